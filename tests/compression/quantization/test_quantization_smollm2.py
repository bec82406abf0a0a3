"""Quantization on the real SmolLM2-135M (slow): quality and artifact size bars.

Kept short for CI: 8 x 128 calibration tokens, perplexity on 4 x 256 held-out tokens. The bounds
are measured values with a margin (see each test)."""

from __future__ import annotations

import pytest

from modelpress.compression.base import Context
from modelpress.compression.data import default_calibration_text, default_eval_text
from modelpress.compression.evaluation import perplexity
from modelpress.compression.models import load_pretrained, weight_bytes
from modelpress.compression.registry import get_method, parse_params

pytestmark = pytest.mark.slow

CAL = {"num_samples": 8, "seq_len": 128}


def _ppl(model, tok) -> float:
    return perplexity(model, tok, default_eval_text(), seq_len=256, num_chunks=4)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    lm = load_pretrained(smollm2_dir)
    return smollm2_dir, lm.tokenizer, _ppl(lm.model, lm.tokenizer)


def _run(smollm2_dir, tok, name, params, out):
    from transformers import AutoModelForCausalLM

    model = load_pretrained(smollm2_dir).model
    res = get_method(name).apply(model, parse_params(name, params),
                                 Context(tokenizer=tok, calibration_text=default_calibration_text()))
    res.saver(res.model, out)
    return res, AutoModelForCausalLM.from_pretrained(out).eval()


def _rtn_ppl(smollm2_dir, tok, symmetric: bool) -> float:
    """The calibration-free baseline: round to nearest, w4 g64 (the rtn method's defaults)."""
    model = load_pretrained(smollm2_dir).model
    cfg = parse_params("rtn", {"symmetric": symmetric})
    return _ppl(get_method("rtn").apply(model, cfg, Context()).model, tok)


def test_int8_smollm2_ppl_and_size(smol, tmp_path):
    d, tok, dense_ppl = smol
    _res, reloaded = _run(d, tok, "int8", {}, tmp_path)
    ppl = _ppl(reloaded, tok)
    print(f"int8: ppl {ppl:.4f} dense {dense_ppl:.4f} ratio {ppl / dense_ppl:.5f} "
          f"bytes {weight_bytes(tmp_path) / weight_bytes(d):.4f} x fp32")
    # symmetric per-channel rounding (the default): 0.998 x dense on this text (8 x 512 tokens)
    assert ppl <= dense_ppl * 1.002, (ppl, dense_ppl)
    assert weight_bytes(tmp_path) <= 0.45 * weight_bytes(d)


def test_gptq_w4g64_smollm2_size_and_ppl(smol, tmp_path):
    d, tok, dense_ppl = smol
    # with only 1k calibration tokens dampening 0.01 (llm-compressor's default) over-fits the Hessian
    # (measured 1.654 x dense); 0.1 with act-order measured 1.128 x dense; RTN 1.569 x
    params = {"bits": 4, "group_size": 64, "dampening": 0.1, "act_order": True, **CAL}
    _res, reloaded = _run(d, tok, "gptq", params, tmp_path)
    from safetensors import safe_open

    packed = n_q = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if k.endswith(("weight_packed", "weight_scale")):
                packed += t.numel() * t.element_size()
            if k.endswith("weight_shape"):
                n_q += int(t.prod())
    # every Linear but the (tied) head: q, o 576x576; k, v 192x576; gate, up, down 576x1536
    assert n_q == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    # 4 bits + one fp32 scale per 64 weights = 0.5625 bytes per weight
    assert packed <= 0.57 * n_q
    ppl = _ppl(reloaded, tok)
    rtn_ppl = _rtn_ppl(d, tok, symmetric=True)
    print(f"gptq: ppl {ppl:.4f} dense {dense_ppl:.4f} ratio {ppl / dense_ppl:.5f} "
          f"rtn {rtn_ppl:.4f}")
    assert ppl <= dense_ppl * 1.38, (ppl, dense_ppl)
    assert ppl <= 0.9 * rtn_ppl, (ppl, rtn_ppl)  # calibration pays: measured 0.85 x RTN


def test_int8_dynamic_smollm2_ppl(smol):
    d, tok, dense_ppl = smol
    model = load_pretrained(d).model
    res = get_method("int8_dynamic").apply(model, parse_params("int8_dynamic", CAL),
                                           Context(tokenizer=tok))
    ppl = _ppl(res.model, tok)
    print(f"int8_dynamic: ppl {ppl:.4f} dense {dense_ppl:.4f} ratio {ppl / dense_ppl:.5f}")
    # measured 1.0296 x dense here (4 x 256 tokens, 8 x 128 calibration); on the benchmark's
    # 16 x 512 tokens with 8 x 512 calibration 1.011
    assert ppl <= dense_ppl * 1.04, (ppl, dense_ppl)


def test_awq_w4g64_asymmetric_smollm2_ppl(smol, tmp_path):
    d, tok, dense_ppl = smol
    params = {"bits": 4, "group_size": 64, "symmetric": False, **CAL}
    _res, reloaded = _run(d, tok, "awq", params, tmp_path)
    ppl = _ppl(reloaded, tok)
    rtn_ppl = _rtn_ppl(d, tok, symmetric=False)
    print(f"awq asym: ppl {ppl:.4f} dense {dense_ppl:.4f} ratio {ppl / dense_ppl:.5f} "
          f"rtn {rtn_ppl:.4f}")
    # measured 1.117 x dense, 0.907 x RTN w4 g64 asymmetric (77.76)
    assert ppl <= dense_ppl * 1.16, (ppl, dense_ppl)
    assert ppl <= 0.94 * rtn_ppl, (ppl, rtn_ppl)

"""Quantization on the real SmolLM2-135M (slow): quality and artifact size bars."""

from __future__ import annotations

import pytest
import torch

from modelpress.compression.base import Context
from modelpress.compression.data import default_calibration_text, default_eval_text
from modelpress.compression.evaluation import perplexity
from modelpress.compression.models import load_pretrained, weight_bytes
from modelpress.compression.registry import get_method, parse_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    lm = load_pretrained(smollm2_dir)
    ppl = perplexity(lm.model, lm.tokenizer, default_eval_text())
    return smollm2_dir, lm.tokenizer, ppl


def _run(smollm2_dir, tok, name, params, out):
    from transformers import AutoModelForCausalLM

    model = load_pretrained(smollm2_dir).model
    res = get_method(name).apply(model, parse_params(name, params),
                                 Context(tokenizer=tok, calibration_text=default_calibration_text()))
    res.saver(res.model, out)
    return res, AutoModelForCausalLM.from_pretrained(out).eval()


def test_int8_smollm2_ppl_and_size(smol, tmp_path):
    d, tok, dense_ppl = smol
    _res, reloaded = _run(d, tok, "int8", {}, tmp_path)
    ppl = perplexity(reloaded, tok, default_eval_text())
    assert ppl <= dense_ppl * 1.002, (ppl, dense_ppl)
    assert weight_bytes(tmp_path) <= 0.45 * weight_bytes(d)


def test_gptq_w4g64_smollm2_size_and_ppl(smol, tmp_path):
    d, tok, dense_ppl = smol
    # fewer calibration tokens than the default to keep the test short
    _res, reloaded = _run(d, tok, "gptq", {"bits": 4, "group_size": 64, "num_samples": 8,
                                           "seq_len": 256}, tmp_path)
    from safetensors import safe_open

    packed = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(("weight_packed", "weight_scale")):
                t = f.get_tensor(k)
                packed += t.numel() * t.element_size()
    n_q = sum(m.weight.numel() for n, m in reloaded.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # 4 bits + one fp32 scale per 64 weights: about 0.28 of fp16 on the quantized layers
    assert packed <= 0.3 * 2 * n_q
    ppl = perplexity(reloaded, tok, default_eval_text())
    assert ppl <= dense_ppl * 1.25, (ppl, dense_ppl)


def test_int8_dynamic_smollm2_ppl(smol):
    d, tok, dense_ppl = smol
    model = load_pretrained(d).model
    res = get_method("int8_dynamic").apply(model, parse_params("int8_dynamic", {}),
                                           Context(tokenizer=tok))
    ppl = perplexity(res.model, tok, default_eval_text())
    assert ppl <= dense_ppl * 1.02, (ppl, dense_ppl)

"""The FP8 runtime: torch._scaled_mm (real FP8 matmuls) on the artifact's E4M3 weights gives the
artifact's numbers (the fake-quantized reference up to float summation order), from the
in-memory model and from the artifact loaded by ``modelpress.runtime.load``; on a machine
without a native FP8 GPU "auto" leaves the model as loaded. CUDA cases run where a GPU with
FP8 (compute capability 8.9+) is present."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress import runtime
from modelpress.compression import Context, compress, parse_params
from modelpress.compression.quantization import fp8_runtime as R
from modelpress.compression.quantization import fpformats as F

IDS = torch.tensor([[5, 9, 17, 33, 60, 7, 81, 200, 3, 44, 12, 99]])
CAL = {"num_samples": 4, "seq_len": 32, "dense_dtype": "float32"}
NATIVE = R.native_fp8()
needs_fp8_gpu = pytest.mark.skipif(not NATIVE, reason="no CUDA device with native FP8 here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_equals_the_fake_quantized_reference(static):
    torch.manual_seed(0)
    w, x, bias = torch.randn(48, 64), torch.randn(3, 5, 64) * 4, torch.randn(48)
    x[0, 0, 7] = 300.0  # an outlier token: its own scale
    q, s = F.fp8_channel(w)
    si = F.fp8_scale(x.abs().amax()).reshape(1) if static else None
    lin = R.Fp8Linear(q, s, bias, si, always_scaled_mm=True)
    xq = F.fake_fp8_static(x, si) if static else F.fake_fp8_tokens(x)
    ref = torch.nn.functional.linear(xq, F.fp8_dequant(q, s), bias)
    y = lin(x)
    assert y.shape == ref.shape == (3, 5, 48) and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-6
    lin.always_scaled_mm = False  # the float fallback: the reference's own arithmetic
    assert _rel(lin(x), ref) < 1e-6
    lin.to(torch.bfloat16)  # a dtype cast keeps the format: FP8 codes, float32 scales
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.bfloat16
    y16 = lin(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and _rel(y16, ref) < 2e-2


def test_fp8_linear_refuses_a_float_weight():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        R.Fp8Linear(torch.randn(16, 16), torch.ones(16, 1))


def _artifact(model, tok, params, path):
    res = compress(model, parse_params("fp8", {**CAL, **params}), Context(tokenizer=tok))
    res.saver(res.model, path)
    (path / "report.json").write_text(json.dumps(
        {"recipe": [{"method": "fp8", "params": {**CAL, **params}}]}))
    return res.model


@pytest.mark.parametrize("params", [{}, {"activations": "static"}])
def test_scaled_mm_runtime_serves_the_artifact(tiny_llama, tiny_tokenizer, tmp_path, params):
    mem = _artifact(tiny_llama, tiny_tokenizer, params, tmp_path)
    with torch.no_grad():
        ref = mem(input_ids=IDS).logits
    loaded = runtime.load(tmp_path)
    assert R.runtime_linears(loaded) == (28 if NATIVE else 0)  # auto: native FP8 only
    fast = R.to_runtime(runtime.load(tmp_path), kernels="scaled_mm")
    assert R.runtime_linears(fast) == 28  # 4 layers x q/k/v/o/gate/up/down; the head stays
    assert isinstance(fast.lm_head, torch.nn.Linear)
    static = [m.input_scale is not None for m in fast.modules() if isinstance(m, R.Fp8Linear)]
    assert all(static) if params else not any(static)
    with torch.no_grad():
        y, y_loaded = fast(input_ids=IDS).logits, loaded(input_ids=IDS).logits
        y_mem = R.to_runtime(mem, kernels="scaled_mm")(input_ids=IDS).logits
    assert torch.equal(y_loaded, ref)  # loaded as is: the artifact's numbers
    assert _rel(y, ref) < 1e-5 and _rel(y_mem, ref) < 1e-5
    fast.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)  # serves a decode too


def test_runtime_load_in_bfloat16_keeps_float32_scales(tiny_llama, tiny_tokenizer, tmp_path,
                                                        monkeypatch):
    """On a machine with an FP8 GPU (pretended here) ``runtime.load`` swaps the Linears and puts
    the artifact's float32 scales on them; inputs off the GPU take the float path."""
    from safetensors import safe_open

    _artifact(tiny_llama, tiny_tokenizer, {}, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    monkeypatch.setattr(R, "native_fp8", lambda device=None: device is None)
    fast = runtime.load(tmp_path, dtype=torch.bfloat16)
    up = fast.model.layers[1].mlp.up_proj
    assert isinstance(up, R.Fp8Linear) and up.weight_scale.dtype == torch.float32
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        exact = f.get_tensor("model.layers.1.mlp.up_proj.weight_scale")
    assert exact.dtype == torch.float32 and torch.equal(up.weight_scale, exact.reshape(1, -1))
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        err_plain = _rel(plain(input_ids=IDS).logits, want)
        err = _rel(fast(input_ids=IDS).logits, want)  # the float fallback, in bfloat16
        for m in fast.modules():
            if isinstance(m, R.Fp8Linear):
                m.always_scaled_mm = True
        err_mm = _rel(fast(input_ids=IDS).logits, want)
    assert err < 1.2 * err_plain and err_mm < 1.2 * err_plain  # no worse than plain bfloat16


def test_fp8_artifact_recognised_without_a_report(tiny_llama, tiny_tokenizer, tmp_path):
    _artifact(tiny_llama, tiny_tokenizer, {}, tmp_path)
    (tmp_path / "report.json").unlink()
    from transformers import AutoConfig

    served = runtime.served_method(tmp_path, AutoConfig.from_pretrained(tmp_path))
    assert served is not None and served[0].name == "fp8"


def test_block_fp8_stays_on_the_loaded_path(tiny_llama, tiny_tokenizer, tmp_path):
    _artifact(tiny_llama, tiny_tokenizer, {"block": [16, 16]}, tmp_path)
    model = R.to_runtime(runtime.load(tmp_path), kernels="scaled_mm")
    assert R.runtime_linears(model) == 0  # block scales: no per-row scaled matmul


def test_int8_dynamic_artifact_refuses_a_gpu_device(tiny_llama, tiny_tokenizer, tmp_path):
    res = compress(tiny_llama, parse_params("int8_dynamic", {"smoothing_alpha": None}),
                   Context(tokenizer=tiny_tokenizer))
    res.saver(res.model, tmp_path)
    with pytest.raises(ValueError, match="run on the CPU"):
        runtime.load(tmp_path, device="cuda")


@needs_fp8_gpu
def test_scaled_mm_on_the_gpu(tiny_llama, tiny_tokenizer, tmp_path):
    mem = _artifact(tiny_llama, tiny_tokenizer, {}, tmp_path)
    with torch.no_grad():
        ref = mem(input_ids=IDS).logits
        fast = runtime.load(tmp_path, dtype=torch.bfloat16, device="cuda")
        assert R.runtime_linears(fast) == 28
        y = fast(input_ids=IDS.cuda()).logits.cpu()
    assert _rel(y, ref) < 3e-2  # bfloat16 activations and outputs

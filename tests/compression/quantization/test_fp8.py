"""FP8 W8A8 (dynamic, static, block-wise): artifacts bit-exact with the in-memory model after
plain ``from_pretrained`` (float32 dense tensors), in compressed-tensors' float-quantized layout."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelpress.compression import CompressionError, Context, compress, parse_params
from modelpress.compression.quantization import fpformats as F
from modelpress.compression.registry import get_method

IDS = torch.tensor([[5, 9, 17, 33, 60, 7, 81, 200]])
CAL = {"num_samples": 4, "seq_len": 32, "dense_dtype": "float32"}


def test_e4m3_rounding_and_channel_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    q, s = F.fp8_channel(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (32, 1)
    assert torch.allclose(s.squeeze(1), w.abs().amax(1) / 448)
    err = (F.fp8_dequant(q, s) - w).abs() / w.abs().amax(1, keepdim=True)
    assert err.max() <= 2 ** -4 * 1.01  # half an E4M3 step at the top binade
    qb, sb = F.fp8_block(w, (16, 16))
    assert sb.shape == (2, 4)
    assert torch.allclose(sb[1, 2], w[16:32, 32:48].abs().max() / 448)
    x = torch.randn(2, 3, 64)
    assert torch.equal(F.fake_fp8_tokens(x), F.fake_fp8_tokens(x))  # deterministic
    assert (F.fake_fp8_tokens(x, 16) - x).abs().max() < 0.1


def _compress(model, tok, params, tmp_path):
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    res = compress(model, parse_params("fp8", params), Context(tokenizer=tok))
    res.saver(res.model, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref, y = res.model(input_ids=IDS).logits, back(input_ids=IDS).logits
    return dense, ref, y, json.loads((tmp_path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("params,wstrat,istrat", [
    ({}, "channel", "token"),
    ({"activations": "static"}, "channel", "tensor"),
    ({"block": [16, 16]}, "block", "group"),
])
def test_fp8_variants_reload_bit_exact(tiny_llama, tiny_tokenizer, tmp_path, params, wstrat,
                                       istrat):
    dense, ref, y, qc = _compress(tiny_llama, tiny_tokenizer, {**CAL, **params}, tmp_path)
    assert qc["format"] == "float-quantized"
    (grp,) = qc["config_groups"].values()
    assert grp["weights"]["strategy"] == wstrat and grp["weights"]["type"] == "float"
    assert grp["input_activations"]["strategy"] == istrat
    assert grp["input_activations"]["dynamic"] is (istrat != "tensor")
    assert torch.equal(y, ref)  # what vLLM-format tensors decompress to is the in-memory model
    assert ((ref - dense).norm() / dense.norm()) < 0.15
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        keys = set(f.keys())
    assert w.dtype == torch.float8_e4m3fn
    assert ("model.layers.0.mlp.up_proj.input_scale" in keys) == (istrat == "tensor")


def test_fp8_artifact_size(tiny_llama, tmp_path):
    from modelpress.compression.quantization.artifact import artifact_quantized_bytes

    compress(tiny_llama, parse_params("fp8", {}), Context()).saver(tiny_llama, tmp_path)
    lin_params = sum(m.weight.numel() for n, m in tiny_llama.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        fp8 = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith("proj.weight"))
    assert fp8 == lin_params  # one byte per weight
    assert artifact_quantized_bytes(tmp_path)[1] > 0


def test_fp8_refusals():
    from transformers import BertConfig, LlamaConfig

    with pytest.raises(CompressionError, match="bert"):
        get_method("fp8").check_model(parse_params("fp8", {"activations": "static"}), BertConfig())
    get_method("fp8").check_model(parse_params("fp8", {}), BertConfig())  # dynamic: any model
    with pytest.raises(CompressionError, match="block width 128"):
        get_method("fp8").check_model(parse_params("fp8", {"block": [128, 128]}),
                                      LlamaConfig(hidden_size=576, intermediate_size=1536))
    with pytest.raises(ValidationError, match="block"):
        parse_params("fp8", {"block": [128]})


def test_fp8_dynamic_on_an_encoder(tiny_bert, tmp_path):
    """The data-free variants need no family table: BERT too, reloaded bit-exact."""
    from transformers import AutoModel

    res = compress(tiny_bert, parse_params("fp8", {"dense_dtype": "float32"}), Context())
    res.saver(res.model, tmp_path)
    back = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        y, ref = back(input_ids=IDS).last_hidden_state, res.model(input_ids=IDS).last_hidden_state
    assert torch.equal(y, ref)

"""FP8 KV cache: per-layer k/v scales calibrated on data, written as ``self_attn.k_scale`` /
``v_scale`` with a compressed-tensors ``kv_cache_scheme``; the reload fake-quantizes keys and
values exactly as the in-memory model does."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelpress.compression import Context, compress, parse_params

IDS = torch.tensor([[5, 9, 17, 33, 60, 7, 81, 200]])
CAL = {"num_samples": 4, "seq_len": 32, "dense_dtype": "float32"}


def test_kv_cache_scales_written_and_applied(tiny_llama, tiny_tokenizer, tmp_path):
    import copy

    plain = copy.deepcopy(tiny_llama)
    res = compress(tiny_llama, parse_params("fp8", {**CAL, "kv_cache": True}),
                   Context(tokenizer=tiny_tokenizer))
    compress(plain, parse_params("fp8", {"dense_dtype": "float32"}), Context())
    assert res.metrics["kv_layers"] == 4
    res.saver(res.model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["num_bits"] == 8
    assert qc["kv_cache_scheme"]["strategy"] == "tensor"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        ks = [f.get_tensor(f"model.layers.{i}.self_attn.k_scale") for i in range(4)]
        vs = f.get_tensor("model.layers.3.self_attn.v_scale")
    assert all(k.dtype == torch.float32 and k.shape == (1,) and k.item() > 0 for k in ks)
    assert len({k.item() for k in ks}) == 4  # one calibrated scale per layer
    assert vs.item() > 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        y, ref = back(input_ids=IDS).logits, res.model(input_ids=IDS).logits
        no_kv = plain(input_ids=IDS).logits
    assert torch.equal(y, ref)
    assert not torch.equal(ref, no_kv)  # keys/values really are quantized
    assert ((ref - no_kv).norm() / no_kv.norm()) < 0.1

"""NVFP4 / MXFP4: numerics against compressed-tensors' own, artifacts reloaded with plain
``from_pretrained`` (which decompresses them on CPU) against the in-memory fake-quantized model."""

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
CAL = {"num_samples": 4, "seq_len": 32}


def test_e2m1_codes_and_packing_match_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    torch.manual_seed(0)
    x = torch.randn(8, 32) * 3
    codes = F.e2m1_codes(x)
    vals = F.e2m1_values(codes)
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6])
    # nearest grid value (ties measure zero for random input), saturating at 6
    want = torch.sign(x) * grid[(x.abs().unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.equal(vals, want)
    packed = F.pack_e2m1(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 16)
    assert torch.equal(packed, pack_fp4_to_uint8(vals))
    assert torch.equal(unpack_fp4_from_uint8(packed, 8, 32, torch.float32), vals)
    assert torch.equal(F.unpack_e2m1(packed), codes)


def test_nvfp4_scales_and_search():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    codes, s, gs = F.nvfp4_quantize(w)
    assert torch.allclose(gs, torch.tensor([448 * 6 / w.abs().max()]))
    assert torch.equal(F.round_e4m3(s), s) and s.max() <= 448
    plain = (F.nvfp4_dequant(codes, s, gs) - w).square().sum()
    c2, s2, _ = F.nvfp4_quantize(w, search=(1.0, 0.9, 0.8))
    searched = (F.nvfp4_dequant(c2, s2, gs) - w).square().sum()
    assert searched < plain  # per group the search keeps the better candidate
    assert (plain.sqrt() / w.norm()) < 0.12


def test_mxfp4_power_of_two_scales():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    codes, e = F.mxfp4_quantize(w, search=False)
    amax = w.reshape(16, 2, 32).abs().amax(-1)
    assert torch.equal(e.float() - 127, torch.floor(torch.log2(amax)) - 2)
    deq = F.mxfp4_dequant(codes, e)
    c2, e2 = F.mxfp4_quantize(w, search=True)
    assert (F.mxfp4_dequant(c2, e2) - w).norm() <= (deq - w).norm()


def _run(tiny_llama, tokenizer, name, params, tmp_path):
    with torch.no_grad():
        dense = tiny_llama(input_ids=IDS).logits
    res = compress(tiny_llama, parse_params(name, params), Context(tokenizer=tokenizer))
    res.saver(res.model, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    return dense, res.model, back


@pytest.mark.parametrize("search", [True, False])
def test_nvfp4_w4a16_artifact(tiny_llama, tmp_path, search):
    from modelpress.compression.quantization.fp8 import FP_ATTR

    dense, model, back = _run(tiny_llama, None, "nvfp4",
                                {"scale_search": search, "awq": False}, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and qc["ignore"] == ["lm_head"]
    (grp,) = qc["config_groups"].values()
    assert grp["weights"]["strategy"] == "tensor_group" and grp["weights"]["group_size"] == 16
    assert grp.get("input_activations") is None
    lin = model.model.layers[0].mlp.down_proj
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        p = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        gs = f.get_tensor("model.layers.0.mlp.down_proj.weight_global_scale")
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
    assert p.dtype == torch.uint8 and p.shape == (64, 64)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (64, 8)
    # what the artifact holds is exactly the in-memory model's weight
    assert torch.equal(F.nvfp4_dequant(F.unpack_e2m1(p), s.float(), gs), lin.weight)
    assert getattr(lin, FP_ATTR).fmt == "nvfp4-pack-quantized"
    # reload: compressed-tensors decompresses to bfloat16 (config dtype), so compare in bf16 terms
    assert back.dtype == torch.bfloat16
    with torch.no_grad():
        y, ref = back(input_ids=IDS).logits.float(), model(input_ids=IDS).logits
    assert ((y - ref).norm() / ref.norm()) < 2e-2
    assert ((ref - dense).norm() / dense.norm()) < 0.4


def test_gptq_nvfp4_lowers_the_output_error():
    from modelpress.compression.quantization.fp_gptq import gptq_nvfp4

    for seed in range(3):
        torch.manual_seed(seed)
        w, x = torch.randn(48, 160), torch.randn(400, 160)
        x[:, 3] = 0  # an input that never fires
        gs = F.nvfp4_global_scale(w.abs().amax())
        codes, scale, g = gptq_nvfp4(w, x.T @ x, gs, (1.0,))
        c0, s0, g0 = F.nvfp4_quantize(w, gs)
        assert torch.equal(g, g0)  # the global scale is the given one; group scales are
        assert torch.equal(F.round_e4m3(scale), scale)  # E4M3 values, set as GPTQ reaches them
        ref = w @ x.T
        err_gptq = (F.nvfp4_dequant(codes, scale, g) @ x.T - ref).norm() / ref.norm()
        err_rtn = (F.nvfp4_dequant(c0, s0, g0) @ x.T - ref).norm() / ref.norm()
        assert err_gptq < 0.95 * err_rtn


@pytest.mark.parametrize("opts", [{"gptq": True}, {"awq": True}, {"awq": True, "gptq": True}])
def test_nvfp4_calibrated_artifact(tiny_llama, tiny_tokenizer, tmp_path, opts):
    """AWQ scales folded in and/or GPTQ rounding: the artifact holds exactly the in-memory
    weights, q/k/v still share one global scale, and the reload runs as the in-memory model."""
    dense, model, back = _run(tiny_llama, tiny_tokenizer, "nvfp4", {**opts, **CAL}, tmp_path)
    lin = model.model.layers[0].mlp.down_proj
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        p = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        gs = f.get_tensor("model.layers.0.mlp.down_proj.weight_global_scale")
        qkv = {f.get_tensor(f"model.layers.1.self_attn.{n}_proj.weight_global_scale").item()
               for n in "qkv"}
    assert torch.equal(F.nvfp4_dequant(F.unpack_e2m1(p), s.float(), gs), lin.weight)
    assert len(qkv) == 1
    with torch.no_grad():
        y, ref = back(input_ids=IDS).logits.float(), model(input_ids=IDS).logits
    assert ((y - ref).norm() / ref.norm()) < 2e-2
    assert ((ref - dense).norm() / dense.norm()) < 0.4


def test_nvfp4_fused_linears_share_one_weight_global_scale(tiny_llama, tmp_path):
    """vLLM multiplies q/k/v (and gate/up) as one fused matmul with one weight global scale:
    the artifact gives every Linear of such a group the same one, from the group's largest
    weight; o_proj and down_proj keep their own."""
    lins = {n: m.weight.abs().amax().item() for n, m in tiny_llama.named_modules()
            if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)}
    _run(tiny_llama, None, "nvfp4", {"awq": False}, tmp_path)
    pre = "model.layers.0."
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        gs = {n[len(pre):-len(".weight_global_scale")]: f.get_tensor(n).item()
              for n in f.keys() if n.startswith(pre) and n.endswith("weight_global_scale")}
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert len({gs[n] for n in qkv}) == 1 and gs["mlp.gate_proj"] == gs["mlp.up_proj"]
    want = F.nvfp4_global_scale(max(lins[pre + n] for n in qkv)).item()
    assert gs["self_attn.q_proj"] == pytest.approx(want, rel=1e-6)
    assert gs["self_attn.o_proj"] == pytest.approx(
        F.nvfp4_global_scale(lins[pre + "self_attn.o_proj"]).item(), rel=1e-6)


def test_nvfp4_w4a4_calibrated_global_scale(tiny_llama, tiny_tokenizer, tmp_path):
    _dense, model, back = _run(tiny_llama, tiny_tokenizer, "nvfp4",
                               {"activations": "dynamic", **CAL}, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (grp,) = qc["config_groups"].values()
    assert grp["input_activations"]["dynamic"] == "local"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        igs = f.get_tensor("model.layers.1.self_attn.o_proj.input_global_scale")
    assert igs.shape == (1,) and 0 < igs.item() < float("inf")
    # one Linear's activation quantization: ours == compressed-tensors' on the reloaded module
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    mod = back.model.layers[1].self_attn.o_proj
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    theirs = forward_quantize(mod, x, "input", mod.quantization_scheme.input_activations)
    ours = F.fake_nvfp4_act(x, igs)
    assert ((ours.float() - theirs.float()).norm() / theirs.float().norm()) < 1e-2
    # whole model: the reload (bf16 activations before FP4 rounding, 4-bit activations on a
    # random tiny model amplify every flipped code) stays near the in-memory bf16 model
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(input_ids=IDS).logits.float()
        y = back(input_ids=IDS).logits.float()
    err = ((y - ref).norm() / ref.norm()).item()
    print("w4a4 reload vs in-memory bf16", err)
    assert err < 0.15


def test_mxfp4_artifact(tiny_llama, tmp_path):
    _dense, model, back = _run(tiny_llama, None, "mxfp4", {}, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp4-pack-quantized"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        e = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert e.dtype == torch.uint8 and e.shape == (64, 2)
    with torch.no_grad():
        y, ref = back(input_ids=IDS).logits.float(), model(input_ids=IDS).logits
    assert ((y - ref).norm() / ref.norm()) < 2e-2


def test_fp4_group_sizes_are_checked_at_submission(tiny_llama):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=72, intermediate_size=144, num_attention_heads=4, head_dim=18)
    for name in ("nvfp4", "mxfp4"):
        with pytest.raises(CompressionError, match="72"):
            get_method(name).check_model(parse_params(name, {}), cfg)
    with pytest.raises(ValidationError, match="activations"):
        parse_params("nvfp4", {"activations": "static"})

"""FP4 (E2M1) weight quantization: NVFP4 (groups of 16, E4M3 scales under an fp32 per-tensor
global scale; weight-only W4A16 or with NVFP4 activations W4A4) and MXFP4 (groups of 32,
power-of-two E8M0 scales, weight-only). Numerics in :mod:`.fpformats`; the artifact writer and
the in-memory contract (:class:`.fp8.FPWeight`) are shared with :mod:`.fp8`."""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..base import (
    CalibrationConfig,
    CompressionError,
    CompressionResult,
    Context,
    Method,
    MethodConfig,
    hf,
    hf_config,
)
from ..calib.engine import Step, calibration_tokens, input_stats, run_sequential
from ..calib.families import shared_inputs, supporting
from . import fpformats as F
from .artifact import DenseDtype
from .common import dense_dtype_field, model_in_features, target_linears
from .fp8 import FP_ATTR, FPWeight, _input_amax, _prefix, attach_fp, fp_saver
from .fp_gptq import gptq_nvfp4
from .layerwise import fold_awq_scales

#: candidate fractions of a group's max mapped onto E2M1's 6 in the NVFP4 scale search
NVFP4_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _args(preset: str, part: str) -> dict[str, Any]:
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    args: dict[str, Any] = PRESET_SCHEMES[preset][part].model_dump(exclude_none=True, mode="json")
    return args


def _check_groups(in_features: dict[str, int], g: int, name: str) -> None:
    bad = sorted({f for f in in_features.values() if f % g})
    if bad:
        raise CompressionError(f"{name} quantizes groups of {g} input features; in_features "
                               f"{bad} are not multiples of {g}")


# ------------------------------------------------------------------------------------ NVFP4


class NVFP4Config(CalibrationConfig):
    activations: Literal["none", "dynamic"] = Field(
        "none", description="'none': weight-only W4A16 (NVFP4A16); 'dynamic': W4A4 (NVFP4), "
        "activations in groups of 16 with dynamic E4M3 scales under a per-tensor global scale "
        "calibrated on data (max |input| over the calibration tokens).")
    scale_search: bool = Field(
        False, description="Per group, try shrinking the max mapped to 6 (1.0 .. 0.75 of it) and "
        "keep the scale with the smallest squared rounding error (after the scale itself is "
        "rounded to E4M3); off: plain min/max. The smaller weight error clips each group's "
        "largest weights, which costs held-out perplexity: off by default.")
    awq: bool | None = Field(
        None, description="Fold activation-aware (AWQ) per-input-channel scales into each "
        "block first, searched under NVFP4 rounding (q/k/v and gate/up with their shared "
        "global scale); needs calibration data. null: on for the model families whose norms "
        "take a scale (decoder LMs), off otherwise.")
    gptq: bool = Field(
        False, description="Round the FP4 weights with GPTQ's error feedback (the Hessian of "
        "calibration inputs), each group's scale set when GPTQ reaches it: same artifact format, "
        "lower output error on the calibration inputs; needs calibration data.")
    dampening: float = Field(
        0.01, gt=0, le=1, description="GPTQ: added to the Hessian diagonal, as a fraction of "
        "its mean.")
    num_samples: int = Field(16, ge=1, le=4096,
                             description="Calibration sequences (W4A4 and gptq).")
    batch_size: int = Field(2, ge=1, le=256, description="Calibration sequences per forward.")
    dense_dtype: DenseDtype = dense_dtype_field()


def weight_global_scales(model: nn.Module, lins: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Each Linear's NVFP4 weight global scale: one per group of Linears that read the same
    tensor (q/k/v, gate/up, from the family table), from the group's largest weight, as vLLM
    fuses them into one matmul with one global scale; a Linear of no group has its own."""
    amax = {n: lin.weight.detach().abs().amax().float() for n, lin in lins.items()}
    out = {n: F.nvfp4_global_scale(a) for n, a in amax.items()}
    for names in shared_inputs(model):
        for prefix in {n.rpartition(names[0])[0] for n in lins if n.endswith(names[0])}:
            group = [prefix + m for m in names]
            if all(g in lins for g in group):
                gs = F.nvfp4_global_scale(torch.stack([amax[g] for g in group]).amax())
                out.update(dict.fromkeys(group, gs))
    return out


def _nvfp4_weight(lin: nn.Linear, cfg: NVFP4Config, input_gs: torch.Tensor | None,
                  weight_gs: torch.Tensor, hessian: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, FPWeight]:
    w = lin.weight.detach()
    search = NVFP4_SEARCH if cfg.scale_search else (1.0,)
    if hessian is None:
        codes, scale, gs = F.nvfp4_quantize(w, weight_gs, search=search)
    else:
        codes, scale, gs = gptq_nvfp4(w, hessian, weight_gs, search, cfg.dampening)
    deq = F.nvfp4_dequant(codes, scale, gs)
    tensors = {"weight_packed": F.pack_e2m1(codes), "weight_scale": scale.to(torch.float8_e4m3fn),
               "weight_global_scale": gs.float()}
    if input_gs is None:
        return deq, FPWeight("nvfp4-pack-quantized", tensors, _args("NVFP4A16", "weights"))
    tensors["input_global_scale"] = input_gs.float().cpu()
    act = lambda x, _g=input_gs.to(w.device): F.fake_nvfp4_act(x, _g)  # noqa: E731
    return deq, FPWeight("nvfp4-pack-quantized", tensors, _args("NVFP4", "weights"),
                         _args("NVFP4", "input_activations"), act)


def _use_awq(cfg: NVFP4Config, model_config: Any) -> bool:
    if cfg.awq is not None:
        return cfg.awq
    return getattr(model_config, "model_type", None) in supporting("folds") & supporting("causal")


def _calibrated_block(model: nn.Module, step: Step, cfg: NVFP4Config, awq: bool
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """A block's calibration for NVFP4: AWQ scales folded in (``awq``), then per Linear of the
    rescaled block (weight global scale, input global scale for W4A4 or None, Hessian for
    ``cfg.gptq`` or None)."""
    need_h = cfg.gptq or awq
    stats = input_stats(step.block, step.inputs, step.groups(), hessian=need_h,
                        abs_mean=awq) if need_h else {}
    if awq:
        def fq(w: torch.Tensor) -> torch.Tensor:  # the stacked group: one global scale
            return F.nvfp4_dequant(*F.nvfp4_quantize(w))

        fold_awq_scales(step.block, step.groups(), step.family, stats, fq)
    amax = _input_amax(step) if cfg.activations != "none" else {}
    wgs = weight_global_scales(model, step.linears())
    return {name: (wgs[name], F.nvfp4_global_scale(amax[name]) if amax else None,
                   stats[name].H if cfg.gptq and name in stats else None)
            for name in step.linears()}


@torch.no_grad()
def apply_nvfp4(model: nn.Module, cfg: NVFP4Config, ctx: Context) -> CompressionResult:
    t0 = time.perf_counter()
    lins = target_linears(model, 16)
    awq = _use_awq(cfg, hf_config(model))
    if cfg.activations == "none" and not cfg.gptq and not awq:
        wgs = weight_global_scales(model, lins)
        for i, (name, lin) in enumerate(lins.items()):
            attach_fp(lin, *_nvfp4_weight(lin, cfg, None, wgs[name]))
            ctx.progress((i + 1) / len(lins), f"quantized {name}")
    else:
        def visit(step: Step) -> None:
            pre = _prefix(model, step)
            scales = _calibrated_block(model, step, cfg, awq)
            for name, lin in step.linears().items():
                if pre + name in lins:
                    wgs_, igs, h = scales[name]
                    attach_fp(lin, *_nvfp4_weight(lin, cfg, igs, wgs_, h))

        run_sequential(model, calibration_tokens(model, cfg, ctx), ctx, visit,
                       batch_size=cfg.batch_size, label="nvfp4 block")
        missing = [n for n, m in lins.items() if getattr(m, FP_ATTR, None) is None]
        if missing:
            raise CompressionError(f"no calibration inputs reached {missing[:3]}")
    return CompressionResult(
        model=model, packed=True, format="compressed-tensors", saver=fp_saver(cfg.dense_dtype),
        metrics={"quantized_linears": float(len(lins)),
                 "compress_seconds": time.perf_counter() - t0})


def _validate_nvfp4(cfg: NVFP4Config, model_config: Any) -> None:
    _check_groups(model_in_features(model_config), 16, "nvfp4")
    mt = getattr(model_config, "model_type", None)
    if (cfg.activations != "none" or cfg.gptq or cfg.awq) and mt not in supporting("causal"):
        raise CompressionError(f"nvfp4 W4A4, awq and gptq calibrate through the family table; "
                               f"model type {mt!r} is not one of {sorted(supporting('causal'))}")
    if cfg.awq and mt not in supporting("folds"):
        raise CompressionError(f"nvfp4 awq folds scales into the norms of model types "
                               f"{sorted(supporting('folds'))}, not {mt!r}")


# ------------------------------------------------------------------------------------ MXFP4


class MXFP4Config(MethodConfig):
    scale_search: bool = Field(
        True, description="Per group, try the OCP exponent (floor(log2 max) - 2, the max may "
        "clip) and one above (no clipping) and keep the smaller squared error; off: OCP only.")
    dense_dtype: DenseDtype = dense_dtype_field()


@torch.no_grad()
def apply_mxfp4(model: nn.Module, cfg: MXFP4Config, ctx: Context) -> CompressionResult:
    t0 = time.perf_counter()
    lins = target_linears(model, 32)
    for i, (name, lin) in enumerate(lins.items()):
        codes, exps = F.mxfp4_quantize(lin.weight.detach(), cfg.scale_search)
        fw = FPWeight("mxfp4-pack-quantized",
                      {"weight_packed": F.pack_e2m1(codes), "weight_scale": exps},
                      _args("MXFP4A16", "weights"))
        attach_fp(lin, F.mxfp4_dequant(codes, exps), fw)
        ctx.progress((i + 1) / len(lins), f"quantized {name}")
    return CompressionResult(
        model=model, packed=True, format="compressed-tensors", saver=fp_saver(cfg.dense_dtype),
        metrics={"quantized_linears": float(len(lins)),
                 "compress_seconds": time.perf_counter() - t0})


def _validate_mxfp4(cfg: MXFP4Config, model_config: Any) -> None:
    _check_groups(model_in_features(model_config), 32, "mxfp4")


def fp4_runtime(model: nn.Module, _cfg: Any = None) -> nn.Module:
    """compressed-tensors decompresses FP4 weights to bfloat16 whatever dtype the rest of the
    model was loaded in (the artifact's config says bfloat16, but a caller may load it in
    float32): one dtype for the whole model, the embeddings'."""
    emb = hf(model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return model if emb is None else model.to(emb.weight.dtype)


NVFP4 = Method(
    name="nvfp4",
    config=NVFP4Config,
    apply=apply_nvfp4,
    description="NVFP4: FP4 E2M1 weights in groups of 16 with E4M3 group scales and an fp32 "
    "global scale (optional per-group scale search); weight-only (W4A16) or with NVFP4 "
    "activations (W4A4, calibrated global activation scale); nvfp4-pack-quantized artifact.",
    family="quantization",
    terminal=True,
    validate=_validate_nvfp4,
    runtime=fp4_runtime,
)

MXFP4 = Method(
    name="mxfp4",
    config=MXFP4Config,
    apply=apply_mxfp4,
    description="MXFP4 weight-only: FP4 E2M1 weights in groups of 32 with power-of-two E8M0 "
    "scales; mxfp4-pack-quantized artifact.",
    family="quantization",
    terminal=True,
    validate=_validate_mxfp4,
    runtime=fp4_runtime,
)

"""W8A8 for CPU serving: int8 weights (per output channel, symmetric) and int8 activations
quantized per token at run time; the kernels and the runtime are ``int8_runtime``.

Optional SmoothQuant smoothing (Xiao et al. 2022) first moves activation outliers into the
weights (``x / s``, ``W * s`` with ``s = max|x|**a / max|W|**(1-a)``, folded into the preceding
norm / Linear), measured on a few calibration sequences.

The in-memory model this method returns runs the int8 kernels (:class:`Int8DynamicLinear`), so
the service's speed measurement is of the real runtime path. The artifact is compressed-tensors
``int-quantized`` (int8 weights + per-channel scales, dynamic per-token int8 activations): vLLM
serves it natively on GPU; plain ``from_pretrained`` on CPU loads it with the weights dequantised
to float and activations fake-quantised (same numbers, float speed): call :func:`to_runtime` on the
loaded model to get the int8 kernels back.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..base import (
    CalibrationConfig,
    CompressionResult,
    Context,
    Method,
    UnsupportedModelError,
    weight_of,
)
from ..calib.engine import (
    Step,
    calibration_tokens,
    can_fold,
    fold_scale,
    input_stats,
    run_sequential,
)
from ..calib.families import supporting
from .artifact import DenseDtype, make_saver
from .common import dense_dtype_field
from .int8_runtime import Int8DynamicLinear, compile_decode, to_runtime

__all__ = ["METHOD", "Int8DynamicConfig", "Int8DynamicLinear", "compile_decode", "smooth_model",
           "to_runtime"]

def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors (inputs are divided, weight columns multiplied)."""
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


class Int8DynamicConfig(CalibrationConfig):
    num_samples: int = Field(8, ge=1, le=4096,
                             description="Calibration sequences (only for smoothing).")
    smoothing_alpha: float | None = Field(
        0.5, ge=0, le=1, description="SmoothQuant migration strength (null: no smoothing, no "
        "calibration needed).")
    quantize_lm_head: bool = Field(
        True, description="Also run the output head in int8 in the CPU runtime (untied from "
        "the float input embedding); in small models the head is a large share of the weights "
        "read per token, so it matters for speed. The artifact keeps the head in float (tied again "
        "where it was, and in the config's ignore list): vLLM's output head takes no quantized weights.")
    keep_float: list[str] = Field(
        default_factory=list, description="Regular expressions of Linear names kept in float "
        "(sensitive layers), e.g. ['layers\\\\.0\\\\.', 'down_proj'].")
    compile_decode: bool = Field(
        False, description="Make the CPU runtime's plain `generate` decode through torch.compile "
        "(inductor) with a static KV cache (see compile_decode); the first generate of each "
        "length compiles (tens of seconds on one core).")
    batch_size: int = Field(4, ge=1, le=256, description="Calibration sequences per pass.")
    dense_dtype: DenseDtype = dense_dtype_field()


@torch.no_grad()
def smooth_model(model: nn.Module, cfg: Int8DynamicConfig, ctx: Context) -> int:
    """Fold SmoothQuant scales into every block, block by block on the calibration engine, for
    each of the family's shared-input groups whose producer takes a scale; returns how many
    groups were smoothed."""
    tokens = calibration_tokens(model, cfg, ctx)
    done = 0

    def visit(step: Step) -> None:
        nonlocal done
        groups = [g for g in step.groups() if can_fold(step.block, g)]
        stats = input_stats(step.block, step.inputs, groups, abs_max=True)
        for g in groups:
            lins = [step.block.get_submodule(n) for n in g.linears]
            w_absmax = torch.stack([weight_of(m).abs().amax(0) for m in lins]).amax(0).float()
            x_absmax = stats[g.linears[0]].abs_max
            assert x_absmax is not None and cfg.smoothing_alpha is not None  # abs_max=True; smoothing on
            s = smoothing_scales(x_absmax, w_absmax, cfg.smoothing_alpha)
            done += fold_scale(step.block, g, s, step.family)

    run_sequential(model, tokens, ctx, visit, batch_size=cfg.batch_size, label="smoothed layer",
                   progress=(0.0, 0.8))
    return done


def apply(model: nn.Module, cfg: Int8DynamicConfig, ctx: Context) -> CompressionResult:
    t0 = time.perf_counter()
    orig = next(model.parameters()).device
    smoothed = 0
    if cfg.smoothing_alpha is not None:
        model.to(ctx.device)
        try:
            smoothed = smooth_model(model, cfg, ctx)
        finally:
            model.to(orig)
    to_runtime(model, cfg.quantize_lm_head, cfg.keep_float, cfg.compile_decode)
    n = sum(isinstance(m, Int8DynamicLinear) for m in model.modules())
    ctx.progress(1.0, f"{n} Linears run in int8")
    return CompressionResult(
        model=model, packed=True, format="compressed-tensors",
        saver=make_saver("int-quantized", activations=True, dense_dtype=cfg.dense_dtype,
                         float_head=True),
        metrics={"quantized_linears": float(n), "smoothed_groups": float(smoothed),
                 "compress_seconds": time.perf_counter() - t0},
    )


def _runtime(model: nn.Module, cfg: Int8DynamicConfig) -> nn.Module:
    return to_runtime(model, cfg.quantize_lm_head, cfg.keep_float, cfg.compile_decode)


def _validate(cfg: Int8DynamicConfig, model_config: Any) -> None:
    model_type = getattr(model_config, "model_type", None)
    folds = supporting("folds")
    if cfg.smoothing_alpha is not None and model_config is not None and model_type not in folds:
        raise UnsupportedModelError(
            f"int8_dynamic's SmoothQuant smoothing folds scales into the norms of model types "
            f"{sorted(folds)}, not {model_type!r}; pass smoothing_alpha: null to quantize "
            "without smoothing")


METHOD = Method(
    name="int8_dynamic",
    config=Int8DynamicConfig,
    apply=apply,
    description="W8A8 for CPU serving: int8 per-channel weights, per-token int8 activations at "
    "run time (torch._int_mm), optional SmoothQuant smoothing; compressed-tensors int-quantized "
    "artifact.",
    family="quantization",
    terminal=True,
    validate=_validate,
    runtime=_runtime,
)

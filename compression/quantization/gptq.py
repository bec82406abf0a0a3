"""GPTQ weight-only quantization, layer by layer, optionally after AWQ scaling."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from ..base import CompressionResult, Context, Method
from ..calib.families import supporting
from .artifact import make_saver
from .common import target_linears, validate_group_size
from .layerwise import WeightCalibConfig, quantize_layerwise


class GPTQConfig(WeightCalibConfig):
    act_order: bool = Field(
        False, description="Quantize columns in order of decreasing Hessian diagonal (scales "
        "then fixed up front per group: 'static groups').")
    dampening: float = Field(
        0.1, gt=0, le=1, description="Added to the Hessian diagonal, as a fraction of its mean. "
        "Larger values pull GPTQ's error feedback towards plain rounding (less fitted to the "
        "calibration text, more stable); llm-compressor's default is 0.01.")
    awq_scaling: bool = Field(
        True, description="Fold activation-aware (AWQ) per-channel scales into each layer before "
        "GPTQ (lower perplexity at the same bits).")
    true_sequential: bool = Field(
        False, description="Within each decoder layer quantize q/k/v, o, gate/up, down in turn, "
        "each from inputs recomputed with the earlier ones already quantized (a cut-short layer "
        "forward per group).")


def apply(model: nn.Module, cfg: GPTQConfig, ctx: Context) -> CompressionResult:
    target_linears(model, cfg.group_size)  # refuse bad group sizes before any work
    metrics = quantize_layerwise(model, cfg, ctx, algorithm="gptq", awq_scaling=cfg.awq_scaling,
                                 act_order=cfg.act_order, dampening=cfg.dampening,
                                 true_sequential=cfg.true_sequential)
    return CompressionResult(model=model, metrics=metrics, packed=True,
                             format="compressed-tensors",
                             saver=make_saver("pack-quantized", dense_dtype=cfg.dense_dtype))


def _validate(cfg: GPTQConfig, model_config: Any) -> None:
    validate_group_size(cfg.group_size, model_config)


METHOD = Method(
    name="gptq",
    config=GPTQConfig,
    apply=apply,
    description="GPTQ: layer-by-layer error-compensating weight quantization with the Hessian of "
    "calibration activations (optional AWQ scaling first, act-order, MSE clipping); packed "
    "compressed-tensors artifact.",
    family="quantization",
    needs_calibration=True,
    prefers_gpu=True,
    architectures=supporting("causal"),
    terminal=True,
    validate=_validate,
)

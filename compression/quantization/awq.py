"""AWQ: activation-aware per-channel weight scaling, then round-to-nearest quantization with a
per-group clipping search that weighs each group's rounding error by its share of the layer's
output error (the group's block of the calibration Gram matrix), both ends of an asymmetric
range searched on their own, and the group scales refitted by least squares."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from ..base import CompressionResult, Context, Method
from ..calib.families import supporting
from .artifact import make_saver
from .common import target_linears, validate_group_size
from .layerwise import WeightCalibConfig, quantize_layerwise


class AWQConfig(WeightCalibConfig):
    grid: int = Field(20, ge=2, le=100, description="Grid points for the scale exponent search.")
    refit_rounds: int = Field(
        3, ge=1, le=20, description="With refit_scales: alternations of re-rounding the weights on "
        "the refitted scales and refitting the scales (a row keeps a round only if its output "
        "error falls).")
    search_clip: float = Field(
        0.9, ge=0.5, le=1.0, description="While the scales are searched, candidates are scored "
        "with each group's range clipped to this fraction of its min/max (a cheap stand-in for "
        "the final quantizer's clipping search; 1.0: plain min/max).")
    clip_error: Literal["block", "diagonal"] = Field(
        "block", description="How the clipping search weighs a group's rounding error: by the "
        "group's diagonal block of the calibration Gram matrix (its share of the layer's output "
        "error, cross-column terms included) or by the Gram diagonal only (cheaper).")
    clip_refine: int = Field(
        2, ge=0, le=5, description="Asymmetric grids: after the common clipping shrink, move each "
        "end of a group's range on its own by up to this many search steps (0: ends move "
        "together).")


def apply(model: nn.Module, cfg: AWQConfig, ctx: Context) -> CompressionResult:
    target_linears(model, cfg.group_size)
    metrics = quantize_layerwise(model, cfg, ctx, algorithm="rtn", awq_scaling=True,
                                 awq_grid=cfg.grid, refit_rounds=cfg.refit_rounds,
                                 awq_search_clip=cfg.search_clip, clip_error=cfg.clip_error,
                                 clip_refine=cfg.clip_refine)
    return CompressionResult(model=model, metrics=metrics, packed=True,
                             format="compressed-tensors",
                             saver=make_saver("pack-quantized", dense_dtype=cfg.dense_dtype))


def _validate(cfg: AWQConfig, model_config: Any) -> None:
    validate_group_size(cfg.group_size, model_config)


METHOD = Method(
    name="awq",
    config=AWQConfig,
    apply=apply,
    description="AWQ: activation-aware per-channel scaling (grid search of the scale exponent per "
    "layer group on calibration data), then per-group rounding with a clipping search; packed "
    "compressed-tensors artifact.",
    family="quantization",
    needs_calibration=True,
    prefers_gpu=True,
    architectures=supporting("causal"),
    terminal=True,
    validate=_validate,
)

"""AWQ: activation-aware per-channel weight scaling, then round-to-nearest quantization with a
clipping search weighted by each input channel's activation energy."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from ..base import CompressionResult, Context, Method
from .artifact import make_saver
from .common import target_linears, validate_group_size
from .gptq import LLAMA_LIKE
from .layerwise import WeightCalibConfig, quantize_layerwise


class AWQConfig(WeightCalibConfig):
    grid: int = Field(20, ge=2, le=100, description="Grid points for the scale exponent search.")
    refit_rounds: int = Field(
        3, ge=1, le=20, description="With refit_scales: alternations of re-rounding the weights on "
        "the refitted scales and refitting the scales (a row keeps a round only if its output "
        "error falls).")


def apply(model: nn.Module, cfg: AWQConfig, ctx: Context) -> CompressionResult:
    target_linears(model, cfg.group_size)
    metrics = quantize_layerwise(model, cfg, ctx, algorithm="rtn", awq_scaling=True,
                                 awq_grid=cfg.grid, refit_rounds=cfg.refit_rounds)
    return CompressionResult(model=model, metrics=metrics, packed=True,
                             format="compressed-tensors",
                             saver=make_saver("pack-quantized", dense_dtype=cfg.dense_dtype))


def _validate(cfg: AWQConfig, model_config) -> None:
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
    architectures=LLAMA_LIKE,
    terminal=True,
    validate=_validate,
)

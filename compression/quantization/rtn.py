"""Round-to-nearest weight-only quantization (no calibration data)."""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..base import CompressionResult, Context, Method, MethodConfig
from .artifact import DenseDtype, make_saver, replace_quantized
from .common import GroupFieldsMixin, dense_dtype_field, group_size_field, target_linears, validate_group_size
from .qtensor import quantize_weight


class RTNConfig(GroupFieldsMixin, MethodConfig):
    bits: int = Field(4, ge=2, le=8, description="Weight bits (2..8).")
    group_size: int | None = group_size_field(64)
    symmetric: bool = Field(False, description="Symmetric (no zero point) or asymmetric grid.")
    mse_clip: bool = Field(
        False, description="Search each group's clipping range for the smallest squared rounding "
        "error instead of plain min/max (clips outliers; off by default: plain min/max keeps "
        "every weight in range).")
    dense_dtype: DenseDtype = dense_dtype_field()


@torch.no_grad()
def apply(model: nn.Module, cfg: RTNConfig, ctx: Context) -> CompressionResult:
    t0 = time.perf_counter()
    lins = target_linears(model, cfg.group_size)
    for i, (name, lin) in enumerate(lins.items()):
        w = lin.weight.detach().to(ctx.device)
        # straight to its integer form: only one float copy at a time
        replace_quantized(model, name, quantize_weight(w, cfg.bits, cfg.group_size,
                                                       cfg.symmetric, mse=cfg.mse_clip))
        ctx.progress((i + 1) / len(lins), f"quantized {name}")
        ctx.check_cancelled()
    return CompressionResult(
        model=model, packed=True, format="compressed-tensors",
        saver=make_saver("pack-quantized", dense_dtype=cfg.dense_dtype),
        metrics={"quantized_linears": float(len(lins)), "bits": float(cfg.bits),
                 "compress_seconds": time.perf_counter() - t0},
    )


def _validate(cfg: RTNConfig, model_config: Any) -> None:
    validate_group_size(cfg.group_size, model_config)


METHOD = Method(
    name="rtn",
    config=RTNConfig,
    apply=apply,
    description="Round-to-nearest weight-only integer quantization (2..8 bits, per group or per "
    "channel, symmetric or asymmetric, optional MSE clipping search); packed compressed-tensors "
    "artifact.",
    family="quantization",
    terminal=True,
    validate=_validate,
)

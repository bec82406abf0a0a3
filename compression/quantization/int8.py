"""Weight-only int8 (per output channel or per group), stored as int8 in the artifact.

The default is plain symmetric per-channel rounding: the asymmetric grid with a clipping search
(the old default) looked better on the WikiText eval text it was chosen on but was worse on
text of another domain (docs/benchmarks.md, "Measurement, issue 17")."""

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


class Int8Config(GroupFieldsMixin, MethodConfig):
    group_size: int | None = group_size_field(None)
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric grid.")
    mse_clip: bool = Field(
        False, description="Search each channel's (group's) clipping range for the smallest "
        "squared weight rounding error instead of plain min/max (clips outliers; off: every "
        "weight stays in range).")
    dense_dtype: DenseDtype = dense_dtype_field()


@torch.no_grad()
def apply(model: nn.Module, cfg: Int8Config, ctx: Context) -> CompressionResult:
    t0 = time.perf_counter()
    lins = target_linears(model, cfg.group_size)
    for i, (name, lin) in enumerate(lins.items()):
        w = lin.weight.detach().to(ctx.device)
        # straight to its integer form: only one float copy at a time
        replace_quantized(model, name, quantize_weight(w, 8, cfg.group_size, cfg.symmetric,
                                                       mse=cfg.mse_clip, grid=40, max_shrink=0.2))
        ctx.progress((i + 1) / len(lins), f"quantized {name}")
        ctx.check_cancelled()
    return CompressionResult(
        model=model, packed=True, format="compressed-tensors",
        # the int8 values packed four to an int32 ("pack-quantized": one byte per weight, the
        # layout compressed-tensors 0.19 picks itself for int weight-only schemes on load)
        saver=make_saver("pack-quantized", dense_dtype=cfg.dense_dtype),
        metrics={"quantized_linears": float(len(lins)), "bits": 8.0,
                 "compress_seconds": time.perf_counter() - t0},
    )


def _validate(cfg: Int8Config, model_config: Any) -> None:
    validate_group_size(cfg.group_size, model_config)


METHOD = Method(
    name="int8",
    config=Int8Config,
    apply=apply,
    description="Weight-only int8 per output channel (or per group), symmetric round-to-nearest "
    "by default (asymmetric grid and clipping search optional); int8 weights in a "
    "compressed-tensors artifact.",
    family="quantization",
    terminal=True,
    validate=_validate,
)

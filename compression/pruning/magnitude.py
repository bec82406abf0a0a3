"""Magnitude pruning: zero the smallest-|w| weights of every Linear but the output head."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..base import CompressionResult, Context, Method, MethodConfig
from ..evaluation import linear_sparsity, prunable_linears
from .masks import global_threshold_masks, nm_mask, parse_nm, row_topk_mask, topk_mask


class MagnitudeConfig(MethodConfig):
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of weights set to zero.")
    scope: Literal["layer", "row", "global"] = Field(
        "layer",
        description="'layer': the same sparsity in every Linear; 'row': in every output row; "
        "'global': one magnitude threshold across all Linears.",
    )
    pattern: str | None = Field(
        None, description="Optional N:M semi-structured pattern, e.g. '2:4' (overrides sparsity)."
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str | None) -> str | None:
        if v is not None:
            parse_nm(v)
        return v


def magnitude_masks(weights: dict[str, torch.Tensor], cfg: MagnitudeConfig) -> dict[str, torch.Tensor]:
    scores = {k: w.detach().abs().float() for k, w in weights.items()}
    if cfg.pattern:
        n, m = parse_nm(cfg.pattern)
        return {k: nm_mask(s, n, m) for k, s in scores.items()}
    if cfg.scope == "global":
        return global_threshold_masks(scores, cfg.sparsity)
    fn = row_topk_mask if cfg.scope == "row" else topk_mask
    return {k: fn(s, cfg.sparsity) for k, s in scores.items()}


@torch.no_grad()
def apply(model: nn.Module, cfg: MagnitudeConfig, ctx: Context) -> CompressionResult:
    linears = prunable_linears(model)
    if cfg.pattern:
        n, m = parse_nm(cfg.pattern)
        bad = [k for k, lin in linears.items() if lin.in_features % m]
        if bad:
            raise ValueError(f"pattern {cfg.pattern}: in_features not divisible by {m} in {bad[:3]}")
    masks = magnitude_masks({k: lin.weight for k, lin in linears.items()}, cfg)
    for i, (k, lin) in enumerate(linears.items()):
        lin.weight.mul_(masks[k].to(lin.weight.dtype))
        ctx.progress((i + 1) / len(linears), f"pruned {k}")
        ctx.check_cancelled()
    return CompressionResult(model=model, metrics={"sparsity_linear": linear_sparsity(model)})


def _validate(cfg: MagnitudeConfig, model_config: Any) -> None:
    from ..base import CompressionError

    if cfg.pattern:
        _, m = parse_nm(cfg.pattern)
        for dim_name in ("hidden_size", "intermediate_size"):
            d = getattr(model_config, dim_name, None)
            if d is not None and d % m:
                raise CompressionError(f"pattern {cfg.pattern}: {dim_name}={d} is not a multiple of {m}")


METHOD = Method(
    name="magnitude",
    config=MagnitudeConfig,
    apply=apply,
    description="Unstructured (or N:M) magnitude pruning of every Linear weight but the output "
    "head, per layer, per row or global.",
    family="pruning",
    validate=_validate,
)

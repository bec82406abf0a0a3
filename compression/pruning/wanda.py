"""Wanda (Sun et al. 2023): prune by |W_ij| x ||X_j||_2, the weight magnitude times the l2 norm
of its input feature over the calibration tokens, compared within each output row. No weight
update: one calibration pass per block."""

from __future__ import annotations

import torch
from torch import nn

from ..base import CompressionResult, Context, Method
from ..calib.engine import InputStats
from ..calib.families import supporting
from . import calibrated
from .masks import nm_mask, row_topk_mask


class WandaConfig(calibrated.CalibratedPruningConfig):
    pass


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` broadcast over rows; ``col_norm`` is ``[in_features]``."""
    return weight.detach().abs().float() * col_norm.float().to(weight.device).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask: per output row, the ``1 - sparsity`` highest scores (or N of every M)."""
    scores = wanda_scores(weight, col_norm)
    return nm_mask(scores, *nm) if nm else row_topk_mask(scores, sparsity)


@torch.no_grad()
def prune_linear(lin: nn.Linear, stats: InputStats, sparsity: float,
                 nm: tuple[int, int] | None) -> None:
    mask = wanda_mask(lin.weight, stats.col_norm, sparsity, nm)
    lin.weight.mul_(mask.to(lin.weight.dtype))


def apply(model: nn.Module, cfg: WandaConfig, ctx: Context) -> CompressionResult:
    return calibrated.run(model, cfg, ctx, prune_linear, hessian=False, label="wanda")


METHOD = Method(
    name="wanda",
    config=WandaConfig,
    apply=apply,
    description="Wanda: prune weights by |W| x input-activation norm per output row, block by "
    "block on calibration text (unstructured or N:M; optional OWL non-uniform sparsity).",
    family="pruning",
    needs_calibration=True,
    prefers_gpu=True,
    architectures=supporting("blocks"),
    validate=calibrated.validate_model,
)

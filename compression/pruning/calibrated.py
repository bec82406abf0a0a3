"""What Wanda and SparseGPT share: the config fields and the run-over-blocks orchestration."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

from pydantic import Field, field_validator, model_validator
from torch import nn

from ..base import CalibrationConfig, CompressionError, CompressionResult, Context
from ..calib.engine import InputStats, block_source, calibration_tokens, find_blocks
from ..evaluation import linear_sparsity, nonzero_count, param_count
from . import layerwise
from .masks import parse_nm


class CalibratedPruningConfig(CalibrationConfig):
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of each Linear's weights set "
                            "to zero (the mean over blocks when owl is on).")
    pattern: str | None = Field(
        None, description="Optional N:M semi-structured pattern, e.g. '2:4' or '4:8': keep N of "
        "every M consecutive input weights (overrides sparsity and owl).")
    sequential: bool = Field(
        True, description="Prune the Linears of a block in execution order (q/k/v, o, gate/up, "
        "down), each group calibrated on inputs produced by the already pruned ones.")
    owl: bool = Field(False, description="OWL non-uniform sparsity: blocks with more outlier "
                      "activations*weights are pruned less (mean sparsity unchanged).")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL: max deviation from the mean.")
    owl_m: float = Field(5.0, gt=1, description="OWL: outlier = score above M x the block mean.")
    owl_samples: int = Field(8, ge=1, le=4096, description="OWL: calibration sequences used to "
                             "measure the outlier distribution (a cheap dense pass).")
    batch_size: int = Field(8, ge=1, le=512, description="Sequences per forward pass.")

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str | None) -> str | None:
        if v is not None:
            parse_nm(v)
        return v

    @model_validator(mode="after")
    def _owl_needs_unstructured(self) -> Self:
        if self.owl and self.pattern:
            raise ValueError("owl sets a different sparsity per block; it cannot be combined with "
                             "an N:M pattern")
        return self


def validate_model(cfg: CalibratedPruningConfig, model_config: Any) -> None:
    if cfg.pattern:
        _, m = parse_nm(cfg.pattern)
        for dim_name in ("hidden_size", "intermediate_size"):
            d = getattr(model_config, dim_name, None)
            if d is not None and d % m:
                raise CompressionError(f"pattern {cfg.pattern}: {dim_name}={d} is not a multiple of {m}")


#: ``prune_linear(linear, stats, sparsity, nm)`` prunes one Linear in place
PruneLinear = Callable[[nn.Linear, InputStats, float, tuple[int, int] | None], None]


def run(model: nn.Module, cfg: CalibratedPruningConfig, ctx: Context, prune_linear: PruneLinear,
        *, hessian: bool, label: str) -> CompressionResult:
    t0 = time.perf_counter()
    nm = parse_nm(cfg.pattern) if cfg.pattern else None
    if nm:
        bad = [f"{k} ({lin.in_features})" for k, lin in
               find_blocks(model)[1].named_modules()
               if isinstance(lin, nn.Linear) and lin.in_features % nm[1]]
        if bad:
            raise CompressionError(f"pattern {cfg.pattern}: in_features not a multiple of {nm[1]}: {bad[:3]}")
    was_training = model.training
    model.eval()
    tokens = calibration_tokens(model, cfg, ctx)
    ctx.event("calibration", {"sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])})
    _, blocks = find_blocks(model)
    per_block = [cfg.sparsity] * len(blocks)
    if cfg.owl and not nm:
        ratios = layerwise.block_outlier_ratios(model, tokens[: cfg.owl_samples], ctx, cfg.owl_m,
                                                cfg.batch_size)
        per_block = layerwise.owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda)
        ctx.event("owl", {"outlier_ratios": ratios, "block_sparsity": per_block})
        ctx.check_cancelled()

    def prune_block(i: int, lins: dict[str, nn.Linear], stats: dict[str, InputStats]) -> None:
        for name, lin in lins.items():
            prune_linear(lin, stats[name], per_block[i], nm)

    layerwise.prune_blockwise(model, tokens, ctx, prune_block, hessian=hessian,
                              sequential=cfg.sequential, batch_size=cfg.batch_size,
                              progress_label=f"{label}: pruned block")
    model.train(was_training)
    metrics = {"compress_seconds": time.perf_counter() - t0}
    if block_source(model) is None:  # a streamed skeleton's blocks are counted as written
        metrics = {"sparsity_linear": linear_sparsity(model),
                   "params": float(param_count(model)),
                   "nonzero_params": float(nonzero_count(model)), **metrics}
    for k, v in metrics.items():
        ctx.metric(k, v, None)
    return CompressionResult(model=model, metrics=metrics)

"""Block-by-block calibrated pruning (Wanda, SparseGPT, ADMM) on the calibration engine.

For every block (:func:`..calib.engine.run_sequential`): the calibration inputs are run through
it with hooks that accumulate each Linear's input statistics, the method prunes it, and the
*pruned* block's outputs become the next block's inputs (so later blocks see, and compensate,
the error of earlier ones). With ``sequential=True`` the Linears of a block are pruned group by
group in execution order (the family table's shared-input groups: q/k/v, then o, then gate/up,
then down for llama), each group seeing inputs produced by the already pruned groups before it;
forwards stop as soon as the group's inputs are collected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..base import Context
from ..calib.engine import InputStats, Step, input_stats, run_sequential

PruneFn = Callable[[int, dict[str, nn.Linear], dict[str, InputStats]], None]


@torch.no_grad()
def prune_blockwise(model: nn.Module, tokens: torch.Tensor, ctx: Context, prune: PruneFn, *,
                    hessian: bool, sequential: bool, batch_size: int = 8,
                    progress_label: str = "pruned block") -> None:
    """Drive ``prune(block_index, {name: Linear}, {name: InputStats})`` over every block; the
    statistics hold ``sq_sum`` (Wanda's ``||X_j||^2``) and, with ``hessian``, ``H``."""
    fields = {"hessian": hessian, "sq_sum": True}

    def visit(step: Step) -> None:
        lins = step.linears()
        groups = step.groups()
        batches = [[g] for g in groups] if sequential else [groups]
        for gs in batches:
            stats = input_stats(step.block, step.inputs, gs, **fields)
            prune(step.index, {n: lins[n] for g in gs for n in g.linears}, stats)

    run_sequential(model, tokens, ctx, visit, batch_size=batch_size, label=progress_label)


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, tokens: torch.Tensor, ctx: Context, m: float,
                         batch_size: int = 8) -> list[float]:
    """OWL's layerwise outlier distribution: for every block, the fraction of its Wanda scores
    ``|W_ij| * ||X_j||`` above ``m`` times the block's mean score (dense model, dense inputs)."""
    ratios: list[float] = []

    def visit(step: Step) -> None:
        lins = step.linears()
        groups = step.groups()
        stats = input_stats(step.block, step.inputs, groups, sq_sum=True)
        names = [n for g in groups for n in g.linears]
        scores = torch.cat([(lins[k].weight.detach().abs().float() * stats[k].col_norm).flatten()
                            for k in names])
        ratios.append(((scores > m * scores.mean()).float().mean()).item())

    # no progress of its own: the pruning pass that follows reports the stage's 0..1
    run_sequential(model, tokens, ctx, visit, batch_size=batch_size, label="OWL: measured block",
                   progress=(0.0, 0.0))
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios (OWL): blocks with more outliers are pruned less;
    the spread is ``[-lam, +lam]`` around ``sparsity`` and the mean equals ``sparsity``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = (r.max() - r.min()).item()
    if span == 0 or lam == 0:
        return [sparsity] * len(ratios)
    density = (r - r.min()) / span * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(min(max(1 - d, 0.0), 0.99)) for d in density]

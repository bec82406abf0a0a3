"""The layer-by-layer driver shared by ``gptq`` and ``awq`` (orchestration only; the math is in
``gptq_math``, ``awq_math`` and ``qtensor``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..base import CalibrationConfig, Context, weight_of
from ..calib.engine import (
    InputStats,
    Step,
    calibration_tokens,
    can_fold,
    fold_scale,
    input_stats,
    run_sequential,
)
from ..calib.families import Family, Group
from ..device import return_freed_memory
from .artifact import DenseDtype, attach, compact
from .awq_math import search_scale
from .common import GroupFieldsMixin, dense_dtype_field, group_size_field
from .gptq_math import gptq_quantize_passes
from .qtensor import (
    QuantizedWeight,
    alternate_refit,
    clipped_qparams,
    dequantize_grouped,
    quantize_grouped,
    quantize_weight,
)


class WeightCalibConfig(GroupFieldsMixin, CalibrationConfig):
    bits: int = Field(4, ge=2, le=8, description="Weight bits (2..8).")
    group_size: int | None = group_size_field(64)
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric grid.")
    mse_clip: bool = Field(
        True, description="Search each group's clipping range (min/max shrunk in steps, lowest "
        "rounding error) instead of plain min/max: outliers are clipped so the rest of the "
        "group gets a finer grid.")
    refit_scales: bool = Field(
        True, description="After rounding, re-solve each row's group scales by least squares "
        "for the chosen integers against the calibration Hessian (lower output error, same "
        "format).")
    gptq_passes: int = Field(
        1, ge=1, le=4, description="gptq only: run GPTQ again on the grids (refitted scales) the "
        "previous pass chose; a row keeps the pass with the lowest output error.")
    batch_size: int = Field(
        2, ge=1, le=256, description="Calibration sequences per forward pass (small batches keep "
        "the transient activation memory low at the same speed on CPU).")
    dense_dtype: DenseDtype = dense_dtype_field()


def _rtn_fake_quant(bits: int, group_size: int | None, symmetric: bool, clip: float = 1.0
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round-to-nearest per group on min/max shrunk to ``clip`` (a cheap stand-in for the final
    quantizer's per-group clipping search while AWQ scales are searched)."""

    def fq(w: torch.Tensor) -> torch.Tensor:
        s, z = clipped_qparams(w, bits, group_size, symmetric, clip)
        return dequantize_grouped(quantize_grouped(w, s, z, bits), s, z)

    return fq


@torch.no_grad()
def apply_awq_scaling(block: nn.Module, groups: list[Group], family: Family,
                      stats: dict[str, InputStats], bits: int, group_size: int | None,
                      symmetric: bool, grid: int = 20, search_clip: float = 1.0
                      ) -> dict[str, InputStats]:
    """Search and fold AWQ scales into ``block`` (function-preserving in float) for every group
    whose producer takes a scale (:func:`can_fold`; e.g. not GQA v_proj -> o_proj: one scale per
    kv channel, tried on SmolLM2 awq asymmetric, did not help: 34.64 -> 35.08); returns the
    input statistics of the rescaled inputs (``stats``' own, rescaled in place). Candidates are
    scored with groups clipped to ``search_clip`` of their range."""
    return fold_awq_scales(block, groups, family, stats,
                           _rtn_fake_quant(bits, group_size, symmetric, search_clip), grid)


@torch.no_grad()
def fold_awq_scales(block: nn.Module, groups: list[Group], family: Family,
                    stats: dict[str, InputStats], fq: Callable[[torch.Tensor], torch.Tensor],
                    grid: int = 20) -> dict[str, InputStats]:
    """:func:`apply_awq_scaling` with the candidates scored under any fake quantizer ``fq``
    (applied to a group's weights stacked: e.g. NVFP4 with the group's one global scale)."""
    for g in groups:
        if not all(n in stats for n in g.linears) or not can_fold(block, g):
            continue
        st = stats[g.linears[0]]
        W = torch.cat([weight_of(block.get_submodule(n)).float() for n in g.linears], 0)
        assert st.abs_mean is not None, "AWQ statistics keep the mean |x|"
        s, _alpha, _err, _base = search_scale(W, st.hessian, st.abs_mean, fq, grid=grid)
        if torch.all(s == 1):
            continue
        fold_scale(block, g, s, family)
        st.scale_(s)  # shared by the group's Linears
    return stats


@torch.no_grad()
def quantize_layerwise(model: nn.Module, cfg: WeightCalibConfig, ctx: Context, *,
                       algorithm: str, awq_scaling: bool, act_order: bool = False,
                       dampening: float = 0.01, awq_grid: int = 20,
                       true_sequential: bool = False, refit_rounds: int = 1,
                       awq_search_clip: float = 1.0, clip_error: str = "diagonal",
                       clip_refine: int = 0) -> dict[str, float]:
    """Quantize every block's Linears in turn on the calibration engine (``algorithm``: "gptq"
    or "rtn" with a Hessian-diagonal-weighted clipping search), optionally after AWQ scaling.
    With ``true_sequential`` the Linears of a block are quantized group by group (the family's
    shared-input groups: q/k/v, o, gate/up, down) and each group's Hessian is taken from inputs
    computed with the earlier groups already quantized (a cut-short block forward per group).
    ``clip_error`` ("diagonal" or "block") and ``clip_refine`` shape the rtn clipping search
    (:func:`search_qparams`, coarse to fine)."""
    t0 = time.perf_counter()
    was = next(model.parameters()).device
    tokens = calibration_tokens(model, cfg, ctx)
    ctx.progress(0.0, f"calibration: {tokens.shape[0]} x {tokens.shape[1]} tokens")
    fields = {"hessian": True, "abs_mean": True}
    n_lin = 0

    def visit(step: Step) -> None:
        nonlocal n_lin
        groups = step.groups()
        stats = input_stats(step.block, step.inputs, groups, **fields)
        if awq_scaling:
            stats = apply_awq_scaling(step.block, groups, step.family, stats, cfg.bits,
                                      cfg.group_size, cfg.symmetric, grid=awq_grid,
                                      search_clip=awq_search_clip)
        lins = step.linears()
        return_freed_memory()  # the forwards' and the scale search's work tensors
        if not true_sequential:
            # each group's statistics are fixed: the widest input first, and each group's
            # statistics freed once it is quantized (a [n, n] Hessian each)
            groups = sorted(groups, key=lambda g: -lins[g.linears[0]].in_features)
        for gi, group in enumerate(groups):
            names = list(group.linears)
            if true_sequential and gi > 0:
                stats.update(input_stats(step.block, step.inputs, [group], **fields))
            if algorithm == "gptq" and len(names) > 1:
                # GPTQ treats output rows independently given H: one pass over the columns
                # for all the Linears reading this input (same result, fewer steps)
                n_lin += _gptq_stacked([lins[n] for n in names], stats[names[0]], cfg,
                                       act_order, dampening)
            else:
                for name in names:
                    n_lin += _quantize_one(lins[name], stats[name], cfg, algorithm, act_order,
                                           dampening, refit_rounds, clip_error, clip_refine)
            for name in names:
                del stats[name]
            return_freed_memory()  # the group's work tensors, before the next group's

    def pack(step: Step) -> None:  # once the block's outputs are propagated
        compact(step.block, model)  # its float weights are not needed any more

    run_sequential(model, tokens, ctx, visit, batch_size=cfg.batch_size, label="quantized layer",
                   after=pack)
    for m in model.modules():  # keep the integer state next to the (moved back) float weights
        qw: Any = getattr(m, "_modelpress_qweight", None)
        if qw is not None:
            qw.scale, qw.zero_point = qw.scale.to(was), qw.zero_point.to(was)
            if qw.q is not None:
                qw.q = qw.q.to(was)
    return {"quantized_linears": float(n_lin), "bits": float(cfg.bits),
            "calibration_tokens": float(tokens.numel()),
            "compress_seconds": time.perf_counter() - t0}


def _gptq(W: torch.Tensor, H: torch.Tensor, cfg: WeightCalibConfig, act_order: bool,
          dampening: float) -> QuantizedWeight:
    return gptq_quantize_passes(W, H, cfg.bits, cfg.group_size, cfg.symmetric,
                                passes=cfg.gptq_passes, act_order=act_order, dampening=dampening,
                                mse=cfg.mse_clip, refit=cfg.refit_scales)


def _quantize_one(lin: nn.Linear, st: InputStats, cfg: WeightCalibConfig, algorithm: str,
                  act_order: bool, dampening: float, refit_rounds: int = 1,
                  clip_error: str = "diagonal", clip_refine: int = 0) -> int:
    if algorithm == "gptq":
        qw = _gptq(lin.weight, st.hessian, cfg, act_order, dampening)
    else:
        qw = quantize_weight(lin.weight, cfg.bits, cfg.group_size, cfg.symmetric,
                             mse=cfg.mse_clip,
                             col_weight=st.hessian if clip_error == "block" else torch.diag(st.hessian),
                             asym_refine=clip_refine, coarse_to_fine=True)
        if cfg.refit_scales:
            qw = alternate_refit(lin.weight, qw, st.hessian, rounds=refit_rounds)
    attach(lin, qw)
    return 1


def _gptq_stacked(lins: list[nn.Linear], st: InputStats, cfg: WeightCalibConfig,
                  act_order: bool, dampening: float) -> int:
    W = torch.cat([lin.weight for lin in lins], 0)
    qw = _gptq(W, st.hessian, cfg, act_order, dampening)
    q = qw.kept_q()
    off = 0
    for lin in lins:
        k = lin.out_features
        part = QuantizedWeight(q[off : off + k].clone(), qw.scale[off : off + k].clone(),
                               qw.zero_point[off : off + k].clone(), qw.bits, qw.group_size,
                               qw.symmetric)
        attach(lin, part)
        off += k
    return len(lins)

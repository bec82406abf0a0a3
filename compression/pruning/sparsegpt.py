"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with an optimal-brain-surgeon weight
update. For each Linear, with ``H = 2/N X^T X`` from the calibration inputs, columns are processed
left to right in blocks: the mask of a block is chosen by the OBS saliency ``w^2 / [H^-1]_cc^2``
(or given, e.g. by Wanda), and the error of every pruned weight is compensated on the
not-yet-processed weights of its row through the Cholesky factor of ``H^-1``."""

from __future__ import annotations

from typing import Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from ..base import CompressionResult, Context, Method
from ..calib.engine import InputStats
from ..calib.families import supporting
from ..quantization.gptq_math import inverse_factor_
from . import calibrated
from .masks import parse_nm
from .wanda import wanda_mask


class SparseGPTConfig(calibrated.CalibratedPruningConfig):
    dampening: float = Field(0.01, gt=0, le=1, description="Added to H's diagonal, as a fraction "
                             "of its mean diagonal, before inversion.")
    block_size: int = Field(128, ge=1, le=8192, description="Columns per lazy-update block (and "
                            "per mask-selection block).")
    mask_selection: Literal["obs", "wanda"] = Field(
        "obs", description="'obs': SparseGPT's adaptive mask from the OBS saliency; 'wanda': the "
        "Wanda mask (per row), then SparseGPT's reconstruction of the kept weights.")

    @model_validator(mode="after")
    def _block_holds_groups(self) -> Self:
        if self.pattern and self.block_size % parse_nm(self.pattern)[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M in {self.pattern}")
        return self


def _inverse_hessian_factor(H: torch.Tensor, dead: torch.Tensor, dampening: float
                            ) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (dead inputs' diagonal set to 1), raising
    the damping until it is positive definite; one [n, n] matrix besides ``H``."""
    damp = None
    for _ in range(6):
        Hd = H.detach().to(dtype=torch.float32, copy=True)
        Hd.diagonal()[dead] = 1.0
        if damp is None:
            damp = dampening * torch.mean(torch.diag(Hd)).clamp_min(1e-8)
        Hd.diagonal().add_(damp)
        if inverse_factor_(Hd):
            return Hd
        del Hd
        damp = damp * 10
    raise RuntimeError("Hessian is not positive definite even with strong dampening")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    dampening: float = 0.01, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep_mask)``: ``weight`` (``[out, in]``) pruned to ``sparsity`` (or
    N of every M kept) with the remaining weights updated to minimise ``||(W - W') X||^2``.
    ``mask`` (True = keep) fixes the pattern instead of choosing it. Pure: inputs untouched."""
    W = weight.detach().clone().float()
    H = H.detach().to(W.device)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(H, dead, dampening)
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.clone().bool().to(W.device)
    pruned_total = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        if mask is None and nm is None:
            # adaptive mask over this column block: exact count so the layer total is exact
            target = int(round(rows * i2 * sparsity))
            k = target - pruned_total
            pruned_total = target
            sal = (W1 ** 2 / d.unsqueeze(0) ** 2).flatten()
            m1 = torch.ones(rows * count, dtype=torch.bool, device=W.device)
            if k > 0:
                m1[torch.argsort(sal, stable=True)[:k]] = False
            keep[:, i1:i2] = m1.view(rows, count)
        for i in range(count):
            c = i1 + i
            if mask is None and nm is not None and c % nm[1] == 0:
                n, m = nm
                sal = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                idx = torch.argsort(sal, dim=1, stable=True)[:, : m - n]
                g = torch.ones_like(sal, dtype=torch.bool)
                g.scatter_(1, idx, False)
                keep[:, c : c + m] = g
            w = W1[:, i]
            q = w * keep[:, c]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W *= keep
    return W.to(weight.dtype), keep


def make_prune_linear(cfg: SparseGPTConfig) -> calibrated.PruneLinear:
    @torch.no_grad()
    def prune_linear(lin: nn.Linear, stats: InputStats, sparsity: float,
                     nm: tuple[int, int] | None) -> None:
        mask = wanda_mask(lin.weight, stats.col_norm, sparsity, nm) if cfg.mask_selection == "wanda" else None
        new, _ = sparsegpt_prune(lin.weight, stats.hessian, sparsity, nm, cfg.block_size, cfg.dampening, mask)
        lin.weight.copy_(new)

    return prune_linear


def apply(model: nn.Module, cfg: SparseGPTConfig, ctx: Context) -> CompressionResult:
    return calibrated.run(model, cfg, ctx, make_prune_linear(cfg), hessian=True, label="sparsegpt")


METHOD = Method(
    name="sparsegpt",
    config=SparseGPTConfig,
    apply=apply,
    description="SparseGPT: second-order (OBS) one-shot pruning with weight reconstruction, block "
    "by block on calibration text (unstructured or N:M; optional OWL non-uniform sparsity).",
    family="pruning",
    needs_calibration=True,
    prefers_gpu=True,
    architectures=supporting("blocks"),
    validate=calibrated.validate_model,
)

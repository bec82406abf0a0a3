"""ADMM pruning: the mask is chosen gradually while the weights are reconstructed, after
Boža (2024), "Fast and Effective Weight Update for Pruned Large Language Models".

For each Linear, with the calibration Hessian ``H = 2/N X^T X`` of its inputs, the layer problem

    min_W  tr((W - W0) H (W - W0)^T)   subject to W having the target sparsity

is split by ADMM into a least-squares variable ``W`` and a sparse copy ``Z``:

    Z = P_s(W + U)                               (keep the largest entries)
    U = U + W - Z
    W = (W0 H + rho (Z - U)) (H + rho I)^-1      (one matmul: the inverse is computed once)

The sparsity ``s`` of the projection grows from 0 to the target on a cubic ramp over the first
``ramp_iterations``, so weights are removed a few at a time while the others already compensate
(SparseGPT instead fixes the mask greedily, one column block at a time, and never revisits it).
Columns are scaled by ``sqrt(diag H)`` first: ``|W_ij| sqrt(H_jj)`` is Wanda's score, and one
``rho`` suits every layer. Finally the kept weights of the final mask are solved exactly for that
mask by conjugate gradients on the masked normal equations.

The tensor math is ``admm_prune`` (pure); orchestration over blocks is ``calibrated.run``.
"""

from __future__ import annotations

from typing import Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn

from ..base import CompressionResult, Context, Method
from ..calib.engine import InputStats
from ..calib.families import supporting
from . import calibrated
from .masks import nm_mask, row_topk_mask


class ADMMConfig(calibrated.CalibratedPruningConfig):
    sequential: bool = Field(
        False, description="Prune the Linears of a block in execution order, each group "
        "calibrated on inputs produced by the already pruned ones (a calibration pass per group "
        "instead of per block: slower); off: one calibration pass per block.")
    iterations: int = Field(8, ge=1, le=500, description="ADMM iterations per Linear.")
    ramp_iterations: int = Field(5, ge=1, le=500, description="Iterations over which the "
                                 "sparsity grows (cubic ramp) to the target; the rest refine "
                                 "the mask at the target sparsity.")
    rho: float = Field(0.5, gt=0, le=1e4, description="ADMM penalty, relative to the "
                       "normalised Hessian (unit diagonal).")
    refine_iterations: int = Field(4, ge=0, le=500, description="Conjugate-gradient steps "
                                   "solving the kept weights exactly for the final mask.")
    scope: Literal["layer", "row"] = Field(
        "layer", description="Compare weights over the whole Linear ('layer', each Linear still "
        "exactly at its sparsity) or within each output row ('row', as Wanda).")
    dampening: float = Field(0.01, gt=0, le=1, description="Added to the normalised Hessian's "
                             "unit diagonal.")

    @model_validator(mode="after")
    def _ramp_within_iterations(self) -> Self:
        if self.ramp_iterations > self.iterations:
            raise ValueError(f"ramp_iterations ({self.ramp_iterations}) must not exceed "
                             f"iterations ({self.iterations})")
        return self


def _ramp(step: int, ramp: int, sparsity: float) -> float:
    p = min(1.0, (step + 1) / ramp)
    return sparsity * (1.0 - (1.0 - p) ** 3)


#: entries sampled to estimate a Linear-wide threshold inside the iterations
_SAMPLE = 1 << 16


def _layer_threshold(a: torch.Tensor, k: int) -> torch.Tensor:
    """About the ``k``-th smallest entry of ``a``: exact for small tensors, else the same
    quantile of an evenly strided sample (an odd stride, so every column is visited). A full
    selection costs as much as the ADMM step itself; the final mask is exact anyway."""
    flat = a.flatten()
    n = flat.numel()
    if n <= 2 * _SAMPLE:
        return torch.kthvalue(flat, k).values
    sample = flat[:: (n // _SAMPLE) | 1]
    kk = min(max(1, round(k * sample.numel() / n)), sample.numel())
    return torch.kthvalue(sample, kk).values


def _exact_layer_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Keep all but the ``k`` smallest entries exactly; among equal values the lower indices go
    first (as a stable sort would), found with one selection instead of a sort."""
    flat = a.flatten()
    thr = torch.kthvalue(flat, k).values
    keep = flat > thr
    missing = flat.numel() - k - int(keep.sum())
    if missing > 0:  # entries equal to the threshold: keep the last ``missing`` of them
        ties = torch.nonzero(flat == thr).flatten()
        keep[ties[-missing:]] = True
    return keep.view_as(a)


def _keep_mask(V: torch.Tensor, sparsity: float, scope: str, nm: tuple[int, int] | None,
               exact: bool) -> torch.Tensor:
    """Keep-mask of the largest ``|V|``: N of every M, per row, or over the whole Linear.
    Inside the iterations a threshold is enough; the final mask is exact."""
    a = V.abs()
    if nm is not None:
        return nm_mask(a, *nm)
    if scope == "row":
        if exact:
            return row_topk_mask(a, sparsity)
        k = int(round(a.shape[1] * sparsity))
        if k <= 0:
            return torch.ones_like(a, dtype=torch.bool)
        return a > torch.kthvalue(a, k, dim=1, keepdim=True).values
    k = int(round(a.numel() * sparsity))
    if k == 0:
        return torch.ones_like(a, dtype=torch.bool)
    return _exact_layer_mask(a, k) if exact else a > _layer_threshold(a, k)


@torch.no_grad()
def admm_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None, *, iterations: int = 8,
               ramp_iterations: int = 5, rho: float = 0.5, refine_iterations: int = 4,
               scope: str = "layer", dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(new_weight, keep_mask)``: ``weight`` (``[out, in]``) pruned to ``sparsity`` (or
    N of every M kept) minimising ``tr((W - W0) H (W - W0)^T)``. Pure: inputs untouched."""
    W0 = weight.detach().float().clone()
    H = H.detach().float().to(W0.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W0[:, dead] = 0.0
    d = torch.diag(H).sqrt()
    Hn = H / d.unsqueeze(1) / d.unsqueeze(0)
    Hn.diagonal().add_(dampening)
    Wn0 = W0 * d
    B = Wn0 @ Hn
    A = Hn.clone()
    A.diagonal().add_(rho)
    L, info = torch.linalg.cholesky_ex(A)
    if info != 0:  # cannot happen for a PSD H with rho > 0, but never fail a job on it
        A.diagonal().add_(10 * rho)
        L = torch.linalg.cholesky(A)
    Ainv = torch.cholesky_inverse(L)
    target = 1.0 - nm[0] / nm[1] if nm else sparsity
    W = Wn0.clone()
    U = torch.zeros_like(W)
    Z = W
    for step in range(iterations):
        V = W + U
        # N:M groups only once the ramp has reached the target; unstructured on the way there
        pattern = nm if step >= ramp_iterations - 1 else None
        keep = _keep_mask(V, _ramp(step, ramp_iterations, target), scope, pattern, exact=False)
        Z = V * keep
        U += W - Z
        W = torch.add(B, Z - U, alpha=rho) @ Ainv
    keep = _keep_mask(Z, target, scope, nm, exact=True)
    X = Z * keep
    # exact least squares of the kept weights for this mask: CG, every row at once
    R = (B - X @ Hn) * keep
    P = R.clone()
    rs = (R * R).sum(1)
    for _ in range(refine_iterations):
        AP = (P @ Hn) * keep
        alpha = rs / (P * AP).sum(1).clamp_min(1e-30)
        X += alpha.unsqueeze(1) * P
        R -= alpha.unsqueeze(1) * AP
        rs_new = (R * R).sum(1)
        P = R + (rs_new / rs.clamp_min(1e-30)).unsqueeze(1) * P
        rs = rs_new
    out = (X / d) * keep
    return out.to(weight.dtype), keep


def make_prune_linear(cfg: ADMMConfig) -> calibrated.PruneLinear:
    @torch.no_grad()
    def prune_linear(lin: nn.Linear, stats: InputStats, sparsity: float,
                     nm: tuple[int, int] | None) -> None:
        new, _ = admm_prune(lin.weight, stats.hessian, sparsity, nm, iterations=cfg.iterations,
                            ramp_iterations=cfg.ramp_iterations, rho=cfg.rho,
                            refine_iterations=cfg.refine_iterations, scope=cfg.scope,
                            dampening=cfg.dampening)
        lin.weight.copy_(new)

    return prune_linear


def apply(model: nn.Module, cfg: ADMMConfig, ctx: Context) -> CompressionResult:
    return calibrated.run(model, cfg, ctx, make_prune_linear(cfg), hessian=True, label="admm")


METHOD = Method(
    name="admm",
    config=ADMMConfig,
    apply=apply,
    description="ADMM pruning: gradual mask selection with an ADMM least-squares weight update, "
    "block by block on calibration text (unstructured or N:M; optional OWL). Lower error than "
    "SparseGPT at a similar cost.",
    family="pruning",
    needs_calibration=True,
    prefers_gpu=True,
    architectures=supporting("blocks"),
    validate=calibrated.validate_model,
)

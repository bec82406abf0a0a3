"""Pure tensor math of GPTQ (Frantar et al. 2022): quantize a weight matrix column by column
and spread each column's rounding error over the not-yet-quantized columns using the inverse
Hessian ``H = 2 X^T X`` of the layer's inputs."""

from __future__ import annotations

import math
from typing import Any

import torch

from .qtensor import (
    QuantizedWeight,
    check_group,
    effective_group,
    qrange,
    refit_scales,
    search_qparams,
)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool, act_order: bool = False, dampening: float = 0.01,
                  mse: bool = False, block_size: int = 128, refit: bool = True,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """Returns the integer weights, scales and zero points of ``W`` ([out, in]).

    Groups are always consecutive runs of ``group_size`` *original* columns (what the artifact
    format stores). Without ``act_order`` each group's scale is chosen when its first column is
    reached, from the error-updated weights; with ``act_order`` (columns processed by decreasing
    Hessian diagonal) all scales are fixed up front from the original weights ("static
    groups"). ``mse`` searches each group's clipping range (min squared error) instead of min/max.
    With ``refit`` the scales are finally re-solved by least squares for the chosen integers
    (:func:`refit_scales`; never increases the layer's output error). ``qparams`` (scale, zero
    point) fixes the groups' grids up front instead of choosing them (a second pass on the
    refitted grids of a first).
    """
    out, n = W.shape
    check_group(group_size, n)
    g = effective_group(group_size, n)
    qmin, qmax = qrange(bits)
    src = W.detach().float()  # the caller's weights (no copy when float32), never modified
    H0 = H.detach().float()  # the caller's Hessian (no copy when float32), never modified
    dead = torch.diag(H0) == 0
    W = src.clone()
    W[:, dead] = 0
    # refit: the weights before the updates (dead inputs' columns 0), the caller's where equal
    W0 = (W.clone() if bool(dead.any()) else src) if refit else W
    del src

    static = act_order or g == n or qparams is not None
    scale = torch.ones(out, n // g, device=W.device)
    zp = torch.zeros(out, n // g, device=W.device)
    if qparams is not None:
        scale, zp = (t.to(W.device).float().clone() for t in qparams)
    elif static:
        scale, zp = search_qparams(W, bits, group_size, symmetric, mse=mse, norm=2.4, grid=25,
                                   max_shrink=0.5)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H0).masked_fill(dead, 1), descending=True)
        W = W[:, perm]
    Hinv = inverse_cholesky(H0, dead, perm, dampening)

    Q = torch.zeros(out, n, dtype=torch.int8, device=W.device)
    # each column's group, on the host (no device read per column)
    col_group = (perm // g).tolist() if perm is not None else [c // g for c in range(n)]
    bs = block_size if static else g * max(1, math.ceil(block_size / g))
    # The column loop is sequential (each column's rounding error updates the ones after it), so
    # on a GPU its cost is the number of tensor ops per column: 9 (symmetric) or 11 here, in
    # place where the values are the same. The integers are not stored per column: the update
    # leaves each finished column of W1 at its dequantized value (w - err * d with err * d =
    # w - dq), from which the block's integers are read back exactly at its end.
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # every column's and row's view made once per block (one op each, not one per column)
        w_cols, err_cols, h_rows = W1.unbind(1), Err1.unbind(1), Hinv1.unbind(0)
        h_diag = Hinv1.diagonal().unbind()
        gi = -1
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                s, z = search_qparams(W1[:, i : i + g], bits, None, symmetric, mse=mse, norm=2.4,
                                      grid=25, max_shrink=0.5)
                scale[:, col // g] = s[:, 0]
                zp[:, col // g] = z[:, 0]
                gi = -1
            if col_group[col] != gi:
                gi = col_group[col]
                s, z = scale[:, gi], zp[:, gi]
            w = w_cols[i]
            q = torch.div(w, s).round_()
            if not symmetric:
                q.add_(z)
            q.clamp_(qmin, qmax)
            if not symmetric:
                q.sub_(z)
            err = err_cols[i]
            torch.sub(w, q.mul_(s), out=err)  # w - dequantized
            err.div_(h_diag[i])
            W1[:, i:].addr_(err, h_rows[i][i:], alpha=-1)
        cols = torch.tensor(col_group[i1:i2], device=W.device)
        Q[:, i1:i2] = torch.clamp(torch.round(W1 / scale[:, cols]) + zp[:, cols], qmin, qmax
                                  ).to(torch.int8)
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    # the refit needs none of these (a 14336-wide Hinv is 822 MB, and a view keeps it alive)
    del Hinv, W, W1, Err1, Hinv1, w_cols, err_cols, h_rows, h_diag
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qw = QuantizedWeight(Q, scale, zp, bits, group_size, symmetric)
    if refit:
        qw = refit_scales(W0, qw, H0)[0]
    return qw


def inverse_factor_(Hw: torch.Tensor) -> bool:
    """Overwrite the symmetric positive definite ``Hw`` with the upper Cholesky factor ``U`` of
    its inverse (``Hw^-1 = U^T U``) and return True; False (``Hw`` overwritten with garbage)
    when it is not positive definite. No second [n, n] matrix: the factorization, the inverse
    and the inverse's factorization each overwrite ``Hw`` (a 14336-wide layer's Hessian is
    822 MB in float32)."""
    # Hw is symmetric, so its transpose (a column-major view of the same memory) is the same
    # matrix in the layout LAPACK works in place on
    F = Hw.mT
    info = torch.zeros((), dtype=torch.int32, device=Hw.device)
    torch.linalg.cholesky_ex(F, out=(F, info))  # F = L (lower), Hw = L L^T
    if int(info) != 0:
        return False
    torch.cholesky_inverse(F, out=F)  # F = Hw^-1 (both triangles)
    torch.linalg.cholesky_ex(F, out=(F, info))  # Hw^-1 = L' L'^T: Hw (row-major) = L'^T = U
    return int(info) == 0


def inverse_cholesky(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None,
                      dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of the dampened Hessian (columns in ``perm``
    order; dead inputs' diagonal set to 1), in one [n, n] matrix besides ``H``
    (:func:`inverse_factor_`)."""
    for extra in (1.0, 11.0):  # not positive definite: once more with more dampening
        Hw = H.clone() if perm is None else H[perm][:, perm]
        Hw.diagonal()[dead if perm is None else dead[perm]] = 1
        Hw.diagonal().add_(extra * dampening * torch.mean(torch.diag(Hw)))
        if inverse_factor_(Hw):
            return Hw
        del Hw
    raise torch.linalg.LinAlgError("the dampened Hessian is not positive definite")


@torch.no_grad()
def gptq_quantize_passes(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None,
                         symmetric: bool, passes: int = 1, **kw: Any) -> QuantizedWeight:
    """:func:`gptq_quantize`, then ``passes - 1`` more passes each run on the grids (refitted
    scales, zero points) the best result so far chose; every output row keeps the pass with
    the lowest output error ``(W - Wq) H (W - Wq)^T``. ``kw`` goes to :func:`gptq_quantize`."""
    best = gptq_quantize(W, H, bits, group_size, symmetric, **kw)
    if passes == 1:
        return best
    Wf, Hf = W.detach().float(), H.float()

    def row_err(qw: QuantizedWeight) -> torch.Tensor:
        D = Wf - qw.dequantize()
        return ((D @ Hf) * D).sum(1)

    best_err = row_err(best)
    kw = {k: v for k, v in kw.items() if k != "mse"}
    for _ in range(passes - 1):
        cand = gptq_quantize(W, H, bits, group_size, symmetric,
                             qparams=(best.scale, best.zero_point), **kw)
        err = row_err(cand)
        better = (err < best_err).unsqueeze(1)
        best = QuantizedWeight(torch.where(better, cand.kept_q(), best.kept_q()),
                               torch.where(better, cand.scale, best.scale),
                               best.zero_point, bits, group_size, symmetric)
        best_err = torch.minimum(err, best_err)
    return best

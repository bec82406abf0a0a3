"""GPTQ's error feedback on a floating-point grid: FP8 E4M3 with one scale per output channel,
and NVFP4 (E2M1 in groups of 16 under E4M3 group scales).

Rounding a weight to E4M3 costs ~2.4% relative error whatever its size (three mantissa bits),
about twice int8's per-channel step on Gaussian weights. GPTQ (Frantar et al. 2022) spreads
each column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = 2 X^T X`` of the layer's calibration inputs, so the layer's *output* error shrinks while
every stored value stays an E4M3 code times the channel's scale (the artifact is unchanged in
format: ``weight`` float8_e4m3fn, ``weight_scale`` per channel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import fpformats as F


def _inverse_factor(h: torch.Tensor, W: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened inverse Hessian; inputs that never fired
    (zero diagonal) get a unit diagonal and their weight columns are zeroed in ``W``."""
    H = h.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(dampening * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite: more dampening once
        H.diagonal().add_(10 * dampening * torch.mean(torch.diag(H)))
        L = torch.linalg.cholesky(H)
    factor: torch.Tensor = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return factor


def _feedback(W: torch.Tensor, Hinv: torch.Tensor,
              rounded: Callable[[int, torch.Tensor], torch.Tensor], block_size: int) -> None:
    """GPTQ's column loop, in place: column ``i`` becomes ``rounded(i, column)`` (a value on
    the grid) and its error is spread over the columns after it."""
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = rounded(i1 + i, W1[:, i])
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)


@torch.no_grad()
def gptq_fp8_channel(w: torch.Tensor, h: torch.Tensor, dampening: float = 0.01,
                     block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes ``[out, in]``, fp32 scale ``[out, 1]``) of ``w`` ``[out, in]`` given the
    Hessian ``h`` ``[in, in]`` of its inputs. The scales are :func:`fpformats.fp8_channel`'s
    (``amax / 448`` of the original rows); values the feedback pushes past 448 saturate."""
    scale = F.fp8_scale(w.float().abs().amax(1, keepdim=True))
    W = w.detach().float().clone()
    Hinv = _inverse_factor(h, W, dampening)
    s = scale[:, 0]
    codes = torch.empty(W.shape, dtype=torch.float8_e4m3fn, device=W.device)

    def rounded(i: int, col: torch.Tensor) -> torch.Tensor:
        codes[:, i] = (col / s).clamp(-F.E4M3_MAX, F.E4M3_MAX).to(torch.float8_e4m3fn)
        return codes[:, i].float() * s

    _feedback(W, Hinv, rounded, block_size)
    return codes, scale


@torch.no_grad()
def gptq_nvfp4(w: torch.Tensor, h: torch.Tensor, global_scale: torch.Tensor,
               search: tuple[float, ...], dampening: float = 0.01, block_size: int = 128
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fpformats.nvfp4_quantize`'s (codes, E4M3 group scales, global scale) with the
    codes chosen by GPTQ's error feedback: the group scales are fixed first from the original
    weights (with the same scale search), then each column is rounded to E2M1 times its
    group's scale, and its error spread over the columns not yet rounded (values pushed past 6
    saturate)."""
    _codes, scale, gs = F.nvfp4_quantize(w, global_scale, search=search)
    step = (scale / gs).to(w.device)  # [out, in / 16]: the dequantization factor per group
    W = w.detach().float().clone()
    Hinv = _inverse_factor(h, W, dampening)
    _feedback(W, Hinv, lambda i, col: F.round_e2m1(col / step[:, i // 16]) * step[:, i // 16],
              block_size)
    codes = F.e2m1_codes(W.reshape(W.shape[0], -1, 16) / step.unsqueeze(-1)).reshape(W.shape)
    return codes, scale, gs

"""GPTQ's error feedback on a floating-point grid (FP8 E4M3 with one scale per output channel).

Rounding a weight to E4M3 costs ~2.4% relative error whatever its size (three mantissa bits),
about twice int8's per-channel step on Gaussian weights. GPTQ (Frantar et al. 2022) spreads
each column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = 2 X^T X`` of the layer's calibration inputs, so the layer's *output* error shrinks while
every stored value stays an E4M3 code times the channel's scale (the artifact is unchanged in
format: ``weight`` float8_e4m3fn, ``weight_scale`` per channel).
"""

from __future__ import annotations

import torch

from . import fpformats as F


@torch.no_grad()
def gptq_fp8_channel(w: torch.Tensor, h: torch.Tensor, dampening: float = 0.01,
                     block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes ``[out, in]``, fp32 scale ``[out, 1]``) of ``w`` ``[out, in]`` given the
    Hessian ``h`` ``[in, in]`` of its inputs. The scales are :func:`fpformats.fp8_channel`'s
    (``amax / 448`` of the original rows); values the feedback pushes past 448 saturate."""
    out, n = w.shape
    scale = F.fp8_scale(w.float().abs().amax(1, keepdim=True))
    W = w.detach().float().clone()
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
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    s = scale[:, 0]
    codes = torch.empty(out, n, dtype=torch.float8_e4m3fn, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = (W1[:, i] / s).clamp(-F.E4M3_MAX, F.E4M3_MAX).to(torch.float8_e4m3fn)
            codes[:, i1 + i] = c
            err = (W1[:, i] - c.float() * s) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
    return codes, scale

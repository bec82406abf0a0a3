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
from .gptq_math import inverse_cholesky


def _inverse_factor(h: torch.Tensor, W: torch.Tensor, dampening: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened inverse Hessian (GPTQ's, see
    :func:`gptq_math.inverse_cholesky`); the weight columns of inputs that never fired (zero
    diagonal) are zeroed in ``W``."""
    H = h.detach().float().to(W.device)
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    return inverse_cholesky(H, dead, None, dampening)


def _feedback(W: torch.Tensor, Hinv: torch.Tensor,
              rounded: Callable[[int, torch.Tensor], torch.Tensor], block_size: int,
              group_start: Callable[[int, torch.Tensor], None] | None = None,
              group_size: int = 1) -> None:
    """GPTQ's column loop, in place: column ``i`` becomes ``rounded(i, column)`` (a value on
    the grid) and its error is spread over the columns after it. ``group_start(i, columns)``
    is called first at every ``group_size``-th column with the group's columns as they are
    then (the earlier columns' errors already spread into them): where a group's scale is set
    (``block_size`` a multiple of ``group_size``)."""
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if group_start is not None and (i1 + i) % group_size == 0:
                group_start(i1 + i, W1[:, i:i + group_size])
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
    codes chosen by GPTQ's error feedback: each group's scale is set (with the same scale
    search) when GPTQ reaches the group, from its weights as the earlier columns' errors have
    left them (so that the feedback is not clipped at the group's original max), then each
    column is rounded to E2M1 times the scale and its error spread over the columns after it.
    The global scale stays the one given (from the original weights)."""
    out, n = w.shape
    W = w.detach().float().clone()
    gs = global_scale.to(W.device)
    scale = torch.empty(out, n // 16, device=W.device)  # stored E4M3 values (times gs)
    Hinv = _inverse_factor(h, W, dampening)

    def group_start(i: int, cols: torch.Tensor) -> None:
        scale[:, i // 16] = F.nvfp4_quantize(cols, gs, search=search)[1][:, 0]

    def rounded(i: int, col: torch.Tensor) -> torch.Tensor:
        step = scale[:, i // 16] / gs
        return F.round_e2m1(col / step) * step

    _feedback(W, Hinv, rounded, block_size, group_start, 16)
    step = (scale / gs).unsqueeze(-1)
    codes = F.e2m1_codes(W.reshape(out, -1, 16) / step).reshape(W.shape)
    return codes, scale, gs

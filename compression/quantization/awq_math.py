"""Pure tensor math of activation-aware weight scaling (AWQ).

For a group of Linears that read the same input ``x`` (e.g. q/k/v after the input norm), the
input channels are scaled by ``s``: ``W' = W * s`` (columns) while the producer of ``x`` divides
its output by ``s`` (a norm's weight or the rows of the previous Linear), so the float function is
unchanged. Salient input channels (large mean |x|) get larger weights and thus a smaller relative
rounding error. ``s = mean|x|**a / mean|w|**(1-a)`` with ``a`` chosen on a grid to minimise the
output error of the quantized group over the calibration tokens. That error is computed exactly
from ``G = X^T X`` (the GPTQ Hessian up to a factor), without touching the tokens again:
``||X W^T - (X/s) Q(W s)^T||^2 = tr(D G D^T)`` with ``D = W - Q(W s) / s``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def output_error(W: torch.Tensor, Wq: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``sum over tokens ||x W^T - x Wq^T||^2`` given ``G = sum x x^T`` (up to G's scale)."""
    D = (W - Wq).float()
    return ((D @ G) * D).sum()


def gram_factor(G: torch.Tensor, rank: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, r)`` with ``G ~= B B^T + diag(r)``: the top-``rank`` eigenpairs of ``G`` plus the
    diagonal of the remainder (activation Gram matrices are dominated by a few directions).
    ``output_error_lr`` with it costs ``rank / in`` of the exact error. ``rank`` None or >= in:
    exact (``r == 0``)."""
    G = G.float()
    n = G.shape[0]
    if rank is None or 2 * rank >= n:
        evals, evecs = torch.linalg.eigh(G)
        return evecs * evals.clamp(min=0).sqrt(), torch.zeros(n, device=G.device)
    # randomized range finder with a fixed seed (a few power iterations; deterministic):
    # far cheaper than a full eigh
    gen = torch.Generator(device=G.device).manual_seed(0)
    Q = torch.randn(n, rank + 8, generator=gen, device=G.device)
    for _ in range(3):
        Q = torch.linalg.qr(G @ Q).Q
    evals, evecs = torch.linalg.eigh(Q.t() @ G @ Q)
    B = (Q @ evecs[:, -rank:]) * evals[-rank:].clamp(min=0).sqrt()
    r = (torch.diagonal(G) - B.square().sum(1)).clamp(min=0)
    return B, r


def output_error_lr(W: torch.Tensor, Wq: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor]
                    ) -> torch.Tensor:
    """``output_error`` with ``G`` given as ``gram_factor(G)``."""
    B, r = factor
    D = (W - Wq).float()
    return (D @ B).square().sum() + (D.square() @ r).sum()


_ROWS_ELEMS = 2**22  # weights fake-quantized at a time (16 MB per float32 copy)


def _error(W: torch.Tensor, s: torch.Tensor | None, fake_quant: FakeQuant,
           factor: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``output_error_lr`` of ``W`` fake-quantized (scaled by ``s`` first when given), a piece
    of rows at a time (rows are quantized independently; a stacked gate/up of Llama-3.1-8B is
    28672 x 4096, 470 MB per float32 copy, and a trial makes several)."""
    step = max(1, _ROWS_ELEMS // W.shape[1])
    err = 0.0
    for a in range(0, W.shape[0], step):
        Wc = W[a : a + step]
        Wq = fake_quant(Wc) if s is None else fake_quant(Wc * s) / s
        err += output_error_lr(Wc, Wq, factor).item()
    return err


def _relative_mean(W: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``|W|`` relative to each row's largest ``|w|`` (a piece of rows at a
    time where ``W`` is large)."""
    step = max(1, _ROWS_ELEMS // W.shape[1])
    if step >= W.shape[0]:
        return (W.abs() / W.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(0)
    total = torch.zeros(W.shape[1], device=W.device)
    for a in range(0, W.shape[0], step):
        Wa = W[a : a + step].abs()
        total += Wa.div_(Wa.amax(dim=1, keepdim=True).clamp(min=1e-8)).sum(0)
    return total / W.shape[0]


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.clamp(min=1e-6).pow(alpha) / w_mean.clamp(min=1e-6).pow(1 - alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(W: torch.Tensor, G: torch.Tensor, x_mean: torch.Tensor, fake_quant: FakeQuant,
                 grid: int = 20, rank: int | None = 64
                 ) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scale for the stacked weights ``W`` ([out_total, in]).

    The output error of every candidate is measured with a rank-``rank`` + diagonal
    approximation of ``G`` (:func:`gram_factor`; None: exact). Returns ``(s, alpha,
    error_with_s, error_without_scaling)``; ``s`` is all ones when no ``alpha`` beats plain
    quantization.
    """
    W = W.float()
    w_mean = _relative_mean(W)
    factor = gram_factor(G, rank)
    base = _error(W, None, fake_quant, factor)
    best_s, best_a, best = torch.ones_like(x_mean), 0.0, base
    tried: dict[int, float] = {}

    def trial(i: int) -> None:
        nonlocal best, best_s, best_a
        if not 0 < i < grid or i in tried:
            return
        s = candidate_scales(x_mean, w_mean, i / grid)
        tried[i] = err = _error(W, s, fake_quant, factor)
        if err < best:
            best, best_s, best_a = err, s, i / grid

    # coarse to fine: every other grid point, then the neighbours of the best one (the same
    # grid, ~40% fewer fake-quantizations; the error is smooth in alpha)
    for i in range(2, grid, 2):
        trial(i)
    if best_a > 0:
        centre = round(best_a * grid)
    else:  # no coarse point beat plain rounding: look next to the smallest coarse error
        centre = min(tried, key=lambda i: tried[i]) if tried else 1
    trial(centre - 1)
    trial(centre + 1)
    if grid <= 3:
        trial(1)
    return best_s, best_a, best, base

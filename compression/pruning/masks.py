"""Pure tensor functions that turn importance scores into pruning masks.

``True`` in a mask means *keep*. All functions are deterministic (ties broken by index).
"""

from __future__ import annotations

import torch


def parse_nm(pattern: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M consecutive input weights."""
    try:
        n_s, m_s = pattern.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest ``(1 - sparsity)`` fraction of ``scores`` over the whole tensor."""
    flat = scores.flatten()
    k_prune = int(round(flat.numel() * sparsity))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k_prune > 0:
        idx = torch.argsort(flat, stable=True)[:k_prune]
        mask[idx] = False
    return mask.view_as(scores)


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest ``(1 - sparsity)`` fraction in every row (output unit)."""
    rows, cols = scores.shape
    k_prune = int(round(cols * sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k_prune > 0:
        idx = torch.argsort(scores, dim=1, stable=True)[:, :k_prune]
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along the input dimension."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not a multiple of M={m}")
    g = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(g, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.view(rows, cols)


def global_threshold_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over all tensors: exactly ``round(total * sparsity)`` entries pruned."""
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    keep = topk_mask(flat, sparsity)
    out: dict[str, torch.Tensor] = {}
    i = 0
    for name, s in scores.items():
        out[name] = keep[i : i + s.numel()].view_as(s)
        i += s.numel()
    return out

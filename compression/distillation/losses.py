"""Pure tensor functions for knowledge distillation (no models, no optimisers).

The logit loss is Hinton et al.'s (2015):

    alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, next token)

where ``p^T = softmax(logits / T)``. The KL direction is the standard ("forward") one: the
divergence *of the teacher distribution from the student's*,
``KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v))``, i.e. the student is trained to
cover the teacher's whole distribution. (The project's first notes wrote "KL(student||teacher)"
loosely; that reverse, mode-seeking divergence is *not* what is computed here.) The ``T^2``
factor keeps the gradient scale of the soft term independent of the temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _flatten(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1]).float()


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(teacher/T) || softmax(student/T))`` (no ``T^2``).

    ``mask`` (bool, one entry per position) selects the positions that count."""
    s = F.log_softmax(_flatten(student_logits) / temperature, dim=-1)
    t = F.log_softmax(_flatten(teacher_logits) / temperature, dim=-1)
    per_pos = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        m = mask.reshape(-1)
        return per_pos[m].mean() if m.any() else per_pos.sum() * 0.0
    return per_pos.mean()


@overload
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, T: float = ..., alpha: float = ..., *,
                      return_parts: Literal[False] = ...) -> torch.Tensor: ...
@overload
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, T: float = ..., alpha: float = ..., *,
                      return_parts: Literal[True]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      labels: torch.Tensor | None, T: float = 1.0, alpha: float = 0.5, *,
                      return_parts: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton distillation loss for aligned logits and labels.

    ``student_logits`` / ``teacher_logits``: ``[..., V]``; ``labels``: ``[...]`` with the target
    token *for the same position* (the caller shifts for next-token prediction), entries equal
    to ``-100`` are ignored by both terms. ``alpha = 1`` is pure distillation (``labels`` may be
    None), ``alpha = 0`` pure cross-entropy (``teacher_logits`` may be None).

    Returns the scalar loss, or ``(loss, kl, ce)`` with ``return_parts=True`` (``kl`` is the raw
    KL without ``T^2``; a part that does not apply is 0)."""
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mask = None if labels is None else labels.reshape(-1) != IGNORE_INDEX
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kl = zero
    ce = zero
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in shape")
        kl = soft_kl(student_logits, teacher_logits, T, mask)
    if alpha < 1:
        if labels is None:
            raise ValueError("alpha < 1 needs labels")
        ce = F.cross_entropy(_flatten(student_logits), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX)
    loss = alpha * (T * T) * kl + (1.0 - alpha) * ce
    return (loss, kl, ce) if return_parts else loss


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits of ``input_ids``: position i predicts token i+1; the last
    position has no target (``-100``)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = input_ids[..., 1:]
    return labels


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """For every student block ``j`` (1-based hidden-state index) the teacher hidden-state index
    at the same relative depth; the last student block maps to the last teacher block."""
    if student_layers <= 0 or teacher_layers <= 0:
        return []
    return [max(1, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      layer_map: list[int]) -> torch.Tensor:
    """Mean over mapped layers of the normalised MSE ``||h_s - h_t||^2 / ||h_t||^2``.

    ``student_hidden[j]`` is compared with ``teacher_hidden[layer_map[j - 1]]`` for j >= 1
    (index 0, the embeddings, is skipped). Needs equal hidden sizes."""
    terms = []
    for j, ti in enumerate(layer_map, start=1):
        hs = student_hidden[j].float()
        ht = teacher_hidden[ti].float()
        if hs.shape != ht.shape:
            raise ValueError(f"hidden state shapes differ: {tuple(hs.shape)} vs {tuple(ht.shape)}")
        terms.append((hs - ht).pow(2).mean() / ht.pow(2).mean().clamp_min(1e-12))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()

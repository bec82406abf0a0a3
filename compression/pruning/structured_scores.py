"""Pure tensor math for structured pruning: importance scores and which units to keep.

Nothing here touches a model. Score functions take activations / gradients / weights of one
batch and return per-unit *sums* (plus how many items were summed) so the caller can accumulate
them over calibration batches and divide at the end. Selection functions turn accumulated scores
into the indices to keep. Higher score = more important everywhere in this module.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# whole blocks


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of ``1 - cos(h_in, h_out)`` (ShortGPT's block influence) and the token
    count. ``h_*``: ``[..., hidden]``. A block whose output points where its input did changes
    little and is a candidate for removal."""
    a = h_in.detach().float().reshape(-1, h_in.shape[-1])
    b = h_out.detach().float().reshape(-1, h_out.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
    return float((1.0 - cos).sum().item()), a.shape[0]


def mean_abs_change(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of ``mean_i |h_out - h_in|`` (absolute change of the residual stream) and
    the token count."""
    a = h_in.detach().float().reshape(-1, h_in.shape[-1])
    b = h_out.detach().float().reshape(-1, h_out.shape[-1])
    return float((b - a).abs().mean(-1).sum().item()), a.shape[0]


# ---------------------------------------------------------------------------------------------
# attention heads


def head_output_norms(attn_in: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head, the sum over tokens of ``||W_o[:, h] a_h||_2``: the L2 norm of the head's
    contribution to the attention output. ``attn_in``: ``[..., num_heads * head_dim]`` (the
    input of the output projection); ``o_weight``: ``[hidden, num_heads * head_dim]``.
    Returns ``[num_heads]`` (float32)."""
    x = attn_in.detach().float().reshape(-1, num_heads, attn_in.shape[-1] // num_heads)
    w = o_weight.detach().float().reshape(o_weight.shape[0], num_heads, -1)
    out = torch.zeros(num_heads)
    for h in range(num_heads):  # per head keeps the temporary at [tokens, hidden]
        out[h] = (x[:, h] @ w[:, h].T).norm(dim=-1).sum().cpu()
    return out


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per head, the sum over (batch, query position) of the attention distribution's entropy
    in nats. ``probs``: ``[batch, heads, queries, keys]`` (rows sum to 1; masked keys are 0).
    Returns ``[heads]`` (float32)."""
    p = probs.detach().float()
    ent = -torch.special.xlogy(p, p).sum(-1)  # [B, H, Q]
    per_head: torch.Tensor = ent.sum(dim=(0, 2)).cpu()
    return per_head


def taylor_abs(mask_grad: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance from the gradient of the loss w.r.t. a per-sample unit mask
    ``[batch, units]`` (which equals ``sum_tokens a * dL/da`` of that unit): ``|.|`` summed over
    the batch. Returns ``[units]``."""
    return mask_grad.detach().float().abs().sum(0).cpu()


# ---------------------------------------------------------------------------------------------
# FFN neurons


def sq_sum(act: torch.Tensor) -> torch.Tensor:
    """Per neuron (last dim), the sum of squared activations over all tokens: ``[units]``."""
    a = act.detach().float().reshape(-1, act.shape[-1])
    return (a * a).sum(0).cpu()


def act_sum(act: torch.Tensor) -> torch.Tensor:
    """Per neuron (last dim), the sum of activations over all tokens: ``[units]``."""
    a = act.detach().float().reshape(-1, act.shape[-1])
    return a.sum(0).cpu()


def neuron_fluctuation_scores(act_sum_: torch.Tensor, act_sq_sum: torch.Tensor, count: int,
                              w_out: torch.Tensor) -> torch.Tensor:
    """Importance when the removed neurons' MEAN contribution is folded into the output bias
    (:func:`bias_compensation`): only the fluctuation around the mean is lost, so the score is
    the activation's standard deviation times the column norm (FLAP-style)."""
    n = max(count, 1)
    mean = act_sum_.float() / n
    var = (act_sq_sum.float() / n - mean * mean).clamp_min(0)
    col_norm: torch.Tensor = w_out.detach().float().norm(dim=0).cpu()
    return var.sqrt() * col_norm


def bias_compensation(w_out: torch.Tensor, removed: list[int], mean: torch.Tensor) -> torch.Tensor:
    """What to add to the output projection's bias so that removing neurons ``removed`` keeps
    the block's mean output: ``W[:, removed] @ mean[removed]``."""
    if not removed:
        return torch.zeros(w_out.shape[0], dtype=w_out.dtype, device=w_out.device)
    idx = torch.tensor(removed, dtype=torch.long, device=w_out.device)
    m = mean.to(device=w_out.device, dtype=torch.float32)[idx]
    return (w_out.detach().float().index_select(1, idx) @ m).to(w_out.dtype)


def neuron_activation_scores(act_sq_sum: torch.Tensor, count: int, w_out: torch.Tensor) -> torch.Tensor:
    """Importance of each intermediate neuron j = RMS activation over the calibration tokens
    times the L2 norm of its column in the down/output projection (``w_out``: ``[hidden,
    units]``): an estimate of the size of the neuron's contribution to the block's output."""
    rms = (act_sq_sum.float() / max(count, 1)).sqrt()
    col_norm: torch.Tensor = w_out.detach().float().norm(dim=0).cpu()
    return rms * col_norm


# ---------------------------------------------------------------------------------------------
# selection


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties broken by lower index), sorted ascending."""
    if k <= 0:
        return []
    order = torch.argsort(scores.float(), stable=True)
    return sorted(order[:k].tolist())


def keep_top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, in their original order."""
    n = scores.numel()
    drop = set(lowest(scores, n - keep))
    return [i for i in range(n) if i not in drop]


def rounded_count(n: int, ratio: float | None, count: int | None, unit: int = 1,
                  min_keep: int = 1) -> int:
    """How many of ``n`` units to remove: ``count`` as given, or ``ratio * n`` rounded to the
    nearest multiple of ``unit`` (at least one unit). Raises ValueError if the result does not
    leave ``min_keep`` units or is not a multiple of ``unit``."""
    if count is None:
        assert ratio is not None
        count = max(unit, int(round(ratio * n / unit)) * unit)
    if count % unit:
        raise ValueError(f"must remove a multiple of {unit} here, not {count}")
    if n - count < min_keep:
        raise ValueError(f"removing {count} of {n} leaves fewer than {min_keep}")
    return count


def select_heads(scores: torch.Tensor, num_kv_heads: int, remove: int,
                 mode: str = "query") -> tuple[list[int], list[int]]:
    """Choose the query heads to keep in ONE layer under grouped-query attention.

    ``scores``: ``[num_heads]`` importances; query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``. ``mode="query"``: remove ``remove / num_kv_heads``
    query heads inside every KV group (the KV heads all stay; the group size shrinks evenly);
    ``mode="group"``: remove ``remove / group_size`` whole KV groups (those whose query heads
    have the lowest summed importance) with their KV heads. Either way every surviving KV group
    keeps the same number of query heads, so the layer is a valid GQA layer.
    Returns ``(kept query heads, kept kv heads)``, both ascending.
    """
    num_heads = scores.numel()
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads do not split into {num_kv_heads} KV groups")
    g = num_heads // num_kv_heads
    if mode == "query" and g > 1:
        if remove % num_kv_heads or remove // num_kv_heads >= g:
            raise ValueError(f"mode 'query' removes the same number of query heads from each of "
                             f"the {num_kv_heads} KV groups of {g}: {remove} is not possible")
        r = remove // num_kv_heads
        kept: list[int] = []
        for j in range(num_kv_heads):
            grp = scores[j * g : (j + 1) * g]
            kept.extend(j * g + i for i in keep_top(grp, g - r))
        return kept, list(range(num_kv_heads))
    if mode not in ("query", "group"):
        raise ValueError(f"unknown GQA mode {mode!r}")
    if remove % g or remove // g >= num_kv_heads:
        raise ValueError(f"removing whole KV groups of {g} query heads: {remove} of {num_heads} "
                         "is not possible")
    group_scores = scores.float().reshape(num_kv_heads, g).sum(-1)
    kv_kept = keep_top(group_scores, num_kv_heads - remove // g)
    return [j * g + i for j in kv_kept for i in range(g)], kv_kept


def head_unit(num_heads: int, num_kv_heads: int, mode: str) -> int:
    """The smallest number of query heads one layer can lose in ``mode``."""
    g = num_heads // num_kv_heads
    return num_kv_heads if (mode == "query" and g > 1) else g


def channel_index(heads: list[int], head_dim: int) -> torch.Tensor:
    """Flat channel indices of ``heads`` in a ``[num_heads * head_dim]`` projection."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def round_keep(n: int, remove: int, multiple_of: int) -> int:
    """Units kept when removing ``remove`` of ``n``, rounded to the nearest multiple of
    ``multiple_of`` (at least one multiple, at most ``n``)."""
    keep = n - remove
    if multiple_of > 1:
        keep = max(multiple_of, int(round(keep / multiple_of)) * multiple_of)
    return min(keep, n)

"""Mixture-of-experts blocks with their experts as ``nn.Linear`` layers.

transformers 5 keeps the experts of a sparse MoE block (qwen3_moe, mixtral) as two 3-D
parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) and converts
the per-expert checkpoint layout (``experts.<e>.gate_proj.weight`` ...) into them at load time.
:func:`linearize_experts` replaces every such module by a :class:`LinearExperts`: one module per
expert holding three ``nn.Linear`` named as in that checkpoint layout, computing exactly what
the fused module computes. Every method then sees the experts as Linears (quantized, pruned,
calibrated like any other); the router (``mlp.gate``, not a Linear) is never touched. The state
dict of a :class:`LinearExperts` is the per-expert checkpoint layout, which plain
``from_pretrained`` merges back into the fused parameters.

Calibration reaches every expert: :func:`count_routed_tokens` runs a block's calibration inputs
once and records how many tokens the router sent to each expert; an expert routed fewer than
:data:`MIN_EXPERT_TOKENS` is then observed on *every* calibration token of the block (the
stated fallback: its input statistics come from all tokens, as if the router had picked it;
the block's output still uses the router's choice). :func:`expert_report` gives the counts and
which experts fell back, for the method's metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import hf

#: an expert routed fewer calibration tokens than this is observed on all of the block's tokens
MIN_EXPERT_TOKENS = 16

#: per model_type: the names of an expert's (gate, up, down) Linears in the checkpoint layout
EXPERT_LINEARS: dict[str, tuple[str, str, str]] = {
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with the Linears named per family."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Linear, up: nn.Linear,
                 down: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.names = names
        for name, lin in zip(names, (gate, up, down), strict=True):
            self.add_module(name, lin)
        self.act_fn = act

    def linear(self, i: int) -> nn.Module:
        """The gate (0), up (1) or down (2) Linear (or what a method replaced it by)."""
        lin: nn.Module = getattr(self, self.names[i])
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(2)(self.act_fn(self.linear(0)(x)) * self.linear(1)(x))
        return out


class LinearExperts(nn.ModuleList):
    """Drop-in replacement of transformers' fused experts module (same ``forward`` signature:
    hidden states ``[T, H]``, the router's top-k expert indices and weights ``[T, k]``)."""

    routed: torch.Tensor  # a buffer (see __init__)

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        #: tokens routed to each expert while :attr:`counting` (one per token and pick)
        self.register_buffer("routed", torch.zeros(len(experts), dtype=torch.long),
                             persistent=False)
        self.counting = False
        #: experts observed on every token (fewer than MIN_EXPERT_TOKENS routed to them)
        self.all_tokens: set[int] = set()
        self.fell_back: set[int] = set()

    def expert(self, e: int) -> Expert:
        ex = self[e]
        assert isinstance(ex, Expert)
        return ex

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts)  # [T, k, E]
            if self.counting:
                self.routed += mask.sum((0, 1)).to(self.routed.device)
            hit = set(torch.nonzero(mask.sum((0, 1)) > 0).flatten().tolist())
        for e in range(self.num_experts):
            if e not in hit and e not in self.all_tokens:
                continue
            token_idx, top_k_pos = torch.where(mask[:, :, e])
            if e in self.all_tokens:  # every token through the expert, the routed rows used
                y = self.expert(e)(hidden_states)[token_idx]
            else:
                y = self.expert(e)(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_fused_experts(m: nn.Module) -> bool:
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3
            and down.dim() == 3 and hasattr(m, "act_fn"))


@torch.no_grad()
def _linearize(fused: nn.Module, names: tuple[str, str, str], dtype: torch.dtype) -> LinearExperts:
    gu, dn = fused.gate_up_proj, fused.down_proj
    assert isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor)  # see _is_fused_experts
    n_exp, two_i, hidden = gu.shape
    inter = two_i // 2
    experts = []
    for e in range(n_exp):
        lins = []
        for w in (gu[e, :inter], gu[e, inter:], dn[e]):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype)
            lin.weight.copy_(w)
            lins.append(lin)
        experts.append(Expert(names, lins[0], lins[1], lins[2], fused.get_submodule("act_fn")))
    return LinearExperts(experts)


def linearize_experts(model: nn.Module) -> int:
    """Replace every fused experts module of a qwen3_moe / mixtral model by a
    :class:`LinearExperts` (in place; a no-op for other models or when already done). Returns
    how many were replaced."""
    cfg = getattr(model, "config", None)
    names = EXPERT_LINEARS.get(str(getattr(cfg, "model_type", "")))
    if names is None:
        return 0
    todo = [(n, m) for n, m in model.named_modules() if _is_fused_experts(m)]
    # the model's dtype: transformers dequantizes FP8 experts of a compressed-tensors artifact to
    # bfloat16 whatever the dtype asked for (a float32 model would then mix dtypes)
    emb = hf(model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
    for name, m in todo:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, _linearize(m, names, dtype))
    return len(todo)


def experts_of(module: nn.Module) -> dict[str, LinearExperts]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LinearExperts)}


@torch.no_grad()
def count_routed_tokens(block: nn.Module, run: Any) -> None:
    """Run ``run()`` (the block's calibration forward) once counting the tokens routed to each
    expert of ``block``, then mark the experts routed fewer than :data:`MIN_EXPERT_TOKENS` to be
    observed on every token (until :func:`end_fallback`)."""
    mods = experts_of(block)
    if not mods:
        return
    for m in mods.values():
        m.routed.zero_()
        m.counting = True
    try:
        run()
    finally:
        for m in mods.values():
            m.counting = False
    for m in mods.values():
        m.all_tokens = {e for e, c in enumerate(m.routed.tolist()) if c < MIN_EXPERT_TOKENS}
        m.fell_back = set(m.all_tokens)


def end_fallback(block: nn.Module) -> None:
    for m in experts_of(block).values():
        m.all_tokens = set()


def expert_report(model: nn.Module) -> dict[str, float]:
    """Per expert the calibration tokens routed to it (``experts.<module>.<e>.tokens``) and
    whether it fell back to all tokens; totals. Empty when nothing was counted."""
    mods = experts_of(model)
    if not mods or not any(int(m.routed.sum()) for m in mods.values()):
        return {}
    out: dict[str, float] = {}
    counts: list[int] = []
    fell = 0
    for name, m in mods.items():
        for e, c in enumerate(m.routed.tolist()):
            out[f"experts.{name}.{e}.tokens"] = float(c)
            counts.append(c)
        for e in sorted(m.fell_back):
            out[f"experts.{name}.{e}.all_tokens_fallback"] = 1.0
        fell += len(m.fell_back)
    out.update({"experts_total": float(len(counts)), "experts_min_tokens": float(min(counts)),
                "experts_max_tokens": float(max(counts)),
                "experts_fallback_all_tokens": float(fell),
                "experts_min_tokens_threshold": float(MIN_EXPERT_TOKENS)})
    return out


#: methods whose expert tensors transformers' MoE loader cannot turn back into the fused
#: parameters (it dequantizes FP8 ``weight`` + ``weight_scale`` and symmetric packed
#: ``weight_packed`` + ``weight_scale`` per expert, nothing else): refused at submission on an
#: MoE model rather than written as an artifact plain ``from_pretrained`` loads wrongly
NOT_RELOADABLE: dict[str, str] = {
    "int8_dynamic": "its experts would be int-quantized (int8 'weight' tensors), which "
    "transformers' MoE loader does not dequantize; use int8 (weight-only) or fp8",
    "nvfp4": "transformers' MoE loader drops the experts' NVFP4 global scales (the reloaded "
    "experts come out wrong); use mxfp4 or fp8",
}


def check_method(method: str, config: Any, model_config: Any) -> None:
    """Raise CompressionError (naming the family) when ``method`` with ``config`` would write a
    mixture-of-experts artifact that plain ``from_pretrained`` cannot load back."""
    from .base import CompressionError

    mt = getattr(model_config, "model_type", None)
    if mt not in EXPERT_LINEARS:
        return
    why = NOT_RELOADABLE.get(method)
    if why is None and getattr(config, "symmetric", True) is False:
        why = ("asymmetric grids store zero points, which transformers' MoE loader does not "
               "read for the experts; set symmetric: true")
    if why is not None:
        raise CompressionError(f"{method} on a {mt} model (mixture of experts): {why}")

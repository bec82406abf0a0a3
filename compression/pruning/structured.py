"""Structured pruning: remove attention heads, FFN neurons or whole blocks, so the model gets
physically smaller (fewer parameters, smaller files, faster on CPU) and its config says so.

Every method: score units on calibration data (math in :mod:`.structured_scores`), remove the
least important ones with the same count in every layer (transformers' Llama and BERT need
uniform per-layer shapes), then rewrite the modules and the config so the result is an ordinary
dense Hugging Face model that plain ``from_pretrained`` loads.

Supported families: those of the family table (:mod:`..calib.families`) with what each method
needs: ``layers`` every family; ``ffn`` the families with separate FFN Linears (not phi3's fused
``gate_up_proj``); ``heads`` those with separate q/k/v/o Linears (not phi3's fused ``qkv_proj``,
not BERT: transformers 5 removed BERT's ``prune_heads``/``pruned_heads`` and derives BERT's head
size as ``hidden_size / num_attention_heads``, so a BERT with fewer heads cannot be described by a
config that plain ``from_pretrained`` loads). Block influence and the activation / entropy
scores run block by block on the calibration engine; gradient scores need the LM loss of the
whole model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Self

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..base import (
    CalibrationConfig,
    CompressionError,
    CompressionResult,
    Context,
    Method,
    UnsupportedModelError,
    hf,
    hf_config,
    weight_of,
)
from ..calib.engine import Step, calibration_tokens, find_blocks, observe, run_block, run_sequential
from ..calib.families import Family, family_of, supporting
from ..evaluation import param_count
from . import structured_scores as S

# ---------------------------------------------------------------------------------------------
# configs


class StructuredCalibration(CalibrationConfig):
    """Calibration for scoring: a few short sequences are enough to rank units."""

    num_samples: int = Field(16, ge=1, le=4096, description="Calibration sequences.")
    seq_len: int = Field(256, ge=8, le=8192, description="Tokens per calibration sequence.")
    batch_size: int = Field(4, ge=1, le=256, description="Sequences per forward pass.")


class _RatioOrCount(StructuredCalibration):
    ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of units to remove "
                                "(default 0.25 when neither ratio nor count is given).")
    count: int | None = Field(None, ge=1, description="Number of units to remove.")

    @model_validator(mode="after")
    def _ratio_or_count(self) -> Self:
        if self.ratio is not None and self.count is not None:
            raise ValueError("give either ratio or count, not both")
        if self.ratio is None and self.count is None:
            self.ratio = 0.25
        return self


class HeadsConfig(_RatioOrCount):
    """Remove attention heads (count/ratio = query heads removed in EVERY layer)."""

    score: Literal["activation", "gradient", "entropy"] = Field(
        "activation",
        description="'activation': mean L2 norm of each head's contribution to the attention "
        "output on calibration data; 'gradient': first-order Taylor |sum a * dL/da| of the LM "
        "loss per sample (Michel et al. 2019); 'entropy': attention entropy (the most diffuse "
        "heads go first).",
    )
    gqa: Literal["query", "group"] = Field(
        "query",
        description="Grouped-query attention: 'query' removes the same number of query heads "
        "from every KV group (KV heads stay); 'group' removes whole KV groups with their KV head.",
    )


class FfnConfig(StructuredCalibration):
    """Remove intermediate FFN neurons (same count in every layer)."""

    ratio: float = Field(0.25, gt=0, lt=1, description="Fraction of neurons to remove.")
    score: Literal["activation", "gradient"] = Field(
        "activation",
        description="'activation': RMS activation x L2 norm of the neuron's down/output "
        "projection column; 'gradient': first-order Taylor |sum a * dL/da| (causal LMs only).",
    )
    multiple_of: int = Field(1, ge=1, le=1024,
                             description="Round the kept intermediate size to a multiple of this.")
    bias_compensation: bool = Field(
        True,
        description="Where the output projection has a bias (BERT): fold the removed neurons' "
        "mean contribution into it and score neurons by their fluctuation around the mean "
        "(FLAP-style). Models without that bias (llama) score by RMS activation.",
    )


class LayersConfig(_RatioOrCount):
    """Remove whole transformer blocks."""

    score: Literal["block_influence", "mean_abs_change"] = Field(
        "block_influence",
        description="'block_influence': 1 - cos(block input, block output) averaged over "
        "calibration tokens (ShortGPT); 'mean_abs_change': mean |output - input|.",
    )
    iterative: bool = Field(False, description="Remove one block at a time and re-score "
                            "(slower) instead of removing the lowest-scoring blocks at once.")


# ---------------------------------------------------------------------------------------------
# model plumbing


def family(model: nn.Module, need: str = "blocks") -> Family:
    """The model's family entry; UnsupportedModelError naming the families that have ``need``
    (see :func:`..calib.families.supporting`)."""
    ok = supporting(need)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ok:
        raise UnsupportedModelError(f"structured pruning ({need}) supports model types "
                                    f"{sorted(ok)}, not {mt!r}")
    return family_of(model)


def blocks(model: nn.Module) -> nn.ModuleList:
    return find_blocks(model)[1]


def _set_blocks(model: nn.Module, new: nn.ModuleList) -> None:
    parent, _, leaf = family(model).blocks.rpartition(".")
    base: nn.Module = hf(model).base_model
    setattr(base.get_submodule(parent) if parent else base, leaf, new)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None,
                 in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new dense ``nn.Linear`` holding only rows ``out_idx`` and columns ``in_idx``."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if out_idx is not None:
        out_idx = out_idx.to(w.device)
        w = w.index_select(0, out_idx)
        b = b.index_select(0, out_idx) if b is not None else None
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    with torch.device("meta"):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    new.weight = nn.Parameter(w.contiguous().clone(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous().clone(), requires_grad=lin.bias.requires_grad)
    return new


def run_calibration(model: nn.Module, ids: torch.Tensor, batch_size: int, ctx: Context,
                    loss: bool = False, label: str = "scoring",
                    progress: tuple[float, float] = (0.0, 1.0)) -> None:
    """Forward ``ids`` through ``model`` batch by batch (hooks collect what they need); with
    ``loss=True`` also backpropagate the causal-LM loss (for gradient scores)."""
    dev = _device(model)
    n = ids.shape[0]
    lo, hi = progress
    for i in range(0, n, batch_size):
        ctx.check_cancelled()
        b = ids[i : i + batch_size].to(dev)
        if loss:
            with torch.enable_grad():
                out = model(input_ids=b, labels=b, use_cache=False)
                out.loss.backward()
        else:
            with torch.no_grad():
                if family(model).causal:
                    model(input_ids=b, use_cache=False)
                else:
                    model(input_ids=b)
        ctx.progress(lo + (hi - lo) * min(1.0, (i + batch_size) / n), f"{label} {min(i + batch_size, n)}/{n}")


@contextmanager
def _hooks() -> Iterator[list[RemovableHandle]]:
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradients while only unit masks are differentiated."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextmanager
def _attn_impl(model: nn.Module, impl: str) -> Iterator[None]:
    old = hf_config(model)._attn_implementation
    if old == impl:
        yield
        return
    hf(model).set_attn_implementation(impl)
    try:
        yield
    finally:
        hf(model).set_attn_implementation(old)


MaskStore = dict[Any, Any]  # ("masks", key) -> the masks of the pass; key -> summed |grad|


def _masking_pre_hook(store: MaskStore, key: Any, units: int
                      ) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """A forward-pre-hook that multiplies the last dim (``units * width``) of the module input by
    a fresh all-ones ``[batch, units]`` mask that requires grad; gradients are summed (as
    ``|.|``) into ``store[key]`` by :func:`_collect_mask_grads`."""

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        mask = torch.ones(x.shape[0], units, device=x.device, dtype=x.dtype, requires_grad=True)
        store.setdefault(("masks", key), []).append(mask)
        shape = x.shape
        y = (x.reshape(shape[0], -1, units, shape[-1] // units) * mask[:, None, :, None]).reshape(shape)
        return (y, *args[1:])

    return hook


def _collect_mask_grads(store: MaskStore, sums: dict[int, torch.Tensor]) -> None:
    for k in [k for k in store if isinstance(k, tuple) and k[0] == "masks"]:
        for m in store.pop(k):
            if m.grad is not None:
                key = k[1]
                sums[key] = sums.get(key, 0) + S.taylor_abs(m.grad)


def _needs_lm_loss(model: nn.Module, what: str) -> None:
    if not family(model).causal or not hasattr(model, "lm_head"):
        raise CompressionError(f"{what}: gradient scores need a causal-LM loss (a "
                               "*ForCausalLM); use score='activation' for this model")


def _ctx_device(model: nn.Module, ctx: Context) -> torch.device:
    """Move the model to ``ctx.device`` for scoring; returns where it was."""
    old = _device(model)
    if ctx.device is not None and torch.device(ctx.device) != old:
        model.to(ctx.device)
    return old


def _finish(model: nn.Module, old_device: torch.device, before: int, metrics: dict[str, float],
            started: float, ctx: Context) -> CompressionResult:
    model.to(old_device)
    after = param_count(model)
    metrics.update(params_before=float(before), params_after=float(after),
                   params_removed_fraction=1.0 - after / before,
                   prune_time_s=time.perf_counter() - started)
    for k, v in metrics.items():
        ctx.metric(k, float(v), None)
    ctx.progress(1.0, "done")
    return CompressionResult(model=model, metrics={k: float(v) for k, v in metrics.items()})


# ---------------------------------------------------------------------------------------------
# layers


@torch.no_grad()
def layer_scores(model: nn.Module, ids: torch.Tensor, score: str, batch_size: int, ctx: Context,
                 progress: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Per block, the mean over calibration tokens of ``score`` between its input and output
    hidden states (higher = the block changes more = more important), block by block."""
    fn = S.block_influence if score == "block_influence" else S.mean_abs_change
    out: list[float] = []

    def visit(step: Step) -> list[torch.Tensor]:
        outs = run_block(step.block, step.inputs)
        total, count = 0.0, 0
        for x, y in zip(step.inputs, outs):
            s, n = fn(x.hidden, y)
            total += s
            count += n
        out.append(total / max(count, 1))
        return outs

    run_sequential(model, ids, ctx, visit, batch_size=batch_size, label="scoring blocks",
                   progress=progress)
    return torch.tensor(out)


def remove_layers(model: nn.Module, drop: list[int]) -> None:
    """Delete blocks ``drop`` and renumber what is left so the KV cache, ``num_hidden_layers``
    and per-layer config lists match the new depth."""
    bl = blocks(model)
    drop_set = set(drop)
    if any(i < 0 or i >= len(bl) for i in drop_set) or len(drop_set) >= len(bl):
        raise CompressionError(f"cannot remove blocks {sorted(drop_set)} of {len(bl)}")
    kept_idx = [i for i in range(len(bl)) if i not in drop_set]
    new = nn.ModuleList([bl[i] for i in kept_idx])
    for new_i, blk in enumerate(new):
        for m in blk.modules():
            if hasattr(m, "layer_idx"):
                layer: Any = m  # HF attention (and cache-using) modules know their block's index
                layer.layer_idx = new_i
    _set_blocks(model, new)
    cfg = hf_config(model)
    old_n = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(kept_idx)
    for name in ("layer_types",):
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)) and len(v) == old_n:
            setattr(cfg, name, [v[i] for i in kept_idx])


def apply_layers(model: nn.Module, cfg: LayersConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    family(model, "blocks")
    before = param_count(model)
    n = len(blocks(model))
    try:
        k = S.rounded_count(n, cfg.ratio, cfg.count)
    except ValueError as e:
        raise CompressionError(f"layers: {e}") from e
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_tokens(model, cfg, ctx)
    original = list(range(n))  # current position -> original index
    removed: list[int] = []
    first_scores: list[float] = []
    rounds = k if cfg.iterative else 1
    for r in range(rounds):
        span = (r / rounds, (r + 1) / rounds)
        scores = layer_scores(model, ids, cfg.score, cfg.batch_size, ctx, progress=span)
        if r == 0:
            first_scores = scores.tolist()
        drop = S.lowest(scores, 1 if cfg.iterative else k)
        removed.extend(original[i] for i in drop)
        remove_layers(model, drop)
        original = [o for i, o in enumerate(original) if i not in set(drop)]
    model.train(was_training)
    ctx.event("layers_removed", {"removed": sorted(removed), "scores": first_scores,
                                 "score": cfg.score, "iterative": cfg.iterative})
    return _finish(model, old_dev, before, {"layers_removed": len(removed),
                                            "num_hidden_layers": hf_config(model).num_hidden_layers},
                   started, ctx)


def _validate_layers(cfg: LayersConfig, mc: Any) -> None:
    n = getattr(mc, "num_hidden_layers", None)
    if n is not None:
        try:
            S.rounded_count(n, cfg.ratio, cfg.count)
        except ValueError as e:
            raise CompressionError(f"layers: {e}") from e


# ---------------------------------------------------------------------------------------------
# attention heads (llama)


def _heads_plan(mc: Any, cfg: HeadsConfig) -> tuple[int, int, int]:
    """(heads removed per layer, new num_attention_heads, new num_key_value_heads)."""
    h = mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or h
    unit = S.head_unit(h, kv, cfg.gqa)
    g = h // kv
    try:
        min_keep = unit if cfg.gqa == "query" and g > 1 else g
        k = S.rounded_count(h, cfg.ratio, cfg.count, unit=unit, min_keep=min_keep)
    except ValueError as e:
        raise CompressionError(f"heads ({h} query / {kv} KV heads, gqa={cfg.gqa!r}): {e}") from e
    new_h = h - k
    new_kv = kv if (cfg.gqa == "query" and g > 1) else kv - k // g
    if mc.hidden_size % new_h:
        raise CompressionError(f"heads: transformers requires hidden_size ({mc.hidden_size}) to be "
                               f"a multiple of num_attention_heads; {new_h} heads is not")
    return k, new_h, new_kv


def _per_block(model: nn.Module, ids: torch.Tensor, batch_size: int, ctx: Context,
               module: Callable[[nn.Module], nn.Module],
               stat: Callable[[Any, nn.Module], tuple[Any, int]],
               finish: Callable[[Any, int, nn.Module], Any],
               label: str, forward_hook: bool = False) -> list[Any]:
    """Per block, ``finish(total, count, module(block))`` where ``total`` / ``count`` sum
    ``stat(x, module(block)) -> (tensor, count)`` over the calibration tokens, ``x`` the input of
    ``module(block)`` (its output with ``forward_hook``); block by block on the engine."""
    rows: list[Any] = []

    def visit(step: Step) -> list[torch.Tensor]:
        acc: dict[str, Any] = {"sum": 0, "n": 0}
        mod = module(step.block)

        def fn(_name: str, x: Any) -> None:
            v, n = stat(x, mod)
            acc["sum"] = acc["sum"] + v
            acc["n"] += n

        if forward_hook:
            h = mod.register_forward_hook(lambda _m, _a, out: fn("", out))
            try:
                outs = run_block(step.block, step.inputs)
            finally:
                h.remove()
        else:
            observed = observe(step.block, step.inputs, {"m": mod}, fn, stop_early=False)
            assert observed is not None  # stop_early=False: the block's outputs
            outs = observed
        rows.append(finish(acc["sum"], acc["n"], mod))
        return outs

    run_sequential(model, ids, ctx, visit, batch_size=batch_size, label=label)
    return rows


def _mean(total: torch.Tensor, n: int, _mod: nn.Module) -> torch.Tensor:
    return total / n


def head_scores(model: nn.Module, ids: torch.Tensor, cfg: HeadsConfig, ctx: Context) -> torch.Tensor:
    """``[layers, heads]`` importances (higher = keep)."""
    att = family(model, "attention").attention
    assert att is not None
    h = hf_config(model).num_attention_heads

    def o_proj(b: nn.Module) -> nn.Module:
        return b.get_submodule(att.o)

    if cfg.score == "activation":
        return torch.stack(_per_block(
            model, ids, cfg.batch_size, ctx, o_proj, finish=_mean, label="scoring heads",
            stat=lambda x, m: (S.head_output_norms(x, weight_of(m), h), x.numel() // x.shape[-1])))
    if cfg.score == "entropy":
        attn = lambda b: b.get_submodule(att.o.rpartition(".")[0])  # noqa: E731
        with _attn_impl(model, "eager"):
            return -torch.stack(_per_block(
                model, ids, cfg.batch_size, ctx, attn, finish=_mean, label="scoring heads",
                forward_hook=True, stat=lambda out, _m: (S.attention_entropy(out[1]),
                                                         out[1].shape[0] * out[1].shape[2])))
    # gradient: the LM loss of the whole model
    _needs_lm_loss(model, "heads")
    bl = blocks(model)
    sums: dict[int, torch.Tensor] = {}
    store: MaskStore = {}
    with _hooks() as hs:
        for i, b in enumerate(bl):
            hs.append(o_proj(b).register_forward_pre_hook(_masking_pre_hook(store, i, h)))
        with _frozen(model):
            for j in range(0, ids.shape[0], cfg.batch_size):
                run_calibration(model, ids[j : j + cfg.batch_size], cfg.batch_size, ctx, loss=True,
                                label="scoring heads",
                                progress=(j / ids.shape[0], (j + cfg.batch_size) / ids.shape[0]))
                _collect_mask_grads(store, sums)
    return torch.stack([sums[i] / ids.shape[0] for i in range(len(bl))])


def prune_llama_heads(model: nn.Module, kept: list[tuple[list[int], list[int]]]) -> None:
    """Keep, in layer ``l``, query heads ``kept[l][0]`` and KV heads ``kept[l][1]`` (every layer
    must keep the same numbers; each kept KV group the same number of query heads)."""
    cfg = hf_config(model)
    d = cfg.head_dim
    nq = {len(q) for q, _ in kept}
    nkv = {len(k) for _, k in kept}
    if len(nq) != 1 or len(nkv) != 1:
        raise CompressionError("every layer must keep the same number of heads")
    new_h, new_kv = nq.pop(), nkv.pop()
    if new_h % new_kv:
        raise CompressionError("query heads must split evenly over KV heads")
    att = family(model, "attention").attention
    assert att is not None
    for blk, (q, kv) in zip(blocks(model), kept):
        qi, kvi = S.channel_index(q, d), S.channel_index(kv, d)
        for name, out_idx, in_idx in ((att.q, qi, None), (att.k, kvi, None), (att.v, kvi, None),
                                      (att.o, None, qi)):
            _replace(blk, name, slice_linear(_linear(blk, name), out_idx, in_idx))
        attn: Any = blk.get_submodule(att.o.rpartition(".")[0])  # an HF attention module
        attn.num_key_value_groups = new_h // new_kv
    cfg.head_dim = d  # stays explicit: hidden_size // num_attention_heads no longer equals it
    cfg.num_attention_heads = new_h
    cfg.num_key_value_heads = new_kv


def apply_heads(model: nn.Module, cfg: HeadsConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    family(model, "attention")  # not BERT (see the module doc) nor fused qkv_proj (phi3)
    mc = hf_config(model)
    k, new_h, new_kv = _heads_plan(mc, cfg)
    h = mc.num_attention_heads
    kv = mc.num_key_value_heads or h
    before = param_count(model)
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_tokens(model, cfg, ctx)
    scores = head_scores(model, ids, cfg, ctx)
    mode = cfg.gqa if h // kv > 1 else "group"
    kept = [S.select_heads(scores[i], kv, k, mode) for i in range(scores.shape[0])]
    prune_llama_heads(model, kept)
    assert (hf_config(model).num_attention_heads, hf_config(model).num_key_value_heads) == (new_h, new_kv)
    model.train(was_training)
    ctx.event("heads_removed", {"kept_query_heads": [q for q, _ in kept],
                                "kept_kv_heads": [v for _, v in kept], "score": cfg.score,
                                "gqa": cfg.gqa})
    return _finish(model, old_dev, before, {"heads_removed_per_layer": k,
                                            "num_attention_heads": new_h,
                                            "num_key_value_heads": new_kv}, started, ctx)


def _validate_heads(cfg: HeadsConfig, mc: Any) -> None:
    _heads_plan(mc, cfg)


# ---------------------------------------------------------------------------------------------
# FFN neurons


def _linear(root: nn.Module, name: str) -> nn.Linear:
    m = root.get_submodule(name)
    if not isinstance(m, nn.Linear):
        raise CompressionError(f"{name} is a {type(m).__name__}, not a Linear")
    return m


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _ffn_modules(model: nn.Module, blk: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(Linears whose output rows are the neurons, the Linear whose input columns are)."""
    mlp = family(model, "mlp").mlp
    assert mlp is not None
    return [_linear(blk, n) for n in mlp.neurons_out], _linear(blk, mlp.neurons_in)


def _compensates(model: nn.Module, cfg: FfnConfig) -> bool:
    return (cfg.bias_compensation and cfg.score == "activation"
            and _ffn_modules(model, blocks(model)[0])[1].bias is not None)


def ffn_scores(model: nn.Module, ids: torch.Tensor, cfg: FfnConfig,
               ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``[layers, intermediate]`` importances (higher = keep) and, with bias compensation, each
    layer's mean activation per neuron."""
    inter = hf_config(model).intermediate_size
    if cfg.score == "activation":
        comp = _compensates(model, cfg)

        def finish(total: torch.Tensor, n: int, out: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            sq, lin = total[0], total[1]
            if comp:
                return S.neuron_fluctuation_scores(lin, sq, n, weight_of(out)), lin / n
            return S.neuron_activation_scores(sq, n, weight_of(out)), lin / n

        rows = _per_block(
            model, ids, cfg.batch_size, ctx, lambda b: _ffn_modules(model, b)[1], finish=finish,
            label="scoring neurons",
            stat=lambda x, _m: (torch.stack([S.sq_sum(x), S.act_sum(x)]),
                                x.numel() // x.shape[-1]))
        scores = torch.stack([r[0] for r in rows])
        return scores, ([r[1] for r in rows] if comp else None)
    bl = blocks(model)
    L = len(bl)
    sums: dict[int, torch.Tensor] = {}
    with _hooks() as hs:
        _needs_lm_loss(model, "ffn")
        store: MaskStore = {}
        for i, b in enumerate(bl):
            hs.append(_ffn_modules(model, b)[1].register_forward_pre_hook(
                _masking_pre_hook(store, i, inter)))
        with _frozen(model):
            for j in range(0, ids.shape[0], cfg.batch_size):
                run_calibration(model, ids[j : j + cfg.batch_size], cfg.batch_size, ctx, loss=True,
                                label="scoring neurons",
                                progress=(j / ids.shape[0], (j + cfg.batch_size) / ids.shape[0]))
                _collect_mask_grads(store, sums)
        return torch.stack([sums[i] / ids.shape[0] for i in range(L)]), None


@torch.no_grad()
def prune_ffn(model: nn.Module, kept: list[list[int]],
              means: list[torch.Tensor] | None = None) -> None:
    """Keep intermediate neurons ``kept[l]`` in layer ``l`` (the same count in every layer).
    With ``means`` (per-layer mean activation of every neuron), the removed neurons' mean
    contribution is added to the output projection's bias."""
    sizes = {len(k) for k in kept}
    if len(sizes) != 1:
        raise CompressionError("every layer must keep the same number of FFN neurons")
    n = sizes.pop()
    fam = family(model, "mlp").mlp
    assert fam is not None
    for li, (blk, keep) in enumerate(zip(blocks(model), kept)):
        idx = torch.tensor(keep, dtype=torch.long)
        ins, out = _ffn_modules(model, blk)
        if means is not None and out.bias is not None:
            keep_set = set(keep)
            removed = [j for j in range(out.in_features) if j not in keep_set]
            out.bias.add_(S.bias_compensation(out.weight, removed, means[li]))
        for name in fam.neurons_out:
            _replace(blk, name, slice_linear(_linear(blk, name), out_idx=idx))
        _replace(blk, fam.neurons_in, slice_linear(out, in_idx=idx))
        if fam.size_attr and fam.module:  # the table gives both or neither
            setattr(blk.get_submodule(fam.module), fam.size_attr, n)
    hf_config(model).intermediate_size = n


def apply_ffn(model: nn.Module, cfg: FfnConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    family(model, "mlp")
    if cfg.score == "gradient":
        _needs_lm_loss(model, "ffn")
    inter = hf_config(model).intermediate_size
    keep_n = S.round_keep(inter, int(round(cfg.ratio * inter)), cfg.multiple_of)
    if keep_n >= inter or keep_n < 1:
        raise CompressionError(f"ffn: ratio {cfg.ratio} of {inter} neurons removes nothing")
    before = param_count(model)
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_tokens(model, cfg, ctx)
    scores, means = ffn_scores(model, ids, cfg, ctx)
    kept = [S.keep_top(scores[i], keep_n) for i in range(scores.shape[0])]
    prune_ffn(model, kept, means)
    model.train(was_training)
    ctx.event("ffn_pruned", {"intermediate_size": keep_n, "score": cfg.score,
                             "bias_compensation": means is not None})
    return _finish(model, old_dev, before, {"intermediate_size": keep_n,
                                            "neurons_removed_per_layer": inter - keep_n},
                   started, ctx)


def _validate_ffn(cfg: FfnConfig, mc: Any) -> None:
    inter = getattr(mc, "intermediate_size", None)
    if inter is not None:
        keep_n = S.round_keep(inter, int(round(cfg.ratio * inter)), cfg.multiple_of)
        if keep_n >= inter or keep_n < 1:
            raise CompressionError(f"ffn: ratio {cfg.ratio} of {inter} neurons removes nothing")
    if cfg.score == "gradient" and getattr(mc, "model_type", None) not in supporting("causal"):
        raise CompressionError(f"ffn: score='gradient' needs a causal LM "
                               f"({sorted(supporting('causal'))})")


# ---------------------------------------------------------------------------------------------
# registry entries


HEADS = Method(
    name="heads",
    config=HeadsConfig,
    apply=apply_heads,
    description="Structured: remove the same number of attention heads from every layer (which "
    "ones by measured importance), GQA-consistent; the model gets physically smaller. Families "
    "with separate q/k/v/o Linears (not BERT: transformers 5 cannot load fewer heads; not "
    "phi3's fused qkv_proj).",
    family="pruning",
    needs_calibration=True,
    architectures=supporting("attention"),
    validate=_validate_heads,
)

FFN = Method(
    name="ffn",
    config=FfnConfig,
    apply=apply_ffn,
    description="Structured: remove the least important intermediate FFN neurons (same count in "
    "every layer; intermediate_size shrinks).",
    family="pruning",
    needs_calibration=True,
    architectures=supporting("mlp"),
    validate=_validate_ffn,
)

LAYERS = Method(
    name="layers",
    config=LayersConfig,
    apply=apply_layers,
    description="Structured: remove whole transformer blocks with the lowest block influence "
    "(1 - cos(input, output)) on calibration data; num_hidden_layers shrinks.",
    family="pruning",
    needs_calibration=True,
    architectures=supporting("blocks"),
    validate=_validate_layers,
)

METHODS = [HEADS, FFN, LAYERS]

"""Structured pruning: remove attention heads, FFN neurons or whole blocks, so the model gets
physically smaller (fewer parameters, smaller files, faster on CPU) and its config says so.

Every method: score units on calibration data (math in :mod:`.structured_scores`), remove the
least important ones with the same count in every layer (transformers' Llama and BERT need
uniform per-layer shapes), then rewrite the modules and the config so the result is an ordinary
dense Hugging Face model that plain ``from_pretrained`` loads.

Supported families: ``llama`` (``LlamaForCausalLM`` / ``LlamaModel``) and ``bert`` (``BertModel``
and heads on top of it). ``heads`` is llama-only: transformers 5 removed BERT's
``prune_heads``/``pruned_heads`` and derives BERT's head size as ``hidden_size /
num_attention_heads``, so a BERT with fewer heads cannot be described by a config that plain
``from_pretrained`` loads.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..base import (
    CalibrationConfig,
    CompressionError,
    CompressionResult,
    Context,
    Method,
    UnsupportedModelError,
)
from ..data import default_calibration_text, self_generated_text, token_chunks
from ..evaluation import param_count
from . import structured_scores as S

FAMILIES = frozenset({"llama", "bert"})


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
    def _ratio_or_count(self):
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


def family(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FAMILIES:
        raise UnsupportedModelError(f"structured pruning supports model types {sorted(FAMILIES)}, "
                                    f"not {mt!r}")
    return mt


def blocks(model: nn.Module) -> nn.ModuleList:
    base = model.base_model
    return base.layers if family(model) == "llama" else base.encoder.layer


def _set_blocks(model: nn.Module, new: nn.ModuleList) -> None:
    base = model.base_model
    if family(model) == "llama":
        base.layers = new
    else:
        base.encoder.layer = new


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


def calibration_ids(model: nn.Module, cfg: StructuredCalibration, ctx: Context) -> torch.Tensor:
    """``[n, seq_len]`` token ids from the job's calibration text (or the model itself)."""
    seq_len = cfg.seq_len
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, max_pos)
    if cfg.calibration_source == "self":
        if family(model) != "llama":
            raise CompressionError("calibration_source='self' needs a generative model (llama)")
        return self_generated_text(model, ctx.tokenizer, cfg.num_samples, seq_len, seed=ctx.seed)
    if ctx.tokenizer is None:
        raise CompressionError("structured pruning scores units on calibration text and needs "
                               "the model's tokenizer (or calibration_source='self')")
    text = ctx.calibration_text or default_calibration_text()
    try:
        return token_chunks(ctx.tokenizer, text, cfg.num_samples, seq_len)
    except ValueError as e:
        raise CompressionError(f"calibration text: {e}") from e


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
                if family(model) == "llama":
                    model(input_ids=b, use_cache=False)
                else:
                    model(input_ids=b)
        ctx.progress(lo + (hi - lo) * min(1.0, (i + batch_size) / n), f"{label} {min(i + batch_size, n)}/{n}")


@contextmanager
def _hooks() -> Iterator[list]:
    handles: list = []
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
    old = model.config._attn_implementation
    if old == impl:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _masking_pre_hook(store: dict, key: Any, units: int) -> Callable:
    """A forward-pre-hook that multiplies the last dim (``units * width``) of the module input by
    a fresh all-ones ``[batch, units]`` mask that requires grad; gradients are summed (as
    ``|.|``) into ``store[key]`` by :func:`_collect_mask_grads`."""

    def hook(_mod, args):
        x = args[0]
        mask = torch.ones(x.shape[0], units, device=x.device, dtype=x.dtype, requires_grad=True)
        store.setdefault(("masks", key), []).append(mask)
        shape = x.shape
        y = (x.reshape(shape[0], -1, units, shape[-1] // units) * mask[:, None, :, None]).reshape(shape)
        return (y, *args[1:])

    return hook


def _collect_mask_grads(store: dict, sums: dict) -> None:
    for k in [k for k in store if isinstance(k, tuple) and k[0] == "masks"]:
        for m in store.pop(k):
            if m.grad is not None:
                key = k[1]
                sums[key] = sums.get(key, 0) + S.taylor_abs(m.grad)


def _needs_lm_loss(model: nn.Module, what: str) -> None:
    if family(model) != "llama" or not hasattr(model, "lm_head"):
        raise CompressionError(f"{what}: gradient scores need a causal-LM loss (a llama "
                               "*ForCausalLM); use score='activation' for this model")


def _ctx_device(model: nn.Module, ctx: Context) -> torch.device:
    """Move the model to ``ctx.device`` for scoring; returns where it was."""
    old = _device(model)
    if ctx.device is not None and torch.device(ctx.device) != old:
        model.to(ctx.device)
    return old


def _finish(model: nn.Module, old_device: torch.device, before: int, metrics: dict,
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
    hidden states (higher = the block changes more = more important)."""
    fn = S.block_influence if score == "block_influence" else S.mean_abs_change
    bl = blocks(model)
    sums = [0.0] * len(bl)
    counts = [0] * len(bl)

    def make(i):
        def hook(_mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            s, n = fn(h_in, h_out)
            sums[i] += s
            counts[i] += n

        return hook

    with _hooks() as hs:
        for i, b in enumerate(bl):
            hs.append(b.register_forward_hook(make(i), with_kwargs=True))
        run_calibration(model, ids, batch_size, ctx, label="scoring blocks", progress=progress)
    return torch.tensor([s / max(c, 1) for s, c in zip(sums, counts)])


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
                m.layer_idx = new_i
    _set_blocks(model, new)
    cfg = model.config
    old_n = cfg.num_hidden_layers
    cfg.num_hidden_layers = len(kept_idx)
    for name in ("layer_types",):
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)) and len(v) == old_n:
            setattr(cfg, name, [v[i] for i in kept_idx])


def apply_layers(model: nn.Module, cfg: LayersConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    family(model)
    before = param_count(model)
    n = len(blocks(model))
    try:
        k = S.rounded_count(n, cfg.ratio, cfg.count)
    except ValueError as e:
        raise CompressionError(f"layers: {e}") from e
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_ids(model, cfg, ctx)
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
                                            "num_hidden_layers": model.config.num_hidden_layers},
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
        k = S.rounded_count(h, cfg.ratio, cfg.count, unit=unit, min_keep=unit if cfg.gqa == "query" and g > 1 else g)
    except ValueError as e:
        raise CompressionError(f"heads ({h} query / {kv} KV heads, gqa={cfg.gqa!r}): {e}") from e
    new_h = h - k
    new_kv = kv if (cfg.gqa == "query" and g > 1) else kv - k // g
    if mc.hidden_size % new_h:
        raise CompressionError(f"heads: transformers requires hidden_size ({mc.hidden_size}) to be "
                               f"a multiple of num_attention_heads; {new_h} heads is not")
    return k, new_h, new_kv


def head_scores(model: nn.Module, ids: torch.Tensor, cfg: HeadsConfig, ctx: Context) -> torch.Tensor:
    """``[layers, heads]`` importances (higher = keep)."""
    bl = blocks(model)
    h = model.config.num_attention_heads
    L = len(bl)
    sums: dict[int, torch.Tensor] = {}
    counts = [0] * L
    with _hooks() as hs:
        if cfg.score == "activation":
            def make(i):
                def hook(mod, args):
                    sums[i] = sums.get(i, 0) + S.head_output_norms(args[0], mod.weight, h)
                    counts[i] += args[0].numel() // args[0].shape[-1]
                return hook

            for i, b in enumerate(bl):
                hs.append(b.self_attn.o_proj.register_forward_pre_hook(make(i)))
            run_calibration(model, ids, cfg.batch_size, ctx, label="scoring heads")
            return torch.stack([sums[i] / counts[i] for i in range(L)])
        if cfg.score == "entropy":
            def make_e(i):
                def hook(_mod, _args, out):
                    probs = out[1]
                    sums[i] = sums.get(i, 0) + S.attention_entropy(probs)
                    counts[i] += probs.shape[0] * probs.shape[2]
                return hook

            for i, b in enumerate(bl):
                hs.append(b.self_attn.register_forward_hook(make_e(i)))
            with _attn_impl(model, "eager"):
                run_calibration(model, ids, cfg.batch_size, ctx, label="scoring heads")
            return -torch.stack([sums[i] / counts[i] for i in range(L)])
        # gradient
        _needs_lm_loss(model, "heads")
        store: dict = {}
        for i, b in enumerate(bl):
            hs.append(b.self_attn.o_proj.register_forward_pre_hook(_masking_pre_hook(store, i, h)))
        with _frozen(model):
            for j in range(0, ids.shape[0], cfg.batch_size):
                run_calibration(model, ids[j : j + cfg.batch_size], cfg.batch_size, ctx, loss=True,
                                label="scoring heads",
                                progress=(j / ids.shape[0], (j + cfg.batch_size) / ids.shape[0]))
                _collect_mask_grads(store, sums)
        return torch.stack([sums[i] / ids.shape[0] for i in range(L)])


def prune_llama_heads(model: nn.Module, kept: list[tuple[list[int], list[int]]]) -> None:
    """Keep, in layer ``l``, query heads ``kept[l][0]`` and KV heads ``kept[l][1]`` (every layer
    must keep the same numbers; each kept KV group the same number of query heads)."""
    cfg = model.config
    d = cfg.head_dim
    nq = {len(q) for q, _ in kept}
    nkv = {len(k) for _, k in kept}
    if len(nq) != 1 or len(nkv) != 1:
        raise CompressionError("every layer must keep the same number of heads")
    new_h, new_kv = nq.pop(), nkv.pop()
    if new_h % new_kv:
        raise CompressionError("query heads must split evenly over KV heads")
    for blk, (q, kv) in zip(blocks(model), kept):
        attn = blk.self_attn
        qi, kvi = S.channel_index(q, d), S.channel_index(kv, d)
        attn.q_proj = slice_linear(attn.q_proj, out_idx=qi)
        attn.k_proj = slice_linear(attn.k_proj, out_idx=kvi)
        attn.v_proj = slice_linear(attn.v_proj, out_idx=kvi)
        attn.o_proj = slice_linear(attn.o_proj, in_idx=qi)
        attn.num_key_value_groups = new_h // new_kv
    cfg.head_dim = d  # stays explicit: hidden_size // num_attention_heads no longer equals it
    cfg.num_attention_heads = new_h
    cfg.num_key_value_heads = new_kv


def apply_heads(model: nn.Module, cfg: HeadsConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    if family(model) != "llama":
        raise UnsupportedModelError(
            "heads: only llama; transformers 5 BERT derives the head size from hidden_size / "
            "num_attention_heads and no longer has prune_heads, so a BERT with fewer heads would "
            "not load with plain from_pretrained (use 'ffn' or 'layers' for BERT)")
    mc = model.config
    k, new_h, new_kv = _heads_plan(mc, cfg)
    h = mc.num_attention_heads
    kv = mc.num_key_value_heads or h
    before = param_count(model)
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_ids(model, cfg, ctx)
    scores = head_scores(model, ids, cfg, ctx)
    mode = cfg.gqa if h // kv > 1 else "group"
    kept = [S.select_heads(scores[i], kv, k, mode) for i in range(scores.shape[0])]
    prune_llama_heads(model, kept)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (new_h, new_kv)
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


def _ffn_modules(model: nn.Module, blk: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """(Linears whose output rows are the neurons, the Linear whose input columns are)."""
    if family(model) == "llama":
        return [blk.mlp.gate_proj, blk.mlp.up_proj], blk.mlp.down_proj
    return [blk.intermediate.dense], blk.output.dense


def _compensates(model: nn.Module, cfg: FfnConfig) -> bool:
    return (cfg.bias_compensation and cfg.score == "activation"
            and _ffn_modules(model, blocks(model)[0])[1].bias is not None)


def ffn_scores(model: nn.Module, ids: torch.Tensor, cfg: FfnConfig,
               ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``[layers, intermediate]`` importances (higher = keep) and, with bias compensation, each
    layer's mean activation per neuron."""
    bl = blocks(model)
    L = len(bl)
    inter = model.config.intermediate_size
    sums: dict[int, torch.Tensor] = {}
    lin_sums: dict[int, torch.Tensor] = {}
    counts = [0] * L
    with _hooks() as hs:
        if cfg.score == "activation":
            def make(i):
                def hook(_mod, args):
                    sums[i] = sums.get(i, 0) + S.sq_sum(args[0])
                    lin_sums[i] = lin_sums.get(i, 0) + S.act_sum(args[0])
                    counts[i] += args[0].numel() // args[0].shape[-1]
                return hook

            for i, b in enumerate(bl):
                hs.append(_ffn_modules(model, b)[1].register_forward_pre_hook(make(i)))
            run_calibration(model, ids, cfg.batch_size, ctx, label="scoring neurons")
            w = [_ffn_modules(model, b)[1].weight for b in bl]
            if _compensates(model, cfg):
                scores = torch.stack([S.neuron_fluctuation_scores(lin_sums[i], sums[i], counts[i], w[i])
                                      for i in range(L)])
                return scores, [lin_sums[i] / counts[i] for i in range(L)]
            return torch.stack([S.neuron_activation_scores(sums[i], counts[i], w[i])
                                for i in range(L)]), None
        _needs_lm_loss(model, "ffn")
        store: dict = {}
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
    for li, (blk, keep) in enumerate(zip(blocks(model), kept)):
        idx = torch.tensor(keep, dtype=torch.long)
        ins, out = _ffn_modules(model, blk)
        if means is not None and out.bias is not None:
            keep_set = set(keep)
            removed = [j for j in range(out.in_features) if j not in keep_set]
            out.bias.add_(S.bias_compensation(out.weight, removed, means[li]))
        if family(model) == "llama":
            mlp = blk.mlp
            mlp.gate_proj = slice_linear(mlp.gate_proj, out_idx=idx)
            mlp.up_proj = slice_linear(mlp.up_proj, out_idx=idx)
            mlp.down_proj = slice_linear(mlp.down_proj, in_idx=idx)
            mlp.intermediate_size = n
        else:
            blk.intermediate.dense = slice_linear(blk.intermediate.dense, out_idx=idx)
            blk.output.dense = slice_linear(blk.output.dense, in_idx=idx)
    model.config.intermediate_size = n


def apply_ffn(model: nn.Module, cfg: FfnConfig, ctx: Context) -> CompressionResult:
    started = time.perf_counter()
    family(model)
    if cfg.score == "gradient":
        _needs_lm_loss(model, "ffn")
    inter = model.config.intermediate_size
    keep_n = S.round_keep(inter, int(round(cfg.ratio * inter)), cfg.multiple_of)
    if keep_n >= inter or keep_n < 1:
        raise CompressionError(f"ffn: ratio {cfg.ratio} of {inter} neurons removes nothing")
    before = param_count(model)
    was_training = model.training
    model.eval()
    old_dev = _ctx_device(model, ctx)
    ids = calibration_ids(model, cfg, ctx)
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
    if cfg.score == "gradient" and getattr(mc, "model_type", None) != "llama":
        raise CompressionError("ffn: score='gradient' needs a causal LM (llama)")


# ---------------------------------------------------------------------------------------------
# registry entries


HEADS = Method(
    name="heads",
    config=HeadsConfig,
    apply=apply_heads,
    description="Structured: remove the same number of attention heads from every layer (which "
    "ones by measured importance), GQA-consistent; the model gets physically smaller. Llama only "
    "(transformers 5 BERT cannot load fewer heads).",
    family="pruning",
    needs_calibration=True,
    architectures=frozenset({"llama"}),
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
    architectures=FAMILIES,
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
    architectures=FAMILIES,
    validate=_validate_layers,
)

METHODS = [HEADS, FFN, LAYERS]

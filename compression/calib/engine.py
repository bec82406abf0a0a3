"""The one calibration engine: every method that looks at activations walks the model with it.

1. :func:`calibration_tokens`: ``[num, seq_len]`` token ids from the job's text (or sampled from
   the model itself);
2. :func:`capture_inputs`: run the model up to its first block and keep that block's inputs
   (hidden states plus the keyword arguments the model passes every block: masks, rotary
   embeddings, positions), one :class:`BlockInput` per mini-batch;
3. :func:`run_sequential`: for each block: onload it (a :class:`BlockSource`), let the method
   observe and change it, propagate the changed block's outputs to the next block, offload it.
   Later blocks thus see, and compensate, the error of earlier ones; only one block and one
   block's activations are on the device at a time.

:func:`observe` / :func:`input_stats` collect per-Linear input statistics (:class:`InputStats`)
with forward hooks, cutting each forward short once the wanted inputs are in
(:class:`StopForward`); :func:`fold_scale` folds an input scale into the op that produces it.
Where a family's blocks, groups and folds are comes from :mod:`.families`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..base import CalibrationConfig, CompressionError, Context, hf, weight_of
from ..data import default_calibration_text, self_generated_text, token_chunks
from ..device import return_freed_memory
from ..moe import count_routed_tokens, end_fallback
from .families import Family, Group, family_of


class StopForward(Exception):
    """Raised by a hook to abandon a forward once what it needed was seen."""


class BlockSource(Protocol):
    """Where the blocks' weights come from and go to (in memory today; streamed from disk by
    the lazy loader)."""

    def onload(self, index: int, device: torch.device) -> nn.Module: ...  # the block, weights on device

    def offload(self, index: int, block: nn.Module) -> None: ...  # after the method changed it

    def outside(self, device: torch.device) -> None: ...  # embeddings/rotary etc. needed before block 0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, the ModuleList of the repeated blocks) from the family table."""
    fam = family_of(model)
    base: nn.Module = hf(model).base_model
    blocks = base.get_submodule(fam.blocks)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise CompressionError(f"{type(model).__name__}: no blocks at {fam.blocks!r}")
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return prefix, blocks


class InMemoryBlocks:
    """Today's behaviour: every block already lives in the model; a block is moved to the work
    device while it is worked on and back afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.home = next(model.parameters()).device

    def __len__(self) -> int:
        return len(self.blocks)

    def onload(self, index: int, device: torch.device) -> nn.Module:
        return self.blocks[index].to(device)

    def offload(self, index: int, block: nn.Module) -> None:
        block.to(self.home)

    def outside(self, device: torch.device) -> None:
        """Move every parameter/buffer that is not inside the blocks (embeddings, rotary, norm,
        head) to ``device``; ``outside(source.home)`` puts them back."""
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if not name.startswith(self.prefix + "."):
                t.data = t.data.to(device)


# ------------------------------------------------------------------------------- calibration data


def calibration_tokens(model: nn.Module, cfg: CalibrationConfig, ctx: Context) -> torch.Tensor:
    """``[num_samples, seq_len]`` token ids from the job's text, or sampled from the model
    (``calibration_source='self'``, causal LMs only); ``seq_len`` is capped at the model's
    ``max_position_embeddings``."""
    seq_len = cfg.seq_len
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, max_pos)
    if cfg.calibration_source == "self":
        if not family_of(model).causal or not hasattr(model, "generate"):
            raise CompressionError("calibration_source='self' needs a generative model (a causal LM)")
        return self_generated_text(model, ctx.tokenizer, cfg.num_samples, seq_len, seed=ctx.seed)
    if ctx.tokenizer is None:
        raise CompressionError("calibration needs the model's tokenizer "
                               "(or calibration_source='self')")
    text = ctx.calibration_text or default_calibration_text()
    try:
        return token_chunks(ctx.tokenizer, text, cfg.num_samples, seq_len)
    except ValueError as e:
        raise CompressionError(f"calibration text: {e}") from e


# --------------------------------------------------------------------------------- block inputs


@dataclass
class BlockInput:
    """One mini-batch entering a block: hidden states and the block's keyword arguments."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


_DROP = ("past_key_values", "past_key_value", "use_cache", "hidden_states")


@torch.no_grad()
def capture_inputs(model: nn.Module, source: BlockSource, tokens: torch.Tensor,
                   device: torch.device, batch_size: int) -> list[BlockInput]:
    """Run the model on ``tokens`` (``batch_size`` rows at a time) until its first block and keep
    that block's inputs. ``source.outside(device)`` before, ``source.outside(home)`` after (home:
    where the embeddings were; ``meta`` for a streamed model)."""
    fam = family_of(model)
    _prefix, blocks = find_blocks(model)
    base: nn.Module = hf(model).base_model
    home = next(base.get_submodule(fam.embeddings[0]).parameters()).device
    captured: list[BlockInput] = []

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = {k: v for k, v in kwargs.items() if k not in _DROP}
        hidden = args[0] if args else kwargs["hidden_states"]
        # BERT passes attention_mask / encoder states positionally
        for name, val in zip(("attention_mask", "encoder_hidden_states"), args[1:]):
            kw.setdefault(name, val)
        if fam.causal:
            kw["use_cache"] = False
        captured.append(BlockInput(hidden.detach(), kw))
        raise StopForward

    source.outside(device)
    h = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch_size):
            kwargs: dict[str, Any] = {"input_ids": tokens[i : i + batch_size].to(device)}
            if fam.causal:
                kwargs["use_cache"] = False
            try:
                model(**kwargs)
            except StopForward:
                pass
    finally:
        h.remove()
        source.outside(home)
    if len(captured) != -(-tokens.shape[0] // batch_size):
        raise CompressionError("could not capture the inputs of the first transformer block")
    return captured


def _output(out: Any) -> torch.Tensor:
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert isinstance(first, torch.Tensor)
    return first


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    """The block's output hidden states, one per mini-batch."""
    return [_output(block(x.hidden, **x.kwargs)) for x in inputs]


@torch.no_grad()
def advance(block: nn.Module, inputs: list[BlockInput]) -> None:
    """Replace every mini-batch's hidden states by ``block``'s outputs, one at a time (never two
    full copies of the calibration activations alive)."""
    for x in inputs:
        x.hidden = _output(block(x.hidden, **x.kwargs))


# ------------------------------------------------------------------------------ the block loop


@dataclass
class Step:
    """What a method sees of one block in :func:`run_sequential`."""

    index: int
    count: int
    block: nn.Module
    inputs: list[BlockInput]
    family: Family

    def linears(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.block.named_modules() if isinstance(m, nn.Linear)}

    def groups(self) -> list[Group]:
        """The family's shared-input groups present in this block, in execution order; any
        Linear the table does not name is a group of its own at the end."""
        lins = self.linears()
        out = []
        for g in self.family.groups:
            names = tuple(n for n in g.linears if n in lins)
            if names:
                out.append(Group(names, g.fold_into, g.fold_part))
        named = {n for g in out for n in g.linears}
        return out + [Group((n,)) for n in lins if n not in named]


#: ``visit(step)``: observe and change the block; may return the block's outputs for the
#: calibration inputs (one per mini-batch) when it computed them anyway, else None
Visit = Callable[[Step], "list[torch.Tensor] | None"]


#: where a streamed model (a meta skeleton) carries its own block source (:mod:`..streaming.blocks`)
BLOCK_SOURCE_ATTR = "_modelpress_block_source"


def block_source(model: nn.Module) -> BlockSource | None:
    """The block source a streamed model carries, or None for a model in memory."""
    return getattr(model, BLOCK_SOURCE_ATTR, None)


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, ctx: Context, visit: Visit, *,
                   batch_size: int, source: BlockSource | None = None,
                   label: str = "calibrated block", progress: tuple[float, float] = (0.0, 1.0),
                   after: Callable[[Step], None] | None = None) -> None:
    """For every block: onload -> ``visit`` (observe, change) -> propagate the changed block's
    outputs to the next block -> ``after`` (e.g. pack what the method attached) -> offload."""
    source = source or block_source(model) or InMemoryBlocks(model)
    fam = family_of(model)
    n = len(find_blocks(model)[1])
    inputs = capture_inputs(model, source, tokens, ctx.device, batch_size)
    lo, hi = progress
    for i in range(n):
        ctx.check_cancelled()
        block = source.onload(i, ctx.device)
        step = Step(i, n, block, inputs, fam)
        # mixture of experts: count the tokens routed to each expert; experts routed too few
        # are observed on every token while the method visits the block (..moe)
        count_routed_tokens(block, lambda b=block, x=inputs: run_block(b, x))  # called at once
        try:
            outs = visit(step)
        finally:
            end_fallback(block)
        if outs is None:
            advance(block, inputs)
        else:
            for x, o in zip(inputs, outs):
                x.hidden = o
        if after is not None:
            after(step)
        source.offload(i, block)
        return_freed_memory()
        ctx.progress(lo + (hi - lo) * (i + 1) / n, f"{label} {i + 1}/{n}")
    del inputs


# ------------------------------------------------------------------------------ input statistics


class InputStats:
    """Statistics of a Linear's inputs over the calibration tokens; a field is None unless asked
    for. ``count``: tokens; ``abs_max`` / ``abs_mean`` / ``sq_sum``: per input feature;
    ``H``: ``2/N * X^T X`` in float32 (GPTQ's and SparseGPT's Hessian; AWQ's Gram matrix)."""

    def __init__(self, in_features: int, device: torch.device, *, hessian: bool = False,
                 abs_mean: bool = False, sq_sum: bool = False, abs_max: bool = False):
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float32, device=device)

        self.count = 0
        self.H = z(in_features, in_features) if hessian else None
        self.abs_mean = z(in_features) if abs_mean else None
        self.sq_sum = z(in_features) if sq_sum else None
        self.abs_max = z(in_features) if abs_max else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        k = x.shape[0]
        tot = self.count + k
        if self.sq_sum is not None:
            self.sq_sum += (x * x).sum(0)
        if self.abs_max is not None:
            torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        if self.abs_mean is not None:
            self.abs_mean.mul_(self.count / tot).add_(x.abs().sum(0) / tot)
        if self.H is not None:  # running mean of 2 x x^T
            self.H.mul_(self.count / tot)
            xs = x * (2.0 / tot) ** 0.5
            self.H.addmm_(xs.t(), xs)
        self.count = tot

    @property
    def hessian(self) -> torch.Tensor:
        """``H`` (kept with ``hessian=True``)."""
        if self.H is None:
            raise ValueError("these statistics were gathered without the Hessian")
        return self.H

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||`` per input feature (Wanda)."""
        assert self.sq_sum is not None
        return self.sq_sum.sqrt()

    def scale_(self, s: torch.Tensor) -> InputStats:
        """Become the statistics of ``x / s`` (after a scale ``s`` was folded in), in place (no
        second [n, n] Hessian: a 14336-wide one is 822 MB)."""
        if self.H is not None:
            self.H.div_(s.unsqueeze(1)).div_(s.unsqueeze(0))
        if self.abs_mean is not None:
            self.abs_mean.div_(s)
        if self.sq_sum is not None:
            self.sq_sum.div_(s * s)
        if self.abs_max is not None:
            self.abs_max.div_(s)
        return self


@contextmanager
def hooked(modules: Mapping[str, nn.Module], fn: Callable[[str, torch.Tensor], None]
           ) -> Iterator[None]:
    """Call ``fn(name, x)`` with each module's first input on every forward."""
    hs = [m.register_forward_pre_hook(lambda _m, args, _n=name: fn(_n, args[0]))
          for name, m in modules.items()]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


@torch.no_grad()
def observe(block: nn.Module, inputs: list[BlockInput], modules: Mapping[str, nn.Module],
            fn: Callable[[str, torch.Tensor], None], stop_early: bool = True
            ) -> list[torch.Tensor] | None:
    """Run every mini-batch through ``block`` calling ``fn(name, x)`` on the inputs of
    ``modules``. ``stop_early``: each forward stops once every module has seen its input
    (returns None); otherwise the forwards complete and their outputs are returned."""
    seen: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        fn(name, x)
        seen.add(name)
        if stop_early and len(seen) == len(modules):
            raise StopForward

    outs = []
    with hooked(modules, hook):
        for x in inputs:
            seen.clear()
            try:
                outs.append(_output(block(x.hidden, **x.kwargs)))
            except StopForward:
                pass
    return None if stop_early else outs


def input_stats(block: nn.Module, inputs: list[BlockInput], groups: list[Group],
                **fields: bool) -> dict[str, InputStats]:
    """One :class:`InputStats` per group (shared by the group's Linears: they read one tensor),
    keyed by every Linear name; ``fields`` as :class:`InputStats`. The forwards stop once the
    last group's input is in."""
    lins = dict(block.named_modules())
    dev = next(block.parameters()).device
    per_group = {g.linears[0]: InputStats(lins[g.linears[0]].in_features, dev, **fields)
                 for g in groups}
    observe(block, inputs, {n: lins[n] for n in per_group}, lambda n, x: per_group[n].add(x))
    return {name: per_group[g.linears[0]] for g in groups for name in g.linears}


# ------------------------------------------------------------------------------- scale folding


def _fold_rows(prev: nn.Linear, group: Group) -> tuple[int, int]:
    rows = prev.out_features
    if group.fold_part is None:
        return 0, rows
    i, parts = group.fold_part
    return i * rows // parts, (i + 1) * rows // parts


def can_fold(block: nn.Module, group: Group) -> bool:
    """Whether an input scale of ``group`` can fold into its producer."""
    if group.fold_into is None:
        return False
    prev = block.get_submodule(group.fold_into)
    in_f = block.get_submodule(group.linears[0]).in_features
    if isinstance(prev, nn.Linear):
        lo, hi = _fold_rows(prev, group)
        return hi - lo == in_f  # not e.g. GQA v_proj (kv heads) feeding o_proj (all heads)
    w = getattr(prev, "weight", None)
    return w is not None and tuple(w.shape) == (in_f,)


@torch.no_grad()
def fold_scale(block: nn.Module, group: Group, s: torch.Tensor, family: Family) -> bool:
    """Multiply the input columns of ``group``'s Linears by ``s`` and divide the output of the op
    producing their input (``group.fold_into``: a norm or a Linear) by ``s``: the float function
    is unchanged. Returns False (and changes nothing) where the producer cannot take it."""
    if not can_fold(block, group) or group.fold_into is None:
        return False
    prev = block.get_submodule(group.fold_into)
    if isinstance(prev, nn.Linear):
        lo, hi = _fold_rows(prev, group)
        prev.weight[lo:hi].div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias[lo:hi].div_(s.to(prev.bias.dtype))
    else:
        w = weight_of(prev)
        off = family.norm_offset
        if off:
            w.copy_(((off + w.float()) / s - off).to(w.dtype))
        else:
            w.div_(s.to(w.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.div_(s.to(bias.dtype))
    for name in group.linears:
        lw = weight_of(block.get_submodule(name))
        lw.mul_(s.to(lw.dtype))
    return True

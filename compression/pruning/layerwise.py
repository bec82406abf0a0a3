"""Block-by-block (sequential) processing of a transformer for calibration-based pruning.

The orchestration shared by Wanda and SparseGPT:

1. tokenise the calibration text (or sample it from the model) into ``[num, seq_len]`` chunks;
2. run the model up to its first block and keep that block's inputs (hidden states plus the
   keyword arguments the model passes to every block: masks, rotary embeddings...);
3. for every block in turn: move it to the work device, run the calibration inputs through it
   with hooks on its Linears that accumulate input statistics, let the method prune it, then run
   the *pruned* block to produce the next block's inputs (so later blocks see, and compensate,
   the error of earlier ones); move it back.

Only one block and the activations of one block live on the device at a time, so peak memory
stays near one copy of the model. With ``sequential=True`` the Linears of a block are pruned in
groups in execution order (q/k/v, then o, then gate/up, then down for llama), each group seeing
inputs produced by the already pruned groups before it; forwards stop as soon as the group's
inputs are collected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import CompressionError, Context
from ..device import return_freed_memory
from ..data import default_calibration_text, self_generated_text, token_chunks

#: model types whose blocks this module knows how to find and run
SUPPORTED_ARCHITECTURES = frozenset({"llama", "bert"})


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: ``model.layers`` (llama) or ``encoder.layer`` (BERT)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (
            name.endswith("model.layers") or name == "layers" or name.endswith("encoder.layer")
        ):
            return name, mod
    raise CompressionError(
        f"cannot find the transformer blocks of {type(model).__name__} "
        "(supported: llama-family model.layers, BERT encoder.layer)"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def calibration_tokens(model: nn.Module, cfg: Any, ctx: Context) -> torch.Tensor:
    """``[num_samples, seq_len]`` token ids from the job's text, or sampled from the model."""
    if ctx.tokenizer is None and cfg.calibration_source == "data":
        raise CompressionError("calibration needs the model's tokenizer")
    if cfg.calibration_source == "self":
        return self_generated_text(model, ctx.tokenizer, cfg.num_samples, cfg.seq_len, seed=ctx.seed)
    text = ctx.calibration_text or default_calibration_text()
    try:
        return token_chunks(ctx.tokenizer, text, cfg.num_samples, cfg.seq_len)
    except ValueError as e:
        raise CompressionError(f"calibration text: {e}") from e


def _move_outside(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move every parameter/buffer that is not inside the blocks (embeddings, rotary, ...)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(prefix + "."):
            t.data = t.data.to(device)


@dataclass
class BlockInput:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, device: torch.device,
                         batch_size: int = 8) -> list[BlockInput]:
    """Run the model on ``tokens`` until its first block and keep that block's inputs."""
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    _move_outside(model, prefix, device)
    captured: list[BlockInput] = []

    def pre_hook(_mod, args, kwargs):
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        hidden = args[0] if args else kw.pop("hidden_states")
        rest = list(args[1:])
        # BERT passes attention_mask / encoder states positionally
        for name, val in zip(("attention_mask", "encoder_hidden_states"), rest):
            kw.setdefault(name, val)
        captured.append(BlockInput(hidden.detach(), kw))
        raise _StopForward

    h = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch_size):
            ids = tokens[i : i + batch_size].to(device)
            try:
                kwargs: dict[str, Any] = {"input_ids": ids}
                if getattr(model.config, "is_decoder", False) or hasattr(model, "generate"):
                    kwargs["use_cache"] = False
                model(**kwargs)
            except _StopForward:
                pass
    finally:
        h.remove()
        _move_outside(model, prefix, home)
    if len(captured) != -(-tokens.shape[0] // batch_size):
        raise CompressionError("could not capture the inputs of the first transformer block")
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    return [BlockInput(_block_output(block(x.hidden, **x.kwargs)), x.kwargs) for x in inputs]


@torch.no_grad()
def linear_groups(block: nn.Module, sample: BlockInput) -> list[list[str]]:
    """The block's Linears in execution order, grouped by shared input (q/k/v read the same
    tensor, so do gate/up). Found by running one calibration batch through the block."""
    lins = block_linears(block)
    order: list[tuple[str, torch.Tensor]] = []  # keep the tensors alive: compare identity
    hooks = []
    for name, lin in lins.items():
        def hook(_m, args, _name=name):
            order.append((_name, args[0]))
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        block(sample.hidden[:1], **_slice_kwargs(sample.kwargs, 1))
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, inp in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    # Linears never called (e.g. unused cross-attention) are left alone
    return groups


def _slice_kwargs(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            out[k] = v[:n]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:n] if t.dim() > 0 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


class InputStats:
    """Accumulates statistics of a Linear's inputs over calibration tokens.

    ``col_sq``: per input feature sum of squares (Wanda's ``||X_j||^2``);
    ``hessian``: ``2/N * X^T X`` in fp32 (SparseGPT), optional.
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool):
        self.count = 0
        self.col_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.col_sq += (x * x).sum(0)
        if self.H is not None:
            # running mean of 2 X^T X / N (as in the SparseGPT paper's Hessian of the l2 loss)
            self.H.mul_(self.count / (self.count + n))
            self.H.addmm_(x.t(), x, alpha=2.0 / (self.count + n))
        self.count += n

    @property
    def col_norm(self) -> torch.Tensor:
        return self.col_sq.sqrt()


@torch.no_grad()
def collect_stats(block: nn.Module, names: list[str], inputs: list[BlockInput], hessian: bool,
                  stop_early: bool) -> dict[str, InputStats]:
    """Run ``inputs`` through ``block`` accumulating input statistics of Linears ``names``.
    Linears that read the same tensor share one accumulator. With ``stop_early`` each forward
    is abandoned once all of them have been called."""
    lins = block_linears(block)
    dev = next(block.parameters()).device
    stats: dict[str, InputStats] = {}
    hooks = []
    called: set[str] = set()
    last: dict[str, Any] = {"x": None, "stats": None}

    for name in names:
        lin = lins[name]

        def hook(_m, args, _name=name, _lin=lin):
            x = args[0]
            if x is last["x"] and (_name not in stats or stats[_name] is last["stats"]):
                stats[_name] = last["stats"]  # same tensor as the previous Linear: share
            else:
                if _name not in stats:
                    stats[_name] = InputStats(_lin.in_features, dev, hessian)
                stats[_name].add(x)
            last["x"], last["stats"] = x, stats[_name]
            called.add(_name)
            if stop_early and len(called) == len(names):
                raise _StopForward

        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for x in inputs:
            called.clear()
            last["x"] = None
            try:
                block(x.hidden, **x.kwargs)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
        last["x"] = None
    return stats


PruneFn = Callable[[int, dict[str, nn.Linear], dict[str, InputStats]], None]


@torch.no_grad()
def prune_blockwise(model: nn.Module, tokens: torch.Tensor, ctx: Context, prune: PruneFn, *,
                    hessian: bool, sequential: bool, batch_size: int = 8,
                    progress_label: str = "pruned block") -> None:
    """Drive ``prune(block_index, {name: Linear}, {name: InputStats})`` over every block."""
    prefix, blocks = find_blocks(model)
    device = ctx.device
    inputs = capture_block_inputs(model, tokens, device, batch_size)
    n = len(blocks)
    for i, block in enumerate(blocks):
        ctx.check_cancelled()
        home = next(block.parameters()).device
        block.to(device)
        lins = block_linears(block)
        groups = linear_groups(block, inputs[0])
        if not sequential:
            groups = [[name for grp in groups for name in grp]]
        for names in groups:
            # the forward stops once the group's last Linear has its input (whole block or not)
            stats = collect_stats(block, names, inputs, hessian, stop_early=True)
            prune(i, {k: lins[k] for k in names}, stats)
        inputs = run_block(block, inputs)
        block.to(home)
        return_freed_memory()
        ctx.progress((i + 1) / n, f"{progress_label} {i + 1}/{n}")
    del inputs


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, tokens: torch.Tensor, device: torch.device,
                         m: float, batch_size: int = 8) -> list[float]:
    """OWL's layerwise outlier distribution: for every block, the fraction of its Wanda scores
    ``|W_ij| * ||X_j||`` above ``m`` times the block's mean score (dense model, dense inputs)."""
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, tokens, device, batch_size)
    ratios = []
    for block in blocks:
        home = next(block.parameters()).device
        block.to(device)
        lins = block_linears(block)
        names = [g for grp in linear_groups(block, inputs[0]) for g in grp]
        stats = collect_stats(block, names, inputs, hessian=False, stop_early=False)
        scores = torch.cat([(lins[k].weight.detach().abs().float() * stats[k].col_norm).flatten()
                            for k in names])
        ratios.append(((scores > m * scores.mean()).float().mean()).item())
        inputs = run_block(block, inputs)
        block.to(home)
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from outlier ratios (OWL): blocks with more outliers are pruned less;
    the spread is ``[-lam, +lam]`` around ``sparsity`` and the mean equals ``sparsity``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = (r.max() - r.min()).item()
    if span == 0 or lam == 0:
        return [sparsity] * len(ratios)
    density = (r - r.min()) / span * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(min(max(1 - d, 0.0), 0.99)) for d in density]

"""Held-out perplexity of a model that is never whole in memory: the forward pass block by
block over all the eval windows (each block materialized once, in float32), instead of window
by window through the whole model.

The first block's inputs are captured by running the model's own forward up to it (embeddings,
rotary position embeddings, masks: what transformers computes for every family), then each block
runs on every window in turn. The embeddings and the output head stay in their stored dtype (a
float32 copy of Llama-3.1-8B's embeddings alone is 2.1 GB): their outputs are upcast (exact); the
embeddings are released once the first block's inputs are captured, and the head's logits are
computed in float32 from pieces of its weight's rows read from the files one at a time.

The numbers are the same as :func:`evaluation.perplexity` on the float32 model (same windows,
same per-token loss); the summation order of the loss differs by float rounding only.

This block loop is the calibration engine's (``compression/calib``) in miniature; it runs
families whose blocks all take the same inputs (llama, mistral, qwen2/3, phi3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base import Cancelled, hf, weight_of
from ..device import return_freed_memory
from ..evaluation import zeros
from .source import decoder_blocks, outside_prefixes, release

_HEAD_ROWS_ELEMS = 2**24  # elements of the head's weight upcast at a time (64 MB)


#: the first block's (args, kwargs) for one batch
Capture = tuple[tuple[Any, ...], dict[str, Any]]


class _Captured(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        super().__init__("first block reached")
        self.args, self.kwargs = args, kwargs


@dataclass
class BlockwiseStats:
    perplexity: float
    nonzero_params: int = 0
    linear_zeros: int = 0
    linear_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.linear_zeros / self.linear_total if self.linear_total else 0.0


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _move_buffers(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    """Buffers outside the blocks (rotary frequencies) onto ``device``."""
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(blocks_name):
            continue
        for leaf, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[leaf] = b.to(device)


def _capture(model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int,
             device: torch.device) -> list[Capture]:
    """The first block's (args, kwargs) for each batch of windows."""
    emb: nn.Module = hf(model).get_input_embeddings()

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    def upcast(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return out.float()

    h1 = first.register_forward_pre_hook(stop, with_kwargs=True)
    h2 = emb.register_forward_hook(upcast)
    caps: list[Capture] = []
    try:
        for b in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[b : b + batch_size].to(device), use_cache=False)
            except _Captured as c:
                caps.append((c.args, dict(c.kwargs)))
            else:
                raise RuntimeError("the forward pass never reached the first block")
    finally:
        h1.remove()
        h2.remove()
    return caps


def _plain(ckpt: Any, src: str) -> bool:
    """Whether tensor ``src`` is stored as it is (readable a piece of rows at a time)."""
    return hasattr(ckpt, "rows") and src in getattr(ckpt, "files", {})


def _used_embeddings(ckpt: Any, model: nn.Module, name: str, sets: list[torch.Tensor],
                     dev: torch.device, stats: BlockwiseStats, seen: set[str]
                     ) -> list[torch.Tensor] | None:
    """Put only the rows of the embeddings ``name`` that ``windows`` use in the module (a
    Llama-3 vocabulary is 128k rows, an eval set uses a few thousand) and return each set of
    windows' ids renumbered into them; count the whole weight's nonzeros on the way (read a piece at a
    time). None, with nothing done, where the weight is not stored plainly."""
    src = ckpt.source_name(f"{name}.weight")
    if not _plain(ckpt, src):
        return None
    used = torch.unique(torch.cat([w.reshape(-1) for w in sets]))
    rows, count = [], 0
    for a, piece in ckpt.row_pieces(src, _HEAD_ROWS_ELEMS):
        count += int(torch.count_nonzero(piece).item())
        inside = used[(used >= a) & (used < a + piece.shape[0])]
        rows.append(piece[inside - a].clone())
    if src not in seen:
        seen.add(src)
        stats.nonzero_params += count
    mod = model.get_submodule(name)
    mod._parameters["weight"] = nn.Parameter(torch.cat(rows).to(dev), requires_grad=False)
    return [torch.searchsorted(used, w) for w in sets]


def _run_block(block: nn.Module, caps: list[Capture]) -> None:
    for j, (args, kwargs) in enumerate(caps):
        if args:
            out = block(*args, **kwargs)
        else:
            out = block(**kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if args:
            caps[j] = ((out, *args[1:]), kwargs)
        else:
            caps[j] = (args, {**kwargs, "hidden_states": out})


def _hidden(cap: Capture) -> torch.Tensor:
    h = cap[0][0] if cap[0] else cap[1]["hidden_states"]
    assert isinstance(h, torch.Tensor)
    return h


class _Head:
    """The output head's weight a piece of rows at a time, in float32 on the device: read from
    the checkpoint's files piece by piece where it is stored plainly (never whole in memory: a
    float32 Llama-3 head is 2.1 GB), else sliced from the materialized module."""

    def __init__(self, ckpt: Any, module: nn.Module, name: str, dev: torch.device):
        self.ckpt, self.module, self.dev = ckpt, module, dev
        self.src = ckpt.source_name(f"{name}.weight")
        self.lazy = _plain(ckpt, self.src)
        shape = ckpt.shape_of(self.src) if self.lazy else list(weight_of(module).shape)
        self.vocab, self.width = int(shape[0]), int(shape[1])
        self.bias = getattr(module, "bias", None)
        if self.lazy and self.bias is not None:
            self.bias = ckpt.tensor(ckpt.source_name(f"{name}.bias")).to(dev)
        self.rows = max(1, _HEAD_ROWS_ELEMS // self.width)

    def pieces(self) -> Any:
        w = weight_of(self.module)
        stored = (self.ckpt.row_pieces(self.src, _HEAD_ROWS_ELEMS) if self.lazy else
                  ((a, w[a : a + self.rows]) for a in range(0, self.vocab, self.rows)))
        for a, piece in stored:
            bias = self.bias[a : a + piece.shape[0]].float() if self.bias is not None else None
            yield a, piece.to(self.dev).float(), bias

    def count(self, stats: BlockwiseStats, seen: set[str]) -> None:
        """Nonzeros of the head's weight (once; a tied head's are the embeddings')."""
        if self.src in seen:
            return
        seen.add(self.src)
        stats.nonzero_params += sum(int(torch.count_nonzero(w).item())
                                    for _a, w, _b in self.pieces())
        if self.bias is not None:
            stats.nonzero_params += int(torch.count_nonzero(self.bias).item())


def _nll(hidden: torch.Tensor, head: _Head, targets: torch.Tensor) -> float:
    """Summed next-token loss of one window in float32, the head's rows a piece at a time: a
    running log-sum-exp instead of the whole ``[seq, vocab]`` logits (Llama-3's 128k vocabulary:
    263 MB per 512 tokens, and as much again for their softmax)."""
    x, tgt = hidden[:-1], targets[1:]
    run_max = torch.full((x.shape[0],), -math.inf, device=x.device)
    run_sum = torch.zeros(x.shape[0], device=x.device)
    picked = torch.zeros(x.shape[0], device=x.device)
    for a, w, bias in head.pieces():
        z = x @ w.T
        if bias is not None:
            z += bias
        new_max = torch.maximum(run_max, z.amax(1))
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
        run_max = new_max
        inside = (tgt >= a) & (tgt < a + z.shape[1])
        picked[inside] = z[inside, tgt[inside] - a]
    return (run_max + torch.log(run_sum) - picked).sum().item()


def _count(stats: BlockwiseStats, module: nn.Module, prefix: str, ckpt: Any,
           seen: set[str]) -> None:
    """Nonzeros of the parameters of ``module`` (each stored tensor once: tied ones by the name
    they are read from) and zeros of its Linear weights."""
    for name, p in module.named_parameters():
        src = ckpt.source_name(f"{prefix}.{name}")
        if src not in seen:
            seen.add(src)
            stats.nonzero_params += int(torch.count_nonzero(p).item())
    for m in module.modules():
        if isinstance(m, nn.Linear):
            stats.linear_zeros += zeros(m.weight)
            stats.linear_total += m.weight.numel()


@torch.no_grad()
def blockwise_perplexity(ckpt: Any, model: nn.Module, windows: torch.Tensor, *,
                         more: tuple[torch.Tensor, ...] = (),
                         device: torch.device | str = "cpu", batch_size: int = 4,
                         progress: Callable[[float, str | None], None] = lambda *_: None,
                         should_stop: Callable[[], bool] = lambda: False) -> BlockwiseStats:
    """Perplexity of the skeleton ``model`` whose weights ``ckpt`` materializes (a
    :class:`LazyCheckpoint` or an artifact reader) over ``windows`` (``[n, seq_len]``), and the
    nonzero counts of every weight seen on the way; ``more``: other sets of windows (another
    text) measured in the same pass, their perplexities in ``extra["perplexities"]``. At most
    one of: the embeddings' used rows, one block, a piece of the output head's rows is in
    memory at a time (with the activations)."""
    dev = torch.device(device)
    blocks_name, blocks = decoder_blocks(model)
    stats = BlockwiseStats(perplexity=float("nan"))
    seen: set[str] = set()
    head_mod: nn.Module = hf(model).get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head_mod)
    head = _Head(ckpt, head_mod, head_name, dev)
    before = [p for p in outside_prefixes(model, blocks_name) if p != head_name]
    try:
        emb: nn.Module = hf(model).get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        sets = [windows, *more]
        ids = _used_embeddings(ckpt, model, emb_name, sets, dev, stats, seen)
        for p in before:  # stored dtype: the embeddings' output is upcast
            if p != emb_name or ids is None:
                _count(stats, ckpt.materialize(model, p, dev), p, ckpt, seen)
        _move_buffers(model, blocks_name, dev)
        caps = [_capture(model, blocks[0], w, batch_size, dev) for w in (ids or sets)]
        tied = f"{head_name}.weight" in ckpt.alias
        if head.lazy or not tied or ids is not None:
            release(emb)  # the head is read in pieces from the files, or is not the embeddings
        for i, block in enumerate(blocks):
            ckpt.materialize(model, f"{blocks_name}.{i}", dev, dtype=torch.float32)
            _count(stats, block, f"{blocks_name}.{i}", ckpt, seen)
            for c in caps:
                _run_block(block, c)
            release(block)
            return_freed_memory()
            progress((i + 1) / (len(blocks) + 1), f"block {i + 1}/{len(blocks)}")
            if should_stop():
                raise Cancelled("job cancelled")
        if not head.lazy:
            if tied:  # one copy of a tied weight
                head_mod.weight = emb.weight
            else:
                ckpt.materialize(model, head_name, dev)
            _count(stats, head_mod, head_name, ckpt, seen)
            # the output head is not a pruned/quantized Linear: not in the sparsity
            stats.linear_zeros -= zeros(weight_of(head_mod))
            stats.linear_total -= weight_of(head_mod).numel()
        else:
            head.count(stats, seen)
        ppl = [_loss(model, blocks_name, head, c, w, dev) for c, w in zip(caps, sets)]
        stats.perplexity = ppl[0]
        stats.extra["perplexities"] = ppl[1:]
    finally:
        for p in [*before, head_name]:
            release(model.get_submodule(p))
    progress(1.0, "perplexity measured")
    return stats


def _loss(model: nn.Module, blocks_name: str, head: _Head, caps: list[Capture],
          windows: torch.Tensor, dev: torch.device) -> float:
    norm = model.get_submodule(blocks_name.rpartition(".")[0]).get_submodule("norm")
    nll, count, w = 0.0, 0, 0
    for cap in caps:
        h = norm(_hidden(cap))
        for j in range(h.shape[0]):
            ids = windows[w].to(dev)
            nll += _nll(h[j], head, ids)
            count += ids.numel() - 1
            w += 1
    return math.exp(nll / count)

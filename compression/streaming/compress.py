"""Compression of a model that never is whole in memory.

The model is a skeleton on the meta device (:class:`LazyCheckpoint`); for each decoder block in
turn its weights are read onto the job's device, upcast to float32 (the dtype every method
computes in, as the in-memory path loads models), changed by the method's own ``apply`` (run on
that block alone, or on the calibration engine's block loop over a streamed skeleton), written to
the sharded artifact and released. Quantized blocks are written by the same per-Linear packing as
the in-memory saver (:func:`artifact.iter_compressed_tensors`); pruned blocks as float32 tensors,
as ``save_pretrained`` writes the in-memory float32 model. The tensors outside the blocks
(embeddings, final norm, an untied output head) are copied from the source in row pieces,
converted to the artifact's dense dtype. The artifact equals the in-memory one tensor for tensor;
only a quantized artifact's ``config.json`` ``dtype`` is the source's (a bf16 source reloads in
bf16).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import Cancelled, CompressionError, CompressionResult, Context, MethodConfig
from ..device import return_freed_memory
from ..evaluation import prunable_linears, zeros
from ..quantization.artifact import (
    DTYPES,
    iter_compressed_tensors,
    save_configs,
    write_compressed_config,
)
from .source import LazyCheckpoint, decoder_blocks, release
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter

#: methods that change each Linear from its own weights only (no calibration): they run on one
#: block exactly as on the whole model
WEIGHT_ONLY = frozenset({"int8", "rtn", "magnitude"})
#: calibrated methods that change each block on its own (the calibration engine's block loop,
#: nothing read from the whole model): they run on a streamed skeleton (:mod:`.blocks`)
CALIBRATED = frozenset({"gptq", "awq", "wanda", "sparsegpt", "admm"})
STREAMABLE = WEIGHT_ONLY | CALIBRATED
_PIECE_ELEMS = 2**24  # elements per piece of a dense tensor copied from the source

Progress = Callable[[float, str | None], None]


def cannot_stream(method: str, params: dict[str, Any] | None) -> str | None:
    """Why one stage of ``method`` with ``params`` cannot run block by block, or None."""
    params = params or {}
    if method not in STREAMABLE:
        return f"{method!r} is not one of the block-by-block methods {sorted(STREAMABLE)}"
    if method == "magnitude" and params.get("scope") == "global":
        return "magnitude with scope='global' compares the weights of all blocks at once"
    if params.get("calibration_source") == "self":
        return "calibration_source='self' generates its calibration text with the whole model"
    return None


class _BlockRoot(nn.Module):
    """A model that holds one block at its place in the full model (``model.layers.3``), so
    that names, and the method's and the saver's view of it, are those of the full model."""

    def __init__(self, config: Any, path: str, block: nn.Module):
        super().__init__()
        self.config = config
        *parents, leaf = path.split(".")
        cur: nn.Module = self
        for p in parents:
            child = nn.Module()
            cur.add_module(p, child)
            cur = child
        cur.add_module(leaf, block)


@dataclass
class StreamResult:
    files: list[Path]
    metrics: dict[str, float] = field(default_factory=dict)
    fmt: str = "compressed-tensors"


@dataclass(frozen=True)
class _Output:
    """How blocks are written: with the method's compressed-tensors saver options, or (None: a
    method that leaves dense float weights, pruning) as float32 tensors, as ``save_pretrained``
    writes the in-memory float32 model."""

    options: dict[str, Any] | None

    @classmethod
    def of(cls, result: CompressionResult, method: str) -> _Output:
        if result.saver is None:
            return cls(None)
        options = getattr(result.saver, "options", None)
        if options is None:
            raise CompressionError(f"method {method!r} has no streamable saver")
        return cls(options)

    @property
    def fmt(self) -> str:
        return "hf-safetensors" if self.options is None else "compressed-tensors"

    @property
    def dense_dtype(self) -> torch.dtype:
        return torch.float32 if self.options is None else DTYPES[self.options["dense_dtype"]]

    def tensors(self, root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        if self.options is None:
            return ((n, t.detach().to("cpu").contiguous()) for n, t in root.state_dict().items())
        return iter_compressed_tensors(root, self.options["fmt"], self.options["dense_dtype"],
                                       self.options["float_head"])

    def write_config(self, model: nn.Module, out: Path) -> None:
        if self.options is None:
            cfg = copy.deepcopy(model.config)
            cfg.dtype = torch.float32
            save_configs(model, cfg, out)
            return
        write_compressed_config(model, out, self.options["fmt"], self.options["activations"],
                                self.options["float_head"])


@dataclass
class _Written:
    files: list[Path]
    output: _Output
    linear_zeros: int = 0
    linear_total: int = 0

    def metrics(self) -> dict[str, float]:
        m = {"shards": float(len(self.files))}
        if self.output.options is None and self.linear_total:
            m["sparsity_linear"] = self.linear_zeros / self.linear_total
        return m


def _dense_pieces(ckpt: LazyCheckpoint, name: str, dtype: torch.dtype
                  ) -> tuple[list[int], Iterator[torch.Tensor]]:
    shape = ckpt.shape_of(name)
    if not shape:
        return shape, iter([ckpt.tensor(name).to(dtype)])
    return shape, (p.to(dtype) for _a, p in ckpt.row_pieces(name, _PIECE_ELEMS))


def _write_outside(ckpt: LazyCheckpoint, model: nn.Module, blocks_name: str,
                   writer: ShardedWriter, dense: torch.dtype) -> None:
    """Every tensor outside the blocks, as the in-memory saver writes it (a tied output head is
    not stored: transformers ties it again on load)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    done: set[str] = set()
    for name, _t in model.state_dict(keep_vars=True).items():
        if name.startswith(blocks_name + "."):
            continue
        if tied and name.endswith("lm_head.weight"):
            continue
        if name not in ckpt and name not in ckpt.alias:
            continue  # a buffer computed from the config, not stored
        src = ckpt.source_name(name)
        if src in done:
            continue
        done.add(src)
        dt = dense if ckpt.dtype_of(src).is_floating_point else ckpt.dtype_of(src)
        shape, pieces = _dense_pieces(ckpt, src, dt)
        writer.add_pieces(name, dt, shape, pieces)


def _write_artifact(ckpt: LazyCheckpoint, model: nn.Module, prefix: str, out_dir: str | Path,
                    blocks: Iterator[tuple[nn.Module, _Output]], max_shard_bytes: int) -> _Written:
    """Write each block ``blocks`` yields (a :class:`_BlockRoot` and how to write it; the
    iterator releases a block when asked for the next), then the tensors outside the blocks and
    the config. Nothing is left behind on an error."""
    writer = ShardedWriter(out_dir, max_shard_bytes)
    written = _Written([], _Output(None))
    try:
        for root, written.output in blocks:
            for name, t in written.output.tensors(root):
                writer.add(name, t)
            if written.output.options is None:  # pruned: count what the report shows
                for lin in prunable_linears(root).values():
                    written.linear_total += lin.weight.numel()
                    written.linear_zeros += zeros(lin.weight.detach())
        _write_outside(ckpt, model, prefix, writer, written.output.dense_dtype)
        written.files = writer.close()
    except BaseException:
        writer.abort()
        raise
    written.output.write_config(model, Path(out_dir))
    return written


def stream_quantize(source: str | Path, out_dir: str | Path, method: Any, cfg: MethodConfig, *,
                    device: torch.device | str = "cpu", progress: Progress = lambda *_: None,
                    should_stop: Callable[[], bool] = lambda: False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamResult:
    """Compress the safetensors model at ``source`` with the weight-only ``method`` block by
    block and write the sharded artifact (config, weights; no tokenizer) to ``out_dir``."""
    why = cannot_stream(method.name, cfg.model_dump())
    if why is not None or method.name not in WEIGHT_ONLY:
        raise CompressionError(f"method {method.name!r} cannot stream without calibration: "
                               f"{why or 'it is calibrated'}")
    dev = torch.device(device)
    t0 = time.perf_counter()
    counts: dict[str, float] = {}
    with LazyCheckpoint(source) as ckpt:
        method.check_model(cfg, ckpt.config)
        model = ckpt.skeleton()
        prefix, blocks = decoder_blocks(model)
        it = _weight_only_blocks(ckpt, model, prefix, len(blocks), method, cfg, dev, progress,
                                 should_stop, counts)
        written = _write_artifact(ckpt, model, prefix, out_dir, it, max_shard_bytes)
    return StreamResult(written.files, {**counts, **written.metrics(),
                                        "compress_seconds": time.perf_counter() - t0},
                        written.output.fmt)


def _weight_only_blocks(ckpt: LazyCheckpoint, model: nn.Module, prefix: str, n: int, method: Any,
                        cfg: MethodConfig, dev: torch.device, progress: Progress,
                        should_stop: Callable[[], bool], counts: dict[str, float]
                        ) -> Iterator[tuple[nn.Module, _Output]]:
    """Each block read, changed by ``method`` on its own, handed out, released."""
    for i in range(n):
        path = f"{prefix}.{i}"
        block = ckpt.materialize(model, path, dev, dtype=torch.float32)
        root = _BlockRoot(model.config, path, block)

        def block_progress(f: float, m: str | None, _i: int = i) -> None:
            progress((_i + f) / n, m)

        ctx = Context(device=dev, should_stop=should_stop, progress=block_progress)
        result = method.apply(root, cfg, ctx)
        if "quantized_linears" in result.metrics:
            counts["quantized_linears"] = (counts.get("quantized_linears", 0.0)
                                           + float(result.metrics["quantized_linears"]))
        yield root, _Output.of(result, method.name)
        del result, root, ctx
        release(block)
        return_freed_memory()
        progress((i + 1) / n, f"block {i + 1}/{n} written")
        if should_stop():
            raise Cancelled("job cancelled")


def stream_calibrated(source: str | Path, out_dir: str | Path, method: Any, cfg: MethodConfig,
                      *, scratch: Path, tokenizer: Any, calibration_text: str | None,
                      device: torch.device | str = "cpu", progress: Progress = lambda *_: None,
                      should_stop: Callable[[], bool] = lambda: False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamResult:
    """Run the calibrated ``method`` on the calibration engine over a streamed skeleton (each
    block read, changed, kept in a scratch file), then write the sharded artifact block by block
    in the format the method's saver declares (none: dense float32, as pruning saves)."""
    from ..calib.engine import BLOCK_SOURCE_ATTR
    from .blocks import StreamedBlocks

    why = cannot_stream(method.name, cfg.model_dump())
    if why is not None or method.name not in CALIBRATED:
        raise CompressionError(f"method {method.name!r} cannot stream on the calibration "
                               f"engine: {why or 'it needs no calibration'}")
    dev = torch.device(device)
    t0 = time.perf_counter()
    with LazyCheckpoint(source) as ckpt:
        method.check_model(cfg, ckpt.config)
        model = ckpt.skeleton()
        blocks = StreamedBlocks(ckpt, model, scratch)
        setattr(model, BLOCK_SOURCE_ATTR, blocks)
        ctx = Context(device=dev, tokenizer=tokenizer, calibration_text=calibration_text,
                      work_dir=Path(scratch), should_stop=should_stop,
                      progress=lambda f, m: progress(0.9 * (f or 0.0), m))
        try:
            result = method.apply(model, cfg, ctx)
        finally:
            delattr(model, BLOCK_SOURCE_ATTR)
        it = _final_blocks(blocks, model, _Output.of(result, method.name), progress)
        written = _write_artifact(ckpt, model, blocks.prefix, out_dir, it, max_shard_bytes)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()}
    metrics.update({**written.metrics(), "compress_seconds": time.perf_counter() - t0})
    return StreamResult(written.files, metrics, written.output.fmt)


def _final_blocks(blocks: Any, model: nn.Module, output: _Output, progress: Progress
                  ) -> Iterator[tuple[nn.Module, _Output]]:
    """Each block as the method left it (its scratch file), handed out, released."""
    for i in range(len(blocks)):
        block = blocks.load_final(i, "cpu")
        yield _BlockRoot(model.config, f"{blocks.prefix}.{i}", block), output
        release(block)
        progress(0.9 + 0.1 * (i + 1) / len(blocks), f"block {i + 1} written")

"""Weight-only quantization of a model that never is whole in memory.

The model is a skeleton on the meta device (:class:`LazyCheckpoint`); for each decoder block in
turn its weights are read onto the job's device, upcast to float32 (the dtype every method
computes in, as the in-memory path loads models), quantized by the method's own ``apply`` run on
that block alone, written to the sharded artifact by the same per-Linear packing as the
in-memory saver (:func:`artifact.iter_compressed_tensors`), and released. The tensors outside
the blocks (embeddings, final norm, an untied output head) are copied from the source in row
pieces, converted to the artifact's dense dtype. The artifact equals the in-memory one tensor
for tensor; only ``config.json``'s ``dtype`` is the source's (a bf16 source reloads in bf16).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base import CompressionError, Context, MethodConfig
from ..device import return_freed_memory
from ..quantization.artifact import DTYPES, iter_compressed_tensors, write_compressed_config
from .source import LazyCheckpoint, decoder_blocks, release
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter

#: methods that quantize each Linear from its own weights only (no calibration): they run on
#: one block exactly as on the whole model
WEIGHT_ONLY = frozenset({"int8", "rtn"})
#: calibrated methods that change each block on its own (the calibration engine's block loop,
#: nothing read from the whole model): they run on a streamed skeleton (:mod:`.blocks`)
CALIBRATED = frozenset({"gptq", "awq"})
STREAMABLE = WEIGHT_ONLY | CALIBRATED
_PIECE_ELEMS = 2**24  # elements per piece of a dense tensor copied from the source


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


def _dense_pieces(ckpt: LazyCheckpoint, name: str, dtype: torch.dtype
                  ) -> tuple[list[int], Iterator[torch.Tensor]]:
    shape = ckpt.shape_of(name)
    row = max(1, torch.Size(shape[1:]).numel())
    step = max(1, _PIECE_ELEMS // row)

    def pieces() -> Iterator[torch.Tensor]:
        if not shape:
            yield ckpt.tensor(name).to(dtype)
            return
        for a in range(0, shape[0], step):
            yield ckpt.rows(name, a, min(shape[0], a + step)).to(dtype)

    return shape, pieces()


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


def stream_quantize(source: str | Path, out_dir: str | Path, method: Any, cfg: MethodConfig, *,
                    device: torch.device | str = "cpu",
                    progress: Callable[[float, str | None], None] = lambda *_: None,
                    should_stop: Callable[[], bool] = lambda: False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamResult:
    """Quantize the safetensors model at ``source`` with the weight-only ``method`` block by
    block and write the sharded compressed-tensors artifact (config, weights; no tokenizer) to
    ``out_dir``."""
    if method.name not in WEIGHT_ONLY:
        raise CompressionError(f"method {method.name!r} cannot stream block by block yet; "
                               f"streaming methods: {sorted(WEIGHT_ONLY)}")
    dev = torch.device(device)
    t0 = time.perf_counter()
    with LazyCheckpoint(source) as ckpt:
        method.check_model(cfg, ckpt.config)
        model = ckpt.skeleton()
        blocks_name, blocks = decoder_blocks(model)
        writer = ShardedWriter(out_dir, max_shard_bytes)
        try:
            options, linears = _stream_blocks(ckpt, model, blocks_name, len(blocks), method, cfg,
                                              dev, writer, progress, should_stop)
            _write_outside(ckpt, model, blocks_name, writer, DTYPES[options["dense_dtype"]])
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_compressed_config(model, Path(out_dir), options["fmt"], options["activations"],
                                options["float_head"])
    return StreamResult(files=files, metrics={
        "quantized_linears": float(linears), "compress_seconds": time.perf_counter() - t0,
        "shards": float(len(files))})


def stream_calibrated(source: str | Path, out_dir: str | Path, method: Any, cfg: MethodConfig,
                      *, scratch: Path, tokenizer: Any, calibration_text: str | None,
                      device: torch.device | str = "cpu",
                      progress: Callable[[float, str | None], None] = lambda *_: None,
                      should_stop: Callable[[], bool] = lambda: False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> StreamResult:
    """Run the calibrated ``method`` on the calibration engine over a streamed skeleton (each
    block read, changed, kept in a scratch file), then write the sharded artifact block by block
    in the format the method's saver declares."""
    from .blocks import BLOCK_SOURCE_ATTR, StreamedBlocks

    if method.name not in CALIBRATED:
        raise CompressionError(f"method {method.name!r} cannot stream block by block yet; "
                               f"streaming methods: {sorted(STREAMABLE)}")
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
        options = getattr(result.saver, "options", None)
        if options is None:
            raise CompressionError(f"method {method.name!r} has no streamable saver")
        writer = ShardedWriter(out_dir, max_shard_bytes)
        try:
            for i in range(len(blocks)):
                block = blocks.load_final(i, "cpu")
                root = _BlockRoot(model.config, f"{blocks.prefix}.{i}", block)
                for name, t in iter_compressed_tensors(root, options["fmt"],
                                                       options["dense_dtype"],
                                                       options["float_head"]):
                    writer.add(name, t)
                release(block)
                progress(0.9 + 0.1 * (i + 1) / len(blocks), f"block {i + 1} written")
            _write_outside(ckpt, model, blocks.prefix, writer, DTYPES[options["dense_dtype"]])
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_compressed_config(model, Path(out_dir), options["fmt"], options["activations"],
                                options["float_head"])
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()}
    metrics.update({"compress_seconds": time.perf_counter() - t0, "shards": float(len(files))})
    return StreamResult(files=files, metrics=metrics)


def _stream_blocks(ckpt: LazyCheckpoint, model: nn.Module, blocks_name: str, n: int,
                   method: Any, cfg: MethodConfig, dev: torch.device, writer: ShardedWriter,
                   progress: Callable[[float, str | None], None],
                   should_stop: Callable[[], bool]) -> tuple[dict, int]:
    options: dict | None = None
    linears = 0
    for i in range(n):
        path = f"{blocks_name}.{i}"
        block = ckpt.materialize(model, path, dev, dtype=torch.float32)
        root = _BlockRoot(model.config, path, block)
        ctx = Context(device=dev, should_stop=should_stop,
                      progress=lambda f, m, _i=i: progress((_i + f) / n, m))
        result = method.apply(root, cfg, ctx)
        options = getattr(result.saver, "options", None)
        if options is None:
            raise CompressionError(f"method {method.name!r} has no streamable saver")
        linears += int(result.metrics.get("quantized_linears", 0))
        for name, t in iter_compressed_tensors(root, options["fmt"], options["dense_dtype"],
                                               options["float_head"]):
            writer.add(name, t)
        del result, root, ctx
        release(block)
        return_freed_memory()
        progress((i + 1) / n, f"block {i + 1}/{n} written")
        if should_stop():
            from ..base import Cancelled

            raise Cancelled("job cancelled")
    assert options is not None
    return options, linears

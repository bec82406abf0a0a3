"""A sharded safetensors writer that holds one tensor (or one piece of one) in memory at a time.

Tensors are appended in order; a shard is closed when the next tensor would take it past
``max_shard_bytes`` (a tensor larger than that gets a shard of its own, as in transformers).
The shard count is known only at the end, so shards are written under temporary names and
renamed at :meth:`ShardedWriter.close` to ``model-00001-of-0000K.safetensors`` with a
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), or to
``model.safetensors`` alone when one shard was enough, as ``save_pretrained`` names them.

Each shard's data is written after a reserved header area; at close the header (JSON padded with
spaces, which the format allows) is written into it, so no large shard is ever copied. A shard
under 64 MiB, or whose header outgrows the area (thousands of tensors), is moved once behind its
exact header instead.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .source import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_HEADER_RESERVE = 256 * 1024
_COMPACT_BELOW = 64 * 2**20  # smaller shards are moved behind an unpadded header (cheap)
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data


class _Shard:
    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path = path
        self.f = open(path, "wb")
        self.f.seek(8 + _HEADER_RESERVE)
        self.header: dict[str, dict[str, Any]] = {}
        self.metadata = metadata
        self.nbytes = 0

    def begin(self, name: str, dtype: torch.dtype, shape: list[int]) -> int:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                             "data_offsets": [self.nbytes, self.nbytes + n]}
        self.nbytes += n
        return n

    def write(self, piece: torch.Tensor) -> int:
        if not piece.numel():
            return 0
        return self.f.write(_bytes_of(piece))

    def close(self) -> None:
        head = dict(self.header)
        head["__metadata__"] = self.metadata
        raw = json.dumps(head, separators=(",", ":")).encode()
        if len(raw) <= _HEADER_RESERVE and self.nbytes >= _COMPACT_BELOW:
            raw += b" " * (_HEADER_RESERVE - len(raw))
            self.f.seek(0)
            self.f.write(struct.pack("<Q", len(raw)))
            self.f.write(raw)
            self.f.close()
            return
        self.f.close()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        tmp = self.path.with_name(self.path.name + ".move")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            src.seek(8 + _HEADER_RESERVE)
            shutil.copyfileobj(src, dst, 16 * 2**20)
        tmp.replace(self.path)


class ShardedWriter:
    """``add`` tensors (or ``add_pieces`` of one) block by block, then ``close``."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = dict(metadata or {"format": "pt"})
        self.shards: list[_Shard] = []
        self.names: set[str] = set()
        self.closed = False

    def _shard_for(self, nbytes: int) -> _Shard:
        cur = self.shards[-1] if self.shards else None
        if cur is None or (cur.nbytes and cur.nbytes + nbytes > self.max_shard_bytes):
            if cur is not None:
                cur.close()
            cur = _Shard(self.out / f".shard-{len(self.shards) + 1}.partial", self.metadata)
            self.shards.append(cur)
        return cur

    def add(self, name: str, t: torch.Tensor) -> None:
        self.add_pieces(name, t.dtype, list(t.shape), [t])

    def add_pieces(self, name: str, dtype: torch.dtype, shape: list[int],
                   pieces: Iterable[torch.Tensor]) -> None:
        """One tensor of ``dtype`` and ``shape`` whose row-major data is ``pieces`` one after
        another (e.g. row blocks read and converted one at a time)."""
        if self.closed:
            raise RuntimeError("the writer is closed")
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        shard = self._shard_for(n)
        shard.begin(name, dtype, shape)
        written = 0
        for p in pieces:
            if p.dtype != dtype:
                raise TypeError(f"{name}: a piece of dtype {p.dtype}, expected {dtype}")
            written += shard.write(p)
        if written != n:
            raise RuntimeError(f"{name}: wrote {written} bytes, its shape {shape} needs {n}")

    def close(self) -> list[Path]:
        """Close the last shard, name the shards and write the index; returns the files."""
        if self.closed:
            raise RuntimeError("the writer is closed")
        self.closed = True
        if not self.shards:
            raise RuntimeError("no tensors were written")
        self.shards[-1].close()
        k = len(self.shards)
        names = ([SINGLE_FILE] if k == 1 else
                 [f"model-{i:05d}-of-{k:05d}.safetensors" for i in range(1, k + 1)])
        weight_map: dict[str, str] = {}
        total = 0
        files = []
        for shard, fname in zip(self.shards, names):
            os.replace(shard.path, self.out / fname)
            files.append(self.out / fname)
            total += shard.nbytes
            for tname in shard.header:
                weight_map[tname] = fname
        if k > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files

    def abort(self) -> None:
        """Remove the partial shards (after an error or a cancel)."""
        self.closed = True
        for s in self.shards:
            if not s.f.closed:
                s.f.close()
            s.path.unlink(missing_ok=True)

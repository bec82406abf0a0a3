"""A checkpoint read lazily: the config first, then tensors by name, read on demand from its
safetensors files (one file, or shards listed by ``model.safetensors.index.json``; each file's
header parsed once), in whatever dtype they are stored.

The model itself is a skeleton whose parameters live on the meta device (no memory); one module
at a time (a decoder block, the embeddings, the final norm) gets its parameters materialized on a
device, in the source dtype, and is released back to meta afterwards. Buffers are created for
real when the skeleton is built (``init_empty_weights(include_buffers=False)``): non-persistent
ones (rotary ``inv_freq``) are computed from the config, never read from the files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from ..base import CompressionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def weight_files(path: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it, for a local HF directory."""
    from safetensors import safe_open

    d = Path(path)
    index = d / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / fname for name, fname in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CompressionError(f"no safetensors weights in {d}")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = f
    return out


def is_streamable(source: str | Path) -> bool:
    """A local directory with a config and safetensors weights."""
    d = Path(source)
    return d.is_dir() and (d / "config.json").is_file() and (
        (d / INDEX_FILE).is_file() or any(d.glob("*.safetensors")))


class TensorFiles:
    """Tensors of safetensors files by name, read on demand (see :meth:`tensor`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = weight_files(self.path)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.alias: dict[str, str] = {}

    def _entry(self, name: str) -> tuple[Any, dict[str, Any]]:
        """(open file, header entry) of tensor ``name``."""
        if name not in self.files:
            raise KeyError(f"{name!r} is not in the checkpoint {self.path}")
        f = self.files[name]
        if f not in self._handles:
            fh = self._stack.enter_context(open(f, "rb"))
            n = struct.unpack("<Q", fh.read(8))[0]
            self._handles[f] = (fh, json.loads(fh.read(n)), 8 + n)
        fh, header, start = self._handles[f]
        e = header[name]
        return fh, {**e, "start": start + e["data_offsets"][0], "end": start + e["data_offsets"][1]}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def dtype_of(self, name: str) -> torch.dtype:
        return _ST_TO_TORCH[self._entry(name)[1]["dtype"]]

    def shape_of(self, name: str) -> list[int]:
        return list(self._entry(name)[1]["shape"])

    def _read(self, fh: Any, offset: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = buf.numpy().data, 0  # a memoryview of buf's bytes
        while done < nbytes:  # one read returns at most ~2 GB
            n = os.preadv(fh.fileno(), [view[done : done + 2**30]], offset + done)
            if n <= 0:
                raise CompressionError(f"{self.path}: a safetensors file is truncated")
            done += n
        return buf

    def tensor(self, name: str) -> torch.Tensor:
        """Read ``name`` into fresh memory (read, not memory-mapped: pages of a mapping stay in
        the process's resident set as long as the file is open: 2.3 GB after reading the 16
        blocks of a Llama-3.2-1B-shaped model)."""
        fh, e = self._entry(name)
        dt = _ST_TO_TORCH[e["dtype"]]
        return self._read(fh, e["start"], e["end"] - e["start"]).view(dt).reshape(e["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), read without the rest."""
        fh, e = self._entry(name)
        dt = _ST_TO_TORCH[e["dtype"]]
        shape = e["shape"]
        stop = min(stop, shape[0])
        row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dt).element_size()
        buf = self._read(fh, e["start"] + start * row, (stop - start) * row)
        return buf.view(dt).reshape([stop - start, *shape[1:]])

    def row_pieces(self, name: str, elems: int = 2**24) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of tensor ``name``, about ``elems`` elements at a time (never the
        whole tensor in memory: a float32 Llama-3 head is 2.1 GB)."""
        shape = self.shape_of(name)
        step = max(1, elems // max(1, torch.Size(shape[1:]).numel()))
        for a in range(0, shape[0], step):
            yield a, self.rows(name, a, min(shape[0], a + step))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the floating-point weights are stored in (the first float tensor's)."""
        for name in self.files:
            dt = self.dtype_of(name)
            if dt.is_floating_point:
                return dt
        return torch.float32

    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def source_name(self, name: str) -> str:
        """The checkpoint name of parameter ``name``: itself, or for a tied weight missing from
        the files, the name of the parameter it is tied to (see :meth:`skeleton`)."""
        if name in self.files:
            return name
        if name in self.alias:
            return self.alias[name]
        raise CompressionError(f"the checkpoint {self.path} has no tensor {name!r}")

    def materialize(self, model: nn.Module, prefix: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
        """Read the parameters (and persistent buffers found in the files) of the submodule
        ``prefix`` of ``model`` onto ``device``, in the source dtype (or ``dtype``)."""
        module = model.get_submodule(prefix) if prefix else model
        pre = f"{prefix}." if prefix else ""
        for name, owner, leaf, t in _tensors(module):
            full = pre + name
            if leaf in owner._parameters:
                data = self.tensor(self.source_name(full))
                if dtype is not None and data.is_floating_point():
                    data = data.to(dtype)
                owner._parameters[leaf] = nn.Parameter(data.to(device), requires_grad=False)
            elif full in self.files:
                owner._buffers[leaf] = self.tensor(full).to(device)
            elif t is not None and t.device != torch.device(device):
                owner._buffers[leaf] = t.to(device)
        return module


class LazyCheckpoint(TensorFiles):
    """A model checkpoint read lazily: its config, a meta-device skeleton, and any module's
    weights materialized on demand."""

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - an unreadable config is the user's error
            raise CompressionError(f"cannot load model config from {path}: {e}") from e
        super().__init__(path)

    # ------------------------------------------------------------------ modules

    def skeleton(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The model built from the config with every parameter on the meta device (buffers
        real: rotary frequencies are computed from the config), in ``dtype`` (default: the
        source dtype); tied weights tied."""
        from accelerate import init_empty_weights

        from ..models import _auto_class, model_kind

        dt = dtype or self.dtype
        with init_empty_weights(include_buffers=False):
            model = _auto_class(model_kind(self.config)).from_config(self.config, dtype=dt)
        if getattr(self.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        self._aliases(model)
        skeleton: nn.Module = model.eval()
        return skeleton

    def _aliases(self, model: nn.Module) -> None:
        """Where each parameter missing from the files is read from: the stored parameter it is
        tied to (taken while the skeleton's ties are intact)."""
        by_id: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in self.files:
                by_id.setdefault(id(p), name)
        self.alias = {name: by_id[id(p)]
                      for name, p in model.named_parameters(remove_duplicate=False)
                      if name not in self.files and id(p) in by_id}


def _tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor | None]]:
    """(name relative to ``module``, owning module, attribute, tensor) of every parameter and
    buffer, shared ones once."""
    seen: set[tuple[int, str]] = set()
    for mod_name, owner in module.named_modules(remove_duplicate=False):
        for leaf in [*owner._parameters, *owner._buffers]:
            if (id(owner), leaf) in seen:
                continue
            seen.add((id(owner), leaf))
            t = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if t is None:
                continue
            yield (f"{mod_name}.{leaf}" if mod_name else leaf), owner, leaf, t


def release(module: nn.Module) -> None:
    """Put every parameter (and tensor buffer of a quantized module) of ``module`` back on the
    meta device: its memory is freed, its shapes and dtypes kept."""
    module.to("meta")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the decoder blocks: the longest ``nn.ModuleList`` of the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise CompressionError(f"{type(model).__name__} has no list of blocks to stream")
    return best


def outside_prefixes(model: nn.Module, blocks_name: str) -> list[str]:
    """The top-level modules holding parameters outside the blocks (embeddings, final norm,
    output head), as submodule names, in the model's own order."""
    out: list[str] = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.startswith(blocks_name + "."):
            continue
        owner = name.rpartition(".")[0]
        if owner not in out:
            out.append(owner)
    return out

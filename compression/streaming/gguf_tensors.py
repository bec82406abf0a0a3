"""A GGUF file's tensor table, read without parsing its metadata values.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value: for a model with
a 49k-token vocabulary that is ~600k views and seconds per file. The conversion needs only the
tensors (name, ggml type, data), so this reader steps over the metadata by its lengths and maps
each tensor's bytes as ``GGUFReader`` shapes them (``gguf.dequantize`` reads either). Little-endian
files (what llama.cpp writes) only; anything else is a :class:`ValueError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
#: metadata value types of fixed width (bytes): uint8 .. float64 as the GGUF spec numbers them
_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_ALIGNMENT_KEY, _ARCH_KEY = "general.alignment", "general.architecture"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # a read-only view of the file, shaped as GGUFReader shapes it


def read_tensors(path: str | Path) -> tuple[str, list[GGUFTensor]]:
    """The GGUF file's ``general.architecture`` and every tensor, in file order, none of them
    read yet."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

    blob = np.memmap(path, mode="r", dtype=np.uint8)
    buf = blob.data  # a memoryview of the map: what struct reads
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError(f"{Path(path).name} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    pos, alignment, arch = 24, 32, ""
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        if key == _ALIGNMENT_KEY and vtype == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        elif key == _ARCH_KEY and vtype == _STRING:
            arch = _string(buf, pos + 4)[0]
        pos = _skip_value(buf, pos + 4, vtype)
    table = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((name, dims, GGMLQuantizationType(ttype), offset))
    start = -(-pos // alignment) * alignment
    out = []
    for name, dims, ttype, offset in table:
        shape = tuple(reversed(dims))  # ggml lists the fastest-moving dimension first
        block, size = GGML_QUANT_SIZES[ttype]
        n_bytes = int(np.prod(dims)) * size // block
        raw = blob[start + offset : start + offset + n_bytes]
        item = _PLAIN.get(ttype.name)
        data = (raw.view(item).reshape(shape) if item is not None
                else raw.reshape(quant_shape_to_byte_shape(shape, ttype)))
        out.append(GGUFTensor(name, ttype, data))
    return arch, out


#: ggml types GGUFReader gives as typed arrays (the rest, BF16 included, as bytes)
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _skip_value(buf: memoryview, pos: int, vtype: int) -> int:
    """The position just past a metadata value of type ``vtype`` that starts at ``pos``."""
    if vtype in _WIDTH:
        return pos + _WIDTH[vtype]
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return int(pos + 8 + n)
    if vtype == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item in _WIDTH:
            return int(pos + _WIDTH[item] * count)
        for _ in range(count):
            pos = _skip_value(buf, pos, item)
        return pos
    raise ValueError(f"unknown GGUF metadata value type {vtype}")

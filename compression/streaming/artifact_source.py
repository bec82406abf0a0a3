"""A compressed-tensors artifact read lazily, as a float checkpoint: every quantized Linear's
weight is unpacked and dequantized when it is read (``(q - zero_point) * scale``, the formula
compressed-tensors decompresses with), the other tensors are read as stored. Used to measure an
artifact block by block when it is too large to reload whole."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..quantization.qtensor import dequantize_grouped
from .source import LazyCheckpoint

_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


class ArtifactCheckpoint(LazyCheckpoint):
    def __init__(self, path: str | Path):
        super().__init__(path)
        qc = getattr(self.config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
        self._groups = [(g.get("targets", []), g.get("weights") or {})
                        for g in (qc.get("config_groups") or {}).values()]
        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config  # the skeleton is a plain float model
        self.quantized = {n.rpartition(".")[0] for n in self.files if n.endswith(".weight_scale")}

    def _bits(self, module: str) -> int:
        for targets, wargs in self._groups:
            for t in targets:
                if t.startswith("re:") and re.match(t[3:], module):
                    return int(wargs["num_bits"])
        for targets, wargs in self._groups:
            if "Linear" in targets:
                return int(wargs["num_bits"])
        raise KeyError(f"no quantization scheme targets {module!r}")

    def __contains__(self, name: str) -> bool:
        return name in self.files or (name.endswith(".weight") and name[:-7] in self.quantized)

    def names(self) -> list[str]:
        plain = [n for n in self.files if not n.endswith(_QUANT_SUFFIXES)
                 and n.rpartition(".")[0] not in self.quantized]
        return plain + [f"{m}.weight" for m in sorted(self.quantized)]

    def source_name(self, name: str) -> str:
        if name.endswith(".weight") and name[:-7] in self.quantized:
            return name
        return super().source_name(name)

    def tensor(self, name: str) -> torch.Tensor:
        mod = name[:-7] if name.endswith(".weight") else None
        if mod not in self.quantized:
            return super().tensor(name)
        scale = super().tensor(f"{mod}.weight_scale").float()
        if f"{mod}.weight_packed" in self.files:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            bits = self._bits(mod)
            shape = torch.Size(super().tensor(f"{mod}.weight_shape").tolist())
            q = unpack_from_int32(super().tensor(f"{mod}.weight_packed"), bits, shape)
            zp_name = f"{mod}.weight_zero_point"
            zp = (unpack_from_int32(super().tensor(zp_name), bits, scale.shape, packed_dim=0)
                  if zp_name in self.files else torch.zeros_like(scale))
        else:  # int8 weights stored as they are
            q = super().tensor(f"{mod}.weight")
            zp_name = f"{mod}.weight_zero_point"
            zp = super().tensor(zp_name) if zp_name in self.files else torch.zeros_like(scale)
        return dequantize_grouped(q, scale, zp.float(), torch.float32)

    def dtype_of(self, name: str) -> torch.dtype:
        mod = name[:-7] if name.endswith(".weight") else None
        return torch.float32 if mod in self.quantized else super().dtype_of(name)

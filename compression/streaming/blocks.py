"""The calibration engine's :class:`~..calib.engine.BlockSource` for a model that is a meta
skeleton: a block is read from the checkpoint (float32) when the engine onloads it, and written
to a per-block scratch file and released when the engine offloads it (the method has changed
it: quantized Linears in their integer form, pruned weights). A block offloaded before (a method
that walks the blocks twice) is read back from its scratch file, as the in-memory model would
hand back the block as it was left. The artifact is assembled from the scratch files once the
method is done and its output format is known (:func:`..compress.stream_calibrated`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..base import hf
from .source import LazyCheckpoint, TensorFiles, _tensors, decoder_blocks, outside_prefixes, release
from .writer import ShardedWriter


def _upcast(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
    return out.float()


class StreamedBlocks:
    def __init__(self, ckpt: LazyCheckpoint, model: nn.Module, scratch: Path):
        self.ckpt, self.model, self.scratch = ckpt, model, Path(scratch)
        self.prefix, self.blocks = decoder_blocks(model)
        head: nn.Module = hf(model).get_output_embeddings()
        head_name = next(n for n, m in model.named_modules() if m is head)
        self.outside_names = [p for p in outside_prefixes(model, self.prefix) if p != head_name]
        self._hook: RemovableHandle | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def _dir(self, index: int) -> Path:
        return self.scratch / f"block-{index:05d}"

    def onload(self, index: int, device: torch.device) -> nn.Module:
        path = f"{self.prefix}.{index}"
        d = self._dir(index)
        if not (d / "model.safetensors").is_file():
            return self.ckpt.materialize(self.model, path, device, dtype=torch.float32)
        block = self.model.get_submodule(path)
        with TensorFiles(d) as files:
            for name, owner, leaf, _t in _tensors(block):
                t = files.tensor(name).to(device)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
                else:
                    owner._buffers[leaf] = t
        _resync(block)
        return block

    def offload(self, index: int, block: nn.Module) -> None:
        d = self._dir(index)
        tmp = d.with_name(d.name + ".partial")
        w = ShardedWriter(tmp, max_shard_bytes=2**62)
        for name, _owner, _leaf, t in _tensors(block):
            if t is not None:
                w.add(name, t.detach())
        w.close()
        if d.exists():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        tmp.rename(d)
        release(block)

    def outside(self, device: torch.device) -> None:
        """Embeddings (stored dtype, their output upcast to float32 as the in-memory float32
        model computes it), rotary buffers; ``meta`` releases them."""
        emb: nn.Module = hf(self.model).get_input_embeddings()
        if torch.device(device).type == "meta":
            for p in self.outside_names:
                release(self.model.get_submodule(p))
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            return
        for p in self.outside_names:
            self.ckpt.materialize(self.model, p, device)
        for mod_name, mod in self.model.named_modules():
            if not mod_name.startswith(self.prefix):
                for leaf, b in list(mod._buffers.items()):
                    if b is not None and not b.is_meta:
                        mod._buffers[leaf] = b.to(device)
        if self._hook is None:
            self._hook = emb.register_forward_hook(_upcast)

    def load_final(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Block ``index`` as the method left it (for writing the artifact)."""
        return self.onload(index, torch.device(device))


def _resync(block: nn.Module) -> None:
    """Point each quantized Linear's integer state at its reloaded buffers."""
    from ..quantization.artifact import QuantizedLinear

    for m in block.modules():
        if isinstance(m, QuantizedLinear):
            m._apply(lambda t: t)

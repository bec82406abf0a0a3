"""FP8 KV cache: per-layer key and value scales calibrated on data.

transformers' attention modules hand their post-RoPE keys and values to
``past_key_values.update(key, value, layer_idx)``. A forward pre-hook on every attention module
(``self_attn`` of the family's blocks) puts a :class:`_KVQuant` there (delegating to the real
cache when there is one), which records ``max |k|``, ``max |v|`` while calibrating and
fake-quantizes keys and values to FP8 E4M3 afterwards: exactly what compressed-tensors does after
``from_pretrained`` with a ``kv_cache_scheme``. The scales are written as ``self_attn.k_scale``
and ``self_attn.v_scale`` (fp32, one per layer), the names vLLM loads into its FP8 KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calib.engine import Step
from . import fpformats as F

ATTN = "self_attn"


class _KVQuant:
    def __init__(self, attn: nn.Module, cache: Any):
        self.attn, self.cache = attn, cache

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        a: Any = self.attn  # carries the _mp_kv_* attributes set by this module
        if getattr(a, "_mp_kv_calibrating", False):
            a._mp_kv_amax[0] = torch.maximum(a._mp_kv_amax[0], key.detach().abs().amax().float())
            a._mp_kv_amax[1] = torch.maximum(a._mp_kv_amax[1], value.detach().abs().amax().float())
        else:
            key = F.fake_fp8_static(key, a.k_scale)
            value = F.fake_fp8_static(value, a.v_scale)
        if self.cache is not None:
            kv: tuple[torch.Tensor, torch.Tensor] = self.cache.update(key, value, *args, **kwargs)
            return kv
        return key, value

    def __getattr__(self, name: str) -> Any:  # anything else of the real cache
        cache = self.__dict__.get("cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _hook(attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
          ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    name = "past_key_values" if "past_key_values" in kwargs or "past_key_value" not in kwargs \
        else "past_key_value"
    kwargs[name] = _KVQuant(attn, kwargs.get(name))
    return args, kwargs


def install(attn: nn.Module) -> None:
    if not hasattr(attn, "_mp_kv_amax"):
        dev = next(attn.parameters()).device
        a: Any = attn  # the _mp_kv_* attributes are this module's own
        a._mp_kv_amax = [torch.zeros((), device=dev), torch.zeros((), device=dev)]
        attn.register_forward_pre_hook(_hook, with_kwargs=True)


class KVObserver:
    """Calibrates and installs FP8 KV-cache quantization block by block (from ``visit``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.scales: dict[int, tuple[float, float]] = {}

    def calibrate(self, step: Step) -> None:
        """Observe the block's keys/values on the calibration inputs (its Linears already
        quantized: the scales fit what the quantized model produces), then switch the block to
        fake-quantized FP8 keys/values before its outputs go to the next block."""
        from ..calib.engine import run_block

        attn: Any = step.block.get_submodule(ATTN)  # with the _mp_kv_* attributes
        install(attn)
        attn._mp_kv_calibrating = True
        try:
            run_block(step.block, step.inputs)
        finally:
            attn._mp_kv_calibrating = False
        k, v = (F.fp8_scale(a).reshape(1) for a in attn._mp_kv_amax)
        attn.register_buffer("k_scale", k)
        attn.register_buffer("v_scale", v)
        self.scales[step.index] = (float(k), float(v))

    def finish(self) -> dict[str, float]:
        ks = [k for k, _ in self.scales.values()]
        vs = [v for _, v in self.scales.values()]
        return {"kv_layers": float(len(ks)), "kv_k_scale_max": max(ks), "kv_v_scale_max": max(vs)}


def supports_kv(model_config: Any) -> bool:
    """Decoders whose blocks have a ``self_attn`` calling ``past_key_values.update``."""
    return getattr(model_config, "model_type", None) != "bert"

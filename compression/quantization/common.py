"""Config fields and checks shared by the weight-quantization methods."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from ..base import CompressionError
from ..evaluation import prunable_linears
from .artifact import DenseDtype

GROUP_DESC = (
    "Input columns sharing one scale (and zero point). Must divide every quantized Linear's "
    "in_features (checked against the model at submission); smaller groups follow the weights "
    "more closely and store more scales; null or -1 = one scale per output channel."
)
DENSE_DESC = (
    "Storage dtype of the tensors that stay in float (embeddings, norms) in the artifact. "
    "float16 halves their bytes and rounds them to float16's 11-bit mantissa; float32 keeps "
    "them bit-exact."
)


class GroupFieldsMixin:
    @field_validator("group_size", check_fields=False)
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is None or v == -1:
            return None
        if v < 8:
            raise ValueError("group_size must be >= 8, or null/-1 for per-channel")
        return v


def group_size_field(default: int | None) -> Any:
    return Field(default, description=GROUP_DESC)


def dense_dtype_field() -> Any:
    return Field("float16", description=DENSE_DESC)


def model_in_features(model_config: Any) -> dict[str, int]:
    """in_features of the Linear kinds of a transformer config (for submission-time checks)."""
    dims: dict[str, int] = {}
    h = getattr(model_config, "hidden_size", None)
    if h:
        dims["hidden_size"] = h
    i = getattr(model_config, "intermediate_size", None)
    if i:
        dims["intermediate_size"] = i
    heads = getattr(model_config, "num_attention_heads", None)
    hd = getattr(model_config, "head_dim", None)
    if heads and hd:
        dims["num_attention_heads*head_dim"] = heads * hd
    return dims


def _valid_sizes(dims: list[int]) -> list[int]:
    g = 0
    for d in dims:
        g = math.gcd(g, d)
    return [s for s in (16, 32, 48, 64, 96, 128, 192, 256) if g % s == 0]


def validate_group_size(group_size: int | None, model_config: Any) -> None:
    if not group_size:
        return
    dims = model_in_features(model_config)
    bad = {k: v for k, v in dims.items() if v % group_size}
    if bad:
        ok = _valid_sizes(list(dims.values()))
        raise CompressionError(
            f"group_size {group_size} does not divide "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f"; valid group sizes for this model: {ok or 'none of the usual ones'} "
            "(or null for per-channel)"
        )


def target_linears(model: nn.Module, group_size: int | None) -> dict[str, nn.Linear]:
    """The Linears to quantize (all but the output head); refuses before any work if the group
    size does not divide one of them."""
    lins = prunable_linears(model)
    if not lins:
        raise CompressionError("model has no Linear layers to quantize")
    if group_size:
        bad = sorted({lin.in_features for lin in lins.values() if lin.in_features % group_size})
        if bad:
            ok = _valid_sizes([lin.in_features for lin in lins.values()])
            raise CompressionError(
                f"group_size {group_size} does not divide in_features {bad}; valid: {ok}"
            )
    return lins


__all__ = ["DenseDtype", "GroupFieldsMixin", "target_linears", "validate_group_size"]

"""The one explicit registry of compression methods, by name.

Each family package lists its methods in its ``METHODS`` list; this module gathers them. To add a
method: write its module (config + pure tensor functions + ``apply``), add its ``Method`` to the
family's ``METHODS`` list.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import ValidationError

from .base import CompressionError, Method, MethodConfig


@cache
def methods() -> dict[str, Method]:
    from .distillation import METHODS as distillation
    from .pruning import METHODS as pruning
    from .quantization import METHODS as quantization

    out: dict[str, Method] = {}
    for m in [*pruning, *quantization, *distillation]:
        if m.name in out:
            raise RuntimeError(f"method {m.name!r} registered twice")
        out[m.name] = m
    return out


class UnknownMethodError(CompressionError):
    pass


def get_method(name: str) -> Method:
    try:
        return methods()[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(methods()))}"
        ) from None


def method_for_config(config: MethodConfig) -> Method:
    for m in methods().values():
        if type(config) is m.config:
            return m
    raise UnknownMethodError(f"no method is registered for config type {type(config).__name__}")


def parse_params(name: str, params: dict[str, Any] | None) -> MethodConfig:
    """Validate a method's params; raises UnknownMethodError or pydantic.ValidationError."""
    return get_method(name).config.model_validate(params or {})


__all__ = [
    "UnknownMethodError",
    "ValidationError",
    "get_method",
    "method_for_config",
    "methods",
    "parse_params",
]

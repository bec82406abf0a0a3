"""modelpress.compression: the compression algorithms as a plain library.

    from modelpress.compression import compress
    from modelpress.compression.pruning.magnitude import MagnitudeConfig
    result = compress(model, MagnitudeConfig(sparsity=0.5))

No HTTP, database or queue code lives here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .base import (
        CalibrationConfig,
        Cancelled,
        CompressionError,
        CompressionResult,
        Context,
        Method,
        MethodConfig,
        UnsupportedModelError,
    )
    from .registry import get_method, method_for_config, methods, parse_params

# the names above, imported on first use: a submodule that needs no torch (the recipe parser
# the remote CLI reads) imports in milliseconds, not the seconds torch takes
_LAZY = {**dict.fromkeys(["CalibrationConfig", "Cancelled", "CompressionError",
                          "CompressionResult", "Context", "Method", "MethodConfig",
                          "UnsupportedModelError"], ".base"),
         **dict.fromkeys(["get_method", "method_for_config", "methods", "parse_params"],
                         ".registry")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compress(model: nn.Module, config: MethodConfig, ctx: Context | None = None) -> CompressionResult:
    """Run the method that ``config`` belongs to on ``model`` (modified in place where the
    method allows it) and return the result."""
    from .base import Context
    from .moe import expert_report, linearize_experts
    from .registry import method_for_config

    method = method_for_config(config)
    method.check_model(config, getattr(model, "config", None))
    linearize_experts(model)
    result = method.apply(model, config, ctx or Context())
    result.metrics.update(expert_report(result.model))
    return result


__all__ = [
    "CalibrationConfig",
    "Cancelled",
    "CompressionError",
    "CompressionResult",
    "Context",
    "Method",
    "MethodConfig",
    "UnsupportedModelError",
    "compress",
    "get_method",
    "method_for_config",
    "methods",
    "parse_params",
]

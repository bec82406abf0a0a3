"""modelpress.compression: the compression algorithms as a plain library.

    from modelpress.compression import compress
    from modelpress.compression.pruning.magnitude import MagnitudeConfig
    result = compress(model, MagnitudeConfig(sparsity=0.5))

No HTTP, database or queue code lives here.
"""

from __future__ import annotations

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


def compress(model: nn.Module, config: MethodConfig, ctx: Context | None = None) -> CompressionResult:
    """Run the method that ``config`` belongs to on ``model`` (modified in place where the
    method allows it) and return the result."""
    from .moe import expert_report, linearize_experts

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

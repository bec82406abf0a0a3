"""A job's peak memory estimated from the model's config alone (admission control).

Streamed jobs (:func:`compress.cannot_stream`) hold one block in float32 (or, while a
calibrated method captures the first block's inputs, the embeddings in the stored dtype), the
activations of the eval windows (and, when calibrated, of the calibration tokens plus the
Hessian work of gptq/sparsegpt/admm); jobs in
memory hold the model in float32 about twice (the job's model, then the reloaded artifact next
to its measurements), plus a calibrated method's calibration. The constants are measured, not
derived: the process itself (Python, torch, transformers: ``BASE_BYTES``) and the factor over
the block's float32 bytes its quantization or forward needs (``BLOCK_FACTOR``: the block plus
the largest Linear's work tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASE_BYTES = int(0.45 * 2**30)
BLOCK_FACTOR = 2.0
IN_MEMORY_FACTOR = 2.3
#: methods that solve with each Linear's input Hessian, and how many float32 copies of the widest
#: one they hold at once: gptq and sparsegpt 2 (the statistics' and one working copy that the
#: factorization, the inverse and its factor overwrite in turn); admm 6. Wanda and AWQ keep
#: per-feature statistics only
HESSIAN_COPIES = {"gptq": 2, "sparsegpt": 2, "admm": 6}
HESSIAN_METHODS = frozenset(HESSIAN_COPIES)
STREAM_ENV = "MODELPRESS_STREAM_ABOVE_BYTES"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _dims(config: Any) -> dict[str, int]:
    h = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads", heads) or heads)
    hd = int(_get(config, "head_dim", None) or h // heads)
    return {"hidden": h, "inter": int(_get(config, "intermediate_size", 4 * h)),
            "layers": int(_get(config, "num_hidden_layers")),
            "vocab": int(_get(config, "vocab_size")), "q": heads * hd, "kv": kv * hd}


def block_params(config: Any) -> int:
    d = _dims(config)
    attn = d["hidden"] * (d["q"] + 2 * d["kv"]) + d["q"] * d["hidden"]
    return attn + 3 * d["hidden"] * d["inter"] + 2 * d["hidden"]


def param_count(config: Any) -> int:
    d = _dims(config)
    heads = 1 if _get(config, "tie_word_embeddings", False) else 2
    return d["layers"] * block_params(config) + heads * d["vocab"] * d["hidden"] + d["hidden"]


def source_dtype_bytes(config: Any) -> int:
    dt = str(_get(config, "dtype", None) or _get(config, "torch_dtype", None) or "float32")
    return _DTYPE_BYTES.get(dt.replace("torch.", ""), 4)


def _full_params(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` with the method's defaults filled in (what the job will run with)."""
    from ..registry import get_method

    try:
        return get_method(method).config.model_validate(params or {}).model_dump()
    except Exception:  # noqa: BLE001 - unknown method or bad params: refused elsewhere
        return dict(params or {})


def _calibration_bytes(config: Any, method: str, params: dict[str, Any]) -> int:
    """A calibrated method's calibration activations (inputs and outputs of a block) plus, for a
    method that solves with the inputs' Hessian, ``HESSIAN_COPIES`` of the widest Linear's; 0 for
    a method without calibration."""
    from ..registry import get_method

    try:
        calibrated = get_method(method).needs_calibration
    except Exception:  # noqa: BLE001 - unknown method: refused elsewhere
        calibrated = False
    if not calibrated:
        return 0
    d = _dims(config)
    wide = max(d["hidden"], d["inter"])
    tokens = int(params.get("num_samples", 32)) * int(params.get("seq_len", 512))
    copies = HESSIAN_COPIES.get(method, 0)
    return 4 * tokens * wide * 2 + copies * 4 * wide**2


def in_memory_bytes(config: Any, method: str, params: dict[str, Any] | None = None) -> int:
    """Peak of a job that holds its model whole: the model in float32 about twice, plus the
    calibration of a calibrated method."""
    full = _full_params(method, params)
    return (BASE_BYTES + int(IN_MEMORY_FACTOR * 4 * param_count(config))
            + _calibration_bytes(config, method, full))


def estimate_peak_bytes(config: Any, method: str, params: dict[str, Any] | None = None, *,
                        streamed: bool | None = None, eval_tokens: int = 16 * 512) -> int:
    """Peak resident bytes of a job running ``method`` (with ``params``) on a model with this
    HF ``config`` (object or dict). ``streamed``: None = streamed when the method can stream."""
    from .compress import cannot_stream

    if streamed is None:
        streamed = cannot_stream(method, params) is None
    if not streamed:
        return in_memory_bytes(config, method, params)
    d = _dims(config)
    block = BLOCK_FACTOR * 4 * block_params(config)
    # the embeddings in the stored dtype while a calibrated method captures the first block's
    # inputs (the perplexity passes read only the rows they use, the head a piece at a time)
    outside = (source_dtype_bytes(config) * d["vocab"] * d["hidden"]
               if _calibration_bytes(config, method, _full_params(method, params)) else 0)
    acts = 4 * eval_tokens * d["hidden"] * 2
    return int(BASE_BYTES + max(block, outside) + max(
        acts, _calibration_bytes(config, method, _full_params(method, params))))


def stream_threshold(memory: int) -> int:
    """Float32 model bytes above which a job that can stream does (``MODELPRESS_STREAM_ABOVE_BYTES``,
    default half of ``memory``)."""
    import os

    from ..base import CompressionError

    raw = os.environ.get(STREAM_ENV)
    if not raw:
        return memory // 2
    try:
        return int(float(raw))
    except ValueError:
        raise CompressionError(f"{STREAM_ENV} must be a number of bytes, got {raw!r}") from None


def can_stream(config: Any, stages: list[dict[str, Any]]) -> bool:
    """A single stage that runs block by block (:func:`.compress.cannot_stream`) on a causal
    language model."""
    from ..models import CAUSAL, model_kind
    from .compress import cannot_stream

    if isinstance(config, dict):
        from types import SimpleNamespace

        config = SimpleNamespace(**config)
    return (len(stages) == 1 and cannot_stream(stages[0]["method"], stages[0].get("params")) is None
            and model_kind(config) == CAUSAL)


def should_stream(fp32_bytes: int, in_memory: int, memory: int) -> bool:
    """Whether a job that can stream does, when nobody asked: its float32 model is above the
    threshold, or the job would not fit in ``memory`` whole."""
    return fp32_bytes > stream_threshold(memory) or in_memory > memory


@dataclass(frozen=True)
class JobEstimate:
    peak_bytes: int
    streamed: bool


def estimate_job(config: Any, stages: list[dict[str, Any]], memory: int) -> JobEstimate:
    """A recipe's peak on a worker with ``memory`` bytes, run as that worker would run it
    (streamed or whole): the largest over its stages."""
    in_memory = max(in_memory_bytes(config, s["method"], s.get("params")) for s in stages)
    if can_stream(config, stages) and should_stream(4 * param_count(config), in_memory, memory):
        st = stages[0]
        return JobEstimate(estimate_peak_bytes(config, st["method"], st.get("params"),
                                               streamed=True), True)
    return JobEstimate(in_memory, False)


def describe(need: int, capacity: int) -> str:
    return (f"this job needs about {need / 2**30:.1f} GiB of memory; a worker has "
            f"{capacity / 2**30:.1f} GiB")

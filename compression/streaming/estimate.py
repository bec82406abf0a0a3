"""A job's peak memory estimated from the model's config alone (admission control).

Streamed jobs (``compress.STREAMABLE`` methods) hold one block in float32 plus the largest
tensor outside the blocks in the stored dtype, the activations of the eval windows (and, when
calibrated, of the calibration tokens plus one Hessian); jobs in memory hold the model in
float32 about twice (the job's model, then the reloaded artifact next to its measurements).
The constants are measured, not derived: the process itself (Python, torch, transformers:
``BASE_BYTES``) and the factor over the block's float32 bytes its quantization or forward
needs (``BLOCK_FACTOR``: the block plus the largest Linear's work tensors).
"""

from __future__ import annotations

from typing import Any

BASE_BYTES = int(0.45 * 2**30)
BLOCK_FACTOR = 2.0
IN_MEMORY_FACTOR = 2.3
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


def estimate_peak_bytes(config: Any, method: str, params: dict | None = None, *,
                        streamed: bool | None = None, eval_tokens: int = 16 * 512) -> int:
    """Peak resident bytes of a job running ``method`` (with ``params``) on a model with this
    HF ``config`` (object or dict). ``streamed``: None = streamed when the method can stream."""
    from .compress import CALIBRATED, STREAMABLE

    params = params or {}
    d = _dims(config)
    if streamed is None:
        streamed = method in STREAMABLE
    if not streamed:
        return BASE_BYTES + int(IN_MEMORY_FACTOR * 4 * param_count(config))
    block = BLOCK_FACTOR * 4 * block_params(config)
    outside = source_dtype_bytes(config) * d["vocab"] * d["hidden"]  # embeddings or head
    acts = 4 * eval_tokens * d["hidden"] * 2
    if method in CALIBRATED:
        tokens = int(params.get("num_samples", 32)) * int(params.get("seq_len", 512))
        acts = max(acts, 4 * tokens * max(d["hidden"], d["inter"]) * 2)
        block += 2 * 4 * max(d["hidden"], d["inter"]) ** 2  # a Hessian and its inverse
    return int(BASE_BYTES + max(block + acts, outside + acts))


def describe(need: int, capacity: int) -> str:
    return (f"this job needs about {need / 2**30:.1f} GiB of memory; a worker has "
            f"{capacity / 2**30:.1f} GiB")

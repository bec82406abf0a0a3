"""A job that never holds its model whole: measure the source block by block, quantize it block
by block into a sharded artifact, measure the artifact block by block.

Which jobs stream (:func:`streaming_plan`): one stage that works block by block
(int8, rtn, magnitude; gptq, awq, wanda, sparsegpt, admm on the calibration engine:
``compress.STREAMABLE``, :func:`compress.cannot_stream`) on
a local safetensors directory (a GGUF source is first converted tensor by tensor) whose float32
size is above ``MODELPRESS_STREAM_ABOVE_BYTES`` (default: half this machine's memory), or any
such job when the caller asks for streaming. Speed is measured only when the model fits in
memory (``fits``); otherwise the report says why it is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base import CompressionError
from . import estimate as E
from .compress import WEIGHT_ONLY, StreamResult, cannot_stream, stream_calibrated, stream_quantize
from .estimate import STREAM_ENV
from .source import LazyCheckpoint, is_streamable

_FIT_FRACTION = 0.4  # a whole float32 model plus a measurement's activations in this share of RAM


def memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def stream_threshold() -> int:
    return E.stream_threshold(memory_bytes())


def _auto_streams(fp32: int, config: Any, method: Any, params: dict[str, Any] | None) -> bool:
    """Nobody asked: stream above the threshold, or where the job would not fit whole."""
    in_memory = (E.in_memory_bytes(config, method.name, params) if config is not None
                 else E.BASE_BYTES + int(E.IN_MEMORY_FACTOR * fp32))
    return E.should_stream(fp32, in_memory, memory_bytes())


def float32_bytes(ckpt: LazyCheckpoint) -> int:
    """What the model takes in float32 (each stored tensor; integers as stored)."""
    total = 0
    for name in ckpt.names():
        n = torch.Size(ckpt.shape_of(name)).numel()
        dt = ckpt.dtype_of(name)
        total += n * (4 if dt.is_floating_point else torch.empty((), dtype=dt).element_size())
    return total


def fits_in_memory(fp32_bytes: int) -> bool:
    return fp32_bytes <= _FIT_FRACTION * memory_bytes()


@dataclass
class StreamPlan:
    source_dir: Path  # a safetensors directory (a GGUF source's conversion cache)
    fp32_bytes: int
    fits: bool
    reason: str


def streaming_plan(source: str | Path, methods: list[Any], stream: bool | None,
                   work: Path, params: dict[str, Any] | None = None) -> StreamPlan | None:
    """The plan when this job streams, else None. ``stream``: True forces it (a job that cannot
    stream is then an error), False forbids it, None decides by size (:func:`_auto_streams`;
    ``params``: the single stage's)."""
    if stream is False:
        return None
    why_not = None
    if len(methods) != 1:
        why_not = f"only a single-stage recipe streams block by block; got {[m.name for m in methods]}"
    else:
        why_not = cannot_stream(methods[0].name, params)
    s = str(source)
    if why_not is None and not (s.endswith(".gguf") or is_streamable(s)):
        why_not = f"{s} is not a local safetensors directory or GGUF file"
    if why_not is not None:
        if stream:
            raise CompressionError(f"this job cannot stream: {why_not}")
        return None
    if s.endswith(".gguf"):
        from .gguf import gguf_config_bytes

        if stream is None and not _auto_streams(gguf_config_bytes(s), None, methods[0], params):
            return None
        from .gguf import convert_gguf

        src = convert_gguf(s, work / "gguf-cache")
    else:
        src = Path(s)
    with LazyCheckpoint(src) as ckpt:
        fp32 = float32_bytes(ckpt)
        if stream is None and not _auto_streams(fp32, ckpt.config, methods[0], params):
            return None
    return StreamPlan(src, fp32, fits_in_memory(fp32), _reason(stream, fp32))


def _reason(stream: bool | None, fp32: int) -> str:
    if stream:
        return "asked for"
    gib, limit = fp32 / 2**30, stream_threshold() / 2**30
    if fp32 > stream_threshold():
        return f"{gib:.1f} GiB in float32 > the {limit:.1f} GiB threshold ({STREAM_ENV})"
    return (f"{gib:.1f} GiB in float32 (under the {limit:.1f} GiB threshold, {STREAM_ENV}) does "
            f"not fit whole in {memory_bytes() / 2**30:.1f} GiB")


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - a model without a tokenizer can still be compressed
        return None


def measure_blockwise(ckpt: LazyCheckpoint, windows: torch.Tensor | None, device: torch.device,
                      weight_bytes: int,
                      progress: Callable[[float, str | None], None],
                      should_stop: Callable[[], bool],
                      other: torch.Tensor | None = None) -> dict[str, float]:
    """params, nonzero params, bytes, sparsity and (with ``windows``) perplexity, block by
    block; with ``other`` (windows of another domain's text) ``perplexity_other`` in the same
    pass."""
    from .. import evaluation as E
    from .forward import blockwise_perplexity

    model = ckpt.skeleton()
    m: dict[str, float] = {"params": float(E.param_count(model)), "bytes": float(weight_bytes)}
    if windows is None:
        return m
    st = blockwise_perplexity(ckpt, model, windows, more=() if other is None else (other,),
                              device=device, progress=progress, should_stop=should_stop)
    m["nonzero_params"] = float(st.nonzero_params)
    m["sparsity"] = float(st.sparsity)
    m["perplexity"] = st.perplexity
    if other is not None:
        m["perplexity_other"] = st.extra["perplexities"][0]
    return m


def compress(plan: StreamPlan, method: Any, cfg: Any, out: Path, device: torch.device,
             progress: Callable[[float, str | None], None], should_stop: Callable[[], bool], *,
             tokenizer: Any = None, calibration_text: str | None = None,
             scratch: Path | None = None) -> StreamResult:
    if method.name in WEIGHT_ONLY:
        return stream_quantize(plan.source_dir, out, method, cfg, device=device,
                               progress=progress, should_stop=should_stop)
    if scratch is None:
        raise CompressionError(f"{method.name}: a streamed calibration needs a scratch folder")
    return stream_calibrated(plan.source_dir, out, method, cfg, scratch=scratch,
                             tokenizer=tokenizer, calibration_text=calibration_text,
                             device=device, progress=progress, should_stop=should_stop)

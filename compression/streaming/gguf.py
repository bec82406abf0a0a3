"""A GGUF file converted tensor by tensor into a safetensors directory (config, tokenizer,
weights), never through a whole-model ``from_pretrained``.

Each tensor is read from the memory-mapped GGUF file, dequantized by the ``gguf`` package, put
back in transformers' layout (llama's q/k rows un-permuted) and named as transformers names it,
with transformers' own GGUF tables (``modeling_gguf_pytorch_utils``: the config fields, the
per-architecture tensor processors, the GGUF -> HF name map), then written and dropped. Quantized
and float32 tensors are stored in float32 (what loading the GGUF in float32 gives), float16 and
bfloat16 ones as they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..base import CompressionError
from .source import is_streamable
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter


def _config_and_tokenizer(path: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a bad upload must read as a user error
        raise CompressionError(f"cannot read GGUF file {path.name}: {e}") from e
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # noqa: BLE001 - a model without a tokenizer can still be compressed
        tokenizer = None
    return config, tokenizer


def _skeleton(config: Any) -> Any:  # a PreTrainedModel on the meta device
    from accelerate import init_empty_weights

    from ..models import _auto_class, model_kind

    with init_empty_weights(include_buffers=False):
        model = _auto_class(model_kind(config)).from_config(config, dtype=torch.float32)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def gguf_config_bytes(path: str | Path) -> int:
    """The model's float32 size from the GGUF's config alone (no tensor is read)."""
    from ..evaluation import param_count

    config, _ = _config_and_tokenizer(Path(path))
    return 4 * param_count(_skeleton(config))


def _dtype_of(tensor_type: Any) -> torch.dtype:
    from gguf import GGMLQuantizationType as T

    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(tensor_type, torch.float32)


def convert_gguf(path: str | Path, out_dir: str | Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert the GGUF file ``path`` into the safetensors directory ``out_dir`` (reused when it
    is already complete) and return ``out_dir``."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise CompressionError(f"GGUF file not found: {path}")
    if is_streamable(out):
        return out
    config, tokenizer = _config_and_tokenizer(path)
    model = _skeleton(config)
    reader = GGUFReader(str(path))
    arch = read_field(reader, "general.architecture")[0]
    parsed_config = load_gguf_checkpoint(str(path), return_tensors=False).get("config", {})
    processor_class: Any = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    processor = processor_class(config=parsed_config)
    name_map = get_gguf_hf_weights_map(model, processor)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardedWriter(tmp, max_shard_bytes)
    done: set[str] = set()
    for t in reader.tensors:
        res = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                tensor_key_mapping=name_map, parsed_parameters={"config": parsed_config})
        if res.name not in name_map:
            continue
        hf_name = name_map[res.name]
        writer.add(hf_name, torch.from_numpy(np.array(res.weights, copy=True)).to(
            _dtype_of(t.tensor_type)))
        done.add(hf_name)
    writer.close()
    missing = [n for n, _ in model.named_parameters() if n not in done]
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompressionError(f"GGUF file {path.name} lacks tensors for {missing[:5]}")
    config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out

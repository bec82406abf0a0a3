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

import contextlib
import copy
import functools
import importlib
import shutil
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..base import CompressionError
from .source import is_streamable
from .writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter

#: the last GGUF files read (file identity -> config, tokenizer, transformers' parsed config):
#: parsing a GGUF's metadata (its vocabulary arrays) takes seconds, and one job asks for it from
#: the size check, the conversion and the tokenizer; a few entries, so a worker never grows
_PARSED: OrderedDict[tuple[str, int, int], tuple[Any, Any, dict[str, Any]]] = OrderedDict()
_PARSED_MAX = 2


def _parsed(path: Path) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _PARSED:
        _PARSED.move_to_end(key)
        return _PARSED[key]
    try:  # the metadata parsed once (what AutoConfig.from_pretrained(gguf_file=) parses again)
        checkpoint = load_gguf_checkpoint(str(path), return_tensors=False)
        parsed = checkpoint.get("config", {})
        config = AutoConfig.for_model(**copy.deepcopy(parsed))
    except Exception as e:  # noqa: BLE001 - a bad upload must read as a user error
        raise CompressionError(f"cannot read GGUF file {path.name}: {e}") from e
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = ""
    try:
        with _metadata_parsed_once(path, checkpoint):
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      config=config)
    except Exception:  # noqa: BLE001 - a model without a tokenizer can still be compressed
        tokenizer = None
    _PARSED[key] = (config, tokenizer, parsed)
    while len(_PARSED) > _PARSED_MAX:
        _PARSED.popitem(last=False)
    return _PARSED[key]


#: transformers' module attributes replaced for the length of a ``with`` block (one at a time)
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched(attr: str, make: Callable[[Any], Any], modules: tuple[str, ...]) -> Iterator[None]:
    """``module.attr = make(module.attr)`` in each of ``modules`` that is imported and has it,
    restored on exit."""
    with _PATCH_LOCK:
        saved = [(m, getattr(m, attr)) for name in modules
                 if (m := sys.modules.get(name)) is not None and hasattr(m, attr)]
        try:
            for m, orig in saved:
                setattr(m, attr, make(orig))
            yield
        finally:
            for m, orig in saved:
                setattr(m, attr, orig)


def _metadata_parsed_once(path: Path, checkpoint: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """While transformers builds the tokenizer of ``path``: its own metadata parses of that file
    (``load_gguf_checkpoint`` without tensors, once for the config and once for the vocabulary:
    seconds each) answered from ``checkpoint``, the parse already made."""
    modules = ("transformers.models.auto.tokenization_auto",
               "transformers.tokenization_utils_tokenizers",  # transformers 5
               "transformers.tokenization_utils_fast")  # transformers 4
    for name in modules:  # imported first, so that the patch finds them
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    target = path.resolve()

    def make(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def load(gguf_path: Any, return_tensors: bool = False, **kw: Any) -> Any:
            if not return_tensors and not kw and Path(gguf_path).resolve() == target:
                return copy.deepcopy(checkpoint)
            return orig(gguf_path, return_tensors=return_tensors, **kw)
        return load

    return _patched("load_gguf_checkpoint", make, modules)


def _name_maps_built_once() -> contextlib.AbstractContextManager[None]:
    """gguf's tensor-name table (``get_tensor_name_map``) built once per (architecture, blocks)
    while transformers maps the GGUF names (it builds one per submodule: hundreds)."""
    import gguf

    return _patched("get_tensor_name_map", lambda orig: functools.lru_cache(maxsize=8)(orig),
                    (gguf.__name__,))


def _config_and_tokenizer(path: Path) -> tuple[Any, Any]:
    """The GGUF's transformers config and tokenizer (copies: callers may change them)."""
    config, tokenizer, _ = _parsed(path)
    return copy.deepcopy(config), copy.deepcopy(tokenizer)


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

    config, _, _ = _parsed(Path(path))
    return 4 * param_count(_skeleton(copy.deepcopy(config)))


def _dtype_of(tensor_type: Any) -> torch.dtype:
    from gguf import GGMLQuantizationType as T

    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(tensor_type, torch.float32)


def convert_gguf(path: str | Path, out_dir: str | Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert the GGUF file ``path`` into the safetensors directory ``out_dir`` (reused when it
    is already complete) and return ``out_dir``."""
    import numpy as np
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from .gguf_tensors import read_tensors

    path, out = Path(path), Path(out_dir)
    if not path.is_file():
        raise CompressionError(f"GGUF file not found: {path}")
    if is_streamable(out):
        return out
    config, tokenizer = _config_and_tokenizer(path)
    parsed_config = copy.deepcopy(_parsed(path)[2])
    model = _skeleton(config)
    arch, tensors = read_tensors(path)
    processor_class: Any = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    processor = processor_class(config=parsed_config)
    with _name_maps_built_once():
        name_map = get_gguf_hf_weights_map(model, processor)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardedWriter(tmp, max_shard_bytes)
    done: set[str] = set()
    for t in tensors:
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

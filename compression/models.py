"""Loading and saving models: hub ids, local Hugging Face directories and GGUF files.

GGUF files are converted tensor by tensor into safetensors (:mod:`streaming.gguf`, dequantised
by the ``gguf`` package) and loaded from there as an ordinary float model.
Never ``trust_remote_code``: only architectures transformers ships are accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import CompressionError, hf, hf_config

#: model_type -> task kind. Causal LMs get perplexity; encoders get an embedding-fidelity metric.
CAUSAL = "causal-lm"
ENCODER = "encoder"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # CAUSAL or ENCODER


def model_kind(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return CAUSAL
    if getattr(config, "is_decoder", False) or getattr(config, "model_type", "") in {
        "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "gemma", "gemma2", "opt",
    }:
        return CAUSAL
    return ENCODER


def _auto_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == CAUSAL else AutoModel


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              cache_dir: str | Path | None = None) -> LoadedModel:
    """A GGUF file as a plain float model: converted tensor by tensor into a safetensors
    directory (``cache_dir``, else a temporary one removed once loaded; see
    :func:`streaming.gguf.convert_gguf`), then loaded from it like any HF directory."""
    import tempfile

    from .streaming.gguf import convert_gguf

    path = Path(path)
    if not path.is_file():
        raise CompressionError(f"GGUF file not found: {path}")
    if cache_dir is not None:
        return load_pretrained(convert_gguf(path, cache_dir), dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="modelpress-gguf-") as tmp:
        # weights memory-mapped from the files stay readable after they are unlinked (Linux)
        loaded = load_pretrained(convert_gguf(path, Path(tmp) / "model"), dtype=dtype)
    hf_config(loaded.model)._name_or_path = ""
    return loaded


def load_pretrained(source: str | Path, revision: str | None = None,
                    dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a local HF directory or a hub id (the hub is only contacted for a non-local id)."""
    from transformers import AutoConfig, AutoTokenizer

    src = str(source)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision and not os.path.isdir(src):
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CompressionError(f"cannot load model config from {src!r}: {e}") from e
    kind = model_kind(config)
    qcfg = getattr(config, "quantization_config", None)
    qmethod = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    if str(qmethod) in {"compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS"}:
        # a compressed-tensors artifact: decompress to float Linear weights so it can be
        # measured and compressed further (plain from_pretrained keeps packed modules)
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    # safetensors only: pickle weights (pytorch_model.bin) are never unpickled
    model = _auto_class(kind).from_pretrained(src, dtype=dtype, use_safetensors=True, **kwargs)
    if "quantization_config" in kwargs:
        _remove_offload(model)
    kwargs.pop("quantization_config", None)
    model.eval()
    from .moe import linearize_experts

    linearize_experts(model)  # MoE experts as Linears (saved in the per-expert checkpoint layout)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except Exception:  # noqa: BLE001 - a model without a tokenizer can still be compressed
        tokenizer = None
    return LoadedModel(model, tokenizer, kind)


def _remove_offload(model: nn.Module) -> None:
    """compressed-tensors (>= 0.19) loads an artifact with every module "offloaded" to the CPU:
    its parameters sit in an offload cache and its forward first moves the inputs to the CPU.
    Such a model computes on the CPU even after ``.to("cuda")`` (found on an H200: the int8
    runtime's CUDA weights met CPU activations). The service moves models itself: make every
    module plain again."""
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # older compressed-tensors: no offloading at load
        return
    remove_dispatch(model, onload_tensors=True)


def load_source(source: str | Path, revision: str | None = None) -> LoadedModel:
    """SOURCE is a ``.gguf`` file, a local HF directory, or a hub id."""
    s = str(source)
    if s.endswith(".gguf"):
        return load_gguf(s)
    return load_pretrained(s, revision=revision)


def read_config(source: str | Path, revision: str | None = None) -> Any:
    """Only the HF config (cheap): used to validate jobs at submission."""
    from transformers import AutoConfig

    s = str(source)
    if s.endswith(".gguf"):
        p = Path(s)
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision and not os.path.isdir(s):
        kwargs["revision"] = revision
    return AutoConfig.from_pretrained(s, **kwargs)


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | Path,
               saver: Callable[[nn.Module, Path], None] | None = None) -> Path:
    """Write a Hugging Face directory (safetensors) that plain ``from_pretrained`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if saver is not None:
        saver(model, out)
    else:
        hf(model).save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def dir_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files only (safetensors), without tokenizer and config."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def config_dict(path: str | Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    return cfg

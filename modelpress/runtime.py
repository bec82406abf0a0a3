"""Serve an artifact the way its job measured it: one call from a directory to a model.

    import torch
    from transformers import AutoTokenizer
    from modelpress import runtime

    model = runtime.load("out/job", dtype=torch.bfloat16)  # any float dtype
    tok = AutoTokenizer.from_pretrained("out/job")
    with torch.inference_mode():
        ids = model.generate(**tok("The lobster", return_tensors="pt"), max_new_tokens=32)

The artifact is loaded with plain ``from_pretrained`` (safetensors only, no remote code), moved
to ``device`` and put in the runtime of the method that made it (its ``report.json`` says which,
with the job's params): for ``int8_dynamic`` the int8 CPU kernels (``int8_dynamic.to_runtime``),
for ``fp8`` real FP8 matmuls on a GPU that has them (``fp8_runtime.to_runtime``: CUDA compute
capability 8.9 and up; elsewhere the loaded model), for every other method the loaded model
itself. Without a report, an int8 W8A8 artifact (per-token dynamic activations) and a
per-channel FP8 W8A8 artifact are recognised from their ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

INT8_DYNAMIC = "int8_dynamic"
FP8 = "fp8"


def load(artifact: str | Path, dtype: torch.dtype = torch.float32,
         compile: bool | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The model in ``artifact`` (a local directory) ready to serve, in eval mode, in ``dtype``,
    on ``device``. ``compile``: decode through ``torch.compile`` (int8_dynamic's
    ``compile_decode``); None keeps what the job chose. Raises ``FileNotFoundError`` for a
    directory without a model and ``ValueError`` for an unreadable report or an
    ``int8_dynamic`` artifact on another device than the CPU (its kernels are CPU kernels)."""
    from transformers import AutoConfig

    from modelpress.compression.models import _auto_class, model_kind

    path = Path(artifact)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    served = served_method(path, config)
    model = _auto_class(model_kind(config)).from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=False).eval()
    if served is None:
        return model.to(device)
    method, cfg = served
    if method.name == INT8_DYNAMIC and torch.device(device).type != "cpu":
        raise ValueError(f"{path}: int8_dynamic artifacts run on the CPU (its int8 kernels); "
                         f"load it with device='cpu' or serve it elsewhere, not on {device}")
    if compile is not None and hasattr(cfg, "compile_decode"):
        cfg = cfg.model_copy(update={"compile_decode": compile})
    if method.name == INT8_DYNAMIC:
        _float32_scales(model, path, ("weight_scale",))
    model = method.runtime(model.to(device), cfg)
    if method.name == FP8:  # the scales of the Linears now on FP8 matmuls (others as loaded)
        from modelpress.compression.quantization.fp8_runtime import Fp8Linear

        _float32_scales(model, path, ("weight_scale", "input_scale"), only=Fp8Linear)
    return model


def served_method(path: Path, config: Any) -> tuple[Any, Any] | None:
    """(method, validated params) whose runtime serves the artifact, or None when plain
    ``from_pretrained`` does: the report's last stage, else int8_dynamic with its defaults
    where ``config.json`` describes its W8A8 format."""
    from modelpress.compression.base import CompressionError
    from modelpress.compression.registry import get_method, parse_params

    report = path / "report.json"
    if report.is_file():
        try:
            stage = json.loads(report.read_text())["recipe"][-1]
            method = get_method(stage["method"])
            cfg = parse_params(method.name, stage.get("params"))
        except (CompressionError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{report}: not a modelpress job report ({e})") from e
        return (method, cfg) if method.runtime is not None else None
    qc = getattr(config, "quantization_config", None)
    if _is_int8_dynamic(qc):
        return get_method(INT8_DYNAMIC), parse_params(INT8_DYNAMIC, {})
    if _is_fp8_channel(qc):
        return get_method(FP8), parse_params(FP8, {})
    return None


def _is_int8_dynamic(qc: Any) -> bool:
    """compressed-tensors ``int-quantized`` with 8-bit weights and dynamic per-token 8-bit
    activations (what int8_dynamic writes)."""
    groups = _groups(qc, "int-quantized")
    return bool(groups) and all(
        (g.get("weights") or {}).get("num_bits") == 8
        and (g.get("input_activations") or {}).get("dynamic") is True
        and (g.get("input_activations") or {}).get("strategy") == "token" for g in groups)


def _groups(qc: Any, fmt: str) -> list[dict[str, Any]]:
    """The config groups of a compressed-tensors quantization config of format ``fmt``."""
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("format") != fmt:
        return []
    return list((qc.get("config_groups") or {}).values())


def _is_fp8_channel(qc: Any) -> bool:
    """compressed-tensors ``float-quantized`` with 8-bit float weights per output channel and
    8-bit float activations (what ``fp8`` writes without ``block``)."""
    groups = _groups(qc, "float-quantized")
    return bool(groups) and all(
        (g.get("weights") or {}).get("strategy") == "channel"
        and (g.get("weights") or {}).get("type") == "float"
        and (g.get("input_activations") or {}).get("num_bits") == 8 for g in groups)


def _float32_scales(model: nn.Module, path: Path, leaves: tuple[str, ...],
                    only: type[nn.Module] | None = None) -> None:
    """Put the artifact's float32 scales (``leaves``) back on the modules (of type ``only``):
    ``from_pretrained`` casts them to the load dtype (bfloat16 keeps 8 bits of each), and the
    int8 and FP8 runtimes scale their accumulators in float32."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name, _, leaf = key.rpartition(".")
                if leaf not in leaves:
                    continue
                try:
                    mod = model.get_submodule(name)
                except AttributeError:  # a name this model class prefixes differently
                    continue
                old = getattr(mod, leaf, None)
                if only is not None:
                    if isinstance(mod, only) and isinstance(old, torch.Tensor):
                        old.copy_(sf.get_tensor(key).float().reshape(old.shape))
                elif isinstance(old, torch.Tensor) and old.dtype != torch.float32:
                    scale = sf.get_tensor(key).float().reshape(old.shape)
                    setattr(mod, leaf, nn.Parameter(scale, requires_grad=False))

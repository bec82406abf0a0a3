"""FP8 W8A8 (E4M3) quantization, and the writer of every floating-point compressed-tensors
artifact (``float-quantized``, ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``).

Each quantized ``nn.Linear`` keeps its float ``weight`` as the dequantized values and carries an
:class:`FPWeight` (the artifact's tensors for it, and its compressed-tensors scheme); its input
activations are fake-quantized in memory by a forward pre-hook exactly as compressed-tensors does
after ``from_pretrained``, so the in-memory model is the artifact's reference.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..base import CalibrationConfig, CompressionError, CompressionResult, Context, Method, hf_config
from ..calib.engine import Step, calibration_tokens, input_stats, observe, run_sequential
from ..calib.families import supporting
from . import fpformats as F
from .artifact import DTYPES, DenseDtype, save_configs, write_safetensors
from .common import dense_dtype_field, target_linears

FP_ATTR = "_modelpress_fpweight"


@dataclass
class FPWeight:
    """One quantized Linear of a floating-point artifact."""

    fmt: str  # compressed-tensors format of the module
    tensors: dict[str, torch.Tensor]  # artifact tensors besides the dense ones, by leaf name
    weights: dict[str, Any]  # compressed-tensors QuantizationArgs fields of the weights
    inputs: dict[str, Any] | None = None  # ... of the input activations (None: weight-only)
    act: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)


def _act_hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(mod, FP_ATTR).act(args[0]), *args[1:])


@torch.no_grad()
def attach_fp(lin: nn.Linear, weight: torch.Tensor, fw: FPWeight) -> None:
    """Make ``lin`` compute what the artifact computes: dequantized weight, fake-quantized
    inputs (when ``fw.act``)."""
    lin.weight.copy_(weight.to(lin.weight.dtype))
    fw.tensors = {k: v.detach().cpu() for k, v in fw.tensors.items()}
    setattr(lin, FP_ATTR, fw)
    if fw.act is not None:
        lin.register_forward_pre_hook(_act_hook)


def fp_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, FP_ATTR, None) is not None}


# ------------------------------------------------------------------------------- the artifact


def _scheme_json(fw: FPWeight) -> str:
    return json.dumps([fw.weights, fw.inputs], sort_keys=True, default=str)


def build_fp_config(model: nn.Module, kv_cache: bool = False) -> dict[str, Any]:
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    mods = fp_modules(model)
    groups: dict[str, list[str]] = {}
    for name, m in mods.items():
        groups.setdefault(_scheme_json(getattr(m, FP_ATTR)), []).append(name)
    fmts = {getattr(m, FP_ATTR).fmt for m in mods.values()}
    config_groups = {}
    for i, (key, names) in enumerate(sorted(groups.items())):
        w, a = json.loads(key)
        targets = (["Linear"] if len(groups) == 1
                   else [f"re:^{n.replace('.', '[.]')}$" for n in names])
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**w),
            input_activations=QuantizationArgs(**a) if a else None)
    ignore = sorted(n for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n not in mods)
    kv = (QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True,
                           dynamic=False) if kv_cache else None)
    qc = QuantizationConfig(config_groups=config_groups,
                            format=fmts.pop() if len(fmts) == 1 else "mixed-precision",
                            quantization_status="compressed", ignore=ignore,
                            kv_cache_scheme=kv)
    d = qc.model_dump(exclude_none=True)
    d["quant_method"] = "compressed-tensors"
    plain: dict[str, Any] = json.loads(json.dumps(d, default=str))
    return plain


def iter_fp_tensors(model: nn.Module, dense_dtype: DenseDtype) -> Iterator[tuple[str, torch.Tensor]]:
    ddt = DTYPES[dense_dtype]
    mods = fp_modules(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if (mod in mods and leaf == "weight") or id(t) in seen:
            continue
        if tied and name.endswith("lm_head.weight"):
            continue
        seen.add(id(t))
        keep = leaf in ("k_scale", "v_scale") or not t.is_floating_point()
        yield name, t.detach().to("cpu", t.dtype if keep else ddt).contiguous()
    for name, m in mods.items():
        for leaf, t in getattr(m, FP_ATTR).tensors.items():
            yield f"{name}.{leaf}", t.contiguous()


def save_fp(model: nn.Module, out_dir: str | Path, dense_dtype: DenseDtype = "float16",
            kv_cache: bool = False) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not fp_modules(model):
        raise ValueError("model has no quantized modules to save")
    write_safetensors(out / "model.safetensors", lambda: iter_fp_tensors(model, dense_dtype),
                      metadata={"format": "pt"})
    cfg = copy.deepcopy(hf_config(model))
    cfg.quantization_config = build_fp_config(model, kv_cache)
    cfg.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if any(getattr(m, FP_ATTR).fmt != "float-quantized" for m in fp_modules(model).values()):
        # compressed-tensors decompresses FP4 weights to bfloat16 whatever the model's dtype:
        # only a bfloat16 model runs them after plain from_pretrained
        cfg.dtype = torch.bfloat16
    save_configs(model, cfg, out)


def fp_saver(dense_dtype: DenseDtype, kv_cache: bool = False) -> Callable[[nn.Module, Path], None]:
    def saver(model: nn.Module, out_dir: Path) -> None:
        save_fp(model, out_dir, dense_dtype, kv_cache)

    return saver


# ------------------------------------------------------------------------------------- FP8


class FP8Config(CalibrationConfig):
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="'dynamic': one FP8 scale per token computed at run time "
        "(compressed-tensors FP8_DYNAMIC); 'static': one per-tensor input scale per Linear "
        "calibrated on data (FP8). Ignored with 'block' (activations per 1 x block-width group).")
    block: list[int] | None = Field(
        None, description="[rows, cols] weight blocks with one scale each (DeepSeek-V3: [128, "
        "128]) and dynamic activation scales per group of 'cols' features (FP8_BLOCK); null: one "
        "weight scale per output channel.")
    kv_cache: bool = Field(
        False, description="Also quantize the attention key/value cache to FP8: per-layer "
        "k_scale/v_scale calibrated on data, written where vLLM reads them.")
    gptq: bool = Field(
        False, description="Round the per-channel FP8 weights with GPTQ's error feedback (the "
        "Hessian of calibration inputs): same artifact format, lower output error; needs "
        "calibration data. Ignored with 'block'.")
    dampening: float = Field(
        0.01, gt=0, le=1, description="GPTQ: added to the Hessian diagonal, as a fraction of "
        "its mean.")
    num_samples: int = Field(16, ge=1, le=4096, description="Calibration sequences (static "
                             "activations, gptq and kv_cache only).")
    batch_size: int = Field(2, ge=1, le=256, description="Calibration sequences per forward.")
    dense_dtype: DenseDtype = dense_dtype_field()

    @field_validator("block")
    @classmethod
    def _block(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError("block must be [rows, cols] with both >= 1")
        return v


def _fp8_weight(lin: nn.Linear, cfg: FP8Config, input_scale: torch.Tensor | None,
                hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, FPWeight]:
    w = lin.weight.detach()
    if cfg.block:
        bh, bw = cfg.block
        q, s = F.fp8_block(w, (bh, bw))
        deq = F.fp8_dequant(q, s, (bh, bw))
        wargs = {"num_bits": 8, "type": "float", "strategy": "block", "symmetric": True,
                 "dynamic": False, "block_structure": [bh, bw]}
        iargs = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": bw,
                 "symmetric": True, "dynamic": True}
        act = lambda x, _g=bw: F.fake_fp8_tokens(x, _g)  # noqa: E731
    else:
        if hessian is not None:
            from .fp_gptq import gptq_fp8_channel

            q, s = gptq_fp8_channel(w, hessian, cfg.dampening)
        else:
            q, s = F.fp8_channel(w)
        deq = F.fp8_dequant(q, s)
        wargs = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                 "dynamic": False}
        if input_scale is None:
            iargs = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                     "dynamic": True}
            act = F.fake_fp8_tokens
        else:
            iargs = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                     "dynamic": False}
            act = lambda x, _s=input_scale.to(w.device): F.fake_fp8_static(x, _s)  # noqa: E731
    tensors = {"weight": q, "weight_scale": s}
    if input_scale is not None and not cfg.block:
        tensors["input_scale"] = input_scale.reshape(1).float()
    return deq, FPWeight("float-quantized", tensors, wargs, iargs, act)


def _needs_data(cfg: FP8Config) -> bool:
    return cfg.kv_cache or (not cfg.block and (cfg.activations == "static" or cfg.gptq))


@torch.no_grad()
def apply(model: nn.Module, cfg: FP8Config, ctx: Context) -> CompressionResult:
    from .kv_cache import KVObserver

    t0 = time.perf_counter()
    lins = target_linears(model, None)
    _check_block(cfg, {n: m.in_features for n, m in lins.items()})
    metrics: dict[str, float] = {}
    if not _needs_data(cfg):
        for i, (name, lin) in enumerate(lins.items()):
            attach_fp(lin, *_fp8_weight(lin, cfg, None))
            ctx.progress((i + 1) / len(lins), f"quantized {name}")
    else:
        static = cfg.activations == "static" and not cfg.block
        kv = KVObserver(model) if cfg.kv_cache else None

        gptq = cfg.gptq and not cfg.block

        def visit(step: Step) -> None:
            amax = _input_amax(step) if static else {}
            stats = input_stats(step.block, step.inputs, step.groups(), hessian=True) if gptq else {}
            for name, lin in step.linears().items():
                if f"{_prefix(model, step)}{name}" in lins:
                    sc = F.fp8_scale(amax[name]).reshape(1) if static else None
                    h = stats[name].H if name in stats else None
                    attach_fp(lin, *_fp8_weight(lin, cfg, sc, h))
            if kv is not None:
                kv.calibrate(step)

        tokens = calibration_tokens(model, cfg, ctx)
        run_sequential(model, tokens, ctx, visit, batch_size=cfg.batch_size, label="fp8 block")
        # Linears outside the blocks (none in the supported families) get dynamic activations
        for lin in lins.values():
            if getattr(lin, FP_ATTR, None) is None:
                attach_fp(lin, *_fp8_weight(lin, cfg, None))
        if kv is not None:
            metrics.update(kv.finish())
    metrics.update({"quantized_linears": float(len(lins)),
                    "compress_seconds": time.perf_counter() - t0})
    return CompressionResult(model=model, packed=True, format="compressed-tensors",
                             saver=fp_saver(cfg.dense_dtype, cfg.kv_cache), metrics=metrics)


def _prefix(model: nn.Module, step: Step) -> str:
    name: str = next(n for n, m in model.named_modules() if m is step.block)
    return name + "."


def _input_amax(step: Step) -> dict[str, torch.Tensor]:
    """max |input| of every Linear of the block over the calibration tokens."""
    lins = step.linears()
    amax: dict[str, torch.Tensor] = {}

    def seen(name: str, x: torch.Tensor) -> None:
        a = x.detach().abs().amax().float()
        amax[name] = torch.maximum(amax[name], a) if name in amax else a

    observe(step.block, step.inputs, lins, seen)
    return amax


def _check_block(cfg: FP8Config, in_features: dict[str, int]) -> None:
    if cfg.block:
        bad = sorted({f for f in in_features.values() if f % cfg.block[1]})
        if bad:
            raise CompressionError(
                f"block width {cfg.block[1]} must divide every quantized Linear's in_features "
                f"(activations are scaled per group of that many features); not {bad}")


def _runtime(model: nn.Module, cfg: FP8Config) -> nn.Module:
    """Real FP8 matmuls (``torch._scaled_mm``) where the model's device has them natively;
    block-wise FP8 and other devices keep the loaded (dequantizing) path."""
    from .fp8_runtime import to_runtime

    return model if cfg.block else to_runtime(model)


def _validate(cfg: FP8Config, model_config: Any) -> None:
    from .common import model_in_features

    if cfg.block:
        _check_block(cfg, model_in_features(model_config))
    if _needs_data(cfg):
        mt = getattr(model_config, "model_type", None)
        if mt not in supporting("causal"):
            raise CompressionError(
                f"fp8 with static activations or kv_cache calibrates through the family table; "
                f"model type {mt!r} is not one of {sorted(supporting('causal'))}")


METHOD = Method(
    name="fp8",
    config=FP8Config,
    apply=apply,
    description="FP8 E4M3 W8A8: weights per output channel (or per block, DeepSeek-V3 style), "
    "activations per token dynamic or static per tensor calibrated on data; optional FP8 KV "
    "cache with calibrated per-layer scales; compressed-tensors float-quantized artifact.",
    family="quantization",
    terminal=True,
    validate=_validate,
    runtime=_runtime,
)

"""Writing quantized models in the compressed-tensors format.

Every quantized ``nn.Linear`` carries a :class:`QuantizedWeight` in the attribute
``QUANT_ATTR``; its float ``weight`` holds the dequantised (fake-quantised) values so the
in-memory model computes exactly what the reloaded artifact computes. The saver writes:

* ``pack-quantized`` (weight-only, 1..8 bits): ``weight_packed`` (int32, 32/bits values per
  word), ``weight_scale``, ``weight_shape`` and, when asymmetric, a packed ``weight_zero_point``;
* ``int-quantized`` (int8 with dynamic per-token int8 activations, W8A8) and
  ``naive-quantized`` (int8 weight-only): ``weight`` as int8, ``weight_scale`` (and
  ``weight_zero_point`` when asymmetric);
* every other tensor (embeddings, norms) in ``dense_dtype``;
* ``config.json`` with a ``quantization_config`` built by the compressed_tensors library, so
  plain ``AutoModelForCausalLM.from_pretrained(dir)`` dequantises the weights on load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..base import hf, hf_config, weight_of
from .qtensor import QuantizedWeight, dequantize_grouped, quantize_grouped

QUANT_ATTR = "_modelpress_qweight"

DenseDtype = Literal["float32", "float16", "bfloat16"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def attach(module: nn.Linear, qw: QuantizedWeight) -> None:
    """Record ``qw`` on ``module`` and make its float weight the dequantised values.

    A float32 weight determines its integer codes exactly (``round(w / scale) + zero_point``
    recovers them: ``|q - zp| <= 255`` is far inside float32's 24-bit mantissa), so for float32
    weights the codes are not kept (a quarter of the weights' bytes saved for the whole run);
    :func:`codes_of` derives and checks them when the artifact is written."""
    with torch.no_grad():
        # in place: no second float copy of the weights (a model loaded from safetensors is
        # memory-mapped; the written pages replace the mapped ones)
        module.weight.copy_(qw.dequantize(module.weight.dtype))
    if module.weight.dtype == torch.float32:
        qw = dataclasses.replace(qw, q=None)
    setattr(module, QUANT_ATTR, qw)


def codes_of(module: nn.Module) -> torch.Tensor:
    """The integer codes of a quantized module (kept, or derived from its float weight and
    checked to reproduce that weight exactly)."""
    qw: QuantizedWeight = getattr(module, QUANT_ATTR)
    if qw.q is not None:
        return qw.q
    w = weight_of(module).detach()
    q = quantize_grouped(w, qw.scale.to(w.device), qw.zero_point.to(w.device), qw.bits)
    back = dequantize_grouped(q, qw.scale.to(w.device), qw.zero_point.to(w.device), w.dtype)
    if not torch.equal(back, w):
        raise RuntimeError("a quantized weight was modified after quantization; its integer "
                           "codes cannot be recovered")
    return q


class QuantizedLinear(nn.Module):
    """A quantized Linear kept in its integer form (codes, scales, zero points: about a quarter
    of its float32 bytes) that dequantizes its weight on every forward; it computes exactly what
    the nn.Linear it replaces computed after :func:`attach`. Layer-by-layer methods turn each
    finished layer into these, so the float weights of done layers do not stay in memory."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        q = qw.kept_q()
        self.out_features: int = q.shape[0]
        self.in_features: int = q.shape[1]
        self.float_dtype = dtype
        # non-persistent: the saver writes them in the compressed-tensors layout
        self.register_buffer("codes", q, persistent=False)
        self.register_buffer("scale", qw.scale, persistent=False)
        self.register_buffer("zero_point", qw.zero_point, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        setattr(self, QUANT_ATTR, qw)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (computed, not stored)."""
        return dequantize_grouped(self.codes, self.scale, self.zero_point, self.float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> QuantizedLinear:  # keep the QuantizedWeight on the buffers' device
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        qw = getattr(self, QUANT_ATTR)
        qw.q, qw.scale, qw.zero_point = self.codes, self.scale, self.zero_point
        return self

    def extra_repr(self) -> str:
        qw = getattr(self, QUANT_ATTR)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={qw.bits}, group_size={qw.group_size}, symmetric={qw.symmetric}")


def _tied(model: nn.Module, w: torch.Tensor) -> bool:
    """Whether ``w`` is shared by more than one parameter of ``model`` (tied weights)."""
    ptr = w.data_ptr()
    return sum(p.data_ptr() == ptr for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _swap(root: nn.Module, name: str, lin: nn.Linear, qw: QuantizedWeight) -> None:
    """Put a :class:`QuantizedLinear` of ``qw`` (codes included) where ``lin`` is and give the
    float weight's memory back (:func:`release_pages`)."""
    from ..device import release_pages

    w = lin.weight
    new = QuantizedLinear(qw, lin.bias, w.dtype)
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)
    lin.register_parameter("weight", None)  # drop the module's reference before the pages go
    if w.is_contiguous() and w.untyped_storage().nbytes() == w.numel() * w.element_size():
        release_pages(w)


@torch.no_grad()
def compact(root: nn.Module, model: nn.Module | None = None) -> int:
    """Replace every :func:`attach`-ed ``nn.Linear`` under ``root`` by a :class:`QuantizedLinear`
    and give its float weight's memory back. Weights shared with another parameter of ``model``
    (tied) are left as they are. Returns how many were replaced."""
    model = model if model is not None else root
    todo = [(n, m) for n, m in root.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, QUANT_ATTR, None) is not None]
    done = 0
    for name, lin in todo:
        if _tied(model, lin.weight):
            continue
        _swap(root, name, lin, dataclasses.replace(getattr(lin, QUANT_ATTR),
                                                   q=codes_of(lin).contiguous()))
        done += 1
    return done


@torch.no_grad()
def replace_quantized(model: nn.Module, name: str, qw: QuantizedWeight) -> None:
    """:func:`attach` then :func:`compact` for the Linear ``name`` in one step, for methods whose
    integers are final at once (int8, rtn): ``qw`` becomes a :class:`QuantizedLinear` directly,
    without writing the dequantized float weight and deriving the codes back from it. A tied
    weight is attached instead (it stays an ``nn.Linear``)."""
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is a {type(lin).__name__}, not an nn.Linear")
    if _tied(model, lin.weight):
        attach(lin, qw)
        return
    dev = lin.weight.device
    _swap(model, name, lin, dataclasses.replace(qw, q=qw.kept_q().to(dev).contiguous(),
                                                scale=qw.scale.to(dev), zero_point=qw.zero_point.to(dev)))


def float_dtype(module: nn.Module) -> torch.dtype:
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return getattr(module, "float_dtype", torch.float32)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if getattr(m, QUANT_ATTR, None) is not None}


def _scheme_key(qw: QuantizedWeight) -> tuple[int, int | None, bool]:
    return (qw.bits, qw.group_size, qw.symmetric)


def _float_head(model: nn.Module, float_head: bool) -> tuple[str, nn.Module] | None:
    """(name, module) of a quantized output head that is to be written in float, else None."""
    if not float_head or not hasattr(model, "get_output_embeddings"):
        return None
    head: nn.Module | None = hf(model).get_output_embeddings()
    if head is None or getattr(head, QUANT_ATTR, None) is None:
        return None
    return next(n for n, m in model.named_modules() if m is head), head


def _saved_quantized(model: nn.Module, float_head: bool) -> dict[str, nn.Module]:
    qmods = quantized_modules(model)
    head = _float_head(model, float_head)
    if head is not None:
        qmods.pop(head[0], None)
    return qmods


def build_quantization_config(model: nn.Module, fmt: str, activations: bool,
                              float_head: bool = False) -> dict[str, Any]:
    """The ``quantization_config`` dict (one config group per distinct weight scheme)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    groups: dict[tuple[int, int | None, bool], list[str]] = {}
    qmods = _saved_quantized(model, float_head)
    for name, m in qmods.items():
        groups.setdefault(_scheme_key(getattr(m, QUANT_ATTR)), []).append(name)
    config_groups = {}
    for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        wargs = QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym,
            strategy="group" if gs else "channel", group_size=gs if gs else None,
            dynamic=False, observer=None,
        )
        iargs = None
        if activations:
            iargs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                     dynamic=True, observer=None)
        targets = (["Linear"] if len(groups) == 1
                   else [f"re:^{n.replace('.', '[.]')}$" for n in names])
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets,
            weights=wargs, input_activations=iargs,
        )
    ignore = sorted(
        n for n, m in model.named_modules()
        if (isinstance(m, nn.Linear) or getattr(m, QUANT_ATTR, None) is not None)
        and n not in qmods
    )
    qc = QuantizationConfig(config_groups=config_groups, format=fmt,
                            quantization_status="compressed", ignore=ignore)
    d = qc.model_dump(exclude_none=True)
    d["quant_method"] = "compressed-tensors"
    plain: dict[str, Any] = json.loads(json.dumps(d, default=str))
    return plain


def iter_compressed_tensors(model: nn.Module, fmt: str, dense_dtype: DenseDtype = "float16",
                            float_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the artifact, one at a time (in a fixed order). ``float_head``: a quantized
    output head is written as a float weight (and listed in ``ignore``), or not at all where it
    was tied to the input embeddings (``tied_input_embeddings`` on the module): vLLM quantizes
    only Linear layers, its output head takes no quantized weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    ddt = DTYPES[dense_dtype]
    qmods = _saved_quantized(model, float_head)
    seen: dict[int, str] = {}
    tied = bool(getattr(hf_config(model), "tie_word_embeddings", False))
    sd = model.state_dict(keep_vars=False)  # references, not copies
    for name, t in sd.items():
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in qmods and leaf == "weight":
            continue
        if id(t) in seen or (tied and name.endswith("lm_head.weight")):
            continue  # tied weights are stored once (transformers re-ties on load)
        seen[id(t)] = name
        yield name, t.detach().to("cpu", ddt if t.is_floating_point() else t.dtype).contiguous()
    head = _float_head(model, float_head)
    if head is not None and not getattr(head[1], "tied_input_embeddings", False):
        hqw: QuantizedWeight = getattr(head[1], QUANT_ATTR)
        yield f"{head[0]}.weight", dequantize_grouped(
            codes_of(head[1]), hqw.scale, hqw.zero_point, torch.float32).to("cpu", ddt).contiguous()
    for name, m in qmods.items():
        qw: QuantizedWeight = getattr(m, QUANT_ATTR)
        sdt = float_dtype(m)  # scales in the model's float dtype: bit-exact reload
        yield f"{name}.weight_scale", qw.scale.to("cpu", sdt).contiguous()
        if fmt == "pack-quantized":
            q = codes_of(m)
            yield f"{name}.weight_packed", pack_to_int32(q.cpu(), qw.bits).contiguous()
            yield f"{name}.weight_shape", torch.tensor(list(q.shape), dtype=torch.int64)
            if not qw.symmetric:
                yield f"{name}.weight_zero_point", pack_to_int32(
                    qw.zero_point.to(torch.int8).cpu(), qw.bits, packed_dim=0).contiguous()
        else:
            yield f"{name}.weight", codes_of(m).cpu().contiguous()
            if not qw.symmetric:
                yield f"{name}.weight_zero_point", qw.zero_point.to("cpu", torch.int8).contiguous()


def compressed_state_dict(model: nn.Module, fmt: str, dense_dtype: DenseDtype = "float16",
                          float_head: bool = False) -> dict[str, torch.Tensor]:
    """:func:`iter_compressed_tensors` as a dict (every tensor in memory at once)."""
    return dict(iter_compressed_tensors(model, fmt, dense_dtype, float_head))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
              torch.float8_e4m3fn: "F8_E4M3"}


def write_safetensors(path: str | Path,
                      tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file holding one tensor in memory at a time: ``tensors()`` is called
    twice (the header needs every name, dtype and shape before the data), each time yielding
    the same tensors in the same order (``safetensors.torch.save_file`` keeps the whole dict
    plus a byte copy of it: ~2x the artifact in memory)."""
    header: dict[str, Any] = {}
    order: list[str] = []
    offset = 0
    for name, t in tensors():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        order.append(name)
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, (name, t) in enumerate(tensors()):
            if i >= len(order) or name != order[i] or header[name]["shape"] != list(t.shape):
                raise RuntimeError(f"tensors changed between the two passes at {name!r}")
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        if f.tell() != 8 + len(head) + offset:
            raise RuntimeError("safetensors data size mismatch")


def save_compressed(model: nn.Module, out_dir: str | Path, fmt: str, activations: bool = False,
                    dense_dtype: DenseDtype = "float16", float_head: bool = False) -> Path:
    """Write ``out_dir`` (config.json with quantization_config, model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not quantized_modules(model):
        raise ValueError("model has no quantized modules to save")
    write_safetensors(out / "model.safetensors",
                      lambda: iter_compressed_tensors(model, fmt, dense_dtype, float_head),
                      metadata={"format": "pt"})
    write_compressed_config(model, out, fmt, activations, float_head)
    return out


def write_compressed_config(model: nn.Module, out: Path, fmt: str, activations: bool = False,
                            float_head: bool = False) -> None:
    """``config.json`` (with its ``quantization_config``) and the generation config of a
    compressed artifact. Reads only module types, shapes and dtypes (the model may be on the
    meta device: the streaming writer calls it on a skeleton)."""
    cfg = copy.deepcopy(hf_config(model))
    cfg.quantization_config = build_quantization_config(model, fmt, activations, float_head)
    # reload in the model's own float dtype, whatever dtype the dense tensors are stored in
    cfg.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    out_emb = hf(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = _float_head(model, float_head)
    if head is not None:  # written in float: tied again if it was tied before quantization
        cfg.tie_word_embeddings = bool(getattr(head[1], "tied_input_embeddings", False))
    elif out_emb is not None and getattr(out_emb, QUANT_ATTR, None) is not None:
        cfg.tie_word_embeddings = False  # the head is stored (quantized) on its own
    save_configs(model, cfg, out)


def save_configs(model: nn.Module, cfg: Any, out: Path) -> None:
    """Write ``cfg`` (the artifact's config.json) and the model's generation config, if any."""
    cfg.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except Exception:  # noqa: BLE001 - a generation config is optional
            pass


class CompressedSaver:
    """Writes a model with :func:`save_compressed`; ``options`` says what it writes, for a writer
    that streams the same tensors block by block."""

    def __init__(self, fmt: str, activations: bool, dense_dtype: DenseDtype, float_head: bool):
        self.options: dict[str, Any] = {"fmt": fmt, "activations": activations,
                                        "dense_dtype": dense_dtype, "float_head": float_head}

    def __call__(self, model: nn.Module, out_dir: Path) -> None:
        o = self.options
        save_compressed(model, out_dir, o["fmt"], o["activations"], o["dense_dtype"], o["float_head"])


def make_saver(fmt: str, activations: bool = False, dense_dtype: DenseDtype = "float16",
               float_head: bool = False) -> CompressedSaver:
    return CompressedSaver(fmt, activations, dense_dtype, float_head)


def artifact_quantized_bytes(out_dir: str | Path) -> tuple[int, int]:
    """(bytes of quantized-layer tensors, bytes of all tensors) in an artifact directory."""
    from safetensors import safe_open

    q = total = 0
    for f in Path(out_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                b = t.numel() * t.element_size()
                total += b
                if any(k.endswith(s) for s in ("weight_packed", "weight_scale", "weight_zero_point",
                                               "weight_shape")) or t.dtype == torch.int8:
                    q += b
    return q, total

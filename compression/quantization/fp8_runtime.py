"""FP8 W8A8 at run time: the artifact's E4M3 weights times E4M3 activations through
``torch._scaled_mm``, a real FP8 matmul (fp32 accumulation, one scale per activation row and one
per weight row), instead of compressed-tensors' path after ``from_pretrained`` (weights
dequantized to float at every forward, activations fake-quantized, a float matmul).

The kernel is native on CUDA devices of compute capability 8.9 and up (Ada, Hopper, Blackwell).
On a machine with one, ``to_runtime`` swaps every per-channel FP8 Linear for an
:class:`Fp8Linear`, which takes ``torch._scaled_mm`` whenever its input is on such a device and
the dequantizing float path otherwise (a CPU emulates ``torch._scaled_mm``, far slower than the
float matmul). On a machine without one, "auto" leaves the model as loaded;
``kernels="scaled_mm"`` swaps and takes ``torch._scaled_mm`` on every device (what the CPU tests
use to check its numbers). Block-wise FP8 (128 x 128 weight scales) stays on the loaded path.

The numbers are the artifact's: the activation scale of a row is ``max|x| / 448`` (dynamic) or
the calibrated ``input_scale`` (static), with the same saturating E4M3 cast as the
fake-quantized reference, so the two differ only by the order of the float sums.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import nn

from .fpformats import E4M3_MAX, fp8_scale

Kernels = Literal["auto", "scaled_mm"]
#: compute capability from which CUDA runs FP8 matmuls natively
NATIVE_CC = (8, 9)
#: torch._scaled_mm on CUDA needs both matmul dimensions to be multiples of 16
ALIGN = 16


def native_fp8(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` (None: any device of this machine) runs FP8 matmuls in hardware."""
    if not torch.cuda.is_available():
        return False
    if device is None:
        return any(_native_index(i) for i in range(torch.cuda.device_count()))
    dev = torch.device(device)
    return dev.type == "cuda" and _native_index(
        dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _native_index(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= NATIVE_CC


class Fp8Linear(nn.Module):
    """A Linear whose E4M3 weight ``[out, in]`` (one fp32 scale per output row) multiplies E4M3
    activations (one scale per token, or one calibrated ``input_scale``) in ``torch._scaled_mm``."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 always_scaled_mm: bool = False):
        super().__init__()
        #: take torch._scaled_mm on every device, not only where FP8 is native
        self.always_scaled_mm = always_scaled_mm
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError(f"expected a 2-d float8_e4m3fn weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        # [1, out]: _scaled_mm's per-column scale of the (transposed) weight
        self.register_buffer("weight_scale", weight_scale.float().reshape(1, -1).contiguous())
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.float().reshape(1, 1))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> Fp8Linear:
        """Device moves apply to the FP8 codes and float32 scales, dtype casts (``.to(dtype)``,
        ``.half()``) do not: they are the format, not the model's compute dtype."""
        kept = {n: getattr(self, n) for n in ("weight", "weight_scale", "input_scale")}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, old in kept.items():
            new = getattr(self, name)
            if old is not None and new is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def extra_repr(self) -> str:
        acts = "dynamic per token" if self.input_scale is None else "static per tensor"
        return f"in={self.in_features}, out={self.out_features}, activations {acts}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.input_scale is None:
            sa = fp8_scale(x2.abs().amax(-1, keepdim=True))
        else:
            sa = self.input_scale.expand(x2.shape[0], 1).contiguous()
        xq = (x2 / sa).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        if self.always_scaled_mm or (x.is_cuda and native_fp8(x.device)):
            # CUDA's row-wise scaled matmul writes bfloat16 only; CPUs write any float dtype
            out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sa, scale_b=self.weight_scale,
                                 out_dtype=out_dtype).to(x.dtype)
        else:  # what the loaded artifact computes: dequantized weights, a float matmul
            w = (self.weight.float() * self.weight_scale.t()).to(x.dtype)
            y = nn.functional.linear((xq.float() * sa).to(x.dtype), w)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def fp8_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(E4M3 weight, per-row scale ``[out, 1]``, static input scale or None) of a per-channel
    FP8 W8A8 Linear, as ``fp8`` left it in memory or as ``from_pretrained`` loaded its artifact;
    None for any other module (block-wise, weight-only, FP4, float)."""
    from .fp8 import FP_ATTR

    fw = getattr(lin, FP_ATTR, None)
    if fw is not None:  # in memory, straight from the method
        if (fw.fmt != "float-quantized" or fw.weights.get("strategy") != "channel"
                or not fw.inputs):
            return None
        w, s, si = fw.tensors["weight"], fw.tensors["weight_scale"], fw.tensors.get("input_scale")
        dev = lin.weight.device
        return w.to(dev), s.to(dev), None if si is None else si.to(dev)
    scheme = getattr(lin, "quantization_scheme", None)
    w = getattr(lin, "weight", None)
    s = getattr(lin, "weight_scale", None)
    if (scheme is None or not isinstance(w, torch.Tensor) or w.dtype != torch.float8_e4m3fn
            or not isinstance(s, torch.Tensor) or s.numel() != w.shape[0]):
        return None
    acts: Any = scheme.input_activations
    if acts is None or acts.type != "float" or acts.num_bits != 8:
        return None
    if acts.dynamic is True and acts.strategy == "token":
        return w.detach(), s.detach().reshape(-1, 1), None
    si = getattr(lin, "input_scale", None)
    if acts.strategy == "tensor" and isinstance(si, torch.Tensor) and si.numel() == 1:
        return w.detach(), s.detach().reshape(-1, 1), si.detach()
    return None


def to_runtime(model: nn.Module, kernels: Kernels = "auto") -> nn.Module:
    """Swap every per-channel FP8 W8A8 Linear of ``model`` for an :class:`Fp8Linear` where this
    machine has a device that runs FP8 natively ("auto") or always ("scaled_mm"); Linears whose
    sizes are not multiples of 16 stay as they are. Returns ``model`` (changed in place)."""
    if kernels == "auto" and not native_fp8():
        return model
    swaps: list[tuple[str, Fp8Linear]] = []
    for name, mod in model.named_modules():
        parts = fp8_parts(mod)
        if parts is None:
            continue
        w, s, si = parts
        if w.shape[0] % ALIGN or w.shape[1] % ALIGN:
            continue
        swaps.append((name, Fp8Linear(w, s, getattr(mod, "bias", None), si,
                                      always_scaled_mm=kernels == "scaled_mm")))
    for name, new in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def runtime_linears(model: nn.Module) -> int:
    """How many Linears of ``model`` run through ``torch._scaled_mm``."""
    return sum(isinstance(m, Fp8Linear) for m in model.modules())

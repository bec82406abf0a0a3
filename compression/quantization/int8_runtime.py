"""The int8 CPU runtime of W8A8 artifacts (``int8_dynamic``): int8 weights (per output channel,
symmetric) times int8 activations quantized per token at run time, multiplied with
``torch._int_mm`` (int8 x int8 -> int32) or oneDNN's int8 kernels; and :func:`to_runtime`, which
puts a float model or one loaded from an ``int8_dynamic`` artifact onto them. The method itself
(config, smoothing, the artifact) is ``int8_dynamic``.

On the CPU each group of Linears that read the same tensor (q/k/v, gate/up) quantizes it once
and runs the fastest of three exact kernels, timed once per shape for one row and for many:
oneDNN with the weights reordered once into its blocked layout (``onednn::qlinear_prepack`` /
``qlinear_pointwise``, the kernels PyTorch's x86 PT2E quantization lowers to: VNNI / AMX where
the CPU has them), ``torch._int_mm``, or (for many rows) a float32 matmul of the int8 values
(exact integer sums below 2**24). oneDNN is used only where probes find its products exact (on
CPUs without VNNI it multiplies byte pairs into saturating 16-bit sums, up to 20% off) and its
speed within 10x of ``_int_mm``'s (some virtualised CPUs run a path ~600x slower).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..base import UnsupportedModelError, hf, hf_config
from ..calib.families import shared_inputs
from .artifact import QUANT_ATTR
from .qtensor import QuantizedWeight

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- pure tensor functions


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scale [out] float32)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a 2-D activation: (q int8, scale [rows, 1] float32)."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T`` with x quantized per token and ``W = qw * w_scale`` (int32 accumulation)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_per_token_int8(x2)
    if xq.device.type == "cpu" or xq.shape[0] > 16:
        acc = torch._int_mm(xq, qw.t())
    else:  # CUDA's int8 GEMM wants more than 16 rows: pad the few-token decode case
        pad = torch.zeros(17, xq.shape[1], dtype=torch.int8, device=xq.device)
        pad[: xq.shape[0]] = xq
        acc = torch._int_mm(pad, qw.t())[: xq.shape[0]]
    y = scale_accumulator(acc, xs, w_scale, bias)
    return y.to(x.dtype).reshape(*shape[:-1], qw.shape[0])


def scale_accumulator(acc: torch.Tensor, xs: torch.Tensor | float, w_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """int32 ``x_q @ W_q^T`` to float: times the weight scales, then the activation scale(s)
    (per token [rows, 1], or one float), plus bias: in the order the oneDNN path applies them to
    its int32 products (:meth:`_CpuGroup._matmul_onednn`), so that both kernels give the same
    floats, bit for bit (tested), and a served model the same numbers whichever kernel each
    group chose in its process. In place after the conversion (a [tokens, vocab] head holds 2
    copies, not 4); one function for every ``_int_mm`` path."""
    y = torch.mul(acc, w_scale).mul_(xs)  # int32 * float32: float32, as acc.float() * w_scale
    return y if bias is None else y.add_(bias.float())


def quantize_per_tensor_int8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric int8 of a whole activation with one scale (equal to per-token for one token):
    (q int8, scale). ``|x / scale| <= 127`` by construction, so no clamp is needed."""
    s = x.abs().max().item() / 127.0 or 1e-12
    return x.mul(1.0 / s).round_().to(torch.int8), s


def onednn_qlinear(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor,
                   w_scale: torch.Tensor, w_zeros: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``xq`` (int8 [rows, in], per-token scales ``xs`` [rows, 1]) times the prepacked weight
    (per-channel ``w_scale``), float out (the eager runtime's multi-token oneDNN path, as one function)."""
    y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, w_scale, w_zeros,
                                                         None, 1.0, 0, torch.float32, "none", [], "")
    y = y.mul_(xs)
    return y if bias is None else y.add_(bias)


# ``modelpress::onednn_qlinear``: :func:`onednn_qlinear` as one opaque op for ``torch.compile``.
# Inductor's own lowering of ``qlinear_pointwise`` wants the packed weight frozen into the graph
# (``torch._inductor.config.freezing``, which freezes every buffer, the static KV cache included,
# and breaks generation); the quantization of the input stays in the graph and fuses with what
# precedes it. A plain ``torch.library`` registration: ``torch.library.custom_op``'s Python
# wrapper costs ~15 us more per call (120 calls per SmolLM2 token).
_LIB = torch.library.Library("modelpress", "FRAGMENT")
_LIB.define("onednn_qlinear(Tensor xq, Tensor xs, Tensor packed, Tensor w_scale, "
            "Tensor w_zeros, Tensor? bias) -> Tensor")
_LIB.impl("onednn_qlinear", onednn_qlinear, "CompositeExplicitAutograd")  # packed: MkldnnCPU


def _onednn_qlinear_fake(xq: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor,
                         w_scale: torch.Tensor, w_zeros: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    return xq.new_empty(xq.shape[0], w_scale.shape[0], dtype=torch.float32)


torch.library.register_fake("modelpress::onednn_qlinear", _onednn_qlinear_fake, lib=_LIB)


# ---------------------------------------------------------------- runtime module


def _onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack") \
        and torch.backends.mkldnn.is_available()


@functools.cache
def onednn_exact() -> bool:
    """Whether oneDNN's int8 matmul is available and exact on this CPU: one probe whose byte
    pairs (127 x 127 + 127 x 127 after oneDNN's shift of the input to unsigned) overflow a 16-bit
    sum, which CPUs without VNNI or AMX saturate."""
    if not _onednn_available():
        return False
    try:
        w = torch.full((16, 64), 127, dtype=torch.int8)
        w[1::2] = -127
        x = torch.full((2, 64), 127, dtype=torch.int8)
        x[1] = -127
        packed = torch.ops.onednn.qlinear_prepack(w, [1, 64])
        y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(16),
                                               torch.zeros(16, dtype=torch.int64), None, 1.0, 0,
                                               torch.float32, "none", [], "")
    except RuntimeError:  # a oneDNN build without these kernels
        return False
    return torch.equal(y, torch._int_mm(x, w.t()).float())


@functools.cache
def onednn_usable() -> bool:
    """:func:`onednn_exact`, and not far slower than ``torch._int_mm`` on a decoder-sized
    product (16 rows, 1024 x 1024): on some CPUs with VNNI (a virtualised AMD EPYC) oneDNN's
    int8 matmul ran ~600x slower than ``_int_mm`` (4.8 s for 16 rows of a 49152 x 576 head), and
    a group's timing would then spend seconds on its first call alone (once per process)."""
    if not onednn_exact():
        return False
    w = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    x = torch.randint(-127, 128, (16, 1024), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, [1, 1024])
    xs, ones, zeros = torch.ones(16, 1), torch.ones(1024), torch.zeros(1024, dtype=torch.int64)
    t_int_mm = _best_time(lambda: torch._int_mm(x, w.t()), reps=2)
    t_onednn = _best_time(lambda: onednn_qlinear(x, xs, packed, ones, zeros, None), reps=2,
                          give_up=10 * t_int_mm)
    if t_onednn > 10 * t_int_mm:
        log.info("oneDNN's int8 matmul is %.0fx slower than torch._int_mm on this CPU: not used",
                 t_onednn / t_int_mm)
        return False
    return True


def _best_time(fn: Callable[[], Any], reps: int = 3, give_up: float = float("inf")) -> float:
    """The best of ``reps`` timed calls after a warm-up; a call slower than ``give_up`` seconds
    ends the timing (a kernel 1000x slower than the other one on a CPU need not be timed 4
    times: on one such Xeon that made the first generate 12 s longer)."""
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > 50 * give_up:  # hopeless even counting a first call's setup
        return time.perf_counter() - t
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if best > give_up:
            break
    return best


#: the multi-row kernel is chosen on this many rows (a prompt, an evaluation window): on a CPU
#: without VNNI ``torch._int_mm`` costs time in proportion to the rows (25x a float32 matmul's
#: at 512 rows on an AVX2 EPYC); at one row any of the kernels may win
TIMED_ROWS = 16

#: (rows, inputs, outputs, bias, candidates) -> the kernel timed fastest (see _CpuGroup._choose)
_CHOSEN: dict[tuple[int, int, int, bool, tuple[str, ...]], str] = {}


class _CpuGroup:
    """The CPU runtime of Linears that read the same tensor (q/k/v, gate/up; or one Linear):
    the input is quantized once and, where oneDNN is faster, one ``qlinear_pointwise`` call on
    the concatenated prepacked weights computes every member's output; the other members' outputs
    wait in the group until they ask for them (keyed by the identity and version of the input
    tensor). Otherwise each member runs ``torch._int_mm`` on the shared int8 input. The kernels
    are chosen once per shape by timing them: ``kernel`` on one row (a decode step; also what
    ``torch.compile`` traces; oneDNN or ``_int_mm``), ``kernel_rows`` on :data:`TIMED_ROWS`
    rows (those two or "float") (oneDNN is ~100x slower than ``_int_mm`` on one row of some small
    shapes on some CPUs, ~2x faster on others; without VNNI ``_int_mm`` is ~25x slower than a
    float32 matmul on many rows)."""

    def __init__(self, members: list[Int8DynamicLinear]):
        self.members = members
        self.kernel: str | None = None  # "onednn" or "int_mm" for one row (first use)
        self.kernel_rows: str | None = None  # the same for more rows
        self.packed: torch.Tensor | None = None
        self.qweight: torch.Tensor | None = None  # the members' int8 weights, one tensor
        self.qweight_t: torch.Tensor | None = None  # its transpose (a view), for torch._int_mm
        self._reset_cache()

    def __getstate__(self) -> dict[str, Any]:  # oneDNN's opaque tensor cannot be copied:
        state = self.__dict__.copy()  # a copy chooses and packs again on first use
        state.update(kernel=None, kernel_rows=None, packed=None, qweight=None, qweight_t=None,
                     cache=(None, -1, {}), traced_out=None)
        return state

    def _reset_cache(self) -> None:
        # (input, its version, the other members' outputs): replaced in one assignment, so a
        # model shared by threads never pairs one input with another input's outputs
        self.cache: tuple[torch.Tensor | None, int, dict[int, torch.Tensor]] = (None, -1, {})
        self.traced_out: tuple[torch.Tensor, torch.Tensor] | None = None

    def _prepare(self) -> None:
        ms = self.members
        self.n_out = [m.out_features for m in ms]
        self.w_scale = torch.cat([m.w_scale for m in ms])
        biases = [m.bias for m in ms]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(n)
             for b, n in zip(biases, self.n_out)])
        self.qweight = ms[0].qweight
        if len(ms) > 1:  # the members' weights become row blocks of one tensor (no second
            # copy), so that torch._int_mm runs once per group
            self.qweight = torch.cat([m.qweight for m in ms])
            for m, part in zip(ms, torch.split(self.qweight, self.n_out)):
                m.qweight = part
                getattr(m, QUANT_ATTR).q = part
        self.qweight_t = self.qweight.t()  # a view, made once (not per call)
        # _int_mm first (never far off), oneDNN last (each kernel after the first gives up at
        # 4x the best so far); "float" only for many rows: it converts the weights on every call
        onednn = ["onednn"] if Int8DynamicLinear.onednn_ok and onednn_usable() else []
        self.kernel = self._choose(1, ["int_mm", *onednn])
        self.kernel_rows = self._choose(TIMED_ROWS, ["int_mm", "float", *onednn])
        if "onednn" not in (self.kernel, self.kernel_rows):
            self.packed = None
        elif self.packed is None:  # chosen for this shape by an earlier group
            self._pack()
        self.set_traced()

    def _choose(self, rows: int, kernels: list[str]) -> str:
        """The fastest kernel for this group's shape, timed by the first group of that shape in
        the process (the 30 layers of a model share 4 shapes: one timing each, not 30)."""
        key = (rows, self.members[0].in_features, sum(self.n_out), self.bias is not None,
               tuple(kernels))
        if key not in _CHOSEN:
            if "onednn" in kernels and self.packed is None:
                try:
                    self._pack()
                except RuntimeError:  # a oneDNN build without these kernels
                    Int8DynamicLinear.onednn_ok = False
                    kernels = [k for k in kernels if k != "onednn"]
            _CHOSEN[key] = self._fastest(rows, kernels)
        return _CHOSEN[key]

    def _pack(self) -> None:
        assert self.qweight is not None  # set by _prepare
        self.packed = torch.ops.onednn.qlinear_prepack(self.qweight,
                                                       [1, self.members[0].in_features])
        self.zeros = torch.zeros(sum(self.n_out), dtype=torch.int64)

    def _fastest(self, rows: int, kernels: list[str]) -> str:
        """The kernel that multiplies ``rows`` rows fastest; each one after the first gives up
        at 4x the best time so far."""
        x = torch.randn(rows, self.members[0].in_features)
        xq, xs = quantize_per_tensor_int8(x) if rows == 1 else quantize_per_token_int8(x)
        best, best_t = kernels[0], float("inf")
        for k in kernels:
            t = _best_time(functools.partial(self._matmul, k, xq, xs), give_up=4 * best_t)
            if t < best_t:
                best, best_t = k, t
        return best

    def use(self, kernel: str) -> None:
        """Run ``kernel`` for every input whatever the timing chose (tests; packs if needed)."""
        if self.kernel is None:
            self._prepare()
        if kernel == "onednn" and self.packed is None:
            self._pack()
        self.kernel = self.kernel_rows = kernel
        self.set_traced()

    def set_traced(self) -> None:
        """What each member's compiled forward reads (module attributes, so that the compiler
        treats the weights as constants): the oneDNN packed weight with its zero points, or the
        group's int8 weights for ``torch._int_mm`` (zero points None)."""
        start = 0
        for m, n in zip(self.members, self.n_out):
            if self.kernel == "onednn":
                m._packed, m._traced = self.packed, (self.w_scale, self.zeros, self.bias, start, n)
            else:
                m._packed, m._traced = self.qweight, (self.w_scale, None, self.bias, start, n)
            start += n

    def _matmul_onednn(self, xq: torch.Tensor, xs: Any) -> torch.Tensor:
        # oneDNN applies only the weight scales to its (exact) int32 products; the activation
        # scale(s) and the bias follow here, as in scale_accumulator. Given the activation scale
        # as its source scale, oneDNN rounds differently from one shape to another (by the
        # kernel it picks), and a served model's numbers would depend on the kernel chosen.
        y: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0, 0, self.packed, self.w_scale, self.zeros, None, 1.0, 0, torch.float32, "none",
            [], "")
        y = y.mul_(xs)
        return y if self.bias is None else y.add_(self.bias)

    def _matmul_int_mm(self, xq: torch.Tensor, xs: Any) -> torch.Tensor:
        assert self.qweight_t is not None  # set by _prepare
        return scale_accumulator(torch._int_mm(xq, self.qweight_t), xs, self.w_scale, self.bias)

    def _matmul_float(self, xq: torch.Tensor, xs: Any) -> torch.Tensor:
        # the int8 values in float32: every product (<= 127 * 127) and every partial sum below
        # 2**24 is exact, which covers any row of up to 1040 inputs and, in practice, more; so
        # the same accumulator as torch._int_mm's where the CPU's int8 GEMM is slow (no VNNI)
        assert self.qweight_t is not None  # set by _prepare
        acc = torch.mm(xq.float(), self.qweight_t.float())
        return scale_accumulator(acc, xs, self.w_scale, self.bias)

    def _matmul(self, kernel: str, xq: torch.Tensor, xs: Any) -> torch.Tensor:
        if kernel == "onednn":
            return self._matmul_onednn(xq, xs)
        return self._matmul_float(xq, xs) if kernel == "float" else self._matmul_int_mm(xq, xs)

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s output for input ``x``."""
        cx, cver, couts = self.cache
        if x is cx and _version(x) == cver:
            out = couts.pop(i, None)
            if out is not None:
                if not couts:  # every member served: do not keep the input alive until the
                    self.cache = (None, -1, {})  # next call (a long prompt's activations)
                return out
        if self.kernel is None:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever the
                self._prepare()  # grad mode of the first call (later calls may use another)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        xs: torch.Tensor | float
        if x2.shape[0] == 1:
            xq, xs = quantize_per_tensor_int8(x2)
        else:
            xq, xs = quantize_per_token_int8(x2)
        kernel = self.kernel if x2.shape[0] == 1 else self.kernel_rows
        assert kernel is not None  # set by _prepare
        y = self._matmul(kernel, xq, xs)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        if len(self.members) == 1:
            return y.reshape(*shape[:-1], y.shape[-1])
        lead = shape[:-1]
        outs = [part.reshape(*lead, part.shape[-1]).contiguous()
                for part in torch.split(y, self.n_out, dim=1)]
        self.cache = (x, _version(x), {j: o for j, o in enumerate(outs) if j != i})
        return outs[i]


def _version(x: torch.Tensor) -> int:
    """The version counter of ``x`` (bumped by in-place writes), or -2 for a tensor made under
    ``torch.inference_mode``, which has none: there the group's cache trusts the identity of the
    input alone (the members of a group read it one after the other, nothing writes it between)."""
    return -2 if x.is_inference() else x._version


class Int8DynamicLinear(nn.Module):
    """A Linear that runs int8 x int8 -> int32 with per-token dynamic activation scales."""

    #: the oneDNN CPU path is switched off process-wide after its first failure
    onednn_ok = _onednn_available()
    qweight: torch.Tensor  # buffers (see __init__)
    w_scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 float_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.float_dtype = float_dtype
        # non-persistent: the saver writes them in the compressed-tensors layout
        self.register_buffer("qweight", q.contiguous(), persistent=False)
        self.register_buffer("w_scale", scale.float().contiguous(), persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None \
            else None
        zp = torch.zeros(q.shape[0], 1)
        setattr(self, QUANT_ATTR, QuantizedWeight(self.qweight, self.w_scale[:, None], zp, 8,
                                                  None, True))
        self._cpu: _CpuGroup | None = None  # the CPU runtime (see :func:`group_for_cpu`)
        self._cpu_index = 0  # this Linear's place in it
        self._cpu_weights = q.device.type == "cpu"
        # the oneDNN group's tensors (see _forward_traced): w_scale, zero points, bias, start, n
        self._traced: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int, int] | None \
            = None
        self._packed: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:  # the oneDNN weight cannot be copied (see _CpuGroup)
        state = self.__dict__.copy()
        state.update(_traced=None, _packed=None)
        return state

    @classmethod
    def from_linear(cls, lin: nn.Linear, scale: torch.Tensor | None = None) -> Int8DynamicLinear:
        if scale is None:
            q, scale = quantize_per_channel_int8(lin.weight)
        else:  # weights already on an int8 grid with known scales (a reloaded artifact)
            scale = scale.detach().float().reshape(-1)
            q = torch.clamp(torch.round(lin.weight.detach().float() / scale[:, None]),
                            -127, 127).to(torch.int8)
        return cls(q, scale, lin.bias, lin.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._forward_traced(x)
        if x.is_cpu and self._cpu_weights:
            if self._cpu is None:
                group_for_cpu([self])
            assert self._cpu is not None
            return self._cpu.forward(self._cpu_index, x)
        return int8_linear(x, self.qweight, self.w_scale, self.bias)

    def _forward_traced(self, x: torch.Tensor) -> torch.Tensor:
        """The path ``torch.compile`` traces: the input quantized per token in the graph (no
        ``.item()``), the matmul one op per group (``modelpress::onednn_qlinear``, or
        ``torch._int_mm`` on the group's weights): the first member computes the group's fused
        output, the next ones take their slice of it while they read the same tensor (the last
        one empties the slot, so that every compiled call starts from the state the graph was
        traced with). Needs an eager call first (the group chooses its kernel and packs then);
        before it, the reference function."""
        traced = self._traced if x.is_cpu and self._cpu_weights else None
        if traced is not None:
            w_scale, zeros, bias, start, n = traced
            g = self._cpu
            assert g is not None and self._packed is not None  # set with _traced
            prev = g.traced_out  # (input, the group's output) a member computed in this graph
            if prev is not None and prev[0] is x:
                y = prev[1]
                if self._cpu_index == len(g.members) - 1:
                    g.traced_out = None
            else:
                x2 = x.reshape(-1, x.shape[-1])
                if zeros is None:  # the group's int8 weights, one torch._int_mm
                    y = int8_linear(x2.float(), self._packed, w_scale, bias)
                else:
                    xq, xs = quantize_per_token_int8(x2)
                    y = torch.ops.modelpress.onednn_qlinear(xq, xs, self._packed, w_scale,
                                                            zeros, bias)
                g.traced_out = (x, y) if len(g.members) > 1 else None
            return y[:, start:start + n].to(x.dtype).reshape(*x.shape[:-1], n)
        return int8_linear(x, self.qweight, self.w_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8"

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
               ) -> Int8DynamicLinear:  # keep the QuantizedWeight on the buffers' device
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self._cpu_weights = self.qweight.device.type == "cpu"
        if self._cpu is not None:  # weights moved or changed: repack on next use
            self._cpu.kernel, self._cpu.packed, self._cpu.qweight = None, None, None
            self._cpu.kernel_rows = None
            self._cpu.qweight_t = None
            for m in self._cpu.members:
                m._traced = m._packed = None
            self._cpu._reset_cache()
        qw = getattr(self, QUANT_ATTR)
        qw.q, qw.scale = self.qweight, self.w_scale[:, None]
        qw.zero_point = qw.zero_point.to(self.qweight.device)
        return self


def group_for_cpu(members: list[Int8DynamicLinear]) -> None:
    """Let Linears that read the same tensor share one CPU runtime (one quantization of the
    input, one fused matmul where that is faster)."""
    g = _CpuGroup(members)
    for i, m in enumerate(members):
        m._cpu, m._cpu_index = g, i


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def runtime_targets(model: nn.Module, quantize_lm_head: bool, keep_float: list[str]
                    ) -> dict[str, nn.Linear]:
    out_emb = hf(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pats = [re.compile(p) for p in keep_float]
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or any(p.search(name) for p in pats):
            continue
        if (m is out_emb or name.endswith("lm_head")) and not quantize_lm_head:
            continue
        out[name] = m
    return out


def _detach_compressed_tensors(model: nn.Module) -> None:
    """Undo what compressed-tensors leaves on a model it loaded: a forward pre-hook that, on the
    first forward, decompresses its Linears and first dispatches every module to its offloading
    (a Python wrapper around each module's forward, paid on every decoded token), and that
    offloading where the hook already ran."""
    for m in model.modules():
        hook = m.__dict__.pop("ct_decompress_hook", None)
        if hook is not None:
            hook.remove()
    from ..models import _remove_offload

    _remove_offload(model)


def _runtime_linear(lin: nn.Linear) -> Int8DynamicLinear:
    """The int8 runtime Linear of ``lin``: quantized here (a float model), or the integers of
    an ``int8_dynamic`` artifact (per-channel symmetric ``weight_scale`` on the module), still
    compressed (int8 ``weight``) or decompressed by compressed-tensors (``weight = q * scale``)."""
    scale = getattr(lin, "weight_scale", None)
    if not isinstance(scale, torch.Tensor):
        return Int8DynamicLinear.from_linear(lin)
    zero = getattr(lin, "weight_zero_point", None)
    if scale.numel() != lin.out_features or (isinstance(zero, torch.Tensor) and bool(zero.any())):
        raise UnsupportedModelError(
            f"{type(lin).__name__} with weight_scale {tuple(scale.shape)}: the int8 runtime "
            "takes per-channel symmetric int8 weights (an int8_dynamic artifact)")
    if lin.weight.dtype != torch.int8:
        return Int8DynamicLinear.from_linear(lin, scale)
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    return Int8DynamicLinear(lin.weight.detach(), scale.detach().float().reshape(-1), lin.bias,
                             dtype)


def compile_decode(model: nn.Module) -> nn.Module:
    """Let a plain ``model.generate`` run its decode steps through ``torch.compile`` (inductor)
    with a static KV cache, on the CPU too: the generation config asks for both and transformers
    compiles the forward on first use (prefill stays eager). Eager decoding at batch 1 spends more
    time in the model's per-op Python than in the int8 matmuls; compiled, those ops fuse into a
    few C++ kernels and the int8 Linears run as one opaque op each (``_forward_traced``). Each new
    ``max_new_tokens`` (static cache length) compiles again (then with dynamic shapes).
    Works on any transformers causal LM (the float model too, for a like-for-like comparison)."""
    from transformers.generation.configuration_utils import CompileConfig

    cc = CompileConfig(fullgraph=False, backend="inductor", mode="default")
    # transformers only auto-compiles on accelerators otherwise (a private field, typed None)
    setattr(cc, "_compile_all_devices", True)  # noqa: B010
    gen = hf(model).generation_config
    gen.cache_implementation = "static"
    gen.compile_config = cc
    return model


@torch.no_grad()
def to_runtime(model: nn.Module, quantize_lm_head: bool = True,
               keep_float: list[str] | None = None, compile: bool = False) -> nn.Module:
    """Swap Linears for :class:`Int8DynamicLinear` in place. Works on a float model and on one
    loaded from an ``int8_dynamic`` artifact by plain ``from_pretrained`` (its Linears still
    compressed: the stored int8 weights and scales are taken as they are) or decompressed (the
    weights on the int8 grid: the integers are recovered with the stored scales), in any float
    dtype. ``compile``: see :func:`compile_decode`."""
    _detach_compressed_tensors(model)
    targets = runtime_targets(model, quantize_lm_head, keep_float or [])
    out_emb = hf(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, lin in targets.items():
        new = _runtime_linear(lin)
        _set_module(model, name, new)
        if lin is out_emb and hasattr(hf_config(model), "tie_word_embeddings"):
            # the head now has its own int8 weights; the artifact ties it again (float_head)
            head: Any = new  # marked for the saver
            head.tied_input_embeddings = bool(hf_config(model).tie_word_embeddings)
            hf_config(model).tie_word_embeddings = False
    mods = dict(model.named_modules())
    shared = shared_inputs(model)
    for name, _m in mods.items():  # Linears that read one tensor (family table) share a runtime
        for names in shared:
            group = [mods.get(f"{name}.{n}") for n in names]
            linears = [g for g in group if isinstance(g, Int8DynamicLinear)]
            if len(linears) == len(group):
                group_for_cpu(linears)
    if compile and hasattr(model, "generation_config"):
        compile_decode(model)
    if targets and not onednn_exact():
        _warn_no_vnni()
    return model


@functools.cache
def _warn_no_vnni() -> None:  # once per process
    log.warning("this CPU has no exact oneDNN int8 matmul (no VNNI or AMX): the int8 runtime "
                "is exact here but decodes slower than the float model (README: Serving an "
                "int8_dynamic artifact on CPU)")

"""Calibration plumbing shared by the activation-aware methods (gptq, awq).

The model is walked one decoder layer at a time: the calibration activations entering layer ``i``
are kept (``num_samples x seq_len x hidden``, a few tens of MB), the layer's Linear inputs are
observed with forward hooks, the layer is quantized, and the *quantized* layer's outputs become
the inputs of layer ``i + 1``. Only one layer is ever being worked on, so peak memory stays near
one copy of the model plus those activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import CalibrationConfig, CompressionError, Context, UnsupportedModelError
from ..data import default_calibration_text, self_generated_text, token_chunks


def calibration_tokens(model: nn.Module, cfg: CalibrationConfig, ctx: Context) -> torch.Tensor:
    if ctx.tokenizer is None:
        raise CompressionError("calibration needs the model's tokenizer")
    if cfg.calibration_source == "self":
        return self_generated_text(model, ctx.tokenizer, cfg.num_samples, cfg.seq_len, ctx.seed)
    text = ctx.calibration_text or default_calibration_text()
    try:
        return token_chunks(ctx.tokenizer, text, cfg.num_samples, cfg.seq_len)
    except ValueError as e:
        raise CompressionError(f"calibration text too short: {e}") from e


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UnsupportedModelError(
            f"{type(model).__name__}: layer-wise calibration needs a decoder with model.layers"
        )
    return layers


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Per mini-batch: the hidden states entering the current layer and the keyword arguments
    the model passes to every decoder layer (rotary embeddings, masks, positions)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, tokens: torch.Tensor, device: torch.device,
                               batch_size: int) -> LayerInputs:
    layers = decoder_layers(model)
    got: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        got["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    out = LayerInputs([], [])
    try:
        for i in range(0, tokens.shape[0], batch_size):
            try:
                model(input_ids=tokens[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            out.hidden.append(got["hidden"])
            kw = dict(got["kwargs"])
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            out.kwargs.append(kw)
    finally:
        h.remove()
    return out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    outs = []
    for hs, kw in zip(inputs.hidden, inputs.kwargs):
        o = layer(hs, **kw)
        outs.append(o[0] if isinstance(o, tuple) else o)
    return outs


@torch.no_grad()
def advance(layer: nn.Module, inputs: LayerInputs) -> None:
    """Replace ``inputs.hidden`` by ``layer``'s outputs, one mini-batch at a time (never two
    full copies of the calibration activations alive)."""
    for i, kw in enumerate(inputs.kwargs):
        o = layer(inputs.hidden[i], **kw)
        inputs.hidden[i] = o[0] if isinstance(o, tuple) else o
        del o


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


@contextmanager
def observe_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]
                   ) -> Iterator[None]:
    """Call ``fn(name, x2d)`` with every input (flattened to ``[tokens, in_features]``)."""
    hs = []
    for name, m in modules.items():
        def hook(_m, args, _name=name):
            x = args[0]
            fn(_name, x.detach().reshape(-1, x.shape[-1]))
        hs.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def shared_input_groups(layer: nn.Module) -> list[list[str]]:
    """Linears of a decoder layer grouped by the tensor they read (llama-style names); any
    Linear not recognised is its own group."""
    lins = layer_linears(layer)
    known = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    groups = [[n for n in grp if n in lins] for grp in known]
    groups = [g for g in groups if g]
    used = {n for g in groups for n in g}
    return groups + [[n] for n in lins if n not in used]


@dataclass
class InputStats:
    H: torch.Tensor  # 2/n sum x x^T, [in, in], float32
    abs_mean: torch.Tensor  # mean |x| per input channel


def input_stats(layer: nn.Module, inputs: LayerInputs, groups: list[list[str]],
                stop_early: bool = False) -> dict[str, InputStats]:
    """Hessian and mean |x| of every Linear's inputs over the calibration tokens; Linears that
    read the same tensor share one (the same object). Each forward is cut as soon as every
    group's input has been seen (for all four llama groups: before down_proj's matmul);
    ``stop_early`` asserts a single group, whose forward thus stops right at its input."""
    if stop_early and len(groups) != 1:
        raise ValueError("stop_early needs exactly one group")
    lins = layer_linears(layer)
    H: dict[str, torch.Tensor] = {}
    A: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}

    def acc(name: str, x: torch.Tensor) -> None:
        x = x.float()
        k = x.shape[0]
        if name not in H:
            H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            A[name] = torch.zeros(x.shape[1], device=x.device)
            n[name] = 0
        tot = n[name] + k
        H[name].mul_(n[name] / tot)
        A[name].mul_(n[name] / tot).add_(x.abs().sum(0) / tot)
        n[name] = tot
        xs = x * (2.0 / tot) ** 0.5
        H[name].addmm_(xs.t(), xs)
        seen.add(name)
        if len(seen) == len(groups):  # every group's input is in: the rest of the layer is not needed
            raise _Stop

    seen: set[str] = set()
    with observe_inputs({g[0]: lins[g[0]] for g in groups}, acc):
        for hs, kw in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                layer(hs, **kw)  # outputs dropped batch by batch: only the hooks matter here
            except _Stop:
                pass
    out: dict[str, InputStats] = {}
    for g in groups:
        st = InputStats(H[g[0]], A[g[0]])
        for name in g:
            out[name] = st
    return out

"""Mixture-of-experts models: experts as Linears, per-expert calibration token counts, the
all-tokens fallback for experts the router starves, and the per-expert checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress.compression import moe
from modelpress.compression.base import Context
from modelpress.compression.calib.engine import InputStats, input_stats, run_sequential
from modelpress.compression.evaluation import prunable_linears

from ..conftest import make_tiny_causal

IDS = torch.tensor([[5, 9, 17, 33, 60, 7, 81, 200]])
MOE = ["qwen3_moe", "mixtral"]


@pytest.mark.parametrize("family", MOE)
def test_linearized_experts_compute_the_same(family: str) -> None:
    model = make_tiny_causal(family)
    with torch.no_grad():
        ref = model(IDS).logits
    assert moe.linearize_experts(model) == 2
    assert moe.linearize_experts(model) == 0  # idempotent
    with torch.no_grad():
        out = model(IDS).logits
    assert torch.equal(ref, out)
    lins = prunable_linears(model)
    names = moe.EXPERT_LINEARS[family]
    assert f"model.layers.0.mlp.experts.3.{names[2]}" in lins
    # the router is never a Linear: no method quantizes or prunes it
    assert not any(n.endswith("mlp.gate") for n in lins)


@pytest.mark.parametrize("family", MOE)
def test_per_expert_layout_reloads(family: str, tmp_path) -> None:
    model = make_tiny_causal(family)
    moe.linearize_experts(model)
    with torch.no_grad():
        ref = model(IDS).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, ref)


def _run(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}

    def visit(step):  # type: ignore[no-untyped-def]
        prefix = next(n for n, m in model.named_modules() if m is step.block) + "."
        for name, st in input_stats(step.block, step.inputs, step.groups(), sq_sum=True).items():
            stats[prefix + name] = st
        return None

    run_sequential(model, tokens, Context(), visit, batch_size=2)
    return stats


def test_every_expert_counted_and_starved_ones_see_all_tokens(monkeypatch) -> None:
    model = make_tiny_causal("qwen3_moe")
    moe.linearize_experts(model)
    tokens = torch.randint(4, 512, (4, 16))
    stats = _run(model, tokens)
    rep = moe.expert_report(model)
    k = model.config.num_experts_per_tok
    for layer in range(2):
        counts = [rep[f"experts.model.layers.{layer}.mlp.experts.{e}.tokens"] for e in range(4)]
        assert sum(counts) == tokens.numel() * k  # every pick of every token counted once
        for e, c in enumerate(counts):
            seen = stats[f"model.layers.{layer}.mlp.experts.{e}.gate_proj"].count
            assert seen == (c if c >= moe.MIN_EXPERT_TOKENS else tokens.numel())
    # a threshold above every count: every expert falls back to all tokens, and says so
    monkeypatch.setattr(moe, "MIN_EXPERT_TOKENS", 10_000)
    stats = _run(model, tokens)
    rep = moe.expert_report(model)
    assert rep["experts_fallback_all_tokens"] == 8
    assert all(st.count == tokens.numel() for n, st in stats.items() if ".experts." in n)
    # the fallback only changes what is observed, never the block's output
    with torch.no_grad():
        ref = model(IDS).logits
        for m in moe.experts_of(model).values():
            m.all_tokens = set(range(4))
        assert torch.allclose(model(IDS).logits, ref, atol=1e-6)

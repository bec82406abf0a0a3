"""The calibration engine and the family table: every family's blocks are found and walked like
the model's own forward, every scale fold the table declares preserves the block's function
(gemma's ``1 + weight`` norms included), statistics are exact, a BlockSource sees every block
once in order."""

from __future__ import annotations

import pytest
import torch

from modelpress.compression import CompressionError, Context, get_method, parse_params
from modelpress.compression.calib import engine
from modelpress.compression.calib.families import FAMILIES, family_of, supporting

from ..conftest import TINY_CAUSAL, make_tiny_bert, make_tiny_causal, make_tiny_llama


def _model(model_type):
    if model_type == "llama":
        return make_tiny_llama(num_hidden_layers=2)
    if model_type == "bert":
        return make_tiny_bert(num_hidden_layers=2)
    return make_tiny_causal(model_type)


ALL = ["llama", *TINY_CAUSAL, "bert"]
TOKENS = torch.randint(4, 500, (4, 24), generator=torch.Generator().manual_seed(0))


def test_the_table_covers_every_tested_family():
    assert set(FAMILIES) == set(ALL)


@pytest.mark.parametrize("model_type", ALL)
def test_walk_equals_the_models_forward(model_type):
    """Block i's captured/propagated inputs are the model's own hidden_states[i]."""
    model = _model(model_type)
    with torch.no_grad():
        ref = model(input_ids=TOKENS[:2], output_hidden_states=True).hidden_states
    seen = []

    def visit(step):
        assert step.family is family_of(model)
        assert [n for g in step.groups() for n in g.linears] and step.count == 2
        seen.append(step.inputs[0].hidden.clone())

    engine.run_sequential(model, TOKENS[:2], Context(), visit, batch_size=2)
    assert len(seen) == 2
    for i, h in enumerate(seen):
        torch.testing.assert_close(h, ref[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ALL)
def test_every_declared_fold_preserves_the_block(model_type):
    model = _model(model_type)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms away from their init, so that gemma's (1 + w) matters
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    _, blocks = engine.find_blocks(model)
    inputs = engine.capture_inputs(model, engine.InMemoryBlocks(model), TOKENS[:2],
                                   torch.device("cpu"), 2)
    block = blocks[0]
    before = engine.run_block(block, inputs)[0]
    step = engine.Step(0, 2, block, inputs, family_of(model))
    folded = 0
    for grp in step.groups():
        if not engine.can_fold(block, grp):
            continue
        n = block.get_submodule(grp.linears[0]).in_features
        s = torch.rand(n, generator=g) * 1.5 + 0.25
        assert engine.fold_scale(block, grp, s, step.family)
        folded += 1
    after = engine.run_block(block, inputs)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # decoders: q/k/v into the input norm, gate/up into the MLP's norm, down into up (GQA: not
    # o into v); BERT (post-LN, GELU): only o into v; mixture of experts: only q/k/v (each
    # expert's gate/up reads its routed tokens only, so no scale folds into the shared norm)
    assert folded == {"bert": 1, "qwen3_moe": 1, "mixtral": 1}.get(model_type, 3)


def test_fold_scale_refuses_what_cannot_fold():
    model = make_tiny_llama(num_hidden_layers=1)  # GQA: v_proj has 32 rows, o_proj 64 inputs
    block = model.model.layers[0]
    grp = next(g for g in engine.Step(0, 1, block, [], family_of(model)).groups()
               if g.linears == ("self_attn.o_proj",))
    w = block.self_attn.o_proj.weight.clone()
    assert not engine.fold_scale(block, grp, torch.full((64,), 2.0), family_of(model))
    assert torch.equal(block.self_attn.o_proj.weight, w)


def test_input_stats_are_exact():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(3)]
    st = engine.InputStats(8, torch.device("cpu"), hessian=True, abs_mean=True, sq_sum=True,
                           abs_max=True)
    for x in xs:
        st.add(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert st.count == 45
    torch.testing.assert_close(st.H.double(), 2 * X.T @ X / 45, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.abs_mean.double(), X.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sq_sum.double(), (X * X).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.abs_max.double(), X.abs().amax(0))
    s = torch.rand(8, generator=g) + 0.5
    sc = st.scale_(s)
    torch.testing.assert_close(sc.H.double(), 2 * (X / s).T @ (X / s) / 45, rtol=1e-5, atol=1e-6)


def test_input_stats_stop_at_the_last_wanted_group():
    model = make_tiny_llama(num_hidden_layers=1)
    block = model.model.layers[0]
    inputs = engine.capture_inputs(model, engine.InMemoryBlocks(model), TOKENS[:2],
                                   torch.device("cpu"), 1)
    groups = engine.Step(0, 1, block, inputs, family_of(model)).groups()
    called = []
    h = block.mlp.register_forward_pre_hook(lambda *_: called.append(1))
    try:
        stats = engine.input_stats(block, inputs, groups[:1], hessian=True)
    finally:
        h.remove()
    assert not called, "the MLP ran although only q/k/v's inputs were wanted"
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["self_attn.q_proj"].count == 2 * 24


class _Recording(engine.InMemoryBlocks):
    def __init__(self, model):
        super().__init__(model)
        self.log = []

    def onload(self, index, device):
        self.log.append(("on", index))
        return super().onload(index, device)

    def offload(self, index, block):
        self.log.append(("off", index))
        super().offload(index, block)

    def outside(self, device):
        self.log.append(("outside", str(device)))
        super().outside(device)


def test_a_block_source_sees_every_block_once_in_order():
    model = make_tiny_llama(num_hidden_layers=3)
    src = _Recording(model)
    engine.run_sequential(model, TOKENS[:2], Context(), lambda step: None, batch_size=2,
                          source=src)
    assert src.log == [("outside", "cpu"), ("outside", "cpu"), ("on", 0), ("off", 0),
                       ("on", 1), ("off", 1), ("on", 2), ("off", 2)]


def test_unsupported_pairs_are_refused_naming_the_supported_families():
    from transformers import GPT2Config

    gpt2 = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2)
    for name in ("wanda", "sparsegpt", "admm", "gptq", "awq", "heads", "ffn", "layers"):
        with pytest.raises(CompressionError, match="llama") as e:
            get_method(name).check_model(parse_params(name, {}), gpt2)
        assert "gpt2" in str(e.value)
    phi3 = make_tiny_causal("phi3").config
    for name in ("heads", "ffn"):  # fused qkv_proj / gate_up_proj
        with pytest.raises(CompressionError, match="mistral") as e:
            get_method(name).check_model(parse_params(name, {}), phi3)
        assert "phi3" in str(e.value)
    assert "phi3" in supporting("folds") and "bert" not in supporting("folds")

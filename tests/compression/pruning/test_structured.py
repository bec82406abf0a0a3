"""Structured pruning (heads / ffn / layers): exact shapes and parameter counts, configs that
plain from_pretrained loads, identical outputs after a save/reload round trip, a working KV cache,
GQA consistency, importance-driven choices, and real-model checks (slow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModel, AutoModelForCausalLM

from modelpress.compression import (
    CompressionError,
    Context,
    UnsupportedModelError,
    compress,
    get_method,
    parse_params,
)
from modelpress.compression.evaluation import param_count
from modelpress.compression.pruning import structured as st
from modelpress.compression.pruning import structured_scores as S


def ctx_for(tok, **kw) -> Context:
    return Context(tokenizer=tok, **kw)


def fast(cls, **kw):
    """Small calibration for tiny-model tests."""
    return cls(num_samples=4, seq_len=64, **kw)


def roundtrip(model, tmp_path, causal: bool):
    model.save_pretrained(tmp_path)
    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(tmp_path).eval()


def same_outputs(a, b, causal: bool):
    x = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if causal:
            return torch.allclose(a(x).logits, b(x).logits, atol=1e-5)
        return torch.allclose(a(x).last_hidden_state, b(x).last_hidden_state, atol=1e-5)


def assert_cache_generate(model):
    x = torch.randint(4, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    a = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
                       pad_token_id=3)
    b = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False,
                       pad_token_id=3)
    assert a.shape == (1, 24)
    assert torch.equal(a, b)


def block_params(blk) -> int:
    return sum(p.numel() for p in blk.parameters())


# ------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("iterative", [False, True])
def test_layers_llama_exact_and_roundtrip(tiny_llama, tiny_tokenizer, tmp_path, iterative):
    per_block = block_params(tiny_llama.model.layers[0])
    before = param_count(tiny_llama)
    events = []
    res = compress(tiny_llama, fast(st.LayersConfig, count=2, iterative=iterative),
                   ctx_for(tiny_tokenizer, event=lambda k, d: events.append((k, d))))
    assert param_count(tiny_llama) == before - 2 * per_block
    assert res.metrics["params_after"] == before - 2 * per_block
    assert tiny_llama.config.num_hidden_layers == 2 and len(tiny_llama.model.layers) == 2
    assert [b.self_attn.layer_idx for b in tiny_llama.model.layers] == [0, 1]
    (kind, data), = events
    assert kind == "layers_removed" and len(data["removed"]) == 2
    re = roundtrip(tiny_llama, tmp_path, causal=True)
    assert re.config.num_hidden_layers == 2 and param_count(re) == before - 2 * per_block
    assert same_outputs(tiny_llama, re, causal=True)
    assert_cache_generate(re)
    assert_cache_generate(tiny_llama)


@pytest.mark.parametrize("score", ["block_influence", "mean_abs_change"])
def test_layers_removes_identity_block(tiny_llama, tiny_tokenizer, score):
    """A block whose attention and MLP output projections are zero leaves the residual stream
    unchanged: it scores 0, so it is the one removed (and the output does not change)."""
    blk = tiny_llama.model.layers[2]
    with torch.no_grad():
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()
    kept = [tiny_llama.model.layers[i] for i in (0, 1, 3)]
    x = torch.randint(4, 500, (1, 16))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    compress(tiny_llama, fast(st.LayersConfig, count=1, score=score), ctx_for(tiny_tokenizer))
    assert list(tiny_llama.model.layers) == kept
    with torch.no_grad():
        assert torch.allclose(tiny_llama(x).logits, ref, atol=1e-5)


def test_layers_bert(tiny_bert, tiny_tokenizer, tmp_path):
    removed_block_params = block_params(tiny_bert.encoder.layer[0])
    before = param_count(tiny_bert)
    compress(tiny_bert, fast(st.LayersConfig, count=1), ctx_for(tiny_tokenizer))
    assert param_count(tiny_bert) == before - removed_block_params
    assert tiny_bert.config.num_hidden_layers == 2 and len(tiny_bert.encoder.layer) == 2
    re = roundtrip(tiny_bert, tmp_path, causal=False)
    assert re.config.num_hidden_layers == 2
    assert same_outputs(tiny_bert, re, causal=False)


def test_remove_layers_fixes_cache_indices(tiny_llama):
    st.remove_layers(tiny_llama, [0, 2])
    assert [b.self_attn.layer_idx for b in tiny_llama.model.layers] == [0, 1]
    assert_cache_generate(tiny_llama)


def test_layer_types_sliced(tiny_llama):
    tiny_llama.config.layer_types = ["a", "b", "c", "d"]
    st.remove_layers(tiny_llama, [1])
    assert tiny_llama.config.layer_types == ["a", "c", "d"]


# -------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("score", ["activation", "gradient", "entropy"])
def test_heads_llama_query_mode(tiny_llama, tiny_tokenizer, tmp_path, score):
    c = tiny_llama.config
    d, hid, L = c.head_dim, c.hidden_size, c.num_hidden_layers
    before = param_count(tiny_llama)
    q_before = [b.self_attn.q_proj.weight.detach().clone() for b in tiny_llama.model.layers]
    events = []
    compress(tiny_llama, fast(st.HeadsConfig, count=2, score=score),
             ctx_for(tiny_tokenizer, event=lambda k, dd: events.append(dd)))
    # 4 q-heads / 2 KV heads -> one q-head removed from each KV group; KV heads all stay
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 2, d)
    assert param_count(tiny_llama) == before - L * 2 * (2 * d * hid)  # q rows + o columns
    kept = events[0]["kept_query_heads"]
    for layer, heads in enumerate(kept):
        assert len(heads) == 2 and heads[0] in (0, 1) and heads[1] in (2, 3)  # one per group
        attn = tiny_llama.model.layers[layer].self_attn
        assert attn.q_proj.weight.shape == (2 * d, hid) and attn.k_proj.weight.shape == (2 * d, hid)
        assert attn.o_proj.weight.shape == (hid, 2 * d) and attn.num_key_value_groups == 1
        want = torch.cat([q_before[layer][h * d : (h + 1) * d] for h in heads])
        assert torch.equal(attn.q_proj.weight, want)
    re = roundtrip(tiny_llama, tmp_path, causal=True)
    assert (re.config.num_attention_heads, re.config.num_key_value_heads, re.config.head_dim) == (2, 2, d)
    assert same_outputs(tiny_llama, re, causal=True)
    assert_cache_generate(re)


def test_heads_llama_group_mode(tiny_llama, tiny_tokenizer, tmp_path):
    c = tiny_llama.config
    d, hid, L = c.head_dim, c.hidden_size, c.num_hidden_layers
    before = param_count(tiny_llama)
    compress(tiny_llama, fast(st.HeadsConfig, ratio=0.5, gqa="group"), ctx_for(tiny_tokenizer))
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    # 2 q heads (q rows + o cols) and 1 KV head (k + v rows) per layer
    assert param_count(tiny_llama) == before - L * (2 * 2 * d * hid + 2 * d * hid)
    re = roundtrip(tiny_llama, tmp_path, causal=True)
    assert same_outputs(tiny_llama, re, causal=True)
    assert_cache_generate(re)


def test_heads_gqa_wider_groups(tiny_tokenizer, tmp_path):
    """6 q heads / 2 KV heads (groups of 3), remove 2: every group keeps 2 q heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=6,
                                     num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                     max_position_embeddings=512)).eval()
    events = []
    compress(m, fast(st.HeadsConfig, count=2), ctx_for(tiny_tokenizer, event=lambda k, d: events.append(d)))
    assert (m.config.num_attention_heads, m.config.num_key_value_heads) == (4, 2)
    for heads in events[0]["kept_query_heads"]:
        assert sum(h < 3 for h in heads) == 2 and sum(h >= 3 for h in heads) == 2
    assert m.model.layers[0].self_attn.num_key_value_groups == 2
    re = roundtrip(m, tmp_path, causal=True)
    assert same_outputs(m, re, causal=True)
    assert_cache_generate(re)


def test_heads_removes_silent_head(tiny_llama, tiny_tokenizer):
    """A head whose output-projection columns are zero contributes nothing: the activation score
    removes it (and the model output does not change)."""
    d = tiny_llama.config.head_dim
    with torch.no_grad():
        for b in tiny_llama.model.layers:
            b.self_attn.o_proj.weight[:, 1 * d : 2 * d] = 0  # head 1 (KV group 0)
            b.self_attn.o_proj.weight[:, 2 * d : 3 * d] = 0  # head 2 (KV group 1)
    x = torch.randint(4, 500, (1, 16))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    events = []
    compress(tiny_llama, fast(st.HeadsConfig, count=2, score="activation"),
             ctx_for(tiny_tokenizer, event=lambda k, dd: events.append(dd)))
    assert events[0]["kept_query_heads"] == [[0, 3]] * 4
    with torch.no_grad():
        assert torch.allclose(tiny_llama(x).logits, ref, atol=1e-5)


def test_heads_rejects_impossible_counts(tiny_llama, tiny_tokenizer):
    m = get_method("heads")
    with pytest.raises(CompressionError):  # 1 is not a multiple of the 2 KV groups
        m.check_model(st.HeadsConfig(count=1), tiny_llama.config)
    with pytest.raises(CompressionError):  # would leave a KV group without query heads
        m.check_model(st.HeadsConfig(count=4), tiny_llama.config)
    with pytest.raises(CompressionError):
        compress(tiny_llama, st.HeadsConfig(count=3), ctx_for(tiny_tokenizer))


def test_heads_bert_unsupported(tiny_bert, tiny_tokenizer):
    with pytest.raises(UnsupportedModelError):
        compress(tiny_bert, st.HeadsConfig(count=1), ctx_for(tiny_tokenizer))
    with pytest.raises(UnsupportedModelError):
        st.apply_heads(tiny_bert, st.HeadsConfig(count=1), ctx_for(tiny_tokenizer))


# ---------------------------------------------------------------------------------------- ffn


@pytest.mark.parametrize("score", ["activation", "gradient"])
def test_ffn_llama(tiny_llama, tiny_tokenizer, tmp_path, score):
    c = tiny_llama.config
    hid, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    before = param_count(tiny_llama)
    compress(tiny_llama, fast(st.FfnConfig, ratio=0.25, score=score), ctx_for(tiny_tokenizer))
    removed = inter // 4
    assert c.intermediate_size == inter - removed
    assert param_count(tiny_llama) == before - L * removed * 3 * hid
    mlp = tiny_llama.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (inter - removed, hid)
    assert mlp.down_proj.weight.shape == (hid, inter - removed)
    re = roundtrip(tiny_llama, tmp_path, causal=True)
    assert re.config.intermediate_size == inter - removed
    assert same_outputs(tiny_llama, re, causal=True)
    assert_cache_generate(re)


def test_ffn_bert(tiny_bert, tiny_tokenizer, tmp_path):
    c = tiny_bert.config
    hid, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    before = param_count(tiny_bert)
    compress(tiny_bert, fast(st.FfnConfig, ratio=0.5), ctx_for(tiny_tokenizer))
    removed = inter // 2
    assert c.intermediate_size == inter - removed
    # intermediate.dense rows (+bias) and output.dense columns
    assert param_count(tiny_bert) == before - L * removed * (2 * hid + 1)
    re = roundtrip(tiny_bert, tmp_path, causal=False)
    assert re.config.intermediate_size == inter - removed
    assert same_outputs(tiny_bert, re, causal=False)


def test_ffn_multiple_of(tiny_llama, tiny_tokenizer):
    compress(tiny_llama, fast(st.FfnConfig, ratio=0.3, multiple_of=32), ctx_for(tiny_tokenizer))
    assert tiny_llama.config.intermediate_size == 96  # 128 * 0.7 = 89.6 -> 96


def test_ffn_removes_dead_neurons(tiny_llama, tiny_tokenizer):
    dead = torch.arange(0, 128, 4)  # 32 neurons whose down_proj columns are zero
    with torch.no_grad():
        for b in tiny_llama.model.layers:
            b.mlp.down_proj.weight[:, dead] = 0
    x = torch.randint(4, 500, (1, 16))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    compress(tiny_llama, fast(st.FfnConfig, ratio=0.25), ctx_for(tiny_tokenizer))
    with torch.no_grad():
        assert torch.allclose(tiny_llama(x).logits, ref, atol=1e-5)


def test_ffn_bert_bias_compensation_constant_neurons(tiny_bert, tiny_tokenizer):
    """Neurons with a constant activation (zero input weights, non-zero bias) carry no
    information: they have zero fluctuation, are removed first, and folding their constant
    contribution into the output bias leaves the hidden states unchanged."""
    const = torch.arange(0, 128, 2)  # 64 of 128 neurons per layer
    with torch.no_grad():
        for blk in tiny_bert.encoder.layer:
            blk.intermediate.dense.weight[const] = 0
            blk.intermediate.dense.bias[const] = 0.5
    x = torch.randint(4, 500, (2, 16))
    with torch.no_grad():
        ref = tiny_bert(x).last_hidden_state
    plain = copy.deepcopy(tiny_bert)
    compress(tiny_bert, fast(st.FfnConfig, ratio=0.5), ctx_for(tiny_tokenizer))
    with torch.no_grad():
        assert torch.allclose(tiny_bert(x).last_hidden_state, ref, atol=1e-4)
    # without compensation (RMS scores) the model loses those neurons' mean output
    compress(plain, fast(st.FfnConfig, ratio=0.5, bias_compensation=False), ctx_for(tiny_tokenizer))
    with torch.no_grad():
        assert not torch.allclose(plain(x).last_hidden_state, ref, atol=1e-2)


def test_ffn_gradient_needs_causal_lm(tiny_bert, tiny_tokenizer):
    with pytest.raises(CompressionError):
        compress(tiny_bert, fast(st.FfnConfig, score="gradient"), ctx_for(tiny_tokenizer))


# ----------------------------------------------------------------------------- contract, misc


def test_registered_and_params():
    decoders = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}
    moe = {"qwen3_moe", "mixtral"}  # experts' MLPs: no ffn
    for name, fam in (("heads", decoders | moe), ("ffn", decoders | {"bert"}),
                      ("layers", decoders | moe | {"bert", "phi3"})):
        m = get_method(name)  # fused qkv_proj / gate_up_proj (phi3): no heads, no ffn
        assert m.family == "pruning" and m.needs_calibration and set(m.architectures) == fam
    assert parse_params("layers", {}).ratio == 0.25
    assert parse_params("heads", {"count": 3}).ratio is None
    for name, bad in (("layers", {"ratio": 0.2, "count": 2}), ("layers", {"ratio": 1.0}),
                      ("ffn", {"ratio": 0}), ("heads", {"score": "bogus"}), ("ffn", {"bogus": 1}),
                      ("heads", {"gqa": "x"})):
        with pytest.raises(ValidationError):
            parse_params(name, bad)


def test_unsupported_family(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    for cfg in (st.HeadsConfig(), st.FfnConfig(), st.LayersConfig()):
        with pytest.raises(UnsupportedModelError):
            compress(gpt2, cfg, ctx_for(tiny_tokenizer))
        method = get_method(type(cfg).__name__.removesuffix("Config").lower())
        with pytest.raises(UnsupportedModelError):
            method.apply(gpt2, cfg, ctx_for(tiny_tokenizer))


def test_needs_tokenizer(tiny_llama):
    with pytest.raises(CompressionError):
        compress(tiny_llama, fast(st.LayersConfig, count=1))


def test_layers_count_too_large(tiny_llama, tiny_tokenizer):
    with pytest.raises(CompressionError):
        get_method("layers").check_model(st.LayersConfig(count=4), tiny_llama.config)
    with pytest.raises(CompressionError):
        compress(tiny_llama, st.LayersConfig(count=4), ctx_for(tiny_tokenizer))


def test_progress_and_cancel(tiny_llama, tiny_tokenizer):
    from modelpress.compression import Cancelled

    seen = []
    compress(tiny_llama, fast(st.LayersConfig, count=1),
             ctx_for(tiny_tokenizer, progress=lambda f, m: seen.append(f)))
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    with pytest.raises(Cancelled):
        compress(tiny_llama, fast(st.FfnConfig), ctx_for(tiny_tokenizer, should_stop=lambda: True))


# --------------------------------------------------------------------------------- pure math


def test_scores_math():
    h = torch.randn(3, 5, 8)
    assert S.block_influence(h, h)[0] == pytest.approx(0, abs=1e-5)
    assert S.block_influence(h, -h) == (pytest.approx(2 * 15, rel=1e-5), 15)
    assert S.mean_abs_change(h, h + 1) == (pytest.approx(15.0), 15)
    uniform = torch.full((1, 2, 3, 4), 0.25)
    one_hot = torch.zeros(1, 2, 3, 4)
    one_hot[..., 0] = 1
    assert torch.allclose(S.attention_entropy(uniform), torch.tensor([3 * math.log(4)] * 2))
    assert torch.allclose(S.attention_entropy(one_hot), torch.zeros(2))
    # head 1 of 2 has zero input -> zero contribution
    a = torch.cat([torch.ones(4, 3), torch.zeros(4, 3)], -1)
    norms = S.head_output_norms(a, torch.eye(6), 2)
    assert norms[1] == 0 and norms[0] == pytest.approx(4 * math.sqrt(3))


def test_selection_math():
    s = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])  # 6 q-heads, 2 KV groups of 3
    assert S.select_heads(s, 2, 2, "query") == ([0, 2, 4, 5], [0, 1])
    assert S.select_heads(s, 2, 3, "group") == ([3, 4, 5], [1])  # group sums 9.0 vs 11.5
    with pytest.raises(ValueError):
        S.select_heads(s, 2, 3, "query")
    with pytest.raises(ValueError):
        S.select_heads(s, 2, 6, "group")
    assert S.lowest(torch.tensor([1.0, 1.0, 0.0]), 2) == [0, 2]
    assert S.rounded_count(30, 0.25, None) == 8
    assert S.rounded_count(9, 0.25, None, unit=3) == 3
    with pytest.raises(ValueError):
        S.rounded_count(4, None, 4)
    assert S.round_keep(1536, 384, 64) == 1152
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    comp = S.bias_compensation(w, [0, 2], torch.tensor([2.0, 5.0, 1.0]))
    assert torch.equal(comp, torch.tensor([5.0, 0.0]))
    acts = torch.tensor([[1.0, 3.0], [1.0, -1.0]])  # neuron 0 constant, neuron 1 mean 1 std 2
    fl = S.neuron_fluctuation_scores(S.act_sum(acts), S.sq_sum(acts), 2, torch.eye(2))
    assert torch.allclose(fl, torch.tensor([0.0, 2.0]))


# -------------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_layers_beats_naive(smollm2_dir, tmp_path):
    from modelpress.compression.data import default_eval_text
    from modelpress.compression.evaluation import perplexity
    from modelpress.compression.models import load_pretrained

    lm = load_pretrained(smollm2_dir)
    res = compress(lm.model, st.LayersConfig(ratio=0.25, num_samples=8), ctx_for(lm.tokenizer))
    assert lm.model.config.num_hidden_layers == 22 and res.metrics["layers_removed"] == 8
    lm.model.save_pretrained(tmp_path / "p")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert re.config.num_hidden_layers == 22
    assert param_count(re) < 0.8 * 134_515_008
    x = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    g1 = re.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    g2 = re.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2) and g1.shape[1] == x.shape[1] + 8
    text = default_eval_text()
    ppl = perplexity(re, lm.tokenizer, text, seq_len=256, num_chunks=4)
    del re
    naive = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    st.remove_layers(naive, list(range(22, 30)))
    ppl_naive = perplexity(naive, lm.tokenizer, text, seq_len=256, num_chunks=4)
    assert math.isfinite(ppl) and ppl < ppl_naive


@pytest.mark.slow
def test_smollm2_heads_and_ffn(smollm2_dir, tmp_path):
    from modelpress.compression.data import default_eval_text
    from modelpress.compression.evaluation import perplexity
    from modelpress.compression.models import load_pretrained

    lm = load_pretrained(smollm2_dir)
    m = lm.model
    compress(m, st.HeadsConfig(count=3, num_samples=8), ctx_for(lm.tokenizer))
    compress(m, st.FfnConfig(ratio=0.25, num_samples=8), ctx_for(lm.tokenizer))
    c = m.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (6, 3, 64, 1152)
    m.save_pretrained(tmp_path / "p")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert same_outputs(m, re, causal=True)
    x = lm.tokenizer("Once upon a time", return_tensors="pt").input_ids
    g = re.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(g, re.generate(x, max_new_tokens=8, do_sample=False, use_cache=False))
    ppl = perplexity(re, lm.tokenizer, default_eval_text(), seq_len=256, num_chunks=4)
    assert math.isfinite(ppl) and ppl < 1000


@pytest.mark.slow
def test_minilm_layers_and_ffn(minilm_dir, tmp_path):
    from modelpress.compression.data import default_eval_text
    from modelpress.compression.evaluation import embedding_fidelity
    from modelpress.compression.models import load_pretrained

    lm = load_pretrained(minilm_dir)
    ref = AutoModel.from_pretrained(minilm_dir).eval()
    text = default_eval_text()
    m = lm.model
    compress(m, st.LayersConfig(count=1), ctx_for(lm.tokenizer))
    compress(m, st.FfnConfig(ratio=0.25), ctx_for(lm.tokenizer))
    assert (m.config.num_hidden_layers, m.config.intermediate_size) == (5, 1152)
    m.save_pretrained(tmp_path / "p")
    re = AutoModel.from_pretrained(tmp_path / "p").eval()
    assert same_outputs(m, re, causal=False)
    fid = embedding_fidelity(re, ref, lm.tokenizer, text)
    naive = AutoModel.from_pretrained(minilm_dir).eval()
    st.remove_layers(naive, [5])
    fid_naive = embedding_fidelity(naive, ref, lm.tokenizer, text)
    assert 0.8 < fid < 1.0
    assert fid > fid_naive

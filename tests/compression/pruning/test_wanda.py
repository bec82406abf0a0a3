import pytest
import torch

from modelpress.compression import Cancelled, Context, UnsupportedModelError, compress, parse_params
from modelpress.compression.evaluation import linear_sparsity, prunable_linears
from modelpress.compression.pruning import layerwise
from modelpress.compression.pruning.wanda import WandaConfig, wanda_mask, wanda_scores

CAL = dict(num_samples=4, seq_len=64)



def test_wanda_mask_keeps_top_scores_per_row():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    norm = torch.rand(16) * 3
    mask = wanda_mask(w, norm, 0.25)
    scores = wanda_scores(w, norm)
    assert (mask.sum(1) == 12).all()
    for r in range(6):
        assert scores[r][mask[r]].min() >= scores[r][~mask[r]].max()


def test_wanda_mask_prefers_high_activation_columns():
    w = torch.ones(4, 8)
    norm = torch.tensor([1.0, 9, 1, 9, 1, 9, 1, 9])
    mask = wanda_mask(w, norm, 0.5)
    assert mask[:, 1::2].all() and not mask[:, 0::2].any()
    mask24 = wanda_mask(w, norm, 0.5, nm=(2, 4))
    assert torch.equal(mask24, mask)


def test_wanda_exact_row_sparsity_llama(tiny_llama, tiny_tokenizer, block_linears):
    head = tiny_llama.lm_head.weight.detach().clone()
    res = compress(tiny_llama, WandaConfig(sparsity=0.5, **CAL), Context(tokenizer=tiny_tokenizer))
    assert res.metrics["sparsity_linear"] == pytest.approx(0.5, abs=1e-6)
    for name, lin in block_linears(tiny_llama).items():
        per_row = (lin.weight == 0).sum(1)
        assert (per_row == lin.in_features // 2).all(), name
    assert torch.equal(tiny_llama.lm_head.weight, head)


def test_wanda_differs_from_magnitude(tiny_llama, tiny_tokenizer):
    lin = tiny_llama.model.layers[1].mlp.down_proj
    before = lin.weight.detach().clone()
    compress(tiny_llama, WandaConfig(sparsity=0.5, **CAL), Context(tokenizer=tiny_tokenizer))
    kept = lin.weight != 0
    # some weight with a smaller |w| is kept over a larger one in the same row: activations matter
    mag_mask = torch.zeros_like(kept)
    mag_mask.scatter_(1, before.abs().argsort(1, descending=True)[:, : before.shape[1] // 2], True)
    assert not torch.equal(kept, mag_mask)
    # kept weights are unchanged (Wanda has no weight update)
    assert torch.equal(lin.weight[kept], before[kept])


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_exact(tiny_llama, tiny_tokenizer, pattern, block_linears):
    n, m = map(int, pattern.split(":"))
    compress(tiny_llama, WandaConfig(pattern=pattern, **CAL), Context(tokenizer=tiny_tokenizer))
    for name, lin in block_linears(tiny_llama).items():
        groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), name
    assert linear_sparsity(tiny_llama) == pytest.approx(1 - n / m)


def test_wanda_bert(tiny_bert, tiny_tokenizer, block_linears):
    compress(tiny_bert, WandaConfig(sparsity=0.6, **CAL), Context(tokenizer=tiny_tokenizer))
    lins = block_linears(tiny_bert)
    assert len(lins) == 3 * 6
    for name, lin in lins.items():
        assert ((lin.weight == 0).sum(1) == round(lin.in_features * 0.6)).all(), name


def test_wanda_progress_per_block_and_cancel(tiny_llama, tiny_tokenizer):
    seen = []
    compress(tiny_llama, WandaConfig(**CAL),
             Context(tokenizer=tiny_tokenizer, progress=lambda f, m: seen.append(f)))
    assert seen == [pytest.approx((i + 1) / 4) for i in range(4)]
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        compress(tiny_llama, WandaConfig(**CAL), Context(tokenizer=tiny_tokenizer, should_stop=stop))


def test_wanda_owl_nonuniform(tiny_llama, tiny_tokenizer):
    events = {}
    compress(tiny_llama, WandaConfig(sparsity=0.5, owl=True, owl_lambda=0.1, owl_m=3, **CAL),
             Context(tokenizer=tiny_tokenizer, event=lambda k, d: events.update({k: d})))
    per_block = events["owl"]["block_sparsity"]
    assert len(per_block) == 4 and max(per_block) - min(per_block) == pytest.approx(0.2, abs=1e-6)
    assert sum(per_block) / 4 == pytest.approx(0.5)
    for i, layer in enumerate(tiny_llama.model.layers):
        lin = layer.mlp.up_proj
        assert ((lin.weight == 0).sum(1) == round(lin.in_features * per_block[i])).all()


def test_owl_sparsities_pure():
    s = layerwise.owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.08)
    assert s == pytest.approx([0.58, 0.5, 0.42])
    assert layerwise.owl_sparsities([0.1, 0.1], 0.5, 0.08) == [0.5, 0.5]


def test_wanda_reload_and_generate(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(tiny_llama, WandaConfig(**CAL), Context(tokenizer=tiny_tokenizer))
    tiny_llama.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert linear_sparsity(back) == pytest.approx(0.5)
    for k, lin in prunable_linears(back).items():
        assert torch.equal(lin.weight, prunable_linears(tiny_llama)[k].weight)
    out = back.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, min_new_tokens=5,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_wanda_self_calibration(tiny_llama, tiny_tokenizer):
    res = compress(tiny_llama, WandaConfig(calibration_source="self", num_samples=2, seq_len=16),
                   Context(tokenizer=tiny_tokenizer))
    assert res.metrics["sparsity_linear"] == pytest.approx(0.5)


def test_wanda_refuses_other_architectures(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512))
    with pytest.raises(UnsupportedModelError):
        compress(gpt2, WandaConfig(**CAL), Context(tokenizer=tiny_tokenizer))


@pytest.mark.parametrize("params", [{"sparsity": 1.0}, {"sparsity": 0}, {"bogus": 1},
                                    {"pattern": "4:2"}, {"pattern": "2-4"}, {"num_samples": 0},
                                    {"owl": True, "pattern": "2:4"}, {"owl_lambda": 0.7}])
def test_wanda_rejects_bad_params(params):
    with pytest.raises(ValueError):
        parse_params("wanda", params)


def test_wanda_rejects_pattern_not_dividing(tiny_tokenizer):
    from modelpress.compression import CompressionError
    from modelpress.compression.registry import get_method

    cfg = parse_params("wanda", {"pattern": "2:4"})
    with pytest.raises(CompressionError):
        get_method("wanda").check_model(cfg, type("C", (), {"model_type": "llama", "hidden_size": 66})())


@pytest.mark.slow
def test_wanda_smollm2_beats_magnitude(smollm2_dir):
    from modelpress.compression.data import default_eval_text
    from modelpress.compression.evaluation import perplexity
    from modelpress.compression.models import load_pretrained
    from modelpress.compression.pruning.magnitude import MagnitudeConfig

    text = default_eval_text()
    lm = load_pretrained(smollm2_dir)
    compress(lm.model, WandaConfig(sparsity=0.5, num_samples=8, seq_len=256), Context(tokenizer=lm.tokenizer))
    assert linear_sparsity(lm.model) == pytest.approx(0.5, abs=1e-3)
    ppl_wanda = perplexity(lm.model, lm.tokenizer, text, seq_len=512, num_chunks=3)
    lm = load_pretrained(smollm2_dir)
    compress(lm.model, MagnitudeConfig(sparsity=0.5, scope="row"))
    ppl_mag = perplexity(lm.model, lm.tokenizer, text, seq_len=512, num_chunks=3)
    assert ppl_wanda < 0.5 * ppl_mag
    assert ppl_wanda < 120

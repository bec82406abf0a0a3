import pytest
import torch

from modelpress.compression import Context, compress, parse_params
from modelpress.compression.calib import engine
from modelpress.compression.evaluation import linear_sparsity
from modelpress.compression.pruning.sparsegpt import SparseGPTConfig, sparsegpt_prune
from modelpress.compression.pruning.wanda import wanda_mask

CAL = dict(num_samples=4, seq_len=64)




def test_sparsegpt_reconstruction_beats_plain_masking(correlated_inputs):
    torch.manual_seed(0)
    X = correlated_inputs()
    W = torch.randn(16, 32)
    H = 2 * X.T @ X / X.shape[0]
    W_new, keep = sparsegpt_prune(W, H, 0.5, block_size=8)
    assert (keep.sum() == W.numel() // 2) and torch.equal(W_new != 0, keep)
    # the kept weights were updated
    assert not torch.allclose(W_new[keep], W[keep])
    err_obs = ((W - W_new) @ X.T).pow(2).sum()
    # the same mask without the update, and Wanda's mask without the update, are both worse
    err_same_mask = ((W - W * keep) @ X.T).pow(2).sum()
    wm = wanda_mask(W, X.pow(2).sum(0).sqrt(), 0.5)
    err_wanda = ((W - W * wm) @ X.T).pow(2).sum()
    assert err_obs < 0.5 * err_same_mask and err_obs < 0.5 * err_wanda
    # inputs untouched (pure function)
    assert torch.equal(H, 2 * X.T @ X / X.shape[0])


def test_sparsegpt_fixed_mask_and_nm(correlated_inputs):
    torch.manual_seed(1)
    X = correlated_inputs()
    W = torch.randn(8, 32)
    H = 2 * X.T @ X / X.shape[0]
    mask = wanda_mask(W, X.pow(2).sum(0).sqrt(), 0.5)
    W_new, keep = sparsegpt_prune(W, H, 0.5, mask=mask)
    assert torch.equal(keep, mask) and torch.equal(W_new != 0, mask)
    assert ((W - W_new) @ X.T).pow(2).sum() < ((W - W * mask) @ X.T).pow(2).sum()
    W24, keep24 = sparsegpt_prune(W, H, 0.5, nm=(2, 4), block_size=16)
    assert ((W24 != 0).reshape(8, -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("sequential", [True, False])
def test_sparsegpt_llama_exact_and_updated(tiny_llama, tiny_tokenizer, sequential, block_linears):
    before = {k: lin.weight.detach().clone() for k, lin in block_linears(tiny_llama).items()}
    head = tiny_llama.lm_head.weight.detach().clone()
    res = compress(tiny_llama, SparseGPTConfig(sparsity=0.5, sequential=sequential, **CAL),
                   Context(tokenizer=tiny_tokenizer))
    assert res.metrics["sparsity_linear"] == pytest.approx(0.5, abs=1e-6)
    for k, lin in block_linears(tiny_llama).items():
        w = lin.weight
        assert (w == 0).sum().item() == w.numel() // 2, k
        kept = w != 0
        assert (w[kept] - before[k][kept]).abs().max() > 1e-4, f"{k} kept weights not updated"
    assert torch.equal(tiny_llama.lm_head.weight, head)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_exact(tiny_llama, tiny_tokenizer, pattern, block_linears):
    n, m = map(int, pattern.split(":"))
    compress(tiny_llama, SparseGPTConfig(pattern=pattern, **CAL), Context(tokenizer=tiny_tokenizer))
    for name, lin in block_linears(tiny_llama).items():
        groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), name


def test_sparsegpt_wanda_mask_selection(tiny_llama, tiny_tokenizer, block_linears):
    compress(tiny_llama, SparseGPTConfig(mask_selection="wanda", **CAL), Context(tokenizer=tiny_tokenizer))
    for name, lin in block_linears(tiny_llama).items():
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all(), name


def test_sparsegpt_bert_reload(tiny_bert, tiny_tokenizer, tmp_path):
    from transformers import AutoModel

    before = tiny_bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    compress(tiny_bert, SparseGPTConfig(sparsity=0.5, **CAL), Context(tokenizer=tiny_tokenizer))
    after = tiny_bert.encoder.layer[0].intermediate.dense.weight
    assert (after == 0).float().mean().item() == pytest.approx(0.5)
    assert not torch.allclose(after[after != 0], before[after != 0])
    tiny_bert.save_pretrained(tmp_path)
    back = AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(4, 500, (2, 12))
    torch.testing.assert_close(back(input_ids=ids).last_hidden_state,
                               tiny_bert(input_ids=ids).last_hidden_state)


def test_sparsegpt_reload_and_generate(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(tiny_llama, SparseGPTConfig(pattern="2:4", **CAL), Context(tokenizer=tiny_tokenizer))
    tiny_llama.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert linear_sparsity(back) == pytest.approx(0.5)
    out = back.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=6, min_new_tokens=6,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("params", [{"sparsity": 1.0}, {"dampening": 0}, {"block_size": 0},
                                    {"mask_selection": "random"}, {"pattern": "2:4", "block_size": 66},
                                    {"seq_len": 4}, {"extra": True}])
def test_sparsegpt_rejects_bad_params(params):
    with pytest.raises(ValueError):
        parse_params("sparsegpt", params)


@pytest.mark.slow
def test_sparsegpt_smollm2_better_than_wanda_layer(smollm2_dir):
    """On one real SmolLM2 block: SparseGPT's layer reconstruction error is below Wanda's."""
    from modelpress.compression.models import load_pretrained

    lm = load_pretrained(smollm2_dir)
    tokens = engine.calibration_tokens(lm.model, SparseGPTConfig(num_samples=4, seq_len=256),
                                       Context(tokenizer=lm.tokenizer))
    inputs = engine.capture_inputs(lm.model, engine.InMemoryBlocks(lm.model), tokens,
                                   torch.device("cpu"), 4)
    block = lm.model.model.layers[0]
    group = engine.Group(("mlp.gate_proj", "mlp.up_proj"))
    stats = engine.input_stats(block, inputs, [group], hessian=True, sq_sum=True)
    W = block.mlp.up_proj.weight.detach()
    H = stats["mlp.up_proj"].H
    W_sg, _ = sparsegpt_prune(W, H, 0.5)
    W_wa = W * wanda_mask(W, stats["mlp.up_proj"].col_norm, 0.5)
    err = lambda Wn: torch.trace((W - Wn) @ H @ (W - Wn).T).item()  # noqa: E731
    assert err(W_sg) < 0.8 * err(W_wa)

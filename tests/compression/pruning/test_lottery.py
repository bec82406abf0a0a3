import pytest
import torch

from modelpress.compression import CompressionError, Context, compress, parse_params
from modelpress.compression.evaluation import linear_sparsity, prunable_linears
from modelpress.compression.pruning.lottery import LotteryTicketConfig, magnitude_prune_step

FAST = dict(steps_per_round=12, batch_size=4, seq_len=32, lr=3e-3, eval_chunks=2)


def test_prune_step_prunes_fraction_of_remaining():
    torch.manual_seed(0)
    w = {"a": torch.randn(10, 10), "b": torch.randn(5, 20)}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    m1 = magnitude_prune_step(w, masks, 0.2, "layer")
    assert [int((~m).sum()) for m in m1.values()] == [20, 20]
    m2 = magnitude_prune_step(w, m1, 0.5, "layer")
    assert [int((~m).sum()) for m in m2.values()] == [60, 60]
    assert all(((~m1[k]) & m2[k]).sum() == 0 for k in w)  # pruned stays pruned
    g = magnitude_prune_step(w, masks, 0.3, "global")
    assert sum(int((~m).sum()) for m in g.values()) == 60
    kept = torch.cat([w[k][g[k]].abs() for k in w])
    gone = torch.cat([w[k][~g[k]].abs() for k in w])
    assert kept.min() >= gone.max()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_lottery_rounds_sparsity_and_learning(tiny_llama, tiny_tokenizer, scope):
    events = []
    start = {k: lin.weight.detach().clone() for k, lin in prunable_linears(tiny_llama).items()}
    cfg = LotteryTicketConfig(rounds=2, prune_per_round=0.3, scope=scope, **FAST)
    ctx = Context(tokenizer=tiny_tokenizer, event=lambda k, d: events.append((k, d)))
    res = compress(tiny_llama, cfg, ctx)
    rounds = [d for k, d in events if k == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2, "final"]
    # per-round sparsity: dense, then 30% of the rest each round
    assert rounds[1]["sparsity"] == pytest.approx(0.0)
    assert rounds[1]["sparsity_after_prune"] == pytest.approx(0.3, abs=1e-3)
    assert rounds[2]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert rounds[3]["sparsity"] == pytest.approx(0.51, abs=1e-3)
    assert res.metrics["sparsity_linear"] == pytest.approx(0.51, abs=1e-3)
    assert linear_sparsity(tiny_llama) == pytest.approx(0.51, abs=1e-3)
    if scope == "layer":
        for lin in prunable_linears(tiny_llama).values():
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.51, abs=2e-3)
    # real training: the loss goes down within every round and held-out ppl improves
    for r in rounds[1:]:
        assert r["loss_mean_last10"] < r["loss_mean_first10"]
    assert res.metrics["ppl_after"] < res.metrics["ppl_before"]
    # weights moved away from the start (trained), and masked weights stayed zero
    moved = [(lin.weight - start[k]).abs().max().item() for k, lin in prunable_linears(tiny_llama).items()]
    assert min(moved) > 1e-3


def test_lottery_rewind_to_start(tiny_llama, tiny_tokenizer):
    """With no final training the survivors are exactly the (rewound) starting weights."""
    start = {k: lin.weight.detach().clone() for k, lin in prunable_linears(tiny_llama).items()}
    cfg = LotteryTicketConfig(rounds=1, prune_per_round=0.5, final_steps=0, **FAST)
    compress(tiny_llama, cfg, Context(tokenizer=tiny_tokenizer))
    for k, lin in prunable_linears(tiny_llama).items():
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], start[k][kept])
    assert linear_sparsity(tiny_llama) == pytest.approx(0.5, abs=1e-3)


def test_lottery_rewind_step_differs_from_start(tiny_llama, tiny_tokenizer):
    start = {k: lin.weight.detach().clone() for k, lin in prunable_linears(tiny_llama).items()}
    cfg = LotteryTicketConfig(rounds=1, prune_per_round=0.5, final_steps=0, rewind_step=3, **FAST)
    compress(tiny_llama, cfg, Context(tokenizer=tiny_tokenizer))
    lin = prunable_linears(tiny_llama)["model.layers.0.mlp.up_proj"]
    kept = lin.weight != 0
    assert not torch.equal(lin.weight[kept], start["model.layers.0.mlp.up_proj"][kept])


def test_lottery_stops_at_max_minutes(tiny_llama, tiny_tokenizer):
    events = []
    cfg = LotteryTicketConfig(rounds=5, prune_per_round=0.2, steps_per_round=100000, batch_size=2,
                              seq_len=16, max_minutes=0.05, eval_chunks=1)
    ctx = Context(tokenizer=tiny_tokenizer, event=lambda k, d: events.append((k, d)))
    res = compress(tiny_llama, cfg, ctx)
    assert res.metrics["stopped_early"] == 1.0
    assert res.metrics["train_seconds"] < 30
    assert any(k == "stopped" for k, _ in events)


def test_lottery_save_reload(tiny_llama, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(tiny_llama, LotteryTicketConfig(rounds=1, prune_per_round=0.4, **{**FAST, "steps_per_round": 3}),
             Context(tokenizer=tiny_tokenizer))
    tiny_llama.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert linear_sparsity(back) == pytest.approx(0.4, abs=1e-3)
    out = back.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_lottery_refuses_encoder(tiny_bert, tiny_tokenizer):
    with pytest.raises(CompressionError):
        compress(tiny_bert, LotteryTicketConfig(**FAST), Context(tokenizer=tiny_tokenizer))


@pytest.mark.parametrize("params", [{"rounds": 0}, {"prune_per_round": 1.0}, {"lr": 0},
                                    {"steps_per_round": 5, "rewind_step": 6}, {"scope": "row"},
                                    {"max_minutes": 0}, {"foo": 1}])
def test_lottery_rejects_bad_params(params):
    with pytest.raises(ValueError):
        parse_params("lottery_ticket", params)

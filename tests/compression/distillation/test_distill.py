import copy

import pytest
import torch
from safetensors import safe_open

from modelpress.compression import Cancelled, CompressionError, compress, parse_params
from modelpress.compression.base import Context
from modelpress.compression.data import default_calibration_text, token_chunks
from modelpress.compression.distillation.distill import CHECKPOINT_NAME, DistillConfig
from modelpress.compression.pipeline import LocalCheckpoints
from modelpress.compression.pruning.magnitude import MagnitudeConfig
from modelpress.compression.registry import get_method

TEXT = default_calibration_text()[:60_000]
FAST = dict(seq_len=32, batch_size=4, max_minutes=None, warmup_steps=2, log_every=2)


def _pair(tiny_llama):
    teacher = tiny_llama
    student = copy.deepcopy(teacher)
    compress(student, MagnitudeConfig(sparsity=0.6))
    return teacher, student


def _ctx(tok, teacher, **kw):
    return Context(tokenizer=tok, calibration_text=TEXT, original_model=teacher, **kw)


def _mean(xs):
    return sum(xs) / len(xs)


def test_registered():
    m = get_method("distill")
    assert m.family == "distillation" and not m.terminal
    with pytest.raises(ValueError):
        parse_params("distill", {"alpha": 1.5})
    with pytest.raises(ValueError):
        parse_params("distill", {"temperature": 0})
    with pytest.raises(ValueError):
        parse_params("distill", {"bogus": 1})


def test_distill_lowers_training_loss(tiny_llama, tiny_tokenizer):
    teacher, student = _pair(tiny_llama)
    events = []
    cfg = DistillConfig(steps=30, lr=1e-2, alpha=0.5, temperature=2.0, freeze_embeddings=False,
                        **FAST)
    res = compress(student, cfg, _ctx(tiny_tokenizer, teacher, event=lambda k, d: events.append((k, d))))
    curve = [d for k, d in events if k == "train"]
    assert len(curve) == 15 and curve[-1]["step"] == 30
    # the teacher is a random-init model, so the loss cannot fall far: CE ~6.1 -> ~5.4 while the
    # student stays near the teacher; the total drops by ~6%
    first, last = _mean([d["loss"] for d in curve[:3]]), _mean([d["loss"] for d in curve[-3:]])
    assert last < 0.97 * first
    assert _mean([d["ce"] for d in curve[-3:]]) < _mean([d["ce"] for d in curve[:3]]) - 0.2
    assert res.metrics["steps"] == 30
    assert res.metrics["train_loss_last"] < res.metrics["train_loss_first"]
    assert not student.training


def test_pure_kd_moves_student_towards_teacher(tiny_llama, tiny_tokenizer):
    teacher = tiny_llama
    with torch.no_grad():  # sharpen the random teacher's output so the KL is not ~0
        teacher.model.norm.weight.mul_(30)
    student = copy.deepcopy(teacher)
    compress(student, MagnitudeConfig(sparsity=0.6))
    before = copy.deepcopy(student)
    cfg = DistillConfig(steps=20, lr=1e-4, alpha=1.0, temperature=1.0, **FAST)
    compress(student, cfg, _ctx(tiny_tokenizer, teacher))
    # embeddings are frozen by default
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    held_out = token_chunks(tiny_tokenizer, default_calibration_text()[70_000:], 4, 64)

    def kl(m):
        with torch.no_grad():
            t = teacher(input_ids=held_out).logits.log_softmax(-1)
            s = m(input_ids=held_out).logits.log_softmax(-1)
        return (t.exp() * (t - s)).sum(-1).mean().item()

    assert kl(student) < 0.9 * kl(before)


def test_hidden_state_loss_is_used(tiny_llama, tiny_tokenizer):
    teacher, student = _pair(tiny_llama)
    events = []
    compress(student, DistillConfig(steps=4, hidden_loss_weight=1.0, **FAST),
             _ctx(tiny_tokenizer, teacher, event=lambda k, d: events.append((k, d))))
    assert all(d["hidden"] > 0 for k, d in events if k == "train")
    with pytest.raises(CompressionError, match="layer_map"):
        compress(student, DistillConfig(steps=1, hidden_loss_weight=1.0, layer_map=[1, 2], **FAST),
                 _ctx(tiny_tokenizer, teacher))


def _weights(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_resume_from_checkpoint_matches_uninterrupted(tiny_llama, tiny_tokenizer, tmp_path):
    teacher, start = _pair(tiny_llama)
    cfg = DistillConfig(steps=10, lr=2e-3, checkpoint_every=4, **FAST)

    full = copy.deepcopy(start)
    compress(full, cfg, _ctx(tiny_tokenizer, teacher))

    store = LocalCheckpoints(tmp_path / "ckpt")

    def kill_after_step_6(frac, msg):
        if msg and msg.startswith("step 6/"):
            raise RuntimeError("worker killed")

    interrupted = copy.deepcopy(start)
    with pytest.raises(RuntimeError, match="killed"):
        compress(interrupted, cfg, _ctx(tiny_tokenizer, teacher, checkpoints=store,
                                        progress=kill_after_step_6))
    saved = tmp_path / "ckpt" / CHECKPOINT_NAME
    assert saved.is_file()
    with safe_open(str(saved), framework="pt") as f:  # safetensors, not a pickle
        assert '"step": 4' in f.metadata()["modelpress"]
        assert any(k.startswith("optim.") for k in f.keys())

    events = []
    retry = copy.deepcopy(start)  # a retried job starts again from the (re-pruned) input
    res = compress(retry, cfg, _ctx(tiny_tokenizer, teacher, checkpoints=store,
                                    event=lambda k, d: events.append((k, d))))
    assert ("resume", {"step": 4}) in events
    assert res.metrics["resumed_from_step"] == 4
    assert min(d["step"] for k, d in events if k == "train") > 4
    a, b = _weights(full), _weights(retry)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           _weights(start)["model.layers.0.mlp.up_proj.weight"])


def test_cancellation_stops_at_next_step(tiny_llama, tiny_tokenizer):
    teacher, student = _pair(tiny_llama)
    events = []
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        compress(student, DistillConfig(steps=50, **{**FAST, "log_every": 1}),
                 _ctx(tiny_tokenizer, teacher, should_stop=stop,
                      event=lambda k, d: events.append((k, d))))
    assert max(d["step"] for k, d in events if k == "train") == 3


def test_teacher_from_registry_and_errors(tiny_llama, tiny_tokenizer):
    teacher, student = _pair(tiny_llama)
    asked = []

    def load_model(mid):
        asked.append(mid)
        return teacher

    cfg = DistillConfig(steps=2, teacher_model_id="m-teacher", **FAST)
    compress(student, cfg, Context(tokenizer=tiny_tokenizer, calibration_text=TEXT,
                                   load_model=load_model))
    assert asked == ["m-teacher"]
    with pytest.raises(CompressionError, match="teacher"):
        compress(student, DistillConfig(steps=2, **FAST),
                 Context(tokenizer=tiny_tokenizer, calibration_text=TEXT))


def test_time_budget_stops(tiny_llama, tiny_tokenizer):
    teacher, student = _pair(tiny_llama)
    res = compress(student, DistillConfig(steps=100_000, **{**FAST, "max_minutes": 0.02}),
                   _ctx(tiny_tokenizer, teacher))
    assert 0 < res.metrics["steps"] < 100_000
    assert res.metrics["train_minutes"] < 0.02 + 0.05


def test_rejects_encoders(tiny_bert):
    with pytest.raises(CompressionError):
        get_method("distill").check_model(DistillConfig(), tiny_bert.config)


def test_retry_after_finished_stage_skips_training(tiny_llama, tiny_tokenizer, tmp_path):
    teacher, start = _pair(tiny_llama)
    cfg = DistillConfig(steps=5, lr=2e-3, checkpoint_every=100, **FAST)
    store = LocalCheckpoints(tmp_path / "ckpt")
    first = copy.deepcopy(start)
    compress(first, cfg, _ctx(tiny_tokenizer, teacher, checkpoints=store))
    events = []
    again = copy.deepcopy(start)
    res = compress(again, cfg, _ctx(tiny_tokenizer, teacher, checkpoints=store,
                                    event=lambda k, d: events.append((k, d))))
    assert res.metrics["resumed_from_step"] == 5 and res.metrics["steps"] == 5
    assert not [d for k, d in events if k == "train"]
    for k, v in _weights(first).items():
        torch.testing.assert_close(_weights(again)[k], v)

"""compression/measure: baseline cache reuse, speed verdicts, the task scorer, the prompt diff,
the gates they feed (tiny random llama; fast)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from modelpress.compression.base import CompressionError
from modelpress.compression.measure import baseline as B
from modelpress.compression.measure import job as MJ
from modelpress.compression.measure import prompts as P
from modelpress.compression.measure import speed as S
from modelpress.compression.measure import tasks as T
from modelpress.compression.measure.jsonl import DatasetFormatError
from modelpress.compression.measure.quality import other_domain_text
from modelpress.compression.pipeline import run_pipeline

EVAL = other_domain_text()[:20_000]  # short eval text: fast perplexity on the tiny model


def _direct_loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) summed token by token with one forward per token."""
    ctx = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    total, ids = 0.0, list(ctx)
    with torch.no_grad():
        for t in cont:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits.float(), -1)[t].item()
            ids.append(t)
    return total


# ------------------------------------------------------------------------------ speed


def test_verdict_states_no_speedup_when_spreads_overlap():
    v = S.verdict({"median": 10.0, "min": 8.0, "max": 12.0},
                  {"median": 11.5, "min": 11.0, "max": 13.0})
    assert v["measurable"] is False and "speedup" not in v
    assert v["verdict"] == S.NOT_MEASURABLE
    v = S.verdict({"median": 10.0, "min": 9.0, "max": 10.5},
                  {"median": 15.0, "min": 14.0, "max": 16.0})
    assert v["measurable"] is True and v["speedup"] == pytest.approx(1.5)
    v = S.verdict({"median": 10.0, "min": 9.5, "max": 10.5}, {"median": 5.0, "min": 4, "max": 6})
    assert v["speedup"] == pytest.approx(0.5) and "slower" in v["verdict"]


def test_interleaved_alternates_order_and_reports_spread():
    calls = []
    dense, comp = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    rates = {id(dense): iter([1, 100, 2, 3, 4, 5]), id(comp): iter([1, 10, 20, 30, 40, 50])}

    def rate(m):
        calls.append("d" if m is dense else "c")
        return float(next(rates[id(m)]))

    r = S.interleaved(dense, comp, rate, rounds=5)
    assert calls == ["d", "c"] + ["d", "c", "c", "d", "d", "c", "c", "d", "d", "c"]
    assert r["dense"]["rates"] == [100, 2, 3, 4, 5] and r["dense"]["median"] == 4
    assert r["compressed"] == {"median": 30, "min": 10, "max": 50, "rates": [10, 20, 30, 40, 50]}
    assert r["measurable"] is False and r["verdict"] == S.NOT_MEASURABLE  # 10..50 meets 2..100
    assert r["threads"] == torch.get_num_threads() and r["rounds"] == 5


# ------------------------------------------------------------------------------ tasks


def test_task_scorer_matches_direct_loglikelihood(tiny_llama, tiny_tokenizer):
    model, tok = tiny_llama.eval(), tiny_tokenizer
    questions = ["The ship sailed into the", "In the beginning God created the",
                 "The army marched towards", "He was born in"]
    choices = ["harbour", "earth", "city", "river"]
    lines, expected = [], []
    for i, q in enumerate(questions):
        lls = [_direct_loglik(model, tok, q, " " + c) for c in choices]
        best = max(range(4), key=lls.__getitem__)
        gold = best if i % 2 == 0 else (best + 1) % 4  # right on even lines, wrong on odd ones
        lines.append(json.dumps({"question": q, "choices": choices, "gold": gold}))
        expected.append(i % 2 == 0)
        for c, ll in zip(choices, lls):
            assert T.continuation_loglik(model, tok, q, " " + c)[0] == pytest.approx(ll, abs=1e-4)
    # completion tasks: the model's own greedy continuation is right, another one is not
    prompt = "The ship sailed into the"
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    greedy_text = tok.decode(greedy)
    lines.append(json.dumps({"prompt": prompt, "expected": greedy_text}))
    expected.append(True)
    first = model(input_ids=ids).logits[0, -1].argmin().item()  # the least likely next token
    lines.append(json.dumps({"prompt": prompt, "completion": tok.decode([first])}))
    expected.append(False)
    tasks = T.parse_tasks("\n".join(lines) + "\n\n")
    res = T.evaluate(model, tok, tasks)
    assert res["correct"] == expected
    assert res["accuracy"] == pytest.approx(3 / 6)
    assert res["accuracy_multiple_choice"] == 0.5 and res["accuracy_completion"] == 0.5


@pytest.mark.parametrize("text, msg", [
    ("", "no records"),
    ("{not json}\n", "line 1: not JSON"),
    ('{"question": "q", "choices": ["a", "b"], "gold": 2}\n', "line 1: 'gold'"),
    ('{"question": "q", "choices": ["a", "b"], "gold": 0}\n[1]\n', "line 2: expected a JSON obj"),
    ('{"question": "q", "choices": ["a"], "gold": 0}\n', "'choices' must be a list of 2"),
    ('{"prompt": "p"}\n', "line 1: needs one of 'expected', 'completion'"),
    ('{"text": "p"}\n', "line 1: a task has"),
    ('{"question": "q", "choices": ["a", "b"], "gold": true}\n', "'gold' must be"),
])
def test_task_set_errors_name_the_line(text, msg):
    with pytest.raises(DatasetFormatError, match=msg):
        T.parse_tasks(text)


# ------------------------------------------------------------------------------ prompts


PROMPTS = ["The ship sailed into the", "In the beginning", "The army", "He was born in the"]


def test_prompt_diff_self_is_zero_and_perturbed_is_ranked(tiny_llama, tiny_tokenizer):
    model, tok = tiny_llama.eval(), tiny_tokenizer
    dense = P.behaviour(model, tok, PROMPTS)
    same = P.diff(PROMPTS, dense, P.behaviour(model, tok, PROMPTS))
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["continuations_changed"] == 0 and all("before" not in r for r in same["prompts"])
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    d = P.diff(PROMPTS, dense, P.behaviour(other, tok, PROMPTS))
    kls = [r["kl"] for r in d["prompts"]]
    assert kls == sorted(kls, reverse=True) and d["mean_kl"] > 1e-3
    assert d["mean_kl"] == pytest.approx(sum(kls) / len(kls))
    # the KL is KL(dense || perturbed) of the next-token distributions, checked directly
    row = d["prompts"][0]
    ids = torch.tensor([[tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
        lq = torch.log_softmax(other(input_ids=ids).logits[0, -1], -1)
    assert row["kl"] == pytest.approx((lp.exp() * (lp - lq)).sum().item(), rel=1e-4)
    for r in d["prompts"]:
        assert ("before" in r) == r["continuation_changed"]
        if r["continuation_changed"]:
            assert r["before"] != r["after"]


def test_prompt_set_errors():
    assert P.parse_prompts('{"prompt": "a"}\n{"prompt": "b"}\n') == ["a", "b"]
    with pytest.raises(DatasetFormatError, match="line 2: needs one of 'prompt'"):
        P.parse_prompts('{"prompt": "a"}\n{"text": "b"}\n')


# ------------------------------------------------------------------------------ pipeline


def _job(src, out, **kw):
    return run_pipeline(str(src), [{"method": "magnitude", "params": {"sparsity": 0.5}}], out,
                        eval_text=EVAL, device="cpu", **kw)


def test_baseline_is_measured_once_and_reused(tiny_llama_dir, tmp_path):
    cache = tmp_path / "baseline"
    B.COUNTERS.update(hits=0, misses=0, stores=0)
    first = _job(tiny_llama_dir, tmp_path / "a", measure="quality", baseline_cache=cache)
    assert first.report["evaluation"]["baseline"]["reused"] is False
    assert B.COUNTERS == {"hits": 0, "misses": 1, "stores": 1}
    second = _job(tiny_llama_dir, tmp_path / "b", measure="quality", baseline_cache=cache)
    ev = second.report["evaluation"]
    assert ev["baseline"]["reused"] is True and ev["measure"] == "quality"
    assert B.COUNTERS == {"hits": 1, "misses": 1, "stores": 1}
    assert second.report["before"] == first.report["before"]
    assert set(first.report["before"]) >= {"perplexity", "perplexity_other", "bytes"}
    # the report times each phase; the repeated job spends (almost) nothing on ``before``
    t1, t2 = first.report["timings"], second.report["timings"]
    assert set(t1) == {"load_s", "before_s", "stages_s", "save_s", "after_s", "total_s"}
    assert sum(v for k, v in t1.items() if k != "total_s") <= t1["total_s"]
    assert t1["before_s"] > 0 and t1["after_s"] > 0
    assert t2["before_s"] < 0.2 * t1["before_s"]
    assert "tokens_per_s" not in second.report["after"]  # measure=quality: no speed
    assert second.report["summary"]["ppl_ratio_other"] == pytest.approx(
        second.report["after"]["perplexity_other"] / first.report["before"]["perplexity_other"])
    # another eval text is another baseline
    third = run_pipeline(str(tiny_llama_dir), [{"method": "magnitude", "params": {}}],
                         tmp_path / "c", eval_text=EVAL[:15_000], device="cpu",
                         measure="none", baseline_cache=cache)
    assert third.report["evaluation"]["baseline"]["reused"] is False
    assert "perplexity" not in third.report["after"] and "perplexity" not in third.report["before"]
    assert third.report["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    # fewer windows are other numbers: another baseline, and the report says how many were read
    fourth = _job(tiny_llama_dir, tmp_path / "d", measure="quality", baseline_cache=cache,
                  eval_windows=2)
    ev = fourth.report["evaluation"]
    assert ev["baseline"]["reused"] is False and ev["perplexity"]["num_chunks"] == 2
    assert first.report["evaluation"]["perplexity"]["num_chunks"] == 16
    assert fourth.report["before"]["perplexity"] != first.report["before"]["perplexity"]


def test_full_job_speed_is_interleaved_and_honest(tiny_llama_dir, tmp_path):
    out = _job(tiny_llama_dir, tmp_path / "a", measure="full")
    sp = out.report["evaluation"]["speed"]
    assert len(sp["dense"]["rates"]) == len(sp["compressed"]["rates"]) == sp["rounds"]
    assert out.report["before"]["tokens_per_s"] == sp["dense"]["median"]
    assert out.report["after"]["tokens_per_s"] == sp["compressed"]["median"]
    assert sp["threads"] >= 1 and "load_average_before" in sp
    if sp["measurable"]:
        assert out.report["summary"]["speedup"] == pytest.approx(sp["speedup"])
    else:
        assert "speedup" not in out.report["summary"] and sp["verdict"] == S.NOT_MEASURABLE
    # timed as a user runs them: each model in a fresh process with the default threads
    assert sp["processes"] == "fresh"
    assert "fresh process" in out.report["evaluation"]["tokens_per_s"]


def test_speed_probes_time_each_model_in_its_own_process(tiny_llama_dir, tmp_path):
    """The probes load the dense model and the artifact (in its method's runtime) in two fresh
    processes: their threads are a fresh interpreter's default, and a probe that cannot load
    its model fails the rounds with its reason instead of hanging."""
    import subprocess
    import sys

    from modelpress.compression.pipeline import run_pipeline

    out = run_pipeline(str(tiny_llama_dir), [{"method": "int8_dynamic", "params": {
        "num_samples": 2, "seq_len": 32}}], tmp_path / "a", eval_text=EVAL, device="cpu",
        measure="none")
    default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                 capture_output=True, text=True, check=True).stdout)
    res = S.interleaved_processes(str(tiny_llama_dir), str(out.output_dir), True,
                                  ("int8_dynamic", {"num_samples": 2, "seq_len": 32}), rounds=2)
    assert res["threads"] == default and res["processes"] == "fresh"
    assert len(res["dense"]["rates"]) == len(res["compressed"]["rates"]) == 2
    assert min(res["dense"]["rates"] + res["compressed"]["rates"]) > 0
    with pytest.raises(S.ProbeError, match="config"):
        S.interleaved_processes(str(tmp_path / "missing"), str(out.output_dir), True, rounds=1)


def test_task_and_prompt_gates_fail_the_job_with_a_reason(tiny_llama_dir, tmp_path):
    tasks = "\n".join(json.dumps({"question": q, "choices": ["earth", "sea", "sky"], "gold": 0})
                      for q in PROMPTS)
    prompts = "\n".join(json.dumps({"prompt": p}) for p in PROMPTS)
    out = _job(tiny_llama_dir, tmp_path / "a", measure="quality", tasks_text=tasks,
               prompts_text=prompts, max_accuracy_drop=1.0, max_mean_kl=0.0)
    r = out.report
    assert out.gate_passed is False
    kl_gate = [g for g in r["gate"]["gates"] if "max_mean_kl" in g][0]
    acc_gate = [g for g in r["gate"]["gates"] if "max_accuracy_drop" in g][0]
    assert acc_gate["passed"] is True and kl_gate["passed"] is False
    assert kl_gate["mean_kl"] == r["evaluation"]["prompts"]["mean_kl"] > 0
    assert "mean KL on the prompt set" in r["gate"]["reason"]
    t = r["evaluation"]["tasks"]
    assert t["n"] == 4 and r["before"]["task_accuracy"] == t["accuracy_before"]
    assert r["after"]["task_accuracy"] == t["accuracy_after"]


def test_gate_options_are_checked_up_front(tmp_path):
    with pytest.raises(CompressionError, match="max_accuracy_drop needs a task set"):
        MJ.make_plan("full", max_accuracy_drop=0.1)
    with pytest.raises(CompressionError, match="measure must be one of"):
        MJ.make_plan("fast")
    for bad in (0, 257, 2.5):
        with pytest.raises(CompressionError, match="eval windows must be a whole number"):
            MJ.make_plan("full", windows=bad)
    with pytest.raises(CompressionError, match="cannot gate"):
        MJ.make_plan("none", prompts_text='{"prompt": "a"}', max_mean_kl=0.1)
    plan = MJ.make_plan("quality", tasks_text='{"prompt": "a", "expected": "b"}',
                        max_accuracy_drop=0.05)
    g = MJ.gates(plan, {"task_accuracy": 0.8}, {"task_accuracy": 0.7})
    assert g[0]["passed"] is False and "fell 0.1000" in g[0]["reason"]


def test_method_descriptions_say_what_a_parameter_does_not_what_it_measured():
    import re

    from modelpress.compression.registry import methods

    measured = re.compile(r"SmolLM|\bppl\b|held-out perplexity \d|\d+\.\d+ ?->|\d+(\.\d+)?% "
                          r"(slower|faster)|measured on")
    for name, m in methods().items():
        texts = {"description": m.description}
        texts.update({k: f.description or "" for k, f in m.config.model_fields.items()})
        for k, t in texts.items():
            assert not measured.search(t), f"{name}.{k}: {t}"


def test_an_interrupted_probe_close_propagates_and_kills_the_probe():
    """A job's soft time limit (an exception raised in the worker wherever it is) that lands
    while a probe is closing must go on propagating (the job fails 'timeout'), and the probe
    process must not outlive it."""
    import subprocess
    import sys

    class Interrupted(Exception):
        pass

    probe = S._Probe.__new__(S._Probe)
    probe.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  stdin=subprocess.PIPE, text=True)
    real_wait = probe.proc.wait
    calls = []

    def wait(timeout=None):
        if not calls:
            calls.append(timeout)
            raise Interrupted()
        return real_wait(timeout)

    probe.proc.wait = wait
    with pytest.raises(Interrupted):
        probe.close()
    assert probe.proc.poll() is not None

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from modelpress.compression import evaluation as E
from modelpress.compression.base import Cancelled, CompressionError, CompressionResult, Method, MethodConfig
from modelpress.compression.cli_compress import main as cli_main
from modelpress.compression.data import default_calibration_text, default_eval_text
from modelpress.compression.pipeline import (
    QUALITY_GATE,
    JobHooks,
    LocalCheckpoints,
    RecipeError,
    Stage,
    run_pipeline,
    validate_recipe,
)
from modelpress.compression.registry import UnknownMethodError, methods

EVAL = default_eval_text()[:40_000]
CAL = default_calibration_text()[:60_000]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a busy 2-core box: per-op threading overhead dominates; one thread is
    an order of magnitude faster. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(src, stages, out, **kw):
    """A job with the test texts; quality only unless a test times speed (``measure='full'``:
    two fresh processes per job)."""
    kw.setdefault("measure", "quality")
    kw.setdefault("eval_text", EVAL)
    kw.setdefault("calibration_text", CAL)
    kw.setdefault("device", "cpu")
    return run_pipeline(src, stages, out, **kw)


@pytest.fixture(scope="module")
def magnitude_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mag") / "out"
    progress, events = [], []
    hooks = JobHooks(progress=lambda p, label: progress.append((p, label)),
                     event=lambda k, d: events.append((k, d)))
    n = torch.get_num_threads()  # set up before the autouse one-thread fixture: restore too
    torch.set_num_threads(1)
    try:
        outcome = _run(tiny_llama_dir, [{"method": "magnitude", "params": {"sparsity": 0.5}}],
                       out, hooks=hooks, max_ppl_increase=1000.0, measure="full")
    finally:
        torch.set_num_threads(n)
    return outcome, progress, events


def test_report_matches_independent_measurement(magnitude_run, tiny_llama_dir):
    outcome, _, _ = magnitude_run
    out = outcome.output_dir
    report = json.loads((out / "report.json").read_text())
    assert report == outcome.report
    assert outcome.format == "hf-safetensors" and outcome.gate_passed

    # independent: plain from_pretrained, own counting
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    n = sum(p.numel() for p in model.parameters())  # parameters() dedups the tied head
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    lin = [m.weight for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    sparsity = sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    ppl = E.perplexity(model, tok, EVAL, seq_len=512, num_chunks=16)
    src_disk = sum(f.stat().st_size for f in Path(tiny_llama_dir).glob("*.safetensors"))
    src = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ppl0 = E.perplexity(src, tok, EVAL, seq_len=512, num_chunks=16)

    a, b = report["after"], report["before"]
    assert a["params"] == pytest.approx(n, rel=0.01)
    assert a["nonzero_params"] == pytest.approx(nz, rel=0.01)
    assert a["sparsity"] == pytest.approx(sparsity, rel=0.01)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    assert a["bytes"] == pytest.approx(disk, rel=0.01)
    assert a["perplexity"] == pytest.approx(ppl, rel=0.01)
    assert b["perplexity"] == pytest.approx(ppl0, rel=0.01)
    assert b["bytes"] == src_disk and b["params"] == n and b["sparsity"] < 0.01
    s = report["summary"]
    assert s["compression_ratio"] == pytest.approx(src_disk / disk, rel=1e-6)
    assert s["ppl_ratio"] == pytest.approx(ppl / ppl0, rel=0.01)
    assert s["accuracy_loss"] == pytest.approx(s["ppl_ratio"] - 1, abs=1e-9)
    sp = report["evaluation"]["speed"]  # interleaved rounds: a speed-up only when measurable
    assert ("speedup" in s) == sp["measurable"]
    if sp["measurable"]:
        assert s["speedup"] == pytest.approx(a["tokens_per_s"] / b["tokens_per_s"], rel=1e-6)
    assert s["wall_time_s"] > 0 and s["peak_rss_bytes"] > 50e6
    assert report["gate"]["passed"] is True and report["gate"]["max_ppl_increase"] == 1000.0
    assert report["recipe"] == [{"method": "magnitude", "params": {"sparsity": 0.5}}]
    st = report["stages"][0]
    assert st["method"] == "magnitude" and st["duration_s"] > 0
    assert st["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    assert report["device"]["device"] == "cpu"
    # the metric rows carry the same numbers
    rows = {(stage, name): v for stage, name, v, _ in outcome.metrics}
    for name in ("params", "nonzero_params", "bytes", "sparsity", "perplexity", "tokens_per_s"):
        assert rows[("before", name)] == pytest.approx(b[name])
        assert rows[("after", name)] == pytest.approx(a[name])
    for name in ("compression_ratio", "ppl_ratio", "wall_time_s", "peak_rss_bytes"):
        assert ("after", name) in rows
    assert rows[("0:magnitude", "duration_s")] > 0


def test_progress_monotonic_to_100(magnitude_run):
    _, progress, events = magnitude_run
    values = [p for p, _ in progress]
    assert values == sorted(values) and values[-1] == 100 and values[0] == 0
    assert all(isinstance(p, int) for p in values)
    assert any("0:magnitude" in label for _, label in progress)
    kinds = [k for k, _ in events]
    assert "metrics" in kinds and kinds[-1] == "done"


def test_quality_gate_miss(tiny_llama_dir, tmp_path):
    outcome = _run(tiny_llama_dir, [{"method": "magnitude", "params": {"sparsity": 0.7}}],
                   tmp_path / "out", max_ppl_increase=1e-3)
    assert outcome.gate_passed is False
    g = outcome.report["gate"]
    assert g["passed"] is False and g["max_ppl_increase"] == 1e-3
    assert g["ppl_ratio"] == pytest.approx(outcome.report["summary"]["ppl_ratio"])
    assert "above the allowed" in g["reason"]
    assert (tmp_path / "out" / "config.json").exists()  # the artifact is still written
    assert QUALITY_GATE["param"] == "max_ppl_increase"


def test_cancellation(tiny_llama_dir, tmp_path):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled):
        _run(tiny_llama_dir, [{"method": "magnitude", "params": {}}], tmp_path / "out",
             hooks=JobHooks(should_stop=stop))


def test_keep_intermediate_and_distill_stage(tiny_llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    events = []
    stages = [Stage(method="magnitude", params={"sparsity": 0.3}),
              {"method": "distill", "params": {"steps": 6, "seq_len": 32, "batch_size": 2,
                                               "checkpoint_every": 3, "log_every": 2,
                                               "lr": 1e-3}}]
    outcome = _run(tiny_llama_dir, stages, tmp_path / "out", keep_intermediate=True,
                   measure_stages=True,
                   hooks=JobHooks(checkpoints=LocalCheckpoints(ckpt),
                                  event=lambda k, d: events.append((k, d))))
    out = outcome.output_dir
    mid = AutoModelForCausalLM.from_pretrained(out / "stages" / "0-magnitude")
    assert E.linear_sparsity(mid) == pytest.approx(0.3, abs=0.01)
    final = AutoModelForCausalLM.from_pretrained(out)
    assert E.linear_sparsity(final) < 0.05  # distillation trained the pruned weights again
    st = outcome.report["stages"]
    assert st[0]["artifact"] == "stages/0-magnitude"
    assert "perplexity" in st[0]["metrics"] and "perplexity" in st[1]["metrics"]
    assert st[1]["metrics"]["steps"] == 6
    assert [c["step"] for c in st[1]["train_curve"]] == [2, 4, 6]
    assert any(k == "train" and d["stage"] == "1:distill" for k, d in events)
    assert (ckpt / "1-distill" / "distill-state.safetensors").is_file()
    # after-bytes count only the final model's files, not the kept stages
    assert outcome.report["after"]["bytes"] == sum(
        f.stat().st_size for f in out.glob("*.safetensors"))


def test_encoder_source(tiny_bert_dir, tmp_path):
    outcome = _run(tiny_bert_dir, [{"method": "magnitude", "params": {"sparsity": 0.5}}],
                   tmp_path / "out", max_ppl_increase=1.1)
    r = outcome.report
    assert "perplexity" not in r["after"] and 0 < r["after"]["embedding_fidelity"] < 1
    assert r["before"]["embedding_fidelity"] == 1.0
    assert r["gate"]["skipped"] and outcome.gate_passed
    AutoModel.from_pretrained(tmp_path / "out")


def test_output_dir_must_be_empty(tiny_llama_dir, tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(CompressionError, match="not empty"):
        _run(tiny_llama_dir, [{"method": "magnitude"}], tmp_path)


# ------------------------------------------------------------------ recipe validation


def test_validate_recipe_ok(tiny_llama):
    cfgs = validate_recipe([{"method": "magnitude", "params": {"sparsity": 0.4}},
                            {"method": "distill", "params": {"steps": 3}}], tiny_llama.config)
    assert cfgs[0].sparsity == 0.4 and cfgs[1].steps == 3
    assert validate_recipe({"stages": [{"method": "magnitude"}]})[0].sparsity == 0.5


@pytest.mark.parametrize("stages, exc, match", [
    ([], RecipeError, "at least one"),
    ([{"method": "magnitude"}] * 9, RecipeError, "at most 8"),
    ([{"method": "nope"}], UnknownMethodError, "unknown method"),
    ([{"method": "magnitude", "params": {"sparsity": 2}}], ValidationError, "sparsity"),
    ([{"method": "magnitude", "params": {"bogus": 1}}], ValidationError, "bogus"),
    ([{"method": "magnitude", "params": {}, "extra": 1}], RecipeError, "unknown key"),
    ([{"params": {}}], RecipeError, "method"),
    (["magnitude"], RecipeError, "expected an object"),
])
def test_validate_recipe_rejects(stages, exc, match):
    with pytest.raises(exc, match=match):
        validate_recipe(stages)


def test_validate_recipe_model_checks(tiny_bert):
    with pytest.raises(CompressionError, match="causal"):
        validate_recipe([{"method": "distill"}], tiny_bert.config)
    known = {"m-1"}
    validate_recipe([{"method": "distill", "params": {"teacher_model_id": "m-1"}}],
                    resolve_model=lambda mid: mid in known)
    with pytest.raises(RecipeError, match="not a registered model"):
        validate_recipe([{"method": "distill", "params": {"teacher_model_id": "m-2"}}],
                        resolve_model=lambda mid: mid in known)


class _PackCfg(MethodConfig):
    bits: int = 4


def _pack(model, cfg, ctx):
    return CompressionResult(model=model, packed=True, format="compressed-tensors")


@pytest.fixture
def fake_terminal(monkeypatch):
    m = Method(name="fakepack", config=_PackCfg, apply=_pack, description="test", family="quantization",
               terminal=True)
    monkeypatch.setitem(methods(), "fakepack", m)
    return m


def test_terminal_stage_must_be_last(fake_terminal):
    validate_recipe([{"method": "magnitude"}, {"method": "fakepack"}])
    with pytest.raises(RecipeError, match="must be the last stage"):
        validate_recipe([{"method": "fakepack"}, {"method": "magnitude"}])


def test_packed_result_uses_its_saver_and_format(fake_terminal, tiny_llama_dir, tmp_path):
    saved = []

    def saver(model, path):
        saved.append(path)
        model.save_pretrained(path)

    def pack(model, cfg, ctx):
        return CompressionResult(model=model, packed=True, saver=saver, format="compressed-tensors")

    methods()["fakepack"] = Method(name="fakepack", config=_PackCfg, apply=pack, description="t",
                                   family="quantization", terminal=True)
    outcome = _run(tiny_llama_dir, [{"method": "fakepack"}], tmp_path / "out")
    assert saved == [tmp_path / "out"]
    assert outcome.format == "compressed-tensors" and outcome.report["format"] == "compressed-tensors"


# ------------------------------------------------------------------ CLI


def test_cli_method(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = cli_main([str(tiny_llama_dir), "--method", "magnitude", "--set", "sparsity=0.5",
                     "--set", "scope=global", "--output", str(out), "-q", "--measure", "quality"])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == [{"method": "magnitude", "params": {"sparsity": 0.5, "scope": "global"}}]
    assert r["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "perplexity" in capsys.readouterr().out


def test_cli_recipe_yaml_and_gate(tiny_llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: magnitude\n    params:\n      pattern: '2:4'\n")
    ev = tmp_path / "eval.txt"
    ev.write_text(EVAL)
    code = cli_main([str(tiny_llama_dir), "--recipe", str(recipe), "--eval-file", str(ev),
                     "--max-ppl-increase", "0.001", "--output", str(tmp_path / "o"), "-q",
                     "--measure", "quality"])
    assert code == 3
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["gate"]["passed"] is False and r["after"]["sparsity"] == pytest.approx(0.5)
    assert "quality gate missed" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--method", "nope"], "unknown method"),
    (["--method", "magnitude", "--set", "sparsity=7"], "sparsity"),
    (["--method", "magnitude", "--set", "oops"], "KEY=VALUE"),
    (["--recipe", "/nonexistent.yaml"], "cannot read recipe"),
    (["--method", "magnitude", "--eval-file", "/nonexistent.txt"], "cannot read eval file"),
])
def test_cli_bad_input(tiny_llama_dir, tmp_path, capsys, args, match):
    code = cli_main([str(tiny_llama_dir), *args, "--output", str(tmp_path / "o")])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_bad_source_and_recipe(tmp_path, capsys):
    assert cli_main([str(tmp_path / "missing.gguf"), "--method", "magnitude",
                     "--output", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    bad = tmp_path / "r.json"
    bad.write_text('[{"method": "magnitude", "params": {}, "stage": 2}]')
    assert cli_main([str(tmp_path), "--recipe", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "unknown key" in capsys.readouterr().err


# ------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_magnitude_report_is_true(smollm2_dir, tmp_path, monkeypatch):
    """SmolLM2-135M, 2:4 magnitude: the report's after-numbers are those of the artifact."""
    import modelpress.compression.measure.job as MJ

    # one 512-token window of each text keeps this test short (perplexity is most of its time)
    ev = default_eval_text()[:8_000]
    other = MJ.other_domain_text()[:4_500]
    monkeypatch.setattr(MJ, "other_domain_text", lambda: other)
    outcome = run_pipeline(smollm2_dir, [{"method": "magnitude", "params": {"pattern": "2:4"}}],
                           tmp_path / "out", eval_text=ev, device="cpu", measure="quality",
                           eval_windows=1)
    r = outcome.report
    assert r["evaluation"]["perplexity"]["num_chunks"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert r["after"]["perplexity"] == pytest.approx(E.perplexity(model, tok, ev, num_chunks=1),
                                                     rel=0.01)
    assert r["after"]["perplexity_other"] == pytest.approx(
        E.perplexity(model, tok, other, num_chunks=1), rel=0.01)
    assert r["after"]["sparsity"] == pytest.approx(E.linear_sparsity(model), rel=0.01)
    assert r["after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert r["after"]["params"] == E.param_count(model) == r["before"]["params"]
    assert r["before"]["bytes"] == sum(f.stat().st_size for f in Path(smollm2_dir).glob("*.safetensors"))
    assert r["after"]["perplexity"] > r["before"]["perplexity"] > 5


@pytest.mark.parametrize("method, params", [("rtn", {"bits": 4, "group_size": 16}), ("int8", {})])
def test_quantized_job_reports_true_numbers(tiny_llama_dir, tmp_path, method, params):
    """A packed (compressed-tensors) artifact is measured decompressed: parameters count by
    their logical size, bytes are the packed files, and the perplexity is the artifact's."""
    from transformers import AutoModelForCausalLM

    from modelpress.compression.evaluation import param_count, perplexity
    from modelpress.compression.models import load_pretrained, weight_bytes

    outcome = _run(tiny_llama_dir, [{"method": method, "params": params}], tmp_path / "out")
    before, after = outcome.report["before"], outcome.report["after"]
    assert outcome.format == "compressed-tensors"
    assert after["params"] == before["params"]  # tied head kept, nothing removed
    assert after["bytes"] == weight_bytes(outcome.output_dir) < 0.5 * before["bytes"]
    # plain from_pretrained loads the packed artifact and runs it
    plain = AutoModelForCausalLM.from_pretrained(outcome.output_dir)
    assert plain(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == plain.config.vocab_size
    reloaded = load_pretrained(outcome.output_dir)
    assert param_count(reloaded.model) == after["params"]
    ppl = perplexity(reloaded.model, reloaded.tokenizer, EVAL)
    assert ppl == pytest.approx(after["perplexity"], rel=0.01)


def test_int8_dynamic_job_measures_its_int8_runtime(tiny_llama_dir, tmp_path, monkeypatch):
    """int8_dynamic's artifact loads in float (weights dequantized); the job's ``after`` speed and
    quality are of the int8 runtime that serving it on CPU uses (``Method.runtime``)."""
    from modelpress.compression.models import load_pretrained
    from modelpress.compression.quantization import int8_dynamic

    seen = []
    real = int8_dynamic.to_runtime

    def spy(model, *a, **kw):
        out = real(model, *a, **kw)
        seen.append(sum(isinstance(m, int8_dynamic.Int8DynamicLinear) for m in out.modules()))
        return out

    monkeypatch.setattr(int8_dynamic, "to_runtime", spy)
    outcome = _run(tiny_llama_dir, [{"method": "int8_dynamic", "params": {"smoothing_alpha": None}}],
                   tmp_path / "out", measure="full")
    r = outcome.report
    # once in the stage, once on the reloaded artifact; every Linear (and the head) in int8
    assert len(seen) == 2 and seen[1] == seen[0] > 0
    assert "int8_dynamic's runtime" in r["evaluation"]["after_measured_on"]
    # counts are of the logical weights (the int8 kernels keep theirs in buffers)
    assert r["after"]["params"] == r["before"]["params"]
    assert r["after"]["nonzero_params"] > 0.99 * r["before"]["nonzero_params"]
    served = real(load_pretrained(outcome.output_dir).model)
    tok = AutoTokenizer.from_pretrained(outcome.output_dir)
    assert r["after"]["perplexity"] == pytest.approx(E.perplexity(served, tok, EVAL), rel=1e-3)
    assert r["after"]["tokens_per_s"] > 0


def test_cli_stream_always_and_refusal(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code = cli_main([str(tiny_llama_dir), "--method", "rtn", "--set", "group_size=16",
                     "--stream", "always", "--output", str(out), "-q"])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    assert r["stages"][0]["streamed"] is True and r["evaluation"]["streamed"]["why"] == "asked for"
    assert r["after"]["perplexity"] > 0 and r["summary"]["compression_ratio"] > 3
    code = cli_main([str(tiny_llama_dir), "--method", "magnitude", "--set", "scope=global",
                     "--stream", "always", "--output", str(tmp_path / "m"), "-q"])
    assert code == 2 and "cannot stream" in capsys.readouterr().err

"""modelpress compress --measure / --baseline-cache / --tasks / --prompts on the tiny llama."""

from __future__ import annotations

import json

from modelpress.compression import cli_compress
from modelpress.compression.measure.quality import other_domain_text


def test_cli_reuses_the_baseline_and_gates_on_tasks(tiny_llama_dir, tmp_path, capsys):
    ev = tmp_path / "eval.txt"
    ev.write_text(other_domain_text()[:20_000])
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"question": q, "choices": ["sea", "land"], "gold": 0})
                               for q in ("The ship", "The army", "In the")) + "\n")
    base = [str(tiny_llama_dir), "--method", "magnitude", "--measure", "quality",
            "--eval-file", str(ev), "--baseline-cache", str(tmp_path / "bc"), "-q",
            "--device", "cpu", "--tasks", str(tasks), "--max-accuracy-drop", "1.0",
            "--eval-windows", "4"]
    assert cli_compress.main(base + ["-o", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert "reused" not in first and "task accuracy" in first
    assert cli_compress.main(base + ["-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "source numbers reused from the baseline cache" in out
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert r["evaluation"]["baseline"]["reused"] is True and r["gate"]["passed"] is True
    assert r["evaluation"]["tasks"]["n"] == 3
    assert r["evaluation"]["perplexity"]["num_chunks"] == 4


def test_cli_refuses_bad_measure_inputs(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "gold": 9}\n')
    args = [str(tiny_llama_dir), "--method", "magnitude", "-o", str(tmp_path / "o"), "-q"]
    assert cli_compress.main(args + ["--tasks", str(bad)]) == cli_compress.EXIT_BAD_INPUT
    assert "task set line 1: 'gold'" in capsys.readouterr().err
    assert cli_compress.main(args + ["--max-mean-kl", "0.1"]) == cli_compress.EXIT_BAD_INPUT
    assert "needs a prompt set" in capsys.readouterr().err
    assert cli_compress.main(args + ["--eval-windows", "0"]) == cli_compress.EXIT_BAD_INPUT
    assert "eval windows must be a whole number from 1 to 256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

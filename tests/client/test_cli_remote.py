"""The CLI against a running service (`modelpress up`: API, worker, sweep): upload with a
progress bar, submit --wait on a real (tiny) model, download with the SHA-256 checked, list,
events, compare, methods; exit codes 2 (bad input) and 3 (quality gate, on SmolLM2)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile

import pytest

from ..e2e.conftest import clean_env, python


def cli(service, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    base, key, _ = service
    return subprocess.run([python(), "-m", "modelpress", *args, "--url", base, "--api-key", key],
                          capture_output=True, text=True, timeout=timeout,
                          env=clean_env())


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_submit_wait_download_and_exit_codes(service, tiny_llama_dir, tmp_path):
    r = cli(service, "models", "upload", str(tiny_llama_dir), "--name", "tiny", "--progress")
    assert r.returncode == 0, r.stderr
    assert "upload" in r.stderr and "tiny" in r.stdout, "a bytes bar, then the model's row"
    models = json.loads(cli(service, "models", "list", "--json").stdout)
    assert [m["name"] for m in models] == ["tiny"]
    mid = models[0]["id"]
    methods = json.loads(cli(service, "methods", "--json").stdout)
    assert {"magnitude", "rtn"} <= {m["name"] for m in methods}

    out = tmp_path / "out.tar.gz"
    r = cli(service, "jobs", "submit", mid, "--method", "magnitude", "--set", "sparsity=0.5",
            "--eval-windows", "3", "--wait", "-o", str(out), "--json")
    assert r.returncode == 0, (r.stdout, r.stderr, service[2].text()[-3000:])
    job = json.loads(r.stdout)
    assert job["state"] == "succeeded" and job["progress"] == 100
    # the job's own window count wins over the service's MODELPRESS_EVAL_WINDOWS (2)
    import httpx

    report = httpx.get(f"{service[0]}/v1/jobs/{job['id']}/report", timeout=60,
                       headers={"Authorization": f"Bearer {service[1]}"}).json()
    assert job["eval_windows"] == 3 == report["evaluation"]["perplexity"]["num_chunks"]
    assert sha256(out) == job["artifact"]["sha256"]
    assert out.stat().st_size == job["artifact"]["bytes"]
    with tarfile.open(out) as tf:
        assert any(n.endswith("config.json") for n in tf.getnames())

    again = tmp_path / "again.tar.gz"
    r = cli(service, "jobs", "download", job["id"], "-o", str(again), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == sha256(again) == sha256(out)

    r = cli(service, "jobs", "events", job["id"], "--follow", "--json")
    evs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["data"]["to"] for e in evs if e["kind"] == "state"] == ["running", "succeeded"]
    listed = json.loads(cli(service, "jobs", "list", "--json").stdout)
    assert [j["id"] for j in listed] == [job["id"]]
    comp = json.loads(cli(service, "compare", mid, "--json").stdout)
    assert [row["job_id"] for row in comp["rows"]] == [job["id"]]

    r = cli(service, "jobs", "submit", mid, "--method", "magnitude", "--set", "sparsity=7")
    assert r.returncode == 2 and "invalid_params" in r.stderr
    r = cli(service, "jobs", "show", "no-such-job")
    assert r.returncode == 2 and "not_found" in r.stderr
    r = cli(service, "jobs", "submit", mid, "--recipe", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read recipe" in r.stderr
    assert json.loads(cli(service, "jobs", "list", "--json").stdout)[0]["id"] == job["id"], \
        "refused submissions made no job"


@pytest.mark.slow
def test_cli_on_smollm2_a_failed_quality_gate_exits_3(service, smollm2_gguf):
    """One job on the real model (quality measured before and after, no speed rounds: minutes
    on a CPU): 80% magnitude pruning with a 1.1x perplexity gate fails the gate -> exit code 3.
    A short eval text (two 512-token windows, uploaded as a dataset) and two windows of the
    other domain's text (the service's MODELPRESS_EVAL_WINDOWS) keep the measurement short."""
    import httpx

    from modelpress.compression.data import default_eval_text

    r = cli(service, "models", "upload", str(smollm2_gguf), "--json")
    assert r.returncode == 0, r.stderr
    mid = json.loads(r.stdout)["id"]
    base, key, _ = service
    up = httpx.post(f"{base}/v1/datasets", headers={"Authorization": f"Bearer {key}"},
                    files={"file": ("eval.txt", default_eval_text()[:6000].encode())},
                    data={"name": "eval"}, timeout=60)
    assert up.status_code == 201, up.text
    r = cli(service, "jobs", "submit", mid, "--method", "magnitude", "--set", "sparsity=0.8",
            "--max-ppl-increase", "1.1", "--measure", "quality", "--eval-dataset-id",
            up.json()["id"], "--wait", "--json", timeout=1100)
    gated = json.loads(r.stdout)
    got = (r.returncode, gated["state"], gated["error"]["code"])
    assert got == (3, "failed", "quality_gate"), (r.stderr, service[2].text()[-3000:])
    assert gated["eval_dataset_id"] == up.json()["id"]
    ppl = {m["stage"]: m["value"] for m in gated["metrics"] if m["name"] == "perplexity"}
    assert ppl["after"] > 1.1 * ppl["before"]


def test_submit_flags_make_the_job_body(tmp_path):
    from modelpress.cli import build_parser
    from modelpress.cli_remote import _submit_body

    args = build_parser().parse_args(
        ["jobs", "submit", "m1", "--method", "magnitude", "--set", "sparsity=0.5",
         "--set", "scope=global", "--measure", "quality", "--max-ppl-increase", "1.2",
         "--callback-url", "https://example.com/hook", "--eval-windows", "4"])
    assert _submit_body(args) == {"method": "magnitude",
                                  "params": {"sparsity": 0.5, "scope": "global"},
                                  "measure": "quality", "max_ppl_increase": 1.2,
                                  "callback_url": "https://example.com/hook", "eval_windows": 4}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: magnitude\n  params: {sparsity: 0.3}\n- method: rtn\n")
    args = build_parser().parse_args(["jobs", "submit", "m1", "--recipe", str(recipe)])
    assert _submit_body(args) == {"recipe": [{"method": "magnitude", "params": {"sparsity": 0.3}},
                                             {"method": "rtn"}]}


def test_remote_commands_import_neither_torch_nor_the_server(tmp_path):
    """A command against a service (and the Python client) starts in a fraction of a second: it
    needs httpx and the response schemas, not torch (seconds to import) nor fastapi/sqlalchemy."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: magnitude\n  params: {sparsity: 0.3}\n")
    code = f"""
import sys
from modelpress.cli import build_parser
from modelpress.cli_remote import _submit_body, run
from modelpress.client import Client
body = _submit_body(build_parser().parse_args(["jobs", "submit", "m", "--recipe", {str(recipe)!r}]))
assert body["recipe"][0]["method"] == "magnitude", body
print(sorted(m for m in ("torch", "fastapi", "sqlalchemy", "transformers") if m in sys.modules))
"""
    r = subprocess.run([python(), "-c", code], capture_output=True, text=True, env=clean_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

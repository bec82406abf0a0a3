"""`modelpress up`: embedded mode in one command, with nothing but a temporary MODELPRESS_HOME
(SQLite, the SQLite-backed Celery transport, a local artifact directory). The whole flow over
HTTP, then SIGTERM and no process left behind."""

from __future__ import annotations

import hashlib
import os
import signal
import tarfile
import time

import psutil
import pytest

from .conftest import Client, clean_env, free_port, metric, python, untar


@pytest.fixture
def tiny_llama_tgz(tiny_llama_dir, tmp_path):
    p = tmp_path / "tiny-llama.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        tf.add(tiny_llama_dir, arcname="tiny-llama")
    return p


def test_up_runs_a_job_end_to_end_and_stops_cleanly(procs, tmp_path, tiny_llama_tgz):
    from transformers import AutoModelForCausalLM

    from modelpress.compression.evaluation import linear_sparsity

    home = tmp_path / "home"
    port = free_port()
    up = procs("up", [python(), "-m", "modelpress", "up", "--port", str(port)],
               clean_env(MODELPRESS_HOME=str(home)), cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    up.wait_http(base + "/healthz", timeout=180)

    key = (home / "api-key").read_text().strip()
    assert key.startswith("mp_")
    assert oct((home / "api-key").stat().st_mode & 0o777) == "0o600"
    assert up.text().count(key) == 1, "the generated key is printed once"
    assert (home / "modelpress.db").is_file()
    # the SQLite broker file appears when the worker (or the first publish) connects, which may
    # be a moment after the API answers
    deadline = time.monotonic() + 120
    while not (home / "broker.db").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (home / "broker.db").is_file()

    c = Client(base, key)
    assert c.http.get("/readyz").status_code == 200, c.http.get("/readyz").text
    assert c.http.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401

    model = c.upload_model(tiny_llama_tgz, "tiny")
    # quality only: the speed rounds (fresh processes) have tests of their own
    job = c.submit(model_id=model["id"], method="magnitude", params={"sparsity": 0.5},
                   measure="quality")
    assert job["state"] == "queued" and job["queue"] == "cpu"
    job = c.wait(job["id"], timeout=240, logs=up.text)
    assert job["state"] == "succeeded", (job["error"], up.text()[-4000:])
    assert job["attempt"] == 1 and job["progress"] == 100
    art = job["artifact"]
    assert art["ready"] and art["format"] == "hf-safetensors"

    dest = tmp_path / "artifact.tar.gz"
    r = c.download(job["id"], dest)
    data = dest.read_bytes()
    assert len(data) == art["bytes"]
    assert hashlib.sha256(data).hexdigest() == art["sha256"] == r.headers["x-checksum-sha256"]
    names = untar(dest, tmp_path / "x")
    assert {n.split("/")[0] for n in names} == {job["id"]}
    out = tmp_path / "x" / job["id"]
    lm = AutoModelForCausalLM.from_pretrained(out)
    measured = linear_sparsity(lm)
    assert measured == pytest.approx(0.5, abs=0.02)
    assert metric(job, "after", "sparsity") == pytest.approx(measured, abs=1e-6)
    assert metric(job, "after", "params") == sum(p.numel() for p in lm.parameters())
    assert c.http.get(f"/v1/jobs/{job['id']}/report").status_code == 200

    # the worker and everything it started are children of `modelpress up`
    children = psutil.Process(up.pid).children(recursive=True)
    assert children, "the embedded worker runs as a child process"
    os.kill(up.pid, signal.SIGTERM)
    up.popen.wait(60)
    assert up.popen.returncode == 0, up.text()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                              for p in children):
        time.sleep(0.2)
    left = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"

    # a second `up` on the same home reuses the saved key and the finished job is still there
    port2 = free_port()
    up2 = procs("up2", [python(), "-m", "modelpress", "up", "--port", str(port2)],
                clean_env(MODELPRESS_HOME=str(home)), cwd=tmp_path)
    up2.wait_http(f"http://127.0.0.1:{port2}/healthz", timeout=180)
    c2 = Client(f"http://127.0.0.1:{port2}", key)
    assert c2.job(job["id"])["state"] == "succeeded"
    assert key not in up2.text()
    up2.stop(signal.SIGTERM, timeout=60)

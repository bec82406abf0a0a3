"""The production shape on one machine: `modelpress api` (uvicorn) and `modelpress worker`
processes on PostgreSQL, Redis and S3 (moto's server). The real SmolLM2-135M GGUF is uploaded
over HTTP, pruned 50 % by magnitude, downloaded through the presigned redirect and loaded with
plain from_pretrained."""

from __future__ import annotations

import hashlib
import secrets
import uuid

import pytest

from .conftest import Client, clean_env, free_port, metric, python, untar


@pytest.fixture
def own_pg(scratch_db):
    with scratch_db("mp_e2e") as url:
        yield url


@pytest.mark.slow
def test_smollm2_gguf_through_api_worker_postgres_redis_s3(procs, tmp_path, own_pg, redis_url,
                                                            s3_endpoint, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    from modelpress.compression.evaluation import linear_sparsity
    from modelpress.compression.models import weight_bytes

    key = "mp_" + secrets.token_urlsafe(24)
    env = clean_env(
        MODELPRESS_HOME=str(tmp_path / "home"), MODELPRESS_DATABASE_URL=own_pg,
        MODELPRESS_BROKER_URL=redis_url, MODELPRESS_STORE="s3",
        MODELPRESS_S3_ENDPOINT_URL=s3_endpoint, MODELPRESS_S3_BUCKET=f"e2e-{uuid.uuid4().hex[:8]}",
        MODELPRESS_S3_ACCESS_KEY_ID="testing", MODELPRESS_S3_SECRET_ACCESS_KEY="testing",
        MODELPRESS_API_KEY=key, MODELPRESS_DEVICE="cpu", MODELPRESS_HEARTBEAT_S="2",
        MODELPRESS_EVAL_WINDOWS="2")

    migrate = procs("migrate", [python(), "-m", "modelpress", "migrate"], env)
    assert migrate.popen.wait(120) == 0, migrate.text()
    port = free_port()
    api = procs("api", [python(), "-m", "modelpress", "api", "--port", str(port)], env)
    worker = procs("worker", [python(), "-m", "modelpress", "worker", "--queues", "cpu,gpu",
                              "--pool", "solo", "--beat", "--hostname", "e2e@%h"], env)
    base = f"http://127.0.0.1:{port}"
    api.wait_http(base + "/healthz", timeout=120)
    worker.wait_log(" ready.", timeout=120)
    c = Client(base, key)
    ready = c.http.get("/readyz")
    assert ready.status_code == 200, ready.text

    model = c.upload_model(smollm2_gguf, "smollm2-135m")
    assert model["kind"] == "gguf" and model["model_type"] == "llama"
    # a short held-out text, two windows of each text and no speed rounds keep the measurement
    # cheap on CI's two cores (and exercise the dataset path: upload -> store -> worker)
    from modelpress.compression.data import default_eval_text

    ev_path = tmp_path / "eval.txt"
    ev_path.write_text(default_eval_text()[:6000], encoding="utf-8")
    with open(ev_path, "rb") as f:
        r = c.http.post("/v1/datasets", files={"file": ("eval.txt", f)}, data={"name": "eval"})
    assert r.status_code == 201, r.text
    job = c.submit(model_id=model["id"], method="magnitude", params={"sparsity": 0.5},
                   eval_dataset_id=r.json()["id"], measure="quality")
    job = c.wait(job["id"], timeout=1000, logs=lambda: worker.text() + api.text())
    assert job["state"] == "succeeded", (job["error"], worker.text()[-4000:])
    art = job["artifact"]
    assert art["ready"]

    dest = tmp_path / "artifact.tar.gz"
    r = c.download(job["id"], dest)
    assert r.history and r.history[0].status_code == 307, "S3: redirect to a presigned URL"
    assert r.url.host == "127.0.0.1" and str(r.url).startswith(s3_endpoint)
    data = dest.read_bytes()
    assert len(data) == art["bytes"]
    assert hashlib.sha256(data).hexdigest() == art["sha256"]
    names = untar(dest, tmp_path / "x")
    assert {n.split("/")[0] for n in names} == {job["id"]}
    out = tmp_path / "x" / job["id"]

    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    measured = linear_sparsity(lm)
    assert measured == pytest.approx(0.5, abs=0.01)
    params = sum(p.numel() for p in lm.parameters())
    assert 130e6 < params < 140e6
    assert metric(job, "after", "sparsity") == pytest.approx(measured, abs=1e-6)
    assert metric(job, "after", "params") == params
    assert metric(job, "after", "bytes") == weight_bytes(out)
    assert metric(job, "before", "sparsity") < 0.05
    assert art["unpacked_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report = c.http.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["evaluation"]["eval_text"] == "custom"
    assert report["evaluation"]["perplexity"]["num_chunks"] == 2  # the worker's setting
    kinds = [e["kind"] for e in c.events(job["id"])]
    assert "artifact" in kinds and "state" in kinds

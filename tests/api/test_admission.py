"""Admission at submission (issue 14): a job's peak memory estimated from the model's config
against a worker's memory; a job that can never fit is a 422 that writes nothing, a fitting one
stores its estimate, and the report shows it beside the measured peak. An unsupported
(method, model_type) pair is a 422 naming the supported model types."""

from __future__ import annotations

from modelpress.api.services.jobs import config_cache
from modelpress.compression.streaming.estimate import estimate_job
from modelpress.domain.jobs import transition
from modelpress.domain.models import Job
from modelpress.domain.states import JobState

from .conftest import make_tar

GPTQ = {"method": "gptq", "params": {"bits": 4, "group_size": 32, "num_samples": 4, "seq_len": 64}}


def _submit(client, headers, model_id, stage):
    return client.post("/v1/jobs", headers=headers, json={"model_id": model_id, **stage})


def test_a_job_that_cannot_fit_is_422_with_both_numbers_and_writes_nothing(
        client, alice, model_id, published, counts, monkeypatch):
    capacity = 64 * 2**20  # below what any job takes (the process alone is ~0.45 GiB)
    monkeypatch.setattr(client.app.state.settings, "worker_memory_bytes", capacity)
    before = counts()
    for stage in (GPTQ, {"method": "magnitude", "params": {"sparsity": 0.5}}):
        r = _submit(client, alice[1], model_id, stage)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "job_too_large"
        need = err["details"]["estimated_peak_bytes"]
        assert err["details"]["worker_memory_bytes"] == capacity and need > capacity
        assert f"needs about {need / 2**30:.1f} GiB" in err["message"]
        assert "a worker has 0.1 GiB" in err["message"]
    assert counts() == before
    assert published == []


def test_a_fitting_job_stores_its_estimate(client, alice, model_id, published, db):
    r = _submit(client, alice[1], model_id, GPTQ)
    assert r.status_code == 201, r.text
    job = r.json()
    db.rollback()
    cfg = config_cache.get(db, model_id)
    capacity = client.app.state.settings.resolved_worker_memory_bytes
    want = estimate_job(cfg, [GPTQ], capacity).peak_bytes
    assert job["estimated_peak_bytes"] == want == db.get(Job, job["id"]).estimated_peak_bytes
    assert 0.4 * 2**30 < want < capacity
    got = client.get(f"/v1/jobs/{job['id']}", headers=alice[1]).json()
    assert got["estimated_peak_bytes"] == want
    listed = client.get("/v1/jobs", headers=alice[1]).json()["items"]
    assert [j["estimated_peak_bytes"] for j in listed if j["id"] == job["id"]] == [want]


def test_recipe_estimate_is_the_largest_stage(client, alice, model_id, published, db):
    recipe = [{"method": "magnitude", "params": {"sparsity": 0.5}}, GPTQ]
    r = client.post("/v1/jobs", headers=alice[1], json={"model_id": model_id, "recipe": recipe})
    assert r.status_code == 201, r.text
    db.rollback()
    cfg = config_cache.get(db, model_id)
    capacity = client.app.state.settings.resolved_worker_memory_bytes
    alone = [estimate_job(cfg, [s], capacity) for s in recipe]
    assert not any(e.streamed for e in alone)  # a tiny model runs whole
    assert r.json()["estimated_peak_bytes"] == max(e.peak_bytes for e in alone)


def test_report_shows_the_estimate_beside_the_measured_peak(client, alice, model_id, published,
                                                            db):
    job_id = _submit(client, alice[1], model_id, GPTQ).json()["id"]
    db.rollback()
    job = db.get(Job, job_id)
    transition(db, job, JobState.running)
    transition(db, job, JobState.succeeded)
    job.report = {"summary": {"peak_rss_bytes": 600_000_000.0}, "stages": ["gptq"]}
    db.commit()
    rep = client.get(f"/v1/jobs/{job_id}/report", headers=alice[1]).json()
    est = job.estimated_peak_bytes
    assert rep["memory"] == {"estimated_peak_bytes": est,
                             "measured_peak_rss_bytes": 600_000_000.0,
                             "measured_over_estimated": 600_000_000.0 / est}
    assert rep["summary"] == {"peak_rss_bytes": 600_000_000.0}


def test_unsupported_method_for_the_model_type_names_what_is_supported(
        client, alice, tiny_bert_dir, published, counts):
    r = client.post("/v1/models", headers=alice[1],
                    files={"file": ("bert.tar", make_tar(tiny_bert_dir, "bert"))})
    assert r.status_code == 201, r.text
    before = counts()
    for method in ("gptq", "heads"):
        r2 = _submit(client, alice[1], r.json()["id"], {"method": method})
        assert r2.status_code == 422, r2.text
        msg = r2.json()["error"]["message"]
        assert f"method {method!r} supports model types [" in msg and "'llama'" in msg
        assert "not 'bert'" in msg
    assert counts() == before

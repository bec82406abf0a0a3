"""Issue 5: GET /v1/jobs/{id}/report and GET /v1/models/{id}/comparison (JSON, PNG, SVG)."""

from __future__ import annotations

import pytest

from modelpress.domain.jobs import transition
from modelpress.domain.models import Artifact, Job, Metric
from modelpress.domain.states import JobState

BEFORE = {"bytes": 1_000_000.0, "params": 250_000.0, "perplexity": 20.0, "tokens_per_s": 100.0}


def _finished(client, headers, model_id, db, recipe, after, *, state=JobState.succeeded,
              error_code=None, report=None):
    job_id = client.post("/v1/jobs", headers=headers,
                         json={"model_id": model_id, "recipe": recipe}).json()["id"]
    db.rollback()
    job = db.get(Job, job_id)
    transition(db, job, JobState.running)
    transition(db, job, state, error_code=error_code,
               error="quality gate missed" if error_code else None)
    job.report = report
    for name, v in BEFORE.items():
        db.add(Metric(job_id=job_id, stage="before", name=name, value=v))
    for name, v in after.items():
        db.add(Metric(job_id=job_id, stage="after", name=name, value=v))
    db.add(Artifact(job_id=job_id, uri="x", store_key=f"jobs/{job_id}/model.tar.gz",
                    bytes=int(after["bytes"] * 0.9), sha256="0" * 64, format="hf-safetensors",
                    ready=state is JobState.succeeded))
    db.commit()
    return job_id


def _after(bytes_, ppl, speedup=1.0):
    return {"bytes": bytes_, "perplexity": ppl, "ppl_ratio": ppl / BEFORE["perplexity"],
            "compression_ratio": BEFORE["bytes"] / bytes_, "speedup": speedup,
            "params": 250_000.0, "nonzero_params": 125_000.0}


@pytest.fixture
def compared(client, alice, model_id, db, published):
    mag = [{"method": "magnitude", "params": {"sparsity": 0.5}}]
    a = _finished(client, alice[1], model_id, db, mag, _after(500_000, 24.0, 1.2),
                  report={"gate_passed": True, "stages": ["magnitude"]})
    # dominated by a: bigger and worse
    b = _finished(client, alice[1], model_id, db, [{"method": "magnitude", "params": {}}],
                  _after(600_000, 30.0))
    # smaller but worse than a: on the frontier; failed the quality gate
    c = _finished(client, alice[1], model_id, db,
                  [{"method": "magnitude", "params": {"sparsity": 0.9}},
                   {"method": "magnitude", "params": {"pattern": "2:4"}}],
                  _after(250_000, 80.0), state=JobState.failed, error_code="quality_gate")
    # not finished, never in the table
    client.post("/v1/jobs", headers=alice[1], json={"model_id": model_id, "method": "magnitude"})
    return a, b, c


def test_report(client, alice, bob, compared):
    a, b, _ = compared
    rep = client.get(f"/v1/jobs/{a}/report", headers=alice[1]).json()
    assert rep.pop("memory")["measured_peak_rss_bytes"] is None  # none in this report
    assert rep == {"gate_passed": True, "stages": ["magnitude"]}
    r = client.get(f"/v1/jobs/{b}/report", headers=alice[1])
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_report"
    assert client.get(f"/v1/jobs/{a}/report", headers=bob[1]).status_code == 404
    assert client.get(f"/v1/jobs/{a}", headers=alice[1]).json()["has_report"] is True


def test_comparison_json(client, alice, bob, model_id, compared):
    a, b, c = compared
    r = client.get(f"/v1/models/{model_id}/comparison", headers=alice[1])
    assert r.status_code == 200, r.text
    comp = r.json()
    assert comp["quality_metric"] == "perplexity"
    rows = {row["job_id"]: row for row in comp["rows"]}
    assert set(rows) == {a, b, c}
    ra = rows[a]
    assert ra["label"] == "magnitude(sparsity=0.5)" and ra["methods"] == ["magnitude"]
    assert ra["settings"] == [{"sparsity": 0.5}]
    assert ra["compression_ratio"] == pytest.approx(2.0)
    assert ra["accuracy_loss"] == pytest.approx(0.2)
    assert ra["speedup"] == pytest.approx(1.2)
    assert ra["perplexity"] == 24.0 and ra["bytes"] == 500_000 and ra["params"] == 250_000
    assert ra["artifact_bytes"] == 450_000
    assert rows[c]["label"] == "magnitude(sparsity=0.9) + magnitude(pattern=2:4)"
    assert rows[c]["gate_passed"] is False and rows[c]["state"] == "failed"
    assert rows[c]["accuracy_loss"] == pytest.approx(3.0)
    # Pareto: the baseline (largest, best), a, and c (smallest) -- b is dominated by a
    assert comp["baseline"]["perplexity"] == 20.0 and comp["baseline"]["pareto"] is True
    assert (ra["pareto"], rows[b]["pareto"], rows[c]["pareto"]) == (True, False, True)
    assert client.get(f"/v1/models/{model_id}/comparison", headers=bob[1]).status_code == 404


def test_comparison_plots(client, alice, model_id, compared):
    url = f"/v1/models/{model_id}/comparison"
    png = client.get(url, headers=alice[1], params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n" and len(png.content) > 10_000
    svg = client.get(url, headers=alice[1], params={"format": "svg"})
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    text = svg.text
    assert "<svg" in text and "Pareto frontier" in text and "magnitude(sparsity=0.5)" in text
    assert client.get(url, headers=alice[1], params={"format": "bmp"}).status_code == 422


def test_comparison_empty(client, alice, model_id):
    comp = client.get(f"/v1/models/{model_id}/comparison", headers=alice[1]).json()
    assert comp["rows"] == [] and comp["baseline"] is None and comp["quality_metric"] is None
    png = client.get(f"/v1/models/{model_id}/comparison", headers=alice[1],
                     params={"format": "png"})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_pareto_front():
    from modelpress.api.services.reports import pareto_front

    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0)]
    assert pareto_front(pts) == {0, 1, 3, 4}

"""Idempotency keys, request limits (JSON body size, per-owner job quota and request rate) and
hostile strings: every one answered with a clear 4xx that changes nothing."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from modelpress.domain import models as orm

from .test_concurrency import ServerThread


@pytest.fixture
def limited(settings_env, pg_url, redis_url, published):
    """A client factory: the app with the given limit settings."""
    clients = []

    def make(**limits) -> TestClient:
        settings_env(database_url=pg_url, broker_url=redis_url, **limits)
        from modelpress.api.app import create_app

        c = TestClient(create_app())
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _job(model_id: str, sparsity: float = 0.5) -> dict:
    return {"model_id": model_id, "method": "magnitude", "params": {"sparsity": sparsity}}


def _jobs_of(db, owner: str) -> int:
    db.rollback()
    return db.scalar(select(func.count()).select_from(orm.Job).where(orm.Job.owner == owner))


# ------------------------------------------------------------------------------ idempotency
def test_idempotency_key_replays_the_same_job(client, alice, bob, model_id, db, published):
    owner, h = alice
    hk = {**h, "Idempotency-Key": "submit-1"}
    r1 = client.post("/v1/jobs", headers=hk, json=_job(model_id))
    r2 = client.post("/v1/jobs", headers=hk, json=_job(model_id))
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert r2.json()["id"] == r1.json()["id"]
    assert r2.json()["params"] == r1.json()["params"] == {"sparsity": 0.5}
    assert _jobs_of(db, owner) == 1 and len(published) == 1

    r3 = client.post("/v1/jobs", headers=hk, json=_job(model_id, 0.3))  # other body
    assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_key_reused"
    assert _jobs_of(db, owner) == 1

    # keys are per owner: bob's "submit-1" is his own (and alice's model is not his: 404)
    rb = client.post("/v1/jobs", headers={**bob[1], "Idempotency-Key": "submit-1"},
                     json=_job(model_id))
    assert rb.status_code == 404
    assert client.post("/v1/jobs", headers={**h, "Idempotency-Key": "bad key\t"},
                       json=_job(model_id)).status_code == 400


def test_failed_request_does_not_consume_the_key(client, alice, model_id, db):
    owner, h = alice
    hk = {**h, "Idempotency-Key": "k-fix-and-retry"}
    bad = client.post("/v1/jobs", headers=hk, json=_job(model_id, 1.5))
    assert bad.status_code == 422
    ok = client.post("/v1/jobs", headers=hk, json=_job(model_id, 1.5 - 1.0))
    assert ok.status_code == 201 and _jobs_of(db, owner) == 1


def test_idempotency_keys_expire(limited, alice, db, tiny_llama_tar):
    c = limited(idempotency_ttl_s=1)
    owner, h = alice
    mid = c.post("/v1/models", headers=h, files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]
    hk = {**h, "Idempotency-Key": "expiring"}
    first = c.post("/v1/jobs", headers=hk, json=_job(mid))
    time.sleep(1.2)
    again = c.post("/v1/jobs", headers=hk, json=_job(mid))
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json()["id"] != again.json()["id"] and _jobs_of(db, owner) == 2


def test_concurrent_requests_with_one_key_make_one_job(app_settings, published, alice, db,
                                                       tiny_llama_tar):
    from modelpress.api.app import create_app

    owner, h = alice
    with ServerThread(create_app()) as base:
        mid = httpx.post(f"{base}/v1/models", headers=h, timeout=60,
                         files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]

        async def many():
            async with httpx.AsyncClient(base_url=base, timeout=60,
                                         headers={**h, "Idempotency-Key": "race"}) as c:
                return await asyncio.gather(*(c.post("/v1/jobs", json=_job(mid))
                                              for _ in range(30)))

        rs = asyncio.run(many())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 29 + [201], codes
    assert len({r.json()["id"] for r in rs}) == 1
    assert _jobs_of(db, owner) == 1 and len(published) == 1


def test_hub_registration_idempotent(client, alice, monkeypatch, db):
    from transformers import LlamaConfig

    import modelpress.compression.models as cm

    monkeypatch.setattr(cm, "read_config", lambda src, revision=None: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
    hk = {**alice[1], "Idempotency-Key": "hub-1"}
    body = {"source": "org/some-model"}
    r1 = client.post("/v1/models", headers=hk, json=body)
    r2 = client.post("/v1/models", headers=hk, json=body)
    assert (r1.status_code, r2.status_code) == (201, 200) and r1.json()["id"] == r2.json()["id"]
    assert client.post("/v1/models", headers=hk, json={"source": "org/other"}).status_code == 409
    db.rollback()
    assert db.scalar(select(func.count()).select_from(orm.ModelSource).where(
        orm.ModelSource.owner == alice[0])) == 1


# ----------------------------------------------------------------------------------- limits
def test_json_body_limit(limited, alice, counts):
    c = limited(max_json_body_bytes=4096)
    before = counts()
    r = c.post("/v1/jobs", headers=alice[1], json={"model_id": "x" * 5000, "method": "rtn"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # chunked (no Content-Length) is cut off the same way
    r = c.post("/v1/jobs", headers={**alice[1], "Content-Type": "application/json"},
               content=iter([b'{"model_id": "', b"x" * 5000, b'"}']))
    assert r.status_code == 413
    assert counts() == before


def test_job_quota(limited, alice, bob, db, tiny_llama_tar):
    c = limited(max_active_jobs_per_owner=2)
    owner, h = alice
    mid = c.post("/v1/models", headers=h, files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]
    ids = [c.post("/v1/jobs", headers=h, json=_job(mid)).json()["id"] for _ in range(2)]
    r = c.post("/v1/jobs", headers=h, json=_job(mid))
    assert r.status_code == 429 and r.json()["error"]["code"] == "job_quota_exceeded"
    assert int(r.headers["Retry-After"]) >= 1 and _jobs_of(db, owner) == 2
    # a finished (cancelled) job frees its slot
    assert c.post(f"/v1/jobs/{ids[0]}/cancel", headers=h).status_code == 200
    assert c.post("/v1/jobs", headers=h, json=_job(mid)).status_code == 201


def test_rate_limit_per_owner(limited, alice, bob):
    c = limited(rate_limit_per_s=0.5, rate_limit_burst=3)
    codes = [c.get("/v1/jobs", headers=alice[1]).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = c.get("/v1/jobs", headers=alice[1])
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 2
    assert r.json()["error"]["code"] == "rate_limited"
    assert c.get("/v1/jobs", headers=bob[1]).status_code == 200  # per owner


# --------------------------------------------------------------------------- hostile strings
@pytest.mark.parametrize("url", [
    "/v1/jobs/abc%00def", "/v1/models/%00", "/v1/datasets/x%00", "/v1/jobs?model_id=a%00b",
    "/v1/jobs?cursor=%00", "/v1/jobs?method=%00", "/v1/jobs/abc%00/artifact",
    "/v1/models/a%00/comparison"])
def test_nul_in_urls_is_400(client, alice, url):
    r = client.get(url, headers=alice[1])
    assert r.status_code == 400, (url, r.status_code, r.text)


def test_nul_in_json_ids_is_422(client, alice, model_id, counts):
    before = counts()
    for body in ({"model_id": "a\x00b", "method": "magnitude"},
                 {"model_id": model_id, "method": "magnitude", "calibration_dataset_id": "\x00"},
                 {"model_id": model_id, "method": "mag\x00nitude"}):
        r = client.post("/v1/jobs", headers=alice[1], json=body)
        assert r.status_code == 422, r.text
    r = client.post("/v1/models", headers=alice[1], json={"source": "org/m\x00"})
    assert r.status_code == 422
    assert counts() == before


def test_huge_id_is_not_echoed(client, alice):
    big = "z" * 200_000
    r = client.post("/v1/jobs", headers=alice[1], json={"model_id": big, "method": "magnitude"})
    assert r.status_code == 404
    assert len(r.text) < 1000 and big[:1000] not in r.text


def test_names_and_sources_over_the_limits(client, alice, tiny_llama_tar, counts):
    before = counts()
    r = client.post("/v1/models", headers=alice[1], data={"name": "n" * 501},
                    files={"file": ("t.tar", tiny_llama_tar)})
    assert r.status_code == 422, r.text
    r = client.post("/v1/models", headers=alice[1], data={"name": "a\x00b"},
                    files={"file": ("t.tar", tiny_llama_tar)})
    assert r.status_code == 422, r.text
    r = client.post("/v1/datasets", headers=alice[1], data={"name": "d" * 501},
                    files={"file": ("d.txt", b"some text")})
    assert r.status_code == 422, r.text
    r = client.post("/v1/models", headers=alice[1], json={"source": "a" * 500})
    assert r.status_code == 422, r.text  # was ENAMETOOLONG from Path(source).exists(): 500
    assert counts() == before


def test_deeply_nested_config_json(client, alice, counts):
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("config.json")
        ti.size = len(nested)
        tf.addfile(ti, io.BytesIO(nested))
    before = counts()
    r = client.post("/v1/models", headers=alice[1], files={"file": ("m.tar", buf.getvalue())})
    assert r.status_code == 422, r.text
    assert counts() == before


def test_deeply_nested_json_body(client, alice):
    body = '{"model_id": "x", "method": "magnitude", "params": {"a": ' + "[" * 50_000 + \
        "]" * 50_000 + "}}"
    r = client.post("/v1/jobs", headers={**alice[1], "Content-Type": "application/json"},
                    content=body)
    assert 400 <= r.status_code < 500, r.text


@pytest.mark.parametrize("raw", [
    '"max_ppl_increase": Infinity', '"max_ppl_increase": NaN', '"max_ppl_increase": 1e999',
])
def test_non_finite_quality_gate_refused(client, alice, model_id, raw):
    body = f'{{"model_id": "{model_id}", "method": "magnitude", {raw}}}'
    r = client.post("/v1/jobs", headers={**alice[1], "Content-Type": "application/json"},
                    content=body)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("method,params", [
    ("magnitude", {"sparsity": "0.5"}),          # a string is not a number
    ("magnitude", '{"sparsity": Infinity}'),
    ("distill", {"max_minutes": 1e12}),
])
def test_strict_method_params(client, alice, model_id, counts, method, params):
    before = counts()
    p = params if isinstance(params, str) else json.dumps(params)
    body = f'{{"model_id": "{model_id}", "method": "{method}", "params": {p}}}'
    r = client.post("/v1/jobs", headers={**alice[1], "Content-Type": "application/json"},
                    content=body)
    assert r.status_code == 422, r.text
    assert counts() == before


# ----------------------------------------------------------------------------- server paths
def test_no_server_paths_in_responses(client, alice, model_id, db, tmp_path):
    import tempfile

    roots = (str(tmp_path), tempfile.gettempdir() + "/", "/home/", "/work/", "/root/")
    h = alice[1]
    m = client.get(f"/v1/models/{model_id}", headers=h)
    assert m.status_code == 200 and not any(r in json.dumps(m.json()) for r in roots)

    job_id = client.post("/v1/jobs", headers=h, json=_job(model_id)).json()["id"]
    db.rollback()
    job = db.get(orm.Job, job_id)
    job.state, job.error_code = "failed", "invalid_model"
    job.error = f"cannot read {tmp_path}/work/job-{job_id}-a1-x/model/config.json: bad"
    job.report = {"source": f"{tmp_path}/cache/models/{model_id}/abc/model",
                  "stages": [{"dir": "/var/lib/modelpress/work/job/stage-0"}],
                  "hub": "org/name", "url": "http://example.com/a/b"}
    db.add(orm.JobEvent(job_id=job_id, kind="error", message=f"at {tmp_path}/x/y.py line 3",
                        data={"path": f"{tmp_path}/a/b"}))
    db.commit()
    bodies = [client.get(u, headers=h).json() for u in (
        f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/report", f"/v1/jobs/{job_id}/events",
        "/v1/jobs")]
    text = json.dumps(bodies)
    assert not any(r in text for r in roots + ("/var/lib",)), text
    job_out, report = bodies[0], bodies[1]
    assert job_out["error"]["message"] == "cannot read config.json: bad"
    assert report["source"] == "model" and report["hub"] == "org/name"
    assert report["url"] == "http://example.com/a/b"


def test_unpaired_surrogates_and_out_of_range_numbers(client, alice, model_id, counts):
    from fastapi.testclient import TestClient

    c = TestClient(client.app, raise_server_exceptions=False)
    h = {**alice[1], "Content-Type": "application/json"}
    before = counts()
    for body in ('{"model_id": "\\ud800", "method": "magnitude"}',
                 f'{{"model_id": "{model_id}", "method": "magnitude", "eval_dataset_id": "\\udfff"}}',
                 '{"source": "org/x", "name": "a\\udc00"}'):
        url = "/v1/models" if "source" in body else "/v1/jobs"
        r = c.post(url, headers=h, content=body)
        assert r.status_code == 422, (body, r.text)
    # a paired surrogate is ordinary text (an emoji)
    r = c.post("/v1/jobs", headers=h, content='{"model_id": "\\ud83d\\ude00", "method": "rtn"}')
    assert r.status_code == 404
    job = c.post("/v1/jobs", headers=h, json=_job(model_id)).json()["id"]
    r = c.get(f"/v1/jobs/{job}/events?after=99999999999999999999", headers=h)
    assert r.status_code == 422
    assert counts()["jobs"] == before["jobs"] + 1


def test_expired_keys_are_purged(limited, alice, bob, db, tiny_llama_tar, monkeypatch):
    from modelpress.api.services import idempotency

    c = limited(idempotency_ttl_s=1)
    mid = c.post("/v1/models", headers=alice[1],
                 files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]
    for i in range(3):
        c.post("/v1/jobs", headers={**alice[1], "Idempotency-Key": f"old-{i}"}, json=_job(mid))
    time.sleep(1.2)
    monkeypatch.setattr(idempotency, "PURGE_SHARE", 1.0)  # this claim purges
    r = c.post("/v1/datasets", headers={**bob[1], "Idempotency-Key": "new"},
               files={"file": ("d.txt", b"text " * 10)})
    assert r.status_code == 201
    db.rollback()
    keys = db.scalars(select(orm.IdempotencyKey.key).where(
        orm.IdempotencyKey.owner.in_([alice[0], bob[0]]))).all()
    assert keys == ["new"]


def test_long_upload_file_name_is_cut_not_refused(client, alice):
    fn = "f" * 700 + ".txt"
    r = client.post("/v1/datasets", headers=alice[1], files={"file": (fn, b"some text")})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == fn[:500]


def test_nul_inside_a_decoded_cursor(client, alice):
    import base64

    from fastapi.testclient import TestClient

    c = TestClient(client.app, raise_server_exceptions=False)
    cur = base64.urlsafe_b64encode(b"2020-01-01T00:00:00+00:00|a\x00b").decode().rstrip("=")
    r = c.get(f"/v1/jobs?cursor={cur}", headers=alice[1])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_cursor", r.text


def test_job_quota_holds_under_concurrent_submissions(settings_env, pg_url, redis_url,
                                                      published, alice, db, tiny_llama_tar):
    settings_env(database_url=pg_url, broker_url=redis_url, max_active_jobs_per_owner=5)
    from modelpress.api.app import create_app

    owner, h = alice
    with ServerThread(create_app()) as base:
        mid = httpx.post(f"{base}/v1/models", headers=h, timeout=60,
                         files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]

        async def many():
            async with httpx.AsyncClient(base_url=base, timeout=60, headers=h) as c:
                return await asyncio.gather(*(c.post("/v1/jobs", json=_job(mid))
                                              for _ in range(30)))

        rs = asyncio.run(many())
    codes = sorted(r.status_code for r in rs)
    assert codes == [201] * 5 + [429] * 25, codes
    assert _jobs_of(db, owner) == 5

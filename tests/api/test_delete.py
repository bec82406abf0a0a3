"""DELETE of jobs, models and datasets (rows and stored objects), and HEAD / If-Range on the
artifact download."""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select

from modelpress.domain import models as orm
from modelpress.domain.jobs import transition
from modelpress.domain.states import JobState

from .test_artifacts import _finish_with_artifact


def _store(app_settings):
    from modelpress.domain.store import make_store

    return make_store(app_settings)


def _rows(db, table, **where) -> int:
    db.rollback()
    stmt = select(func.count()).select_from(table)
    for k, v in where.items():
        stmt = stmt.where(getattr(table, k) == v)
    return db.scalar(stmt)


def test_delete_finished_job_removes_rows_and_artifacts(client, alice, bob, model_id, db,
                                                        app_settings):
    store = _store(app_settings)
    job_id, _data = _finish_with_artifact(client, alice[1], model_id, db, store)
    store.put_stream(f"jobs/{job_id}/checkpoints/step-1", __import__("io").BytesIO(b"ck"))
    job_dir = store.path(f"jobs/{job_id}")
    assert job_dir.is_dir()

    assert client.delete(f"/v1/jobs/{job_id}", headers=bob[1]).status_code == 404
    assert job_dir.is_dir()
    r = client.delete(f"/v1/jobs/{job_id}", headers=alice[1])
    assert r.status_code == 204 and r.content == b""
    assert client.get(f"/v1/jobs/{job_id}", headers=alice[1]).status_code == 404
    for table in (orm.Job, orm.Artifact, orm.Metric, orm.JobEvent):
        key = "id" if table is orm.Job else "job_id"
        assert _rows(db, table, **{key: job_id}) == 0, table
    assert not job_dir.exists()
    assert client.delete(f"/v1/jobs/{job_id}", headers=alice[1]).status_code == 404


def test_delete_running_job_cancels_it_first(client, alice, model_id, db):
    job_id = client.post("/v1/jobs", headers=alice[1],
                         json={"model_id": model_id, "method": "magnitude"}).json()["id"]
    db.rollback()
    job = db.get(orm.Job, job_id)
    job.worker = "w1"
    transition(db, job, JobState.running)
    db.commit()
    assert client.delete(f"/v1/jobs/{job_id}", headers=alice[1]).status_code == 204
    # the worker's ownership check (state running, its name, its attempt) now fails
    db.expire_all()
    assert db.get(orm.Job, job_id) is None


def test_delete_model_in_use_409_then_cascade(client, alice, model_id, db, app_settings):
    store = _store(app_settings)
    job_id, _ = _finish_with_artifact(client, alice[1], model_id, db, store)
    queued = client.post("/v1/jobs", headers=alice[1],
                         json={"model_id": model_id, "method": "magnitude"}).json()["id"]
    model_file = store.path(f"models/{model_id}")
    assert model_file.is_dir()

    r = client.delete(f"/v1/models/{model_id}", headers=alice[1])
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_in_use"
    assert "2 job(s)" in r.json()["error"]["message"]
    assert _rows(db, orm.Job, model_id=model_id) == 2 and model_file.is_dir()

    r = client.delete(f"/v1/models/{model_id}?cascade=true", headers=alice[1])
    assert r.status_code == 204
    assert _rows(db, orm.ModelSource, id=model_id) == 0
    assert _rows(db, orm.Job, model_id=model_id) == 0
    assert not model_file.exists() and not store.path(f"jobs/{job_id}").exists()
    assert client.get(f"/v1/jobs/{queued}", headers=alice[1]).status_code == 404


def test_delete_unused_model_and_dataset(client, alice, bob, model_id, db, app_settings):
    store = _store(app_settings)
    ds = client.post("/v1/datasets", headers=alice[1],
                     files={"file": ("d.txt", b"hello world " * 100)}).json()["id"]
    assert client.delete(f"/v1/datasets/{ds}", headers=bob[1]).status_code == 404
    assert client.delete(f"/v1/models/{model_id}", headers=bob[1]).status_code == 404
    assert store.path(f"datasets/{ds}/data.txt").is_file()
    assert client.delete(f"/v1/datasets/{ds}", headers=alice[1]).status_code == 204
    assert client.delete(f"/v1/models/{model_id}", headers=alice[1]).status_code == 204
    assert not store.path(f"datasets/{ds}").exists()
    assert not store.path(f"models/{model_id}").exists()
    assert _rows(db, orm.Dataset, id=ds) == 0 and _rows(db, orm.ModelSource, id=model_id) == 0


def test_delete_dataset_in_use(client, alice, model_id, db):
    ds = client.post("/v1/datasets", headers=alice[1],
                     files={"file": ("d.txt", b"hello world " * 100)}).json()["id"]
    client.post("/v1/jobs", headers=alice[1], json={
        "model_id": model_id, "method": "magnitude", "eval_dataset_id": ds})
    r = client.delete(f"/v1/datasets/{ds}", headers=alice[1])
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"
    assert client.delete(f"/v1/datasets/{ds}?cascade=true", headers=alice[1]).status_code == 204
    assert _rows(db, orm.Job, eval_dataset_id=ds) == 0


def test_idempotency_key_of_deleted_job_is_forgotten(client, alice, model_id, db):
    hk = {**alice[1], "Idempotency-Key": "del-1"}
    body = {"model_id": model_id, "method": "magnitude"}
    first = client.post("/v1/jobs", headers=hk, json=body).json()["id"]
    assert client.delete(f"/v1/jobs/{first}", headers=alice[1]).status_code == 204
    again = client.post("/v1/jobs", headers=hk, json=body)
    assert again.status_code == 201 and again.json()["id"] != first


def test_head_and_if_range(client, alice, model_id, db, app_settings):
    job_id, data = _finish_with_artifact(client, alice[1], model_id, db, _store(app_settings))
    sha = hashlib.sha256(data).hexdigest()
    url = f"/v1/jobs/{job_id}/artifact"

    h = client.head(url, headers=alice[1])
    assert h.status_code == 200 and h.content == b""
    assert h.headers["Content-Length"] == str(len(data))
    assert h.headers["ETag"] == f'"{sha}"' and h.headers["Accept-Ranges"] == "bytes"

    # If-Range with the artifact's ETag: the range is honoured
    r = client.get(url, headers={**alice[1], "Range": "bytes=100-199", "If-Range": f'"{sha}"'})
    assert r.status_code == 206 and r.content == data[100:200]
    # another ETag (or a date): the client's copy is stale, the whole file comes back
    for stale in ('"' + "0" * 64 + '"', "Wed, 21 Oct 2015 07:28:00 GMT"):
        r = client.get(url, headers={**alice[1], "Range": "bytes=100-199", "If-Range": stale})
        assert r.status_code == 200 and r.content == data
        assert "Content-Range" not in r.headers
    h = client.head(url, headers={**alice[1], "Range": "bytes=0-9"})
    assert h.status_code == 206 and h.headers["Content-Length"] == "10"
    assert h.headers["Content-Range"] == f"bytes 0-9/{len(data)}"
    assert client.head(url).status_code == 401


def test_s3_delete_prefix(s3_endpoint):
    import io
    import uuid

    from modelpress.domain.store import S3Store

    store = S3Store(f"b-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint, create_bucket=True,
                    access_key_id="testing", secret_access_key="testing")
    for k in ("jobs/a/x", "jobs/a/sub/y", "jobs/ab/z"):
        store.put_stream(k, io.BytesIO(b"1"))
    assert store.delete_prefix("jobs/a/") == 2
    assert store.head("jobs/a/x") is None and store.head("jobs/a/sub/y") is None
    assert store.head("jobs/ab/z") is not None  # a sibling sharing the name's start survives


def test_model_named_as_a_teacher_is_in_use(client, alice, model_id, db, tiny_llama_tar):
    teacher = client.post("/v1/models", headers=alice[1],
                          files={"file": ("t.tar", tiny_llama_tar)}).json()["id"]
    r = client.post("/v1/jobs", headers=alice[1], json={
        "model_id": model_id, "method": "distill",
        "params": {"teacher_model_id": teacher, "steps": 1}})
    assert r.status_code == 201, r.text
    r = client.delete(f"/v1/models/{teacher}", headers=alice[1])
    assert r.status_code == 409 and "1 job(s)" in r.json()["error"]["message"]
    assert client.delete(f"/v1/models/{teacher}?cascade=true",
                         headers=alice[1]).status_code == 204
    assert _rows(db, orm.Job, model_id=model_id) == 0

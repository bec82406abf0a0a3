"""GET /v1/jobs/{id}/artifact: local store streaming with Range, S3 presigned redirect."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import urllib.request
import uuid

import pytest
from fastapi.testclient import TestClient

from modelpress.domain.jobs import transition
from modelpress.domain.models import Artifact, Job
from modelpress.domain.states import JobState


def _archive(job_id: str) -> bytes:
    buf = io.BytesIO()
    payload = os.urandom(300_000)  # incompressible: a multi-chunk archive
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ti = tarfile.TarInfo(f"{job_id}/model.safetensors")
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def _finish_with_artifact(client, headers, model_id, db, store) -> tuple[str, bytes]:
    job_id = client.post("/v1/jobs", headers=headers,
                         json={"model_id": model_id, "method": "magnitude"}).json()["id"]
    data = _archive(job_id)
    key = f"jobs/{job_id}/model.tar.gz"
    store.put_stream(key, io.BytesIO(data))
    db.rollback()
    job = db.get(Job, job_id)
    transition(db, job, JobState.running)
    transition(db, job, JobState.succeeded)
    db.add(Artifact(job_id=job_id, uri=store.uri(key), store_key=key, bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(), format="hf-safetensors",
                    unpacked_bytes=300_000, ready=True))
    db.commit()
    return job_id, data


def test_local_download_with_ranges(client, alice, bob, model_id, db, app_settings):
    from modelpress.domain.store import make_store

    job_id, data = _finish_with_artifact(client, alice[1], model_id, db, make_store(app_settings))
    n = len(data)
    sha = hashlib.sha256(data).hexdigest()
    url = f"/v1/jobs/{job_id}/artifact"

    job = client.get(f"/v1/jobs/{job_id}", headers=alice[1]).json()
    assert job["artifact"]["ready"] and job["artifact"]["sha256"] == sha
    assert job["artifact"]["download_url"].endswith(url)

    r = client.get(url, headers=alice[1])
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(n)
    assert r.headers["x-checksum-sha256"] == sha
    assert r.headers["digest"] == "sha-256=" + base64.b64encode(bytes.fromhex(sha)).decode()
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-disposition"] == f'attachment; filename="{job_id}.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tf:
        assert tf.getnames() == [f"{job_id}/model.safetensors"]

    for rng, (a, b) in {"bytes=10-99": (10, 99), "bytes=100000-": (100000, n - 1),
                        "bytes=-500": (n - 500, n - 1), f"bytes=5-{n + 100}": (5, n - 1)}.items():
        r = client.get(url, headers={**alice[1], "Range": rng})
        assert r.status_code == 206, rng
        assert r.content == data[a:b + 1]
        assert r.headers["content-range"] == f"bytes {a}-{b}/{n}"
        assert r.headers["content-length"] == str(b - a + 1)
    # resume a download in two halves
    half = n // 2
    first = client.get(url, headers={**alice[1], "Range": f"bytes=0-{half - 1}"}).content
    rest = client.get(url, headers={**alice[1], "Range": f"bytes={half}-"}).content
    assert first + rest == data

    for bad in ("bytes=abc", f"bytes={n}-", "bytes=50-10", "items=0-5", "bytes=-0"):
        r = client.get(url, headers={**alice[1], "Range": bad})
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{n}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"

    assert client.get(url, headers=bob[1]).status_code == 404


def test_not_ready_is_409(client, alice, model_id, db):
    job_id = client.post("/v1/jobs", headers=alice[1],
                         json={"model_id": model_id, "method": "magnitude"}).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/artifact", headers=alice[1])
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "artifact_not_ready"
    assert "state: queued" in r.json()["error"]["message"]
    db.add(Artifact(job_id=job_id, uri="x", store_key=f"jobs/{job_id}/model.tar.gz", bytes=1,
                    sha256="0" * 64, format="hf-safetensors", ready=False))
    db.commit()
    r = client.get(f"/v1/jobs/{job_id}/artifact", headers=alice[1])
    assert r.status_code == 409 and "not ready" in r.json()["error"]["message"]


def test_s3_download_is_a_presigned_redirect(settings_env, pg_url, redis_url, s3_endpoint,
                                             published, tiny_llama_tar, db):
    from modelpress.api.app import create_app
    from modelpress.domain.keys import create_key
    from modelpress.domain.store import make_store

    s = settings_env(database_url=pg_url, broker_url=redis_url, store="s3",
                     s3_endpoint_url=s3_endpoint, s3_bucket=f"mp-{uuid.uuid4().hex[:8]}",
                     s3_access_key_id="testing", s3_secret_access_key="testing")
    owner = f"s3-{uuid.uuid4().hex[:6]}"
    h = {"Authorization": f"Bearer {create_key(db, owner)}"}
    db.commit()
    with TestClient(create_app()) as c:
        m = c.post("/v1/models", headers=h, files={"file": ("t.tar", tiny_llama_tar)})
        assert m.status_code == 201, m.text
        store = make_store(s)
        assert store.head(f"models/{m.json()['id']}/model.tar").bytes == len(tiny_llama_tar)
        job_id, data = _finish_with_artifact(c, h, m.json()["id"], db, store)
        r = c.get(f"/v1/jobs/{job_id}/artifact", headers=h, follow_redirects=False)
        assert r.status_code == 307
        loc = r.headers["location"]
        assert loc.startswith(s3_endpoint) and "X-Amz-Signature" in loc
        with urllib.request.urlopen(loc, timeout=30) as resp:
            assert resp.read() == data
            assert f'filename="{job_id}.tar.gz"' in resp.headers["Content-Disposition"]
        # the presigned URL is the only way in: the object itself needs a signature
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(loc.split("?")[0], timeout=30)

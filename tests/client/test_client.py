"""modelpress.client against the real API (uvicorn, PostgreSQL): upload with progress, submit
with idempotency keys, errors with the API's codes, pagination, the event stream (wait, resume
with Last-Event-ID), resumable downloads with the SHA-256 checked, and the async client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import pytest

from modelpress.client import ApiError, AsyncClient, ChecksumMismatch, SseParser

from .conftest import move


@pytest.fixture
def model(client, tiny_llama_dir):
    seen: list[tuple[int, int]] = []
    m = client.upload_model(tiny_llama_dir, progress=lambda a, b: seen.append((a, b)))
    assert seen and seen[-1][0] == seen[-1][1] > 0, "progress reaches the tar's full size"
    assert all(a <= b for a, b in seen)
    return m


def test_upload_submit_and_errors_carry_the_api_codes(client, model, published):
    assert model.kind == "hf-dir" and model.model_type == "llama"
    assert [m.id for m in client.list_models()] == [model.id]
    job = client.submit(model.id, method="magnitude", params={"sparsity": 0.5})
    assert job.state == "queued" and job.method == "magnitude"
    again = client.submit(model.id, method="magnitude", params={"sparsity": 0.5},
                          idempotency_key="k-1")
    replay = client.submit(model.id, method="magnitude", params={"sparsity": 0.5},
                           idempotency_key="k-1")
    assert replay.id == again.id != job.id
    assert len(published) == 2, "a replayed submission publishes nothing"
    with pytest.raises(ApiError) as e:
        client.submit(model.id, method="magnitude", params={"sparsity": 7})
    assert e.value.status == 422 and e.value.code == "invalid_params"
    with pytest.raises(ApiError) as e:
        client.get_job("nope")
    assert (e.value.status, e.value.code) == (404, "not_found")
    names = {m.name for m in client.methods()}
    assert {"magnitude", "rtn", "gptq"} <= names


def test_pagination_lists_every_job_once(client, model):
    ids = {client.submit(model.id, method="rtn", params={"bits": 8}).id for _ in range(5)}
    page = client.list_jobs(limit=2)
    assert len(page.items) == 2 and page.next_cursor
    paged = [j.id for j in client.iter_jobs(limit=2)]
    assert len(paged) == 5 and set(paged) == ids
    assert paged == [j.id for j in client.list_jobs(limit=50).items], "newest first, in order"


def test_wait_follows_the_stream_to_the_terminal_state(client, model):
    job = client.submit(model.id, method="rtn", params={"bits": 8})
    progress: list[dict] = []

    def worker():
        time.sleep(1.0)
        move(job.id, "running", progress=40)
        time.sleep(1.0)
        move(job.id, "succeeded")

    t = threading.Thread(target=worker)
    t.start()
    seen = []
    t0 = time.monotonic()
    done = client.wait(job.id, timeout=60, on_event=seen.append, on_progress=progress.append)
    t.join()
    assert done.state == "succeeded" and done.progress == 100
    assert time.monotonic() - t0 < 10
    assert [e.kind for e in seen] == ["submitted", "state", "state"]
    assert [e.data["to"] for e in seen[1:]] == ["running", "succeeded"]
    assert [p["state"] for p in progress][0] == "queued"
    assert {"state": "running", "progress": 40, "stage": None} in progress
    # resuming after the first event sends only the later ones
    ids = [e.id for e in seen]
    assert [e.id for e in client.stream_events(job.id, after=ids[0])] == ids[1:]
    r = client.http.get(f"/v1/jobs/{job.id}/events/stream", headers={"Last-Event-ID": str(ids[1])})
    sse = SseParser()
    got = [x for line in r.text.splitlines() + [""] if (x := sse.feed(line))]
    assert [(k, i) for k, _, i in got if k == "log"] == [("log", str(ids[2]))]
    bad = client.http.get(f"/v1/jobs/{job.id}/events/stream", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 422


def test_stream_of_another_owners_job_is_404(client, model, live_api):
    from modelpress.client import Client

    job = client.submit(model.id, method="rtn", params={"bits": 8})
    with Client(live_api[0], "mp_bootstrap_test_key") as admin:
        with pytest.raises(ApiError) as e:
            list(admin.stream_events(job.id))
    assert e.value.status == 404


def _fake_artifact(job_id: str, settings, data: bytes) -> str:
    """A finished job's artifact in the local store (what the worker publishes)."""
    from modelpress.domain.db import session_scope
    from modelpress.domain.models import Artifact
    from modelpress.domain.store import make_store

    key = f"jobs/{job_id}/artifact.tar.gz"
    p = make_store(settings).path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    with session_scope() as s:
        s.add(Artifact(job_id=job_id, uri=f"local://{key}", store_key=key, bytes=len(data),
                       sha256=sha, format="hf-tar.gz", ready=True))
    return sha


def test_download_resumes_with_range_and_checks_the_sha256(client, model, live_api, tmp_path):
    job = client.submit(model.id, method="rtn", params={"bits": 8})
    move(job.id, "running", "succeeded")
    data = os.urandom(3 * 1024 * 1024 + 17)
    _fake_artifact(job.id, live_api[1], data)
    dest = tmp_path / "a.tar.gz"
    # an interrupted download: the first MiB is on disk, with the ETag it came with
    (tmp_path / "a.tar.gz.part").write_bytes(data[:1 << 20])
    (tmp_path / "a.tar.gz.etag").write_text(f'"{hashlib.sha256(data).hexdigest()}"')
    seen: list[tuple[int, int]] = []
    client.download(job.id, dest, progress=lambda a, b: seen.append((a, b)))
    assert dest.read_bytes() == data
    assert seen[0][0] > 1 << 20 and seen[-1] == (len(data), len(data)), "resumed, not restarted"
    assert not (tmp_path / "a.tar.gz.part").exists()
    # a partial file of another artifact version (another ETag): the whole file is sent again
    (tmp_path / "b.part").write_bytes(b"x" * 100)
    (tmp_path / "b.etag").write_text('"0000"')
    client.download(job.id, tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == data
    # bytes on disk that do not match the checksum: refused, nothing left behind
    (tmp_path / "c.part").write_bytes(b"y" * (1 << 20))
    (tmp_path / "c.etag").write_text(f'"{hashlib.sha256(data).hexdigest()}"')
    with pytest.raises(ChecksumMismatch):
        client.download(job.id, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.part").exists()


def test_async_client_uploads_submits_and_waits(live_api, owner_key, tiny_llama_dir):
    async def run():
        async with AsyncClient(live_api[0], owner_key[1]) as c:
            sent = []
            m = await c.upload_model(tiny_llama_dir, progress=lambda a, b: sent.append(a))
            job = await c.submit(m.id, method="rtn", params={"bits": 8})
            waiter = asyncio.create_task(c.wait(job.id, timeout=60))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(move, job.id, "running", "failed")
            done = await waiter
            page = await c.list_jobs()
            return m, sent, done, page

    m, sent, done, page = asyncio.run(run())
    assert m.model_type == "llama" and sent
    assert done.state == "failed" and [j.id for j in page.items] == [done.id]


def test_wait_times_out_on_a_job_that_never_finishes(client, model, monkeypatch):
    from modelpress.api.routes import events

    monkeypatch.setattr(events, "HEARTBEAT_S", 0.3)  # the server runs in this process
    job = client.submit(model.id, method="rtn", params={"bits": 8})
    lines: list[str] = []
    t0 = time.monotonic()
    with client.http.stream("GET", f"/v1/jobs/{job.id}/events/stream") as resp:
        for line in resp.iter_lines():
            lines.append(line)
            if time.monotonic() - t0 > 1.5:
                break
    assert ": keep-alive" in lines, "an idle stream sends keep-alive comments"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        client.wait(job.id, timeout=1.0)
    assert time.monotonic() - t0 < 5


def test_async_download_resumes_and_checks(live_api, owner_key, client, model, tmp_path):
    job = client.submit(model.id, method="rtn", params={"bits": 8})
    move(job.id, "running", "succeeded")
    data = os.urandom(2 * 1024 * 1024 + 5)
    sha = _fake_artifact(job.id, live_api[1], data)
    (tmp_path / "x.part").write_bytes(data[:777])
    (tmp_path / "x.etag").write_text(f'"{sha}"')

    async def run():
        async with AsyncClient(live_api[0], owner_key[1]) as c:
            seen = []
            await c.download(job.id, tmp_path / "x", progress=lambda a, b: seen.append(a))
            return seen, [j.id async for j in c.iter_jobs(limit=1)]

    seen, ids = asyncio.run(run())
    assert (tmp_path / "x").read_bytes() == data and seen[0] > 777
    assert ids == [job.id]

"""Many concurrent requests against a real uvicorn server: every request is answered (no 500,
no deadlock on the connection pool) and every created job is committed exactly once.

Before the fix, sessions were committed through a second thread-pool hop after the route
returned: with every pool thread waiting for a connection and every connection held by a
request waiting for a thread, 50 concurrent POSTs deadlocked until the pool timed out (500s).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from modelpress.domain import models as orm

from .conftest import make_tar


class ServerThread:
    """uvicorn serving ``app`` on a free loopback port, in a thread of this process (so the
    tests' monkeypatched publish_job applies)."""

    def __init__(self, app):
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                     lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


async def _post_many(base: str, headers: dict[str, str], body: dict, n: int,
                     timeout_s: float) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=timeout_s) as c:
        async def one():
            try:
                return await c.post("/v1/jobs", json=body)
            except Exception as e:  # noqa: BLE001 - counted as a failure below
                return e

        return await asyncio.gather(*(one() for _ in range(n)))


def _register_model(base: str, headers: dict[str, str], tar: bytes) -> str:
    r = httpx.post(f"{base}/v1/models", headers=headers, timeout=60,
                   files={"file": ("tiny.tar", tar, "application/x-tar")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _check_all_created(responses, db, owner: str, n: int) -> None:
    failures = [r if isinstance(r, Exception) else (r.status_code, r.text[:200])
                for r in responses if isinstance(r, Exception) or r.status_code != 201]
    assert failures == [], f"{len(failures)} of {n} failed: {failures[:3]}"
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == n
    db.rollback()
    stored = db.scalars(select(orm.Job.id).where(orm.Job.owner == owner)).all()
    assert sorted(stored) == sorted(ids)  # every answered job committed, exactly once
    submitted = db.scalar(select(func.count()).select_from(orm.JobEvent).where(
        orm.JobEvent.job_id.in_(ids), orm.JobEvent.kind == "submitted"))
    assert submitted == n


@pytest.mark.parametrize("n", [200])
def test_concurrent_submissions_postgres(app_settings, published, db, alice, tiny_llama_tar, n):
    from modelpress.api.app import create_app

    owner, headers = alice
    with ServerThread(create_app()) as base:
        model_id = _register_model(base, headers, tiny_llama_tar)
        body = {"model_id": model_id, "method": "magnitude", "params": {"sparsity": 0.5}}
        t0 = time.monotonic()
        responses = asyncio.run(_post_many(base, headers, body, n, timeout_s=60))
        took = time.monotonic() - t0
    _check_all_created(responses, db, owner, n)
    assert len(published) == n
    assert took < 30, f"{n} concurrent submissions took {took:.1f} s"


def test_concurrent_submissions_embedded(settings_env, published, tiny_llama_dir):
    """Embedded mode (SQLite, a pool of 15 connections): 200 concurrent submissions."""
    from modelpress.api.app import create_app
    from modelpress.domain.db import session_factory
    from modelpress.domain.keys import create_key
    from modelpress.migrations.runner import upgrade

    settings = settings_env(broker_url="memory://")
    upgrade(settings.resolved_database_url)
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    with session_factory()() as db:
        key = create_key(db, owner)
        db.commit()
        headers = {"Authorization": f"Bearer {key}"}
        with ServerThread(create_app()) as base:
            model_id = _register_model(base, headers, make_tar(tiny_llama_dir))
            body = {"model_id": model_id, "method": "magnitude", "params": {"sparsity": 0.5}}
            responses = asyncio.run(_post_many(base, headers, body, 200, timeout_s=60))
        _check_all_created(responses, db, owner, 200)


def test_database_down_is_503_with_retry_after(settings_env, redis_url):
    """A request that cannot reach the database gets 503 + Retry-After, not 500."""
    from fastapi.testclient import TestClient

    from modelpress.api.app import create_app

    settings_env(database_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
                 broker_url=redis_url)
    with TestClient(create_app()) as c:
        r = c.get("/v1/jobs", headers={"Authorization": "Bearer mp_any_key"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "unavailable"
    assert int(r.headers["Retry-After"]) >= 1


def test_fresh_server_processes_answer_concurrent_first_requests(app_settings, alice, db,
                                                                 tiny_llama_tar, tmp_path):
    """``uvicorn --workers 2`` started fresh: the model is registered through one process, then
    100 concurrent submissions also reach the other, whose first requests used to race on
    transformers' lazy imports (ImportError: 500s, then reset connections)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODELPRESS_DATABASE_URL": app_settings.database_url,
           "MODELPRESS_BROKER_URL": "memory://", "MODELPRESS_HOME": str(tmp_path / "srv")}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                             "modelpress.api.app:create_app", "--port", str(port), "--workers",
                             "2", "--log-level", "warning"], env=env, stdout=log, stderr=log,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.2)
        owner, headers = alice
        model_id = _register_model(base, headers, tiny_llama_tar)
        body = {"model_id": model_id, "method": "magnitude", "params": {"sparsity": 0.5}}
        responses = asyncio.run(_post_many(base, headers, body, 100, timeout_s=60))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()
    _check_all_created(responses, db, owner, 100)


def test_database_restart_is_503_then_recovers(client, alice, model_id, pg_url):
    """Every pooled connection killed under the API (what a PostgreSQL restart does): the
    request that finds its connection dead gets 503 + Retry-After, never a 500, and the pool
    reconnects for the next one."""
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, text

    c = TestClient(client.app, raise_server_exceptions=False)
    h = alice[1]
    body = {"model_id": model_id, "method": "magnitude"}
    assert c.post("/v1/jobs", headers=h, json=body).status_code == 201
    assert c.get("/v1/jobs", headers=h).status_code == 200
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(pg_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})
    admin.dispose()
    codes = []
    for _ in range(3):
        r = c.post("/v1/jobs", headers=h, json=body)
        codes.append(r.status_code)
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "unavailable"
    assert 500 not in codes and codes[-1] == 201, codes


def test_api_pool_is_bounded_per_process(pg_url):
    """Each API process opens at most 2 x ``db_pool_size`` connections: with two processes, the
    workers and the test's own pools on one PostgreSQL (max_connections 100), the former 40
    per process ran the server out of connections under bursts (503 'database unavailable')."""
    from modelpress.api.app import api_engine

    api_engine.cache_clear()
    try:
        eng = api_engine(pg_url, 5.0, 7)
        assert eng.pool.size() == 7 and eng.pool._max_overflow == 7  # type: ignore[attr-defined]
        assert eng.pool.timeout() == 5.0  # type: ignore[attr-defined]
    finally:
        api_engine.cache_clear()

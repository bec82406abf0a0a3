"""Client fixtures: the real API app on PostgreSQL served by uvicorn in a thread (real HTTP,
real streaming), Celery publishing recorded; a worker is simulated by transitioning jobs in the
database (the CLI and browser tests run the whole stack)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from ..e2e.conftest import clean_env, free_port, procs, python  # noqa: F401 (procs: fixture)


def serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return server, t


@pytest.fixture
def live_api(settings_env, pg_url, redis_url, published):
    """(base URL, settings) of the API on a free port."""
    from modelpress.api.app import create_app

    from ..conftest import _free_port

    settings = settings_env(database_url=pg_url, broker_url=redis_url,
                            api_key="mp_bootstrap_test_key", webhook_allow_private="true",
                            webhook_backoff_s="0.3", webhook_dispatch_interval_s="0.2",
                            webhook_max_attempts="4")
    port = _free_port()
    server, t = serve(create_app(), port)
    yield f"http://127.0.0.1:{port}", settings
    server.should_exit = True
    t.join(15)


@pytest.fixture
def published(monkeypatch):
    import modelpress.workers.dispatch as dispatch

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(dispatch, "publish_job",
                        lambda job_id, queue: calls.append((job_id, queue)))
    return calls


@pytest.fixture
def owner_key(live_api):
    from modelpress.domain.db import session_factory
    from modelpress.domain.keys import create_key

    owner = f"owner-{uuid.uuid4().hex[:8]}"
    with session_factory()() as s:
        key = create_key(s, owner)
        s.commit()
    return owner, key


@pytest.fixture
def client(live_api, owner_key):
    from modelpress.client import Client

    with Client(live_api[0], owner_key[1], backoff_s=0.05) as c:
        yield c


def move(job_id: str, *states: str, progress: int | None = None) -> None:
    """What a worker does to a job: state transitions (and progress) committed one by one."""
    from modelpress.domain.db import session_scope
    from modelpress.domain.jobs import transition
    from modelpress.domain.models import Job
    from modelpress.domain.states import JobState

    for st in states:
        with session_scope() as s:
            job = s.get(Job, job_id)
            transition(s, job, JobState(st))
            if progress is not None:
                job.progress = progress


@pytest.fixture
def service(procs, tmp_path):  # noqa: F811
    """`modelpress up` (API, worker, sweep; SQLite) in a temp home: (base URL, key, Proc).
    Perplexity reads two windows of each text (the quality gate test's job on SmolLM2)."""
    home = tmp_path / "home"
    port = free_port()
    up = procs("up", [python(), "-m", "modelpress", "up", "--port", str(port)],
               clean_env(MODELPRESS_HOME=str(home), MODELPRESS_EVAL_WINDOWS="2"), cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    up.wait_http(base + "/healthz", timeout=180)
    return base, (home / "api-key").read_text().strip(), up

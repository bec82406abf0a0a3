"""Real-stack fixtures for the worker tests: PostgreSQL (pg_url), Redis (redis_url), a local
artifact directory shared with real ``celery worker`` subprocesses. No eager mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: fast timings so the reaper and progress paths run within a test
FAST = {"MODELPRESS_HEARTBEAT_S": "0.5", "MODELPRESS_REAPER_TIMEOUT_S": "4",
        "MODELPRESS_PROGRESS_MIN_INTERVAL_S": "0.2", "MODELPRESS_DISPATCH_GRACE_S": "30",
        "MODELPRESS_MAX_ATTEMPTS": "2", "MODELPRESS_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def own_pg(scratch_db) -> Iterator[str]:
    """A PostgreSQL database of this module's own (migrated), so the sweep, which looks at every
    job in the database, never sees jobs other test modules left behind."""
    from modelpress.migrations.runner import upgrade

    with scratch_db("mp_workers") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def stack_env(own_pg, redis_url, tmp_path_factory) -> dict[str, str]:
    """The environment the test process and the worker subprocesses share."""
    home = tmp_path_factory.mktemp("mp-home")
    env = {"MODELPRESS_HOME": str(home), "MODELPRESS_DATABASE_URL": own_pg,
           "MODELPRESS_BROKER_URL": redis_url, "MODELPRESS_STORE": "local",
           "MODELPRESS_STORE_DIR": str(home / "store"), **FAST}
    return env


@pytest.fixture(scope="module")
def use_stack(stack_env) -> Iterator[dict[str, str]]:
    """Point this (test) process's settings at the stack."""
    from modelpress.domain.settings import get_settings

    old = {k: os.environ.get(k) for k in stack_env}
    os.environ.update(stack_env)
    get_settings.cache_clear()
    yield stack_env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


class Worker:
    def __init__(self, proc: subprocess.Popen, log: Path, name: str):
        self.proc, self.log, self.name = proc, log, name

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 120) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.text():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait(30)


@pytest.fixture(scope="module")
def start_worker(stack_env, tmp_path_factory) -> Iterator[Callable[..., Worker]]:
    """Start a real ``celery worker`` subprocess (killed at teardown)."""
    workers: list[Worker] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(name: str = "w", pool: str = "solo", extra_env: dict | None = None) -> Worker:
        log = logs / f"{name}-{len(workers)}.log"
        env = {**os.environ, **stack_env, **(extra_env or {})}
        cmd = [sys.executable, "-m", "celery", "-A", "modelpress.workers.celery_app", "worker",
               "-Q", "cpu,gpu", "--concurrency", "1", "--pool", pool, "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "-n", f"{name}-{len(workers)}@%h"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO, start_new_session=True)
        w = Worker(proc, log, name)
        workers.append(w)
        return w.wait_ready()

    def kill_all() -> None:
        """Kill every worker this module started, so the next one started is the only consumer
        of the queue (a test that kills "the" worker must know which one took the job)."""
        for w in workers:
            w.kill(signal.SIGKILL)

    start.kill_all = kill_all  # type: ignore[attr-defined]
    yield start
    for w in workers:
        w.kill(signal.SIGKILL)


# --------------------------------------------------------------------------- rows


def tar_dir(src: Path, dest: Path, top: str = "model") -> Path:
    with tarfile.open(dest, "w") as tf:
        tf.add(src, arcname=top)
    return dest


def register_model(owner: str, path: Path, kind: str, sha256: str | None = None) -> str:
    """Put ``path`` in the store the way the API does and insert the ModelSource row."""
    from modelpress.domain.db import session_scope
    from modelpress.domain.models import ModelSource, new_id
    from modelpress.domain.store import make_store, sha256_file

    mid = new_id()
    key = f"models/{mid}/" + ("model.gguf" if kind == "gguf" else "model.tar")
    store = make_store()
    info = store.put_file(key, path)
    with session_scope() as s:
        s.add(ModelSource(id=mid, owner=owner, name=path.name, kind=kind, store_key=key,
                          bytes=info.bytes, sha256=sha256 or sha256_file(path)))
    return mid


def insert_job(owner: str, model_id: str, recipe: list[dict], *, queue: str = "cpu",
               age_s: float = 0.0, **fields) -> str:
    from modelpress.domain.db import session_scope
    from modelpress.domain.jobs import add_event
    from modelpress.domain.models import Job, new_id, utcnow

    jid = new_id()
    now = utcnow() - timedelta(seconds=age_s)
    with session_scope() as s:
        s.add(Job(id=jid, owner=owner, model_id=model_id, recipe=recipe, queue=queue,
                  method=recipe[0]["method"] if len(recipe) == 1 else None,
                  params=recipe[0].get("params") if len(recipe) == 1 else None,
                  created_at=now, updated_at=now, **fields))
        s.flush()
        add_event(s, jid, "submitted", "test")
    return jid


def submit(owner: str, model_id: str, recipe: list[dict], **fields) -> str:
    """Insert the job and publish it, as the API does (commit, publish, stamp dispatched_at)."""
    from sqlalchemy import update

    from modelpress.domain.db import session_scope
    from modelpress.domain.models import Job, utcnow
    from modelpress.workers.dispatch import publish_job

    jid = insert_job(owner, model_id, recipe, **fields)
    publish_job(jid, fields.get("queue", "cpu"))
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == jid).values(dispatched_at=utcnow()))
    return jid


def job_row(job_id: str):
    from modelpress.domain.db import session_scope
    from modelpress.domain.models import Job

    with session_scope() as s:
        j = s.get(Job, job_id)
        s.expunge(j)
        return j


def wait_for(job_id: str, states: set[str], timeout: float = 300, worker: Worker | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = job_row(job_id)
        if j.state in states:
            return j
        time.sleep(0.25)
    tail = worker.text()[-6000:] if worker else ""
    raise AssertionError(f"job {job_id} still {j.state} (progress {j.progress}, stage "
                         f"{j.stage!r}) after {timeout} s\n{tail}")


def events(job_id: str) -> list:
    from sqlalchemy import select

    from modelpress.domain.db import session_scope
    from modelpress.domain.models import JobEvent

    with session_scope() as s:
        evs = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                             .order_by(JobEvent.id)))
        for e in evs:
            s.expunge(e)
        return evs

"""API test fixtures: the app on the real PostgreSQL (fresh DB per session), a local artifact
store under a temp home, two owners with their own keys, and Celery publishing recorded instead
of sent (the worker's own tests use a real worker)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from modelpress.domain import models as orm

TABLES = (orm.ApiKey, orm.ModelSource, orm.Dataset, orm.Job, orm.JobEvent, orm.Artifact,
          orm.Metric)


@pytest.fixture
def published(monkeypatch):
    """Calls to publish_job, recorded (job_id, queue)."""
    import modelpress.workers.dispatch as dispatch

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(dispatch, "publish_job", lambda job_id, queue: calls.append((job_id, queue)))
    return calls


@pytest.fixture
def app_settings(settings_env, pg_url, redis_url):
    return settings_env(database_url=pg_url, broker_url=redis_url, api_key="mp_bootstrap_test_key")


@pytest.fixture
def client(app_settings, published):
    from modelpress.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def db(app_settings):
    from modelpress.domain.db import session_factory

    with session_factory()() as s:
        yield s


def _new_owner(db) -> tuple[str, dict[str, str]]:
    from modelpress.domain.keys import create_key

    owner = f"owner-{uuid.uuid4().hex[:8]}"
    key = create_key(db, owner)
    db.commit()
    return owner, {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice(db):
    return _new_owner(db)


@pytest.fixture
def bob(db):
    return _new_owner(db)


@pytest.fixture
def counts(db):
    """Row counts of every table, to assert that a refused request wrote nothing."""

    def _counts() -> dict[str, int]:
        db.rollback()
        return {t.__tablename__: db.scalar(select(func.count()).select_from(t)) for t in TABLES}

    return _counts


def make_tar(src: Path, top: str | None = "tiny-llama") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in sorted(src.iterdir()):
            tf.add(f, arcname=f"{top}/{f.name}" if top else f.name)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_llama_tar(tiny_llama_dir) -> bytes:
    return make_tar(tiny_llama_dir)


@pytest.fixture
def model_id(client, alice, tiny_llama_tar) -> str:
    """alice's registered tiny llama (uploaded as a tar)."""
    r = client.post("/v1/models", headers=alice[1],
                    files={"file": ("tiny-llama.tar", tiny_llama_tar, "application/x-tar")})
    assert r.status_code == 201, r.text
    return r.json()["id"]

"""Attempts of one job against the real PostgreSQL, run in this process with a stand-in pipeline
(the model work is not what is tested here): the lease fence on publishing, disk-full failures,
scratch of dead attempts, server paths kept out of what the job stores."""

from __future__ import annotations

import errno
import json
import os
import tarfile
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from modelpress.domain.db import session_scope
from modelpress.domain.models import Artifact, utcnow
from modelpress.domain.store import LocalStore, sha256_file

from .conftest import events, insert_job, job_row, register_model

OWNER = "carol"
RECIPE = [{"method": "magnitude", "params": {"sparsity": 0.5}}]


def _stand_in_pipeline(source, recipe, out_dir, **kw):
    """Writes what a real pipeline writes (config with the load path, weights, report)."""
    out = Path(out_dir)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"_name_or_path": str(source)}))
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    report = {"source": str(source), "gate": None}
    (out / "report.json").write_text(json.dumps(report))
    return SimpleNamespace(output_dir=out, report=report, metrics=[("after", "bytes", 4096.0, "B")],
                           format="safetensors", gate_passed=True)


@pytest.fixture(scope="module")
def model_id(use_stack, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("m")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"\0" * 128)
    tar = d.parent / "m.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(d, arcname="m")
    return register_model(OWNER, tar, "hf-dir")


def _artifact(job_id: str) -> Artifact | None:
    with session_scope() as s:
        a = s.scalar(select(Artifact).where(Artifact.job_id == job_id))
        if a is not None:
            s.expunge(a)
        return a


def _job_files(settings, job_id: str) -> list[str]:
    root = settings.resolved_store_dir / "jobs" / job_id
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class StallingStore(LocalStore):
    """Stalls the thread named ``stall_thread`` right after its artifact upload (a SIGSTOP)."""

    def __init__(self, root, stall_thread: str):
        super().__init__(root)
        self.stall_thread = stall_thread
        self.uploaded = threading.Event()
        self.resume = threading.Event()
        self.keys: dict[str, str] = {}

    def put_file(self, key, path):
        info = super().put_file(key, path)
        me = threading.current_thread().name
        if key.endswith("model.tar.gz"):
            self.keys[me] = key
            if me == self.stall_thread:
                self.uploaded.set()
                assert self.resume.wait(60)
        return info


@pytest.mark.parametrize("b_worker", ["host-b:2", "host-a:1"],
                         ids=["other-worker", "same-worker-name"])
def test_zombie_attempt_never_touches_the_published_artifact(use_stack, model_id, monkeypatch,
                                                             b_worker, tmp_path):
    """A uploads, stalls, is reaped; B runs the job to success; A wakes and finishes. B's
    artifact stays, byte for byte, where its row says; A's own upload is gone."""
    from modelpress.api.services.artifacts import local_download
    from modelpress.domain.settings import get_settings
    from modelpress.workers import execution
    from modelpress.workers.execution import execute_job
    from modelpress.workers.sweeper import reap

    settings = get_settings()
    store = StallingStore(settings.resolved_store_dir, stall_thread="A")
    monkeypatch.setattr(execution, "make_store", lambda _s=None: store)
    jid = insert_job(OWNER, model_id, RECIPE)

    result: dict[str, str] = {}
    a = threading.Thread(name="A", target=lambda: result.update(a=execute_job(
        jid, worker_name="host-a:1", run_pipeline=_stand_in_pipeline)))
    a.start()
    assert store.uploaded.wait(60), "attempt A never uploaded"
    assert job_row(jid).stage == "uploading artifact"  # what an operator sees while it stalls
    assert reap(settings, utcnow() + timedelta(hours=1))["requeued"] == [jid]

    assert execute_job(jid, worker_name=b_worker, run_pipeline=_stand_in_pipeline) == "succeeded"
    art = _artifact(jid)
    want = sha256_file(store.path(art.store_key))

    store.resume.set()
    a.join(60)
    assert result["a"] == "lost"
    job = job_row(jid)
    assert (job.state, job.attempt, job.worker) == ("succeeded", 2, b_worker)
    assert (job.progress, job.stage) == (100, "done")  # not the stalled step's "uploading artifact"
    assert _artifact(jid).store_key == art.store_key
    assert store.head(art.store_key) is not None, "the published artifact was deleted"
    assert sha256_file(store.path(art.store_key)) == want == art.sha256
    assert art.store_key == store.keys["MainThread"] != store.keys["A"]
    assert _job_files(settings, jid) == [art.store_key.split("/", 2)[2]], "A's upload removed"
    # the artifact route serves the key the row names
    dl = local_download(store, art, None)
    assert dl.path == store.path(art.store_key) and dl.size == art.bytes
    # no server path in what the job stored
    blob = json.dumps(job.report) + (tmp_path / "x").as_posix()
    assert str(settings.resolved_work_dir) not in json.dumps(job.report)
    assert job.report["source"] == model_id, blob
    with tarfile.open(store.path(art.store_key)) as tf:
        cfg = json.load(tf.extractfile(f"{jid}/config.json"))
    assert cfg["_name_or_path"] == model_id


def test_lost_commit_answer_keeps_the_published_upload(use_stack, model_id):
    """discard_upload deletes only what no Artifact row names."""
    from modelpress.domain.settings import get_settings
    from modelpress.domain.store import make_store
    from modelpress.workers.execution import execute_job
    from modelpress.workers.uploads import discard_upload

    jid = insert_job(OWNER, model_id, RECIPE)
    assert execute_job(jid, worker_name="w:1", run_pipeline=_stand_in_pipeline) == "succeeded"
    store = make_store()
    art = _artifact(jid)
    discard_upload(store, art.store_key)
    assert store.head(art.store_key).bytes == art.bytes
    stray = f"jobs/{jid}/a9-deadbeef/model.tar.gz"
    store.put_file(stray, store.path(art.store_key))
    discard_upload(store, stray)
    assert store.head(stray) is None
    assert _job_files(get_settings(), jid) == [art.store_key.split("/", 2)[2]]


def test_publishing_removes_uploads_other_attempts_left(use_stack, model_id, tmp_path):
    """An attempt that died (or could not tell whether it published while the database was
    down) leaves its upload; the attempt that publishes removes it, and only it."""
    from modelpress.domain.settings import get_settings
    from modelpress.domain.store import make_store
    from modelpress.workers.execution import execute_job

    store = make_store()
    jid = insert_job(OWNER, model_id, RECIPE)
    (tmp_path / "old").write_bytes(b"an earlier attempt's archive")
    store.put_file(f"jobs/{jid}/a1-0badc0de/model.tar.gz", tmp_path / "old")
    store.put_file(f"jobs/{jid}/checkpoints/distill.pt", tmp_path / "old")
    assert execute_job(jid, worker_name="w:1", run_pipeline=_stand_in_pipeline) == "succeeded"
    art = _artifact(jid)
    assert _job_files(get_settings(), jid) == sorted([art.store_key.split("/", 2)[2],
                                                      "checkpoints/distill.pt"])


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["scratch", "extract", "upload"])
def test_disk_full_fails_the_job_with_disk_full(use_stack, model_id, monkeypatch, where,
                                                tmp_path):
    from modelpress.domain.settings import get_settings
    from modelpress.workers import execution
    from modelpress.workers.execution import execute_job

    settings = get_settings()
    mid = model_id
    if where == "scratch":
        monkeypatch.setattr(execution.tempfile, "mkdtemp", _enospc)
    elif where == "extract":
        # a model not yet in this worker's cache, so it is unpacked
        d = tmp_path / "m2"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"\1" * 64)
        with tarfile.open(tmp_path / "m2.tar", "w") as tf:
            tf.add(d, arcname="m2")
        mid = register_model(OWNER, tmp_path / "m2.tar", "hf-dir")
        monkeypatch.setattr(tarfile.TarFile, "makefile", _enospc)
    else:
        monkeypatch.setattr(LocalStore, "put_file", _enospc)
    jid = insert_job(OWNER, mid, RECIPE)
    out = execute_job(jid, worker_name="w:disk", run_pipeline=_stand_in_pipeline)
    job = job_row(jid)
    assert (out, job.state, job.error_code) == ("failed", "failed", "disk_full"), job.error
    assert job.error.startswith("the worker's disk is full") and "No space left" in job.error
    assert str(settings.resolved_work_dir) not in job.error
    assert _artifact(jid) is None and _job_files(settings, jid) == []
    assert not list(settings.resolved_work_dir.glob(f"job-{jid}-*")), "scratch freed"
    assert [e.kind for e in events(jid)].count("traceback") == 0


def test_sweep_removes_scratch_of_dead_attempts_only(use_stack, model_id):
    from sqlalchemy import update

    from modelpress.domain.models import Job
    from modelpress.domain.settings import get_settings
    from modelpress.workers.sweeper import sweep_scratch

    work = get_settings().resolved_work_dir
    running = insert_job(OWNER, model_id, RECIPE)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == running).values(state="running", attempt=2,
                                                                 worker="elsewhere:1"))
    done = insert_job(OWNER, model_id, RECIPE)
    dirs = {"live": work / f"job-{running}-a2-x1", "old_attempt": work / f"job-{running}-a1-x2",
            "queued": work / f"job-{done}-a1-x3", "no_job": work / "job-nosuchjob-a1-x4",
            "other": work / "cache"}
    for d in dirs.values():
        (d / "out").mkdir(parents=True, exist_ok=True)
        (d / "out" / "w.bin").write_bytes(b"x" * 10)
    removed = sweep_scratch(get_settings())
    assert sorted(removed) == sorted(dirs[k].name for k in ("old_attempt", "queued", "no_job"))
    assert dirs["live"].is_dir() and dirs["other"].is_dir()
    assert not any(dirs[k].exists() for k in ("old_attempt", "queued", "no_job"))


def test_worker_start_sweeps_dead_scratch_and_deleted_models_cache(use_stack, model_id):
    from modelpress.domain.settings import get_settings
    from modelpress.workers.celery_app import _housekeeping_at_start

    work = get_settings().resolved_work_dir
    dead = work / f"job-{insert_job(OWNER, model_id, RECIPE)}-a1-zz"
    (dead / "out").mkdir(parents=True)
    gone = work / "cache" / "models" / "deletedmodel" / "sha"
    kept = work / "cache" / "models" / model_id / "sha"
    for d in (gone, kept):
        (d / "dir").mkdir(parents=True, exist_ok=True)
        (d / "dir" / "w.safetensors").write_bytes(b"\0" * 10)
    _housekeeping_at_start()
    assert not dead.exists() and not gone.exists() and kept.is_dir()

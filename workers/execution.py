"""Running one job: claim it, materialise its inputs, run the pipeline, publish the artifact.

Every database write is a short transaction of its own; nothing is held open while the model
runs. A job is claimed under a row lock (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the
claim transaction starts with a write, which takes SQLite's single write lock), so two workers
that receive the same message never both run it. While it runs, a heartbeat thread stamps
``heartbeat_at``; the sweep reaps jobs whose heartbeat stopped. Every later write checks that the
job is still ours (state running, our worker name): a worker that lost its job (reaped, or
cancelled) stops at the next checkpoint and leaves the row alone.

The artifact is made visible last: the archive is uploaded, its size and SHA-256 are checked in
the store, and only then ONE transaction inserts the ready Artifact row, the metrics and the
report and moves the job to succeeded. A quality-gate miss keeps metrics and report, uploads
nothing and fails the job with ``error_code="quality_gate"``.

Beside it: ``inputs`` (the model and dataset fetched and checked), ``uploads`` (the artifact's
archive and keys), ``failures`` (error codes, reasons, redaction).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from modelpress.compression.base import Cancelled, CompressionError
from modelpress.compression.report import jsonable  # NaN -> None: PostgreSQL's JSON rejects it
from modelpress.domain.db import session_scope
from modelpress.domain.jobs import add_event, transition
from modelpress.domain.models import Artifact, Dataset, Job, Metric, ModelSource, utcnow
from modelpress.domain.settings import Settings, get_settings
from modelpress.domain.states import JobState
from modelpress.domain.store import ArtifactStore, make_store

from .failures import Redactor, error_code_for, one_line, reraise_time_limit
from .inputs import SourceError, dataset_text, materialize_model, safe_extract
from .model_cache import ModelCache
from .uploads import artifact_key, discard_upload, make_archive, remove_stale_uploads

log = logging.getLogger(__name__)

#: what execute_job returns (also logged by the task)
SUCCEEDED, FAILED, CANCELLED, SKIPPED, LOST = "succeeded", "failed", "cancelled", "skipped", "lost"


class LostJob(Exception):
    """The job is no longer ours (reaped by the sweep, or already finished elsewhere)."""


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- row locking


def lock_for_write(session: Session) -> None:
    """Make the next read of this transaction happen under the write lock.

    SQLite has one database-wide write lock, taken by the first write of a transaction; a read
    followed by a write could otherwise fail with a stale snapshot (or two claimers could both
    read "queued"). A write that matches no row takes that lock. PostgreSQL uses row locks
    (``FOR UPDATE``) instead; this is a no-op there."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Job).where(Job.id == "").values(progress=Job.progress))


def _locked_job(session: Session, job_id: str) -> Job | None:
    lock_for_write(session)
    return session.scalar(select(Job).where(Job.id == job_id).with_for_update())


@contextmanager
def owned_job(job_id: str, worker: str, attempt: int | None = None
              ) -> Iterator[tuple[Session, Job]]:
    """A transaction holding the job's row lock, if the job is still running under ``worker``
    (and on ``attempt``, when given; raises :class:`LostJob` otherwise). The lease fence: what
    is written in this transaction commits only while the attempt still owns the job."""
    with session_scope() as s:
        job = _locked_job(s, job_id)
        if job is None or job.state != JobState.running.value or job.worker != worker \
                or (attempt is not None and job.attempt != attempt):
            raise LostJob(f"job {job_id} is no longer running on {worker}"
                          + (f" (attempt {attempt})" if attempt is not None else ""))
        yield s, job


# --------------------------------------------------------------------------- claim


@dataclass
class Claim:
    job_id: str
    worker: str
    owner: str
    model_id: str
    recipe: list[Any]
    calibration_dataset_id: str | None
    eval_dataset_id: str | None
    max_ppl_increase: float | None
    attempt: int
    keep_intermediate: bool = False
    #: measure, eval_windows, tasks/prompts dataset ids, max_accuracy_drop, max_mean_kl
    #: (Job.measure_options)
    measure_options: dict[str, Any] | None = None


def claim_job(job_id: str, worker: str) -> Claim | str:
    """queued -> running under ``worker``; or the reason why not (skipped/cancelled)."""
    with session_scope() as s:
        job = _locked_job(s, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return SKIPPED
        state = JobState(job.state)
        if state.terminal or state is JobState.running:
            # a duplicate delivery (sweep re-publish, broker redelivery) of a job that another
            # worker runs or ran: nothing to do
            return SKIPPED
        if job.cancel_requested:
            transition(s, job, JobState.cancelled, message="cancelled before it started")
            return CANCELLED
        transition(s, job, JobState.running, message=f"started on {worker}")
        job.worker = worker
        return Claim(job.id, worker, job.owner, job.model_id, list(job.recipe or []),
                     job.calibration_dataset_id, job.eval_dataset_id, job.max_ppl_increase,
                     job.attempt, bool(job.keep_intermediate), dict(job.measure_options or {}))


# --------------------------------------------------------------------------- heartbeat & hooks


class JobChannel:
    """The running job's link to its row: heartbeat thread, throttled progress, events, and the
    cancellation flag (cached for ``cache_s``)."""

    def __init__(self, claim: Claim, settings: Settings, cache_s: float = 1.0):
        self.claim = claim
        self.settings = settings
        self.cache_s = cache_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._cancel = False
        self._cancel_read_at = 0.0
        self._progress_at = 0.0
        self._pending: tuple[int, str] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim.job_id}",
                                        daemon=True)

    # -- heartbeat
    def start(self) -> JobChannel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                if not self._touch():
                    log.warning("job %s: no longer ours; stopping at the next checkpoint",
                                self.claim.job_id)
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a DB blip must not kill the job; retry next beat
                log.exception("job %s: heartbeat failed", self.claim.job_id)

    def _touch(self, **values: Any) -> bool:
        """UPDATE the job if it is still ours; False if not."""
        with session_scope() as s:
            r = cast(CursorResult[Any], s.execute(  # an UPDATE's result: rowcount
                update(Job).where(Job.id == self.claim.job_id, Job.state == JobState.running.value,
                                  Job.worker == self.claim.worker, Job.attempt == self.claim.attempt)
                .values(heartbeat_at=utcnow(), **values)))
            return r.rowcount == 1

    # -- hooks for the pipeline
    def progress(self, percent: int, stage: str) -> None:
        now = time.monotonic()
        pct = max(0, min(100, int(percent)))
        stage = (stage or "")[:200]
        with self._lock:
            self._pending = (pct, stage)
            if now - self._progress_at < self.settings.progress_min_interval_s:
                return
            self._progress_at = now
            self._pending = None
        try:
            if not self._touch(progress=pct, stage=stage):
                self.lost.set()
        except Exception as e:  # noqa: BLE001 - progress is best effort
            reraise_time_limit(e)
            log.exception("job %s: progress write failed", self.claim.job_id)

    def flush_progress(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._touch(progress=pending[0], stage=pending[1])
            except Exception as e:  # noqa: BLE001
                reraise_time_limit(e)
                log.exception("job %s: progress write failed", self.claim.job_id)

    def event(self, kind: str, data: dict | None = None) -> None:
        try:
            with session_scope() as s:
                add_event(s, self.claim.job_id, str(kind)[:50],
                          str((data or {}).get("message", ""))[:2000] if isinstance(data, dict)
                          else "", jsonable(data) if data is not None else None)
        except Exception as e:  # noqa: BLE001 - the event log is best effort
            reraise_time_limit(e)
            log.exception("job %s: event write failed", self.claim.job_id)

    def should_stop(self) -> bool:
        if self.lost.is_set():
            return True
        now = time.monotonic()
        if now - self._cancel_read_at >= self.cache_s:
            self._cancel_read_at = now
            try:
                with session_scope() as s:
                    row = s.execute(select(Job.cancel_requested, Job.state, Job.worker,
                                           Job.attempt)
                                    .where(Job.id == self.claim.job_id)).one_or_none()
                if row is None or row.state != JobState.running.value \
                        or row.worker != self.claim.worker or row.attempt != self.claim.attempt:
                    self.lost.set()
                    return True
                self._cancel = bool(row.cancel_requested)
            except Exception as e:  # noqa: BLE001 - keep the last known answer
                reraise_time_limit(e)
                log.exception("job %s: reading cancel flag failed", self.claim.job_id)
        return self._cancel


# --------------------------------------------------------------------------- checkpoints


class StoreCheckpoints:
    """base.CheckpointStore backed by the artifact store under ``jobs/<id>/checkpoints/``.
    A directory is stored as a tar (``<name>.dir.tar``) and restored as a directory."""

    def __init__(self, store: ArtifactStore, job_id: str, scratch: Path):
        self.store = store
        self.prefix = f"jobs/{job_id}/checkpoints/"
        self.scratch = scratch

    def _key(self, name: str) -> str:
        name = name.strip("/")
        if not name or ".." in Path(name).parts:
            raise ValueError(f"invalid checkpoint name {name!r}")
        return self.prefix + name

    def save(self, name: str, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            self.scratch.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.scratch, suffix=".tar")
            os.close(fd)
            try:
                with tarfile.open(tmp, "w") as tf:
                    tf.add(path, arcname=".")
                self.store.put_file(self._key(name) + ".dir.tar", tmp)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            self.store.put_file(self._key(name), path)

    def load(self, name: str, dest: Path) -> bool:
        dest = Path(dest)
        key = self._key(name)
        if self.store.head(key) is not None:
            self.store.get_file(key, dest)
            return True
        if self.store.head(key + ".dir.tar") is not None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            tmp = self.scratch / f"ckpt-{os.getpid()}-{time.monotonic_ns()}.tar"
            try:
                self.store.get_file(key + ".dir.tar", tmp)
                dest.mkdir(parents=True, exist_ok=True)
                safe_extract(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            return True
        return False


# --------------------------------------------------------------------------- the job


def _finish_failed(job_id: str, worker: str, code: str, reason: str,
                   attempt: int | None = None) -> str:
    """Record the failure: one small UPDATE and an event row, nothing on the worker's disk."""
    try:
        with owned_job(job_id, worker, attempt) as (s, job):
            transition(s, job, JobState.failed, error_code=code, error=reason,
                       message=f"failed: {reason}"[:2000])
        return FAILED
    except LostJob:
        return LOST


def _finish_cancelled(job_id: str, worker: str, attempt: int | None = None) -> str:
    try:
        with owned_job(job_id, worker, attempt) as (s, job):
            transition(s, job, JobState.cancelled, message="cancelled while running")
        return CANCELLED
    except LostJob:
        return LOST


def _store_outcome(s: Session, job: Job, outcome: Any) -> None:
    s.execute(delete(Metric).where(Metric.job_id == job.id))
    seen: set[tuple[str, str]] = set()
    for stage, name, value, unit in outcome.metrics:
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(v) or (str(stage), str(name)) in seen:
            continue
        seen.add((str(stage), str(name)))
        s.add(Metric(job_id=job.id, stage=str(stage)[:200], name=str(name)[:100], value=v,
                     unit=None if unit is None else str(unit)[:30]))
    job.report = jsonable(outcome.report)


def _gate_reason(report: dict) -> str:
    for key in ("quality_gate", "gate"):
        g = report.get(key) if isinstance(report, dict) else None
        if isinstance(g, dict):
            for k in ("reason", "message"):
                if g.get(k):
                    return str(g[k])
        elif isinstance(g, str) and g:
            return g
    return "the compressed model missed the max_ppl_increase quality gate"


class _Attempt:
    """What one attempt made and must clean up: scratch folder, cache leases, its own upload."""

    def __init__(self, claim: Claim, settings: Settings):
        self.claim = claim
        self.settings = settings
        self.redact = Redactor(settings)
        self.leases = ExitStack()
        self.store: ArtifactStore | None = None
        self.uploaded_key: str | None = None
        self.scratch: Path | None = None
        self.cache = ModelCache(settings.resolved_work_dir / "cache" / "models")

    def make_scratch(self) -> Path:
        self.scratch = Path(tempfile.mkdtemp(
            dir=self.settings.resolved_work_dir,
            prefix=f"job-{self.claim.job_id}-a{self.claim.attempt}-"))
        return self.scratch

    def use_model(self, src: ModelSource) -> tuple[str, str | None]:
        """The model's local copy (leased from the cache for the rest of the attempt)."""
        assert self.store is not None
        if src.kind != "hub":
            lease = self.cache.lease(src.id, src.sha256)
            self.leases.callback(lease.release)
        path, rev = materialize_model(self.store, src, self.cache.root)
        if src.kind != "hub":
            self.redact.add(path, src.id)
            self.redact.add(self.cache.entry(src.id, src.sha256), src.id)
            self.evict()
        return path, rev

    def evict(self) -> None:
        try:
            self.cache.evict(self.settings.model_cache_max_bytes, existing_models)
        except Exception:  # noqa: BLE001 - eviction is housekeeping
            log.exception("model cache eviction failed")

    def cleanup(self) -> None:
        self.leases.close()
        if self.uploaded_key is not None and self.store is not None:
            discard_upload(self.store, self.uploaded_key)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def existing_models(ids) -> set[str]:
    with session_scope() as s:
        return set(s.scalars(select(ModelSource.id).where(ModelSource.id.in_(list(ids)))))


def _load_inputs(att: _Attempt, channel: JobChannel):
    claim = att.claim
    with session_scope() as s:
        src = s.get(ModelSource, claim.model_id)
        if src is None:
            raise SourceError(f"model {claim.model_id} no longer exists")
        s.expunge(src)
        cal = s.get(Dataset, claim.calibration_dataset_id) if claim.calibration_dataset_id else None
        ev = s.get(Dataset, claim.eval_dataset_id) if claim.eval_dataset_id else None
        for d in (cal, ev):
            if d is not None:
                s.expunge(d)
    channel.progress(0, "fetching inputs")
    assert att.store is not None and att.scratch is not None
    source, revision = att.use_model(src)
    calibration_text = dataset_text(att.store, cal, att.scratch) if cal is not None else None
    eval_text = dataset_text(att.store, ev, att.scratch) if ev is not None else None
    channel.event("inputs", {"message": "inputs ready", "source_kind": src.kind,
                             "calibration_dataset": getattr(cal, "id", None),
                             "eval_dataset": getattr(ev, "id", None)})
    return src, source, revision, calibration_text, eval_text


def _options_text(att: _Attempt, dataset_id: str | None) -> str | None:
    """The text of a job's task or prompt set (None when it names none)."""
    if not dataset_id:
        return None
    with session_scope() as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None:
            raise CompressionError(f"dataset {dataset_id} no longer exists")
        s.expunge(ds)
    assert att.store is not None and att.scratch is not None
    return dataset_text(att.store, ds, att.scratch)


def _model_loader(att: _Attempt):
    def load_model(model_id: str):
        from modelpress.compression.models import load_source

        with session_scope() as s2:
            other = s2.scalar(select(ModelSource).where(ModelSource.id == model_id,
                                                        ModelSource.owner == att.claim.owner))
            if other is None:
                raise CompressionError(f"model {model_id!r} is not registered for this owner")
            s2.expunge(other)
        path, rev = att.use_model(other)
        return load_source(path, revision=rev).model

    return load_model


def _upload_verified(att: _Attempt, channel: JobChannel, model_dir: Path
                     ) -> tuple[str, int, str]:
    """Archive ``model_dir``, upload it under this attempt's own key and check it in the store.
    Returns (key, bytes, sha256)."""
    assert att.store is not None and att.scratch is not None
    archive = att.scratch / "model.tar.gz"
    channel.progress(99, "uploading artifact")
    channel.flush_progress()  # not throttled away: the pipeline's "done" was just written
    local_size, local_sha = make_archive(model_dir, att.claim.job_id, archive)
    if archive.stat().st_size != local_size:
        raise OSError(f"archive size mismatch: wrote {local_size} bytes, file has "
                      f"{archive.stat().st_size}")
    key = artifact_key(att.claim.job_id, att.claim.attempt)
    att.uploaded_key = key
    att.store.put_file(key, archive)
    head = att.store.head(key)
    if head is None or head.bytes != local_size:
        raise OSError(f"artifact upload check failed: store has "
                      f"{head.bytes if head else 'nothing'} bytes, expected {local_size}")
    remote_sha = att.store.sha256(key)
    if remote_sha != local_sha:
        raise OSError(f"artifact upload check failed: store SHA-256 {remote_sha} "
                      f"!= local {local_sha}")
    return key, local_size, local_sha


def _publish(att: _Attempt, channel: JobChannel, outcome: Any) -> str:
    claim = att.claim
    model_dir = Path(outcome.output_dir)
    att.redact.json_files(model_dir)
    unpacked = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    key, size, sha = _upload_verified(att, channel, model_dir)
    if channel.should_stop():
        raise Cancelled("job cancelled")
    assert att.store is not None
    with owned_job(claim.job_id, claim.worker, claim.attempt) as (s, job):
        if job.cancel_requested:
            raise Cancelled("job cancelled")
        _store_outcome(s, job, outcome)
        s.execute(delete(Artifact).where(Artifact.job_id == claim.job_id))
        s.add(Artifact(job_id=claim.job_id, uri=att.store.uri(key), store_key=key, bytes=size,
                       sha256=sha, format=str(outcome.format), unpacked_bytes=unpacked,
                       ready=True))
        add_event(s, claim.job_id, "artifact", f"artifact uploaded: {size} bytes",
                  {"bytes": size, "sha256": sha, "unpacked_bytes": unpacked,
                   "attempt": claim.attempt})
        transition(s, job, JobState.succeeded, message="succeeded")
    att.uploaded_key = None  # published: keep it
    try:
        remove_stale_uploads(att.store, claim.job_id, key)
    except Exception:  # noqa: BLE001 - housekeeping must not fail a published job
        log.exception("job %s: listing stale uploads failed", claim.job_id)
    return SUCCEEDED


def _run(att: _Attempt, channel: JobChannel, run_pipeline: Callable[..., Any] | None) -> str:
    claim = att.claim
    if run_pipeline is None:
        from modelpress.compression.pipeline import run_pipeline as default_run

        run_pipeline = default_run
    from modelpress.compression.device import choose_device
    from modelpress.compression.pipeline import JobHooks

    att.store = make_store(att.settings)
    scratch = att.make_scratch()
    src, source, revision, calibration_text, eval_text = _load_inputs(att, channel)
    hooks = JobHooks(progress=channel.progress,
                     event=lambda k, d: channel.event(k, att.redact.json(d)),
                     should_stop=channel.should_stop,
                     checkpoints=StoreCheckpoints(att.store, claim.job_id, scratch / "ckpt"),
                     load_model=_model_loader(att))
    t0 = time.monotonic()
    opts = claim.measure_options or {}
    outcome = run_pipeline(source, claim.recipe, scratch / "out" / claim.job_id,
                           revision=revision, calibration_text=calibration_text,
                           eval_text=eval_text, max_ppl_increase=claim.max_ppl_increase,
                           hooks=hooks, device=str(choose_device(att.settings.device)),
                           keep_intermediate=claim.keep_intermediate,
                           measure=opts.get("measure", "full"),
                           baseline_cache=att.settings.resolved_work_dir / "cache" / "baselines",
                           tasks_text=_options_text(att, opts.get("tasks_dataset_id")),
                           prompts_text=_options_text(att, opts.get("prompts_dataset_id")),
                           max_accuracy_drop=opts.get("max_accuracy_drop"),
                           max_mean_kl=opts.get("max_mean_kl"),
                           eval_windows=opts.get("eval_windows") or att.settings.eval_windows)
    channel.flush_progress()
    if channel.should_stop():
        raise Cancelled("job cancelled")
    log.info("job %s: pipeline done in %.1f s", claim.job_id, time.monotonic() - t0)
    outcome.report = att.redact.json(outcome.report)
    if not outcome.gate_passed:
        reason = _gate_reason(outcome.report)
        with owned_job(claim.job_id, claim.worker, claim.attempt) as (s, job):
            _store_outcome(s, job, outcome)
            transition(s, job, JobState.failed, error_code="quality_gate", error=reason,
                       message=f"quality gate: {reason}"[:2000])
        return FAILED
    return _publish(att, channel, outcome)


def _fail(att: _Attempt, channel: JobChannel, exc: BaseException) -> str:
    """End the job failed with a code and a reason. On a full disk the scratch is freed first
    and the (large) traceback event is skipped: recording the failure needs no disk here."""
    claim = att.claim
    code = error_code_for(exc)
    reason = att.redact.text(one_line(exc))
    if code == "disk_full":
        reason = f"the worker's disk is full: {reason}"[:1000]
        if att.scratch is not None:
            shutil.rmtree(att.scratch, ignore_errors=True)
        log.error("job %s failed: disk full (%s)", claim.job_id, reason)
    else:
        log.exception("job %s failed (%s)", claim.job_id, code)
    result = _finish_failed(claim.job_id, claim.worker, code, reason, claim.attempt)
    if code != "disk_full":
        channel.event("traceback", {"message": reason, "error_code": code,
                                    "traceback": att.redact.text(
                                        traceback.format_exc()[-20000:])})
    return result


def execute_job(job_id: str, *, worker_name: str | None = None,
                settings: Settings | None = None,
                run_pipeline: Callable[..., Any] | None = None) -> str:
    """Run job ``job_id`` to a terminal state (or leave it alone if it is not ours to run).
    Returns one of succeeded/failed/cancelled/skipped/lost."""
    settings = settings or get_settings()
    worker = worker_name or default_worker_name()
    claim = claim_job(job_id, worker)
    if isinstance(claim, str):
        return claim

    channel = JobChannel(claim, settings).start()
    att = _Attempt(claim, settings)
    try:
        return _run(att, channel, run_pipeline)
    except Cancelled:
        if channel.lost.is_set():
            log.warning("job %s was taken away from %s; leaving it alone", job_id, worker)
            return LOST
        return _finish_cancelled(job_id, worker, claim.attempt)
    except LostJob:
        log.warning("job %s was taken away from %s; leaving it alone", job_id, worker)
        return LOST
    except BaseException as exc:  # noqa: BLE001 - every failure ends the job, with a reason
        result = _fail(att, channel, exc)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: let them through
            raise
        return result
    finally:
        channel.stop()
        att.cleanup()

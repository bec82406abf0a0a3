"""The periodic sweep: what a broker alone cannot guarantee.

1. Reaper: a running job whose ``heartbeat_at`` is older than ``settings.reaper_timeout_s`` lost
   its worker (killed, OOM, machine gone). It goes back to queued with a ``worker_lost`` event
   and is re-published while ``attempt < settings.max_attempts``; after that it fails with
   ``error_code="worker_lost"``. A job whose cancel was requested is simply cancelled.
2. Re-dispatch: a queued job that was never published (``dispatched_at`` NULL: the broker was
   down when the API tried) or whose message seems lost (published more than
   ``settings.dispatch_grace_s`` ago and still queued) is published again. Repeated re-publishes
   of the same job back off exponentially (grace * 2^n, at most an hour), so a job that merely
   waits behind a long one does not flood the queue; duplicates are harmless anyway (a worker
   only claims a queued job).

3. Scratch: a ``work_dir/job-<id>-a<n>-*`` folder whose attempt is not running any more (its
   worker was killed -9, or the job moved on) is removed. Each worker does this at start-up for
   its own work folder too.

Runs as the Celery task ``modelpress.sweep`` (for ``celery beat``), and as a loop thread inside
``modelpress up`` and ``modelpress worker --beat``.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import overload

from sqlalchemy import and_, func, or_, select, update

from modelpress.domain.db import session_scope
from modelpress.domain.jobs import add_event, transition
from modelpress.domain.models import Job, JobEvent, utcnow
from modelpress.domain.settings import Settings, get_settings
from modelpress.domain.states import JobState

from .execution import lock_for_write

log = logging.getLogger(__name__)

#: a job inserted this recently with dispatched_at NULL may still be being published by the API
NEW_JOB_GRACE_S = 5.0
MAX_BACKOFF_S = 3600.0


@overload
def _aware(ts: datetime) -> datetime: ...
@overload
def _aware(ts: datetime | None) -> datetime | None: ...
def _aware(ts: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes (stored as UTC)
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


def reap(settings: Settings, now: datetime) -> dict[str, list[str]]:
    """Handle running jobs with a stale heartbeat. Returns {"requeued": [...], "failed": [...],
    "cancelled": [...]}."""
    cutoff = now - timedelta(seconds=settings.reaper_timeout_s)
    out: dict[str, list[str]] = {"requeued": [], "failed": [], "cancelled": []}
    with session_scope() as s:
        lock_for_write(s)
        stale = s.scalars(
            select(Job).where(Job.state == JobState.running.value,
                              or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))
            .with_for_update(skip_locked=True)).all()
        for job in stale:
            last = _aware(job.heartbeat_at)
            silent = (now - last).total_seconds() if last else None
            who = job.worker or "unknown worker"
            detail = {"worker": who, "attempt": job.attempt,
                      "max_attempts": settings.max_attempts,
                      "last_heartbeat": last.isoformat() if last else None,
                      "silent_s": round(silent, 1) if silent is not None else None}
            what = (f"worker {who} stopped heartbeating "
                    f"({'never' if silent is None else f'{silent:.0f} s ago'}) "
                    f"on attempt {job.attempt}/{settings.max_attempts}")
            add_event(s, job.id, "worker_lost", what, detail)
            if job.cancel_requested:
                transition(s, job, JobState.cancelled, message=f"cancelled; {what}")
                out["cancelled"].append(job.id)
            elif job.attempt < settings.max_attempts:
                transition(s, job, JobState.queued, message=f"requeued: {what}")
                job.dispatched_at = None
                out["requeued"].append(job.id)
            else:
                transition(s, job, JobState.failed, error_code="worker_lost",
                           error=f"{what}; giving up after {job.attempt} attempts")
                out["failed"].append(job.id)
    for k, ids in out.items():
        for i in ids:
            log.warning("reaper: job %s %s", i, k)
    return out


def redispatch(settings: Settings, now: datetime,
               publish: Callable[[str, str], None]) -> dict[str, list[str]]:
    """Publish queued jobs that were never published or whose message seems lost."""
    grace = settings.dispatch_grace_s
    new_cutoff = now - timedelta(seconds=min(NEW_JOB_GRACE_S, grace))
    old_cutoff = now - timedelta(seconds=grace)
    with session_scope() as s:
        rows = s.execute(
            select(Job.id, Job.queue, Job.dispatched_at).where(
                Job.state == JobState.queued.value,
                or_(and_(Job.dispatched_at.is_(None), Job.created_at < new_cutoff),
                    Job.dispatched_at < old_cutoff))
            .order_by(Job.created_at).limit(500)).all()
        due = []
        for job_id, queue, dispatched_at in rows:
            if dispatched_at is not None:
                n = s.scalar(select(func.count()).select_from(JobEvent).where(
                    JobEvent.job_id == job_id, JobEvent.kind == "redispatched")) or 0
                wait = min(grace * (2 ** n), MAX_BACKOFF_S)
                if (now - _aware(dispatched_at)).total_seconds() < wait:
                    continue
            due.append((job_id, queue, dispatched_at))
    out: dict[str, list[str]] = {"published": [], "publish_failed": []}
    for job_id, queue, before in due:
        try:
            publish(job_id, queue)
        except Exception as e:  # noqa: BLE001 - broker down: try again next sweep
            log.warning("sweep: publishing job %s failed: %s", job_id, e)
            out["publish_failed"].append(job_id)
            continue
        with session_scope() as s:
            lock_for_write(s)
            # (a worker may already have claimed it: the stamp and event are still true)
            s.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
            add_event(s, job_id, "redispatched",
                      "published again by the sweep"
                      + (" (never published before)" if before is None else ""),
                      {"queue": queue})
        out["published"].append(job_id)
    return out


_SCRATCH = re.compile(r"^job-(?P<id>[A-Za-z0-9_-]+)-a(?P<attempt>\d+)-")


def sweep_scratch(settings: Settings) -> list[str]:
    """Remove scratch folders of attempts that are not running now (never one whose attempt is
    the job's current, running one: that may be a live job on this host)."""
    work = settings.resolved_work_dir
    found: dict[Path, tuple[str, int]] = {}
    for p in work.iterdir():
        m = _SCRATCH.match(p.name)
        if m and p.is_dir():
            found[p] = (m["id"], int(m["attempt"]))
    if not found:
        return []
    with session_scope() as s:
        rows = s.execute(select(Job.id, Job.state, Job.attempt)
                         .where(Job.id.in_({i for i, _ in found.values()}))).all()
    live = {(r.id, r.attempt) for r in rows if r.state == JobState.running.value}
    removed = []
    for path, key in found.items():
        if key not in live:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            log.info("sweep: removed scratch %s of a dead attempt", path.name)
    return removed


def sweep(settings: Settings | None = None, publish: Callable[[str, str], None] | None = None,
          now: datetime | None = None) -> dict:
    settings = settings or get_settings()
    if publish is None:
        from .dispatch import publish_job

        publish = publish_job
    now = now or utcnow()
    result: dict = {}
    result.update(reap(settings, now))
    result.update(redispatch(settings, now, publish))
    try:
        result["scratch_removed"] = sweep_scratch(settings)
    except Exception:  # noqa: BLE001 - housekeeping must not stop the sweep
        log.exception("sweep: scratch cleanup failed")
    try:
        from .webhooks import deliver_due

        deliver_due(settings)
    except Exception:  # noqa: BLE001 - a receiver or DB blip must not stop the sweep
        log.exception("sweep: webhook delivery failed")
    if any(result.values()):
        log.info("sweep: %s", {k: len(v) for k, v in result.items()})
    return result


class SweepLoop(threading.Thread):
    """Run :func:`sweep` every ``settings.sweep_interval_s`` until stopped."""

    def __init__(self, interval_s: float | None = None):
        super().__init__(name="modelpress-sweep", daemon=True)
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = self.interval_s or get_settings().sweep_interval_s
        while not self._stop_event.is_set():
            try:
                sweep()
            except Exception:  # noqa: BLE001 - the loop must survive a DB or broker blip
                log.exception("sweep failed")
            self._stop_event.wait(interval)

    def stop(self) -> None:
        self._stop_event.set()

"""Operations on job rows shared by the API and the workers. Callers own the transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from .models import Job, JobEvent, utcnow
from .states import JobState, check_transition


def add_event(session: Session, job_id: str, kind: str, message: str = "",
              data: dict[str, Any] | None = None) -> JobEvent:
    ev = JobEvent(job_id=job_id, kind=kind, message=message, data=data)
    session.add(ev)
    return ev


def transition(session: Session, job: Job, new: JobState, *, message: str = "",
               error_code: str | None = None, error: str | None = None) -> Job:
    """Move ``job`` to ``new`` if the state machine allows it (raises IllegalTransition), set the
    timestamps that go with it and log a ``state`` event."""
    old = JobState(job.state)
    check_transition(old, new)
    now = utcnow()
    job.state = new.value
    if new is JobState.running:
        job.started_at = now
        job.heartbeat_at = now
        job.attempt = (job.attempt or 0) + 1
    if new is JobState.queued:
        job.worker = None
        job.heartbeat_at = None
    if new.terminal:
        job.finished_at = now
        if new is JobState.succeeded:
            job.progress = 100
            job.stage = "done"  # not the last step's "uploading artifact"
    if error is not None:
        job.error = error
        job.error_code = error_code
    add_event(session, job.id, "state", message or f"{old.value} -> {new.value}",
              {"from": old.value, "to": new.value, **({"error_code": error_code} if error_code else {})})
    from .webhooks import enqueue  # the outbox row commits (or not) with the change

    enqueue(session, job, {"from": old.value, "to": new.value, "state": new.value,
                           "attempt": job.attempt, "error_code": job.error_code})
    return job

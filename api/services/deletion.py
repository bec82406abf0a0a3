"""Deleting jobs, models and datasets, with what they stored.

- A job: a queued or running job is cancelled first (a ``state`` event is written, so a worker
  running it sees it is no longer its job at its next checkpoint and stops; its fenced publish
  cannot commit), then the row goes with its events, metrics and artifact row, and once that
  has committed every stored object under ``jobs/<id>/`` (artifacts of every attempt,
  checkpoints).
- A model or a dataset that jobs still use: 409 ``in_use``, naming how many, unless
  ``cascade=true``: then those jobs are deleted as above first. Compressed artifacts are a
  user's results, so they are never removed as a side effect of an unqualified DELETE.

Store deletions run after the commit: a rolled-back delete removes nothing.
"""

from __future__ import annotations

import logging

from sqlalchemy import Text, cast, delete, or_, select
from sqlalchemy.orm import Session

from modelpress.domain.jobs import transition
from modelpress.domain.models import Dataset, Job, ModelSource
from modelpress.domain.states import JobState
from modelpress.domain.store import ArtifactStore

from ..deps import after_commit
from ..errors import Conflict
from . import idempotency
from .datasets import get_dataset
from .jobs import get_job
from .models import get_model

log = logging.getLogger("modelpress.api")


def _purge_later(session: Session, store: ArtifactStore, keys: list[str],
                 prefixes: list[str]) -> None:
    def purge() -> None:
        for k in keys:
            store.delete(k)
        for p in prefixes:
            n = store.delete_prefix(p)
            log.info("deleted %d stored objects under %s", n, p)

    after_commit(session, purge)


def _delete_job_rows(session: Session, store: ArtifactStore, job: Job) -> None:
    state = JobState(job.state)
    if not state.terminal:
        transition(session, job, JobState.cancelled, message="cancelled: the job was deleted",
                   error_code="cancelled", error="deleted by the user")
        session.flush()
    idempotency.forget(session, job.owner, job.id)
    session.execute(delete(Job).where(Job.id == job.id))
    _purge_later(session, store, [], [f"jobs/{job.id}/"])


def delete_job(session: Session, store: ArtifactStore, owner: str, job_id: str) -> None:
    _delete_job_rows(session, store, get_job(session, owner, job_id, children=False,
                                             for_update=True))


def _jobs_using(session: Session, owner: str, *conds) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.owner == owner, or_(*conds))
                                .order_by(Job.created_at).with_for_update()))


def _delete_users(session: Session, store: ArtifactStore, what: str, jobs: list[Job],
                  cascade: bool) -> None:
    if jobs and not cascade:
        active = sum(1 for j in jobs if not JobState(j.state).terminal)
        raise Conflict(f"{len(jobs)} job(s) use this {what} ({active} queued or running): "
                       "delete them first, or DELETE with ?cascade=true to delete them too "
                       "(running ones are cancelled)", code=f"{what}_in_use")
    for j in jobs:
        _delete_job_rows(session, store, j)


def delete_model(session: Session, store: ArtifactStore, owner: str, model_id: str,
                 cascade: bool) -> None:
    m = get_model(session, owner, model_id)
    # a job uses a model as its source, or names it in a stage's params (a distillation
    # teacher: ``*_model_id``); ids are 32 random hex digits, so a text match is exact enough
    users = _jobs_using(session, owner, Job.model_id == m.id,
                        cast(Job.recipe, Text).contains(m.id))
    _delete_users(session, store, "model", users, cascade)
    idempotency.forget(session, owner, m.id)
    session.execute(delete(ModelSource).where(ModelSource.id == m.id))
    _purge_later(session, store, [m.store_key] if m.store_key else [], [f"models/{m.id}/"])


def delete_dataset(session: Session, store: ArtifactStore, owner: str, dataset_id: str,
                   cascade: bool) -> None:
    d = get_dataset(session, owner, dataset_id)
    users = _jobs_using(session, owner, Job.calibration_dataset_id == d.id,
                        Job.eval_dataset_id == d.id)
    _delete_users(session, store, "dataset", users, cascade)
    idempotency.forget(session, owner, d.id)
    session.execute(delete(Dataset).where(Dataset.id == d.id))
    _purge_later(session, store, [d.store_key], [f"datasets/{d.id}/"])

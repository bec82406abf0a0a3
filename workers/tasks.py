"""Celery tasks: thin, named wrappers. All the work is in :mod:`.execution` and :mod:`.sweeper`."""

from __future__ import annotations

import logging
import os
import socket

from celery import shared_task

# Imported here, not in the task, so a prefork worker loads torch & co. once in the parent
# before forking (and a task's time limit never counts import time).
from .execution import execute_job
from .sweeper import sweep as do_sweep

log = logging.getLogger(__name__)


def _worker_name(task) -> str:
    host = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{host}:{os.getpid()}"


@shared_task(name="modelpress.run_job", bind=True, acks_late=True, ignore_result=True)
def run_job(self, job_id: str) -> str:
    """Run one compression job. The job row says everything; the message carries only its id."""
    outcome = execute_job(job_id, worker_name=_worker_name(self))
    log.info("job %s: %s", job_id, outcome)
    return outcome


@shared_task(name="modelpress.sweep", ignore_result=True)
def sweep() -> dict:
    """Re-publish lost queued jobs and reap running jobs whose worker stopped heartbeating."""
    return do_sweep()

"""Publishing jobs to the broker (called by the API after its COMMIT, and by the sweep).

Both calls are bounded to a couple of seconds so an HTTP request never hangs on a dead broker: a
failed publish leaves the job queued with ``dispatched_at`` NULL, and the sweep re-publishes it.
"""

from __future__ import annotations

from .celery_app import QUEUES, RUN_JOB, current_celery

#: kombu's retry policy for one publish: 2 tries (each connect is bounded to 1 s by the transport
#: options), then the error is raised: ~0.5 s for a refused connection, ~2.5 s at worst
RETRY_POLICY = {"max_retries": 1, "interval_start": 0.3, "interval_step": 0.3,
                "interval_max": 0.3}


def publish_job(job_id: str, queue: str) -> None:
    """Send task ``modelpress.run_job(job_id)`` to ``queue`` ("gpu" or "cpu"). Raises on a
    broker error (after ~2 s at most)."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    app = current_celery()
    app.send_task(RUN_JOB, args=[job_id], queue=queue, routing_key=queue, retry=True,
                  retry_policy=RETRY_POLICY, ignore_result=True)


def broker_ping() -> None:
    """Raise if the broker cannot be reached within ~2 s (used by ``/readyz``)."""
    app = current_celery()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2,
                               interval_max=0.2, timeout=2)
        # A Redis connection is lazy: make one round trip so a dead server shows.
        client = getattr(conn.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()

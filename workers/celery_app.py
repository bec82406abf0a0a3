"""The Celery application, configured from :mod:`modelpress.domain.settings`.

Job state lives in our database, never in Celery: results are ignored, messages are JSON only,
and a task is acknowledged only after it finished (``acks_late``) so a worker that dies mid-job
does not lose it. The periodic sweep (:mod:`.sweeper`) covers what the broker cannot: a message
that was never published, or one held by a dead worker until the broker's visibility timeout.

Start a worker with ``modelpress worker`` or
``celery -A modelpress.workers.celery_app worker -Q cpu,gpu``.
"""

from __future__ import annotations

import threading

from celery import Celery
from celery.signals import worker_process_init, worker_ready
from kombu import Exchange, Queue

from modelpress.domain.settings import Settings, get_settings

QUEUES = ("gpu", "cpu")
RUN_JOB = "modelpress.run_job"
SWEEP = "modelpress.sweep"


def celery_config(settings: Settings) -> dict:
    broker = settings.resolved_broker_url
    transport_options: dict = {}
    if broker.startswith(("redis://", "rediss://", "sentinel://")):
        transport_options = {
            # An unacknowledged message is handed to another worker after this long. It must
            # outlast the longest task (acks_late), else a running job would be delivered twice;
            # a dead worker's job is recovered much sooner by the sweep's reaper.
            "visibility_timeout": settings.task_time_limit_s + 600,
            "socket_connect_timeout": 1,
            "socket_keepalive": True,
            "health_check_interval": 25,
        }
    return dict(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_default_exchange="cpu",
        task_default_routing_key="cpu",
        task_create_missing_queues=False,
        task_routes={SWEEP: {"queue": "cpu"}},
        # Used only by a separate ``celery beat``: `modelpress up` and `modelpress worker --beat`
        # run the sweep in a thread of their own so it never waits behind a long job.
        beat_schedule={"modelpress-sweep": {"task": SWEEP,
                                            "schedule": settings.sweep_interval_s,
                                            "options": {"queue": "cpu",
                                                        "expires": settings.sweep_interval_s}}},
        enable_utc=True,
        timezone="UTC",
    )


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("modelpress", set_as_current=False)
    app.conf.update(celery_config(s))
    # Tasks are declared with @shared_task; a worker imports this module at start-up (before
    # forking). Publishers (the API) never import it: they send tasks by name and stay light.
    app.conf.update(imports=["modelpress.workers.tasks"])
    return app


#: the app of this process, for the settings at import time (what a worker uses)
celery_app = make_celery()
app = celery_app  # `celery -A modelpress.workers.celery_app` finds `app` or `celery_app`

_apps: dict[str, Celery] = {celery_app.conf.broker_url: celery_app}
_lock = threading.Lock()


def current_celery() -> Celery:
    """The app for the broker the settings name *now* (tests and the CLI change the environment
    after import; a long-lived process sees one broker)."""
    s = get_settings()
    url = s.resolved_broker_url
    with _lock:
        a = _apps.get(url)
        if a is None:
            a = _apps[url] = make_celery(s)
        return a


@worker_process_init.connect
def _fresh_db_pool_after_fork(**_kw) -> None:
    """A prefork child must not reuse the parent's pooled database connections (the parent may
    hold some: `modelpress worker --beat` sweeps from it). Replace the pool without closing the
    parent's sockets."""
    from modelpress.domain.db import get_engine

    get_engine().dispose(close=False)


@worker_ready.connect
def _housekeeping_at_start(**_kw) -> None:
    """Scratch left by attempts killed on this host (kill -9, OOM) goes at start-up, and the
    model cache drops deleted models' entries and shrinks to its cap."""
    import logging

    from .execution import existing_models
    from .model_cache import ModelCache
    from .sweeper import sweep_scratch

    s = get_settings()
    try:
        sweep_scratch(s)
        ModelCache(s.resolved_work_dir / "cache" / "models").evict(s.model_cache_max_bytes,
                                                                   existing_models)
    except Exception:  # noqa: BLE001 - housekeeping must not stop a worker from starting
        logging.getLogger(__name__).exception("housekeeping at start-up failed")

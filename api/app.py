"""The FastAPI application factory (``uvicorn --factory modelpress.api.app:create_app``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from modelpress.domain.db import engine_for
from modelpress.domain.keys import create_key
from modelpress.domain.settings import Settings, get_settings

from .deps import KeyCache, LazyStore
from .errors import install_handlers
from .guards import RequestGuard, TokenBuckets
from .metrics import ApiMetrics, MetricsMiddleware
from .routes import datasets, events, health, jobs, methods, models, ui, webhooks

log = logging.getLogger("modelpress.api")

DESCRIPTION = """\
Compress transformer models: register a model, submit a job (one method or a recipe of
pruning, quantization and distillation stages), follow it, download the compressed model and
compare techniques. Every `/v1` route needs `Authorization: Bearer <key>`; what a key's owner
registers is invisible to other owners. Errors are `{"error": {"code", "message"}}`.
"""


@lru_cache
def api_engine(url: str, pool_timeout_s: float = 10.0, pool_size: int = 10) -> Engine:
    """The API's connection pool. For a server database it skips the per-checkout ping
    (``pool_pre_ping`` costs a round trip on every request); a connection that died with the
    server is detected on use, the pool is invalidated and the next request reconnects.

    A request holds a connection only inside one thread-pool call (see ``deps``), so waiting
    for one is bounded by other requests' database work; past ``pool_timeout_s`` the request is
    answered 503 with Retry-After. At most ``2 * pool_size`` connections per process: with
    several API processes, workers and tools on one PostgreSQL, a larger pool ran the server
    out of connections under bursts ("too many clients": 503s)."""
    if url.startswith("sqlite"):
        return engine_for(url)
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_timeout=pool_timeout_s,
                         pool_pre_ping=False, pool_recycle=1800, pool_use_lifo=True)


def _bootstrap_key(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    if settings.api_key is None:
        return
    from sqlalchemy.exc import IntegrityError

    with app.state.session_factory() as s:
        create_key(s, "admin", settings.api_key.get_secret_value(), name="bootstrap")
        try:
            s.commit()
        except IntegrityError:  # another API worker process registered the same key first
            s.rollback()


def _warm_imports() -> None:
    """Import what a submission needs before the first request: transformers' lazy module
    is not safe to import from many threads at once (50 concurrent first submissions to a
    fresh process got ``ImportError: cannot import name 'AutoConfig'``: 500s)."""
    from transformers import AutoConfig, PretrainedConfig  # noqa: F401

    from modelpress.compression.registry import methods

    methods()


def _start_webhooks(app: FastAPI):
    """The webhook dispatcher thread of this API process (see workers/webhooks.py)."""
    settings: Settings = app.state.settings
    if settings.webhook_dispatch_interval_s <= 0:
        return None
    from modelpress.workers.webhooks import WebhookLoop

    loop = WebhookLoop(settings, app.state.session_factory, settings.webhook_dispatch_interval_s)
    loop.start()
    return loop


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        await run_in_threadpool(_bootstrap_key, app)
    except Exception:
        log.exception("could not store the bootstrap API key (is the database migrated?)")
        raise
    await run_in_threadpool(_warm_imports)
    loop = _start_webhooks(app)
    yield
    if loop is not None:
        loop.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="modelpress", version="1.0.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    engine = api_engine(settings.resolved_database_url, settings.db_pool_timeout_s,
                        settings.db_pool_size)
    app.state.session_factory = sessionmaker(bind=engine, expire_on_commit=False)
    # read-only requests: autocommit, so there is no transaction to finish after the route
    app.state.read_session_factory = sessionmaker(
        bind=engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
    app.state.stores = LazyStore(settings)
    app.state.key_cache = KeyCache(ttl_s=5.0)
    app.state.rate_limits = TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.metrics = ApiMetrics(lambda: app.state.session_factory)
    install_handlers(app)
    for r in (models.router, datasets.router, jobs.router, events.router, webhooks.router,
              methods.router, health.router):
        app.include_router(r)
    ui.install(app)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_json_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app

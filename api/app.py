"""The FastAPI application factory (``uvicorn --factory modelpress.api.app:create_app``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from modelpress.domain.db import _factory
from modelpress.domain.keys import create_key
from modelpress.domain.settings import Settings, get_settings

from .deps import KeyCache, LazyStore
from .errors import install_handlers
from .metrics import ApiMetrics, MetricsMiddleware
from .routes import datasets, health, jobs, methods, models

log = logging.getLogger("modelpress.api")

DESCRIPTION = """\
Compress transformer models: register a model, submit a job (one method or a recipe of
pruning, quantization and distillation stages), follow it, download the compressed model and
compare techniques. Every `/v1` route needs `Authorization: Bearer <key>`; what a key's owner
registers is invisible to other owners. Errors are `{"error": {"code", "message"}}`.
"""


def _bootstrap_key(app: FastAPI) -> None:
    settings: Settings = app.state.settings
    if settings.api_key is None:
        return
    with app.state.session_factory() as s:
        create_key(s, "admin", settings.api_key.get_secret_value(), name="bootstrap")
        s.commit()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        await run_in_threadpool(_bootstrap_key, app)
    except Exception:
        log.exception("could not store the bootstrap API key (is the database migrated?)")
        raise
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="modelpress", version="1.0.0", description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.session_factory = _factory(settings.resolved_database_url)
    app.state.stores = LazyStore(settings)
    app.state.key_cache = KeyCache(ttl_s=5.0)
    app.state.metrics = ApiMetrics(lambda: app.state.session_factory)
    install_handlers(app)
    for r in (models.router, datasets.router, jobs.router, methods.router, health.router):
        app.include_router(r)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app

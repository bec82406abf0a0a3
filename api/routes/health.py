"""Liveness, readiness and Prometheus metrics (no auth)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from ..schemas import Health, Ready

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 5.0
_pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


def _db(request: Request) -> None:
    with request.app.state.session_factory() as s:
        s.execute(text("SELECT 1"))


def _broker(_request: Request) -> None:
    from modelpress.workers.dispatch import broker_ping

    broker_ping()


def _store(request: Request) -> None:
    request.app.state.stores.get().ping()


@router.get("/readyz", response_model=Ready, summary="Database, broker and store reachable",
            responses={503: {"model": Ready, "description": "Which dependency failed"}})
def readyz(request: Request):
    futures = {name: _pool.submit(fn, request)
               for name, fn in (("database", _db), ("broker", _broker), ("store", _store))}
    checks: dict[str, str] = {}
    for name, fut in futures.items():
        try:
            fut.result(timeout=CHECK_TIMEOUT_S)
            checks[name] = "ok"
        except FutureTimeout:
            checks[name] = f"timed out after {CHECK_TIMEOUT_S:g} s"
        except Exception as e:  # noqa: BLE001
            checks[name] = f"{type(e).__name__}: {e}"[:300]
    ok = all(v == "ok" for v in checks.values())
    body = Ready(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)

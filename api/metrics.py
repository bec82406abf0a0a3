"""Prometheus metrics of the API process: requests by route template and status, request latency,
jobs submitted, and jobs by state (counted in the database at scrape time).

Each app gets its own registry (tests build many apps). With several uvicorn worker processes
every process reports its own request counters; the jobs-by-state gauge is global (database)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelpress.domain.models import Job
from modelpress.domain.states import JobState


class JobsByState:
    """A collector that counts jobs per state with one GROUP BY query per scrape."""

    def __init__(self, session_factory: Callable[[], sessionmaker[Session]]):
        self._factory = session_factory

    def collect(self):
        g = GaugeMetricFamily("modelpress_jobs", "Jobs by state (all owners).", labels=["state"])
        counts = {s.value: 0 for s in JobState}
        try:
            with self._factory()() as s:
                for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                    counts[state] = n
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            return
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g

    def describe(self):
        return []


class ApiMetrics:
    def __init__(self, session_factory: Callable[[], sessionmaker[Session]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("modelpress_http_requests", "HTTP requests.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "modelpress_http_request_duration_seconds", "HTTP request latency.",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.jobs_submitted = Counter("modelpress_jobs_submitted", "Jobs submitted.", ["queue"],
                                      registry=self.registry)
        self.registry.register(JobsByState(session_factory))


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead). The route label is the matched
    route's path template, so ids never explode the label space."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status)).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)

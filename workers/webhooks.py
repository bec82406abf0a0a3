"""The webhook dispatcher: POSTs due ``webhook_deliveries`` rows, signed, with exponential
backoff, and records each attempt.

A batch is claimed in one short transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so API
processes and sweeps running it at once never POST the same row twice): each row's attempt
counter is bumped and its ``next_attempt_at`` pushed past the POST timeout (a lease: a
dispatcher that dies mid-POST leaves the row to be retried). The POSTs happen outside any
transaction; each outcome is written in a transaction of its own.

Runs from the API (:class:`WebhookLoop`, every ``webhook_dispatch_interval_s``) and from the
worker's periodic sweep.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from modelpress.domain.models import Job, WebhookDelivery, WebhookOwner, utcnow
from modelpress.domain.settings import Settings, get_settings
from modelpress.domain.webhooks import SIGNATURE_HEADER, CallbackUrlError, check_url, sign

log = logging.getLogger("modelpress.webhooks")

MAX_BACKOFF_S = 3600.0


@dataclass
class Claimed:
    id: int
    url: str
    payload: dict
    attempts: int
    secret: str


@dataclass
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None


def backoff_s(settings: Settings, attempts: int) -> float:
    """Delay after the ``attempts``-th failed POST: base * 2^(attempts-1), capped."""
    return min(MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** max(0, attempts - 1))


def claim(session: Session, settings: Settings, now: datetime, limit: int) -> list[Claimed]:
    """Due rows, each the oldest pending one of its job: a job's changes arrive in order (a
    later one waits while an earlier one is being retried)."""
    earlier = aliased(WebhookDelivery)
    stmt = (select(WebhookDelivery, WebhookOwner.secret)
            .join(Job, Job.id == WebhookDelivery.job_id)
            .join(WebhookOwner, WebhookOwner.owner == Job.owner)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
                   ~select(earlier.id).where(earlier.job_id == WebhookDelivery.job_id,
                                             earlier.status == "pending",
                                             earlier.id < WebhookDelivery.id).exists())
            .order_by(WebhookDelivery.id).limit(limit)
            .with_for_update(of=WebhookDelivery, skip_locked=True))
    lease = now + timedelta(seconds=settings.webhook_timeout_s * 3 + 5)
    out = []
    for row, secret in session.execute(stmt).all():
        row.attempts += 1
        row.next_attempt_at = lease
        out.append(Claimed(row.id, row.url, row.payload, row.attempts, secret))
    return out


def post(c: Claimed, settings: Settings) -> Outcome:
    """One signed POST. The URL is checked again (a name may now resolve to a refused
    address); redirects are not followed."""
    try:
        check_url(c.url, allow_private=settings.webhook_allow_private)
    except CallbackUrlError as e:
        return Outcome(False, None, str(e))
    body = json.dumps({**c.payload, "delivery_id": c.id, "attempt": c.attempts},
                      separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(c.secret, body),
               "Modelpress-Delivery": str(c.id), "Modelpress-Event": c.payload.get("type", ""),
               "User-Agent": "modelpress-webhooks/1"}
    try:
        r = httpx.post(c.url, content=body, headers=headers, timeout=settings.webhook_timeout_s,
                       follow_redirects=False)
    except httpx.HTTPError as e:
        return Outcome(False, None, f"{type(e).__name__}: {e}"[:500])
    ok = 200 <= r.status_code < 300
    return Outcome(ok, r.status_code, None if ok else f"HTTP {r.status_code}")


def record(session: Session, settings: Settings, c: Claimed, o: Outcome, now: datetime) -> None:
    row = session.get(WebhookDelivery, c.id)
    if row is None:  # the job was deleted meanwhile
        return
    row.last_status_code, row.last_error = o.status_code, o.error
    if o.ok:
        row.status, row.delivered_at = "delivered", now
    elif c.attempts >= settings.webhook_max_attempts:
        row.status = "failed"
    else:
        row.next_attempt_at = now + timedelta(seconds=backoff_s(settings, c.attempts))


def deliver_due(settings: Settings | None = None, *, limit: int = 50,
                session_factory: Callable[[], Session] | None = None,
                send: Callable[[Claimed, Settings], Outcome] = post) -> int:
    """Claim and POST the due deliveries; returns how many were attempted."""
    settings = settings or get_settings()
    if session_factory is None:
        from modelpress.domain.db import session_factory as sf

        session_factory = sf()
    with session_factory() as s:
        batch = claim(s, settings, utcnow(), limit)
        s.commit()
    for c in batch:
        outcome = send(c, settings)
        with session_factory() as s:
            record(s, settings, c, outcome, utcnow())
            s.commit()
        if not outcome.ok:
            log.info("webhook delivery %s attempt %s failed: %s", c.id, c.attempts, outcome.error)
    return len(batch)


class WebhookLoop(threading.Thread):
    """:func:`deliver_due` every ``interval_s`` until stopped (the API starts one)."""

    def __init__(self, settings: Settings, session_factory: Callable[[], Session],
                 interval_s: float):
        super().__init__(name="modelpress-webhooks", daemon=True)
        self.settings, self.session_factory, self.interval_s = settings, session_factory, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                deliver_due(self.settings, session_factory=self.session_factory)
            except Exception:  # noqa: BLE001 - survive a database blip
                log.exception("webhook dispatch failed")
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()

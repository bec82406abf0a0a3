"""Webhooks: callback URLs, their validation, the per-owner signing secret and the outbox.

A job's callback URL (given at submission, or the owner's default) is stored in
``job_webhooks``. :func:`enqueue` is called by :func:`modelpress.domain.jobs.transition`: every
state change of such a job inserts a ``webhook_deliveries`` row in the SAME transaction, so a
change that commits is always reported and one that rolls back never is. The dispatcher
(:mod:`modelpress.workers.webhooks`) POSTs the rows.

Signature: ``Modelpress-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from typing import Any, Literal, overload
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Job, JobWebhook, WebhookDelivery, WebhookOwner, utcnow

SIGNATURE_HEADER = "Modelpress-Signature"
MAX_URL_CHARS = 2000


class CallbackUrlError(ValueError):
    """A callback URL that is malformed, does not resolve or points at a refused address."""


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, *, allow_private: bool) -> str:
    """``url`` if it is an http(s) URL whose host resolves only to public addresses (or
    ``allow_private``); else :class:`CallbackUrlError`. Called at submission and again before
    every POST (a name may resolve elsewhere later)."""
    if len(url) > MAX_URL_CHARS:
        raise CallbackUrlError(f"callback URL longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackUrlError("callback URL is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackUrlError("callback URL must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise CallbackUrlError("callback URL must not carry credentials")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        raise CallbackUrlError(f"callback host {parts.hostname[:200]!r} does not resolve") from None
    if not allow_private:
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if _refused(ip):
                raise CallbackUrlError(
                    f"callback host {parts.hostname[:200]!r} resolves to {ip}: loopback, "
                    "link-local and private addresses are refused")
    return url


@overload
def owner_settings(session: Session, owner: str, *, create: Literal[True]) -> WebhookOwner: ...
@overload
def owner_settings(session: Session, owner: str, *, create: bool = False) -> WebhookOwner | None: ...
def owner_settings(session: Session, owner: str, *, create: bool = False) -> WebhookOwner | None:
    row = session.get(WebhookOwner, owner)
    if row is None and create:
        row = WebhookOwner(owner=owner, default_url=None, secret=secrets.token_hex(32),
                           created_at=utcnow())
        session.add(row)
        session.flush()
    return row


def attach(session: Session, owner: str, job_id: str, url: str | None, *,
           allow_private: bool) -> str | None:
    """At submission: the job's callback URL (``url``, else the owner's default), validated and
    stored; the owner gets a signing secret on first use. Returns the URL or None."""
    if url is not None:
        check_url(url, allow_private=allow_private)
        owner_settings(session, owner, create=True)
    else:
        row = owner_settings(session, owner)
        url = row.default_url if row is not None else None
        if url is None:
            return None
    session.add(JobWebhook(job_id=job_id, url=url))
    return url


def enqueue(session: Session, job: Job, payload: dict[str, Any]) -> WebhookDelivery | None:
    """The outbox write of one state change, if the job has a callback URL (a primary-key
    look-up; nothing else when it has none)."""
    url = session.scalar(select(JobWebhook.url).where(JobWebhook.job_id == job.id))
    if url is None:
        return None
    now = utcnow()
    row = WebhookDelivery(job_id=job.id, url=url, event="job.state_changed",
                          payload={"type": "job.state_changed", "job_id": job.id,
                                   "ts": now.isoformat(), **payload},
                          status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(row)
    return row


def sign(secret: str, body: bytes, ts: int | None = None) -> str:
    """The signature header's value for ``body`` sent at ``ts`` (unix seconds)."""
    ts = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """What a receiver does: the header's MAC matches and its timestamp is recent."""
    try:
        fields = dict(p.split("=", 1) for p in header.split(","))
        ts = int(fields["t"])
    except (ValueError, KeyError):
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))

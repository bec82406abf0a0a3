"""``Idempotency-Key`` on creating POSTs: the same key and body give back what the first request
created (201, then 200 on every retry); the same key with another body is a 409. Keys are per
owner and per kind of resource, and expire after ``idempotency_ttl_s``.

The key row is inserted first in the request's transaction: a concurrent request with the same
key blocks on the primary key until the first commits, then fails to insert and replays the
committed result. If the creation fails (a 4xx), the row rolls back with it and the key is free
for a corrected retry.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

from fastapi import Request
from sqlalchemy import CursorResult, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from modelpress.domain.models import IdempotencyKey, new_id, utcnow
from modelpress.domain.settings import Settings

from ..errors import BadRequest, Conflict

HEADER = "Idempotency-Key"
T = TypeVar("T")
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
#: share of claims that also purge every owner's expired keys (keeps the table bounded without
#: a periodic task; the purge is one indexed DELETE)
PURGE_SHARE = 0.01


def header_key(request: Request) -> str | None:
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not _KEY.match(raw):
        raise BadRequest(f"{HEADER} must be 1-200 visible ASCII characters",
                         code="invalid_idempotency_key")
    return raw


def body_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


@dataclass
class Claim:
    row: IdempotencyKey
    replay: bool

    @property
    def resource_id(self) -> str:
        return self.row.resource_id


def _existing(session: Session, owner: str, scope: str, key: str,
              req_hash: str) -> IdempotencyKey | None:
    row = session.scalar(select(IdempotencyKey).where(
        IdempotencyKey.owner == owner, IdempotencyKey.scope == scope, IdempotencyKey.key == key))
    if row is not None and row.request_hash != req_hash:
        raise Conflict(f"{HEADER} was already used with a different request body",
                       code="idempotency_key_reused")
    return row


def claim(session: Session, settings: Settings, owner: str, scope: str, key: str,
          req_hash: str) -> Claim:
    """Reserve ``key`` for this request (``replay=False``, ``resource_id`` pre-allocated), or
    return the earlier request's claim (``replay=True``). Must be the request's first write."""
    now = utcnow()
    if random.random() < PURGE_SHARE:
        purge_expired(session)
    session.execute(delete(IdempotencyKey).where(
        IdempotencyKey.owner == owner, IdempotencyKey.scope == scope, IdempotencyKey.key == key,
        IdempotencyKey.expires_at <= now))
    row = _existing(session, owner, scope, key, req_hash)
    if row is not None:
        return Claim(row, True)
    row = IdempotencyKey(owner=owner, scope=scope, key=key, request_hash=req_hash,
                         resource_id=new_id(), created_at=now,
                         expires_at=now + timedelta(seconds=settings.idempotency_ttl_s))
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key committed first
        session.rollback()
        row = _existing(session, owner, scope, key, req_hash)
        if row is None:
            raise Conflict(f"a request with this {HEADER} is in progress; retry",
                           code="idempotency_key_busy") from None
        return Claim(row, True)
    return Claim(row, False)


def purge_expired(session: Session) -> int:
    """Delete every expired key (all owners); returns how many."""
    # a DELETE's result is a CursorResult (rowcount); execute() is typed for any statement
    res = cast(CursorResult[Any], session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.expires_at <= utcnow())))
    return res.rowcount or 0


def forget(session: Session, owner: str, resource_id: str) -> None:
    """Drop the keys that point at a deleted resource."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                 IdempotencyKey.resource_id == resource_id))


def run_once(session: Session, settings: Settings, owner: str, scope: str, key: str | None,
             req_hash: str, create: Callable[[], T], fetch: Callable[[str], T]) -> tuple[T, bool]:
    """``create()`` under ``key`` (no key: just create), or ``fetch`` the resource an earlier
    request with the same key and body created. Returns (resource, replayed)."""
    if key is None:
        return create(), False
    c = claim(session, settings, owner, scope, key, req_hash)
    if c.replay:
        return fetch(c.resource_id), True
    obj = create()
    c.row.resource_id = obj.id  # type: ignore[attr-defined]
    session.flush()
    return obj, False

"""Typed dependencies of every route: the request's database session, the caller's owner name,
the artifact store and the settings.

The session is a unit of work per request: committed when the route returns normally (before the
response is sent), rolled back on any error. Work that must only happen once the data is durable
(publishing a Celery task) is registered with :func:`after_commit`; cleanup of side effects
outside the database (an uploaded object in the store) with :func:`on_rollback`.

Connections are never held across a thread hop. A route's database work, its commit (or
rollback) and the release of its connection happen in ONE thread-pool call: sync routes get this
from :class:`UnitOfWorkRoute` (the route and then its sessions' finish, in the same thread);
async routes hand their database work to :func:`in_unit_of_work`. Otherwise a request holding a
connection would wait for a pool thread while every pool thread waits for a connection: under
50+ concurrent requests the API deadlocked until the pool timed out (500s).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from modelpress.domain.keys import hash_key
from modelpress.domain.models import ApiKey
from modelpress.domain.settings import Settings as _Settings
from modelpress.domain.store import ArtifactStore

from .errors import TooManyRequests, Unauthorized
from .guards import TokenBuckets

log = logging.getLogger("modelpress.api")

_AFTER_COMMIT = "mp_after_commit"
_ON_ROLLBACK = "mp_on_rollback"
_READ_ONLY = "mp_read_only"

T = TypeVar("T")

#: Finishing a session left open by a route (the fallback path) runs on threads of its own, never
#: behind the route threads of the default limiter, which may all be waiting for a connection.
_FINISH_LIMITER: CapacityLimiter | None = None


def _finish_limiter() -> CapacityLimiter:
    global _FINISH_LIMITER
    if _FINISH_LIMITER is None:
        _FINISH_LIMITER = CapacityLimiter(math.inf)
    return _FINISH_LIMITER


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the request's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


def on_rollback(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` if the request's transaction rolls back (undo side effects outside the DB)."""
    session.info.setdefault(_ON_ROLLBACK, []).append(fn)


def _run_hooks(session: Session, key: str) -> None:
    for fn in session.info.pop(key, []):
        try:
            fn()
        except Exception:  # noqa: BLE001 - a hook must never turn a done request into a 500
            log.exception("%s hook failed", key)


def _finish(session: Session, ok: bool) -> None:
    """Commit (or roll back) the request's transaction, then run the matching hooks."""
    try:
        if ok:
            try:
                session.commit()
            except BaseException:
                session.rollback()
                session.info.pop(_AFTER_COMMIT, None)
                _run_hooks(session, _ON_ROLLBACK)
                raise
            session.info.pop(_ON_ROLLBACK, None)
            _run_hooks(session, _AFTER_COMMIT)
        else:
            session.rollback()
            session.info.pop(_AFTER_COMMIT, None)
            _run_hooks(session, _ON_ROLLBACK)
    finally:
        session.close()


def release(session: Session, ok: bool) -> None:
    """End a request's session in the calling thread: a read session is closed, a unit of work
    committed (``ok``) or rolled back, with its hooks. Idempotent."""
    if session.info.get(_READ_ONLY):
        session.close()
    elif session.in_transaction() or set(session.info) & {_AFTER_COMMIT, _ON_ROLLBACK}:
        _finish(session, ok)
    else:
        session.close()


def in_unit_of_work(session: Session, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` followed by the commit of ``session`` (rollback if it raises), for one thread-pool
    call from an async route: ``await run_in_threadpool(in_unit_of_work(session, fn), ...)``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            release(session, False)
            raise
        release(session, True)
        return out

    return run


def _finishing(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A sync endpoint that finishes the request's sessions (its Session arguments) in the same
    thread, once it has returned or raised."""

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        sessions = [v for v in kwargs.values() if isinstance(v, Session)]
        try:
            out = endpoint(*args, **kwargs)
        except BaseException:
            for s in sessions:
                release(s, False)
            raise
        for s in sessions:
            release(s, True)
        return out

    return run


class UnitOfWorkRoute(APIRoute):
    """Every sync route of the API: its sessions end in the thread that used them."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _finishing(endpoint)
        super().__init__(path, endpoint, **kwargs)


async def _finish_off_loop(session: Session, ok: bool) -> None:
    if session.in_transaction() or set(session.info) & {_AFTER_COMMIT, _ON_ROLLBACK}:
        await anyio.to_thread.run_sync(_finish, session, ok, limiter=_finish_limiter())
    else:
        session.close()


async def get_db(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work. Creating a Session does no I/O, so it happens on the event
    loop. The route normally finishes it in its own thread (:class:`UnitOfWorkRoute`,
    :func:`in_unit_of_work`); one left open is finished here on a thread of its own."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    except BaseException:
        await _finish_off_loop(session, False)
        raise
    await _finish_off_loop(session, True)


async def get_read_db(request: Request) -> AsyncIterator[Session]:
    """A session for routes that only read: autocommit (no BEGIN/COMMIT round trips), nothing
    to commit or roll back; closed by the route's thread, or here (closing does no I/O)."""
    session: Session = request.app.state.read_session_factory()
    session.info[_READ_ONLY] = True
    try:
        yield session
    finally:
        session.close()


async def get_settings_dep(request: Request) -> _Settings:
    return request.app.state.settings


class LazyStore:
    """The artifact store, built on first use (an S3 endpoint that is down at start-up must not
    stop the API from starting; /readyz reports it)."""

    def __init__(self, settings: _Settings):
        self._settings = settings
        self._store: ArtifactStore | None = None
        self._lock = threading.Lock()

    def get(self) -> ArtifactStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from modelpress.domain.store import make_store

                    self._store = make_store(self._settings)
        return self._store


async def get_store(request: Request) -> ArtifactStore:
    stores: LazyStore = request.app.state.stores
    if stores._store is not None:
        return stores._store
    return await run_in_threadpool(stores.get)  # first use: may contact S3


class KeyCache:
    """key hash -> owner for a few seconds, so authenticating is not a query per request.
    Only successful look-ups are cached; a revoked key stops working within ``ttl_s``."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 10_000):
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._data: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> str | None:
        hit = self._data.get(key_hash)
        if hit is None:
            return None
        owner, expires = hit
        if expires < time.monotonic():
            with self._lock:
                self._data.pop(key_hash, None)
            return None
        return owner

    def put(self, key_hash: str, owner: str) -> None:
        with self._lock:
            if len(self._data) >= self.max_entries:
                self._data.clear()
            self._data[key_hash] = (owner, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")

DbSession = Annotated[Session, Depends(get_db, scope="function")]
ReadSession = Annotated[Session, Depends(get_read_db, scope="function")]


def _lookup_owner(factory: Callable[[], Session], key_hash: str) -> str | None:
    """One short read with a session of its own: the connection is back in the pool before the
    route starts (it never waits for a thread while holding one)."""
    with factory() as session:
        return session.scalar(select(ApiKey.owner).where(ApiKey.key_hash == key_hash,
                                                         ApiKey.revoked.is_(False)))


async def current_owner(request: Request,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                        ) -> str:
    """The key's owner. A cache hit costs no I/O and no thread hop; a miss asks the database."""
    if creds is None or not creds.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    h = hash_key(creds.credentials)
    cache: KeyCache = request.app.state.key_cache
    owner = cache.get(h)
    if owner is None:
        owner = await run_in_threadpool(_lookup_owner, request.app.state.read_session_factory, h)
        if owner is None:
            raise Unauthorized("invalid API key")
        cache.put(h, owner)
    limits: TokenBuckets = request.app.state.rate_limits
    wait = limits.take(owner)
    if wait > 0:
        raise TooManyRequests(f"over the rate limit of {limits.rate:g} requests/s per API key "
                              "owner", retry_after_s=wait, code="rate_limited")
    return owner


CurrentOwner = Annotated[str, Depends(current_owner)]
Store = Annotated[ArtifactStore, Depends(get_store)]
Settings = Annotated[_Settings, Depends(get_settings_dep)]

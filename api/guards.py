"""Cheap guards in front of every route: hostile input refused before it reaches a route or the
database, and a per-owner request rate.

- :class:`RequestGuard` (pure ASGI middleware): a NUL character in the path or query -> 400 (the
  database refuses NULs in text: it was a 500); a JSON (or any non-multipart) body over
  ``max_json_body_bytes`` -> 413, read no further; a ``\\u0000`` escape in a JSON body -> 422.
  Multipart uploads are left to ``uploads.py`` (their own streaming size limit).
- :class:`TokenBuckets`: a token bucket per owner, in process memory. With several API
  processes each enforces its own bucket (the effective limit is ``processes x rate``); it costs
  one dict look-up and no I/O per request.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# a JSON \u0000 escape that is not itself escaped (an even run of backslashes before it)
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
MAX_ECHO_CHARS = 200


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr`` of user input, cut to ``limit`` characters: error messages never echo
    unbounded input."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def _has_nul(scope: Scope) -> bool:
    if "\x00" in scope.get("path", ""):
        return True
    qs: bytes = scope.get("query_string", b"")
    return b"\x00" in qs or b"\x00" in unquote_to_bytes(qs)


def _lone_surrogate(body: bytes | bytearray) -> bool:
    """Whether the JSON holds a string that is not valid Unicode (an unpaired surrogate escape:
    the database cannot store it). Only parsed when a surrogate escape is present at all."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON: the route's parser answers that

    def bad(v: Any) -> bool:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(v, dict):
            return any(bad(k) or bad(x) for k, x in v.items())
        if isinstance(v, list):
            return any(bad(x) for x in v)
        return False

    try:
        return bad(doc)
    except RecursionError:
        return False


async def _reply(send: Send, status: int, code: str, message: str) -> None:
    from .errors import error_body  # here: the client imports the schemas (and this module)
    # without the server's fastapi and sqlalchemy

    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await _reply(send, 400, "bad_request", "NUL characters are not allowed in URLs")
            return
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype == b"multipart/form-data" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _reply(send, 413, "payload_too_large",
                         f"request body over the limit of {self.max_body} bytes")
            return
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                await _reply(send, 413, "payload_too_large",
                             f"request body over the limit of {self.max_body} bytes")
                return
        if ctype.endswith(b"json") and _NUL_ESCAPE.search(body):
            await _reply(send, 422, "validation_error",
                         "NUL characters (\\u0000) are not allowed in request bodies")
            return
        if ctype.endswith(b"json") and _SURROGATE_ESCAPE.search(body) and _lone_surrogate(body):
            await _reply(send, 422, "validation_error",
                         "unpaired UTF-16 surrogates (\\ud800-\\udfff) are not text")
            return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when it comes

    return _receive


class TokenBuckets:
    """``rate`` tokens per second up to ``burst`` per owner; :meth:`take` returns 0 when the
    request may go, else the seconds until a token is available."""

    def __init__(self, rate: float, burst: int, max_owners: int = 100_000):
        self.rate, self.burst, self.max_owners = rate, max(1, burst), max_owners
        self._b: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, owner: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._b.get(owner, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._b[owner] = (tokens, now)
                return (1.0 - tokens) / self.rate
            if len(self._b) >= self.max_owners and owner not in self._b:
                self._b.clear()
            self._b[owner] = (tokens - 1.0, now)
            return 0.0


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


MAX_NAME_CHARS = 500  # the models/datasets `name` columns


def check_name(name: str) -> str:
    """A display name that fits its column and holds no NUL (else 422, not a database error)."""
    from .errors import Unprocessable

    if "\x00" in name:
        raise Unprocessable("name must not contain NUL characters", code="validation_error")
    if len(name) > MAX_NAME_CHARS:
        raise Unprocessable(f"name is longer than {MAX_NAME_CHARS} characters",
                            code="validation_error")
    return name


# an absolute POSIX path of two or more parts, not inside a URL or a relative path
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()<>\[\]{}]+/)+[^\s'\"/:,;()<>\[\]{}]*")


def _basename(m: re.Match[str]) -> str:
    parts = [p for p in m.group(0).split("/") if p]
    return parts[-1] if parts else "/"


def scrub_paths(value: Any) -> Any:
    """``value`` (JSON-like) with every absolute server path replaced by its last component:
    responses never show where the server keeps files (temp dirs, the home, the model cache)."""
    if isinstance(value, str):
        return _ABS_PATH.sub(_basename, value) if "/" in value else value
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    return value


def display_name(name: str | None, fallback: str) -> str:
    """An explicit name is checked (422 when it does not fit); the fallback (an upload's file
    name, a hub id) is made to fit: NULs dropped, cut to the column."""
    if name:
        return check_name(name)
    return fallback.replace("\x00", "")[:MAX_NAME_CHARS] or "upload"

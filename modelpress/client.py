"""Python client of the modelpress HTTP API (httpx): :class:`Client` and :class:`AsyncClient`.

    from modelpress.client import Client

    with Client("http://127.0.0.1:8000", api_key="mp_...") as c:   # or MODELPRESS_URL/_API_KEY
        model = c.upload_model("model.gguf", progress=lambda sent, total: ...)
        job = c.submit(model.id, method="rtn", params={"bits": 8})
        job = c.wait(job.id)                  # follows the event stream
        c.download(job.id, "model.tar.gz")    # resumes a partial download, checks the SHA-256

Results are the API's own pydantic models (:mod:`modelpress.api.schemas`). A non-2xx answer
raises :class:`ApiError` with the API's error code. Connection errors, 429 and 503 are retried
with exponential backoff, honouring ``Retry-After``; every creating POST carries an
``Idempotency-Key`` generated per call, so a retry never creates a second job or model.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from modelpress.api.schemas import (
    Comparison,
    DatasetOut,
    EventOut,
    EventPage,
    JobOut,
    JobPage,
    JobWebhooksOut,
    MethodOut,
    ModelOut,
    WebhookSettingsOut,
)

__all__ = ["ApiError", "AsyncClient", "ChecksumMismatch", "Client", "TERMINAL"]

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUS = frozenset({429, 503})
CHUNK = 1 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class ApiError(Exception):
    """A non-2xx answer: ``status``, the API's ``code`` and ``message`` (and ``details``)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class ChecksumMismatch(ApiError):
    def __init__(self, expected: str, got: str):
        super().__init__(0, "checksum_mismatch", f"SHA-256 {got} != expected {expected}")


def api_error(r: httpx.Response) -> ApiError:
    try:
        err = r.json()["error"]
        return ApiError(r.status_code, err.get("code", "error"), err.get("message", ""),
                        err.get("details"))
    except (ValueError, KeyError, TypeError):
        return ApiError(r.status_code, f"http_{r.status_code}", r.text[:500])


def retry_after_s(r: httpx.Response) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), or None."""
    v = r.headers.get("retry-after")
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class Req:
    """One API call: what to send and how to read the answer."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    parse: Callable[[httpx.Response], Any] | None = None
    ok: tuple[int, ...] = ()


def _model(cls):
    return lambda r: cls.model_validate_json(r.content)


def _none(_r: httpx.Response) -> None:
    return None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class Upload:
    """A multipart body streamed from a file, reporting bytes sent."""

    path: Path
    name: str | None
    boundary: str = field(default_factory=lambda: uuid.uuid4().hex)

    def parts(self) -> tuple[bytes, bytes]:
        head = b""
        if self.name is not None:
            head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
                     f"{self.name}\r\n").encode()
        fname = self.path.name.replace('"', "_")
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{fname}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        return head, f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def length(self) -> int:
        head, tail = self.parts()
        return len(head) + self.path.stat().st_size + len(tail)

    def chunks(self, progress: Progress | None) -> Iterator[bytes]:
        head, tail = self.parts()
        total, sent = self.path.stat().st_size, 0
        yield head
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                sent += len(chunk)
                yield chunk
                if progress:
                    progress(sent, total)
        yield tail


def _tar_dir(src: Path) -> Path:
    """An HF directory as a temporary tar (the caller removes it)."""
    fd, tmp = tempfile.mkstemp(suffix=".tar", prefix="modelpress-upload-")
    os.close(fd)
    with tarfile.open(tmp, "w") as tf:
        tf.add(src, arcname=src.name or "model")
    return Path(tmp)


class SseParser:
    """Server-Sent Events, line by line: :meth:`feed` returns (event, data, id) at the end of
    each event, else None. Comments (heartbeats) are skipped."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []
        self.id: str | None = None

    def feed(self, line: str) -> tuple[str, str, str | None] | None:
        if line == "":
            out = (self.event, "\n".join(self.data), self.id) if self.data else None
            self.event, self.data, self.id = "message", [], None
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        elif name == "id":
            self.id = value
        return None


class _Api:
    """Every plain call, written once: ``_call`` runs it (sync: the value; async: a coroutine)."""

    def __init__(self, url: str | None, api_key: str | None, *, retries: int, backoff_s: float,
                 max_backoff_s: float):
        self.url = (url or os.environ.get("MODELPRESS_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key or os.environ.get("MODELPRESS_API_KEY")
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    def _headers(self) -> dict[str, str]:
        h = {"User-Agent": "modelpress-client/1"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _delay(self, attempt: int, r: httpx.Response | None) -> float:
        hinted = retry_after_s(r) if r is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s)
        d = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return d * (0.5 + random.random() / 2)

    def _result(self, req: Req, r: httpx.Response) -> Any:
        if not (200 <= r.status_code < 300 or r.status_code in req.ok):
            raise api_error(r)
        return req.parse(r) if req.parse else r.json()

    def _call(self, req: Req) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------- models
    def register_hub_model(self, source: str, revision: str | None = None,
                           name: str | None = None) -> ModelOut:
        return self._call(Req("POST", "/v1/models", json=_drop_none(
            {"source": source, "revision": revision, "name": name}),
            headers={"Idempotency-Key": uuid.uuid4().hex}, parse=_model(ModelOut)))

    def list_models(self) -> list[ModelOut]:
        return self._call(Req("GET", "/v1/models", parse=lambda r: [
            ModelOut.model_validate(m) for m in r.json()["items"]]))

    def get_model(self, model_id: str) -> ModelOut:
        return self._call(Req("GET", f"/v1/models/{model_id}", parse=_model(ModelOut)))

    def delete_model(self, model_id: str, cascade: bool = False) -> None:
        return self._call(Req("DELETE", f"/v1/models/{model_id}",
                              params={"cascade": "true"} if cascade else None, parse=_none))

    def compare(self, model_id: str) -> Comparison:
        return self._call(Req("GET", f"/v1/models/{model_id}/comparison",
                              parse=_model(Comparison)))

    def list_datasets(self) -> list[DatasetOut]:
        return self._call(Req("GET", "/v1/datasets", parse=lambda r: [
            DatasetOut.model_validate(m) for m in r.json()["items"]]))

    def methods(self) -> list[MethodOut]:
        return self._call(Req("GET", "/v1/methods", parse=lambda r: [
            MethodOut.model_validate(m) for m in r.json()["items"]]))

    # ------------------------------------------------------------------ jobs
    def submit(self, model_id: str, method: str | None = None, params: dict | None = None, *,
               recipe: list[dict] | None = None, idempotency_key: str | None = None,
               **extra: Any) -> JobOut:
        """Submit a job (``method`` + ``params``, or ``recipe``); ``extra``: other JobCreate
        fields (max_ppl_increase, calibration_dataset_id, callback_url...)."""
        body = _drop_none({"model_id": model_id, "method": method, "params": params,
                           "recipe": recipe, **extra})
        if method is not None and params is None:
            body["params"] = {}
        return self._call(Req("POST", "/v1/jobs", json=body, parse=_model(JobOut),
                              headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex}))

    def get_job(self, job_id: str) -> JobOut:
        return self._call(Req("GET", f"/v1/jobs/{job_id}", parse=_model(JobOut)))

    def list_jobs(self, *, state: str | None = None, model_id: str | None = None,
                  method: str | None = None, limit: int = 50,
                  cursor: str | None = None) -> JobPage:
        return self._call(Req("GET", "/v1/jobs", params=_drop_none(
            {"state": state, "model_id": model_id, "method": method, "limit": limit,
             "cursor": cursor}), parse=_model(JobPage)))

    def events(self, job_id: str, after: int | None = None, limit: int = 200) -> EventPage:
        return self._call(Req("GET", f"/v1/jobs/{job_id}/events",
                              params=_drop_none({"after": after, "limit": limit}),
                              parse=_model(EventPage)))

    def cancel(self, job_id: str) -> JobOut:
        return self._call(Req("POST", f"/v1/jobs/{job_id}/cancel", parse=_model(JobOut)))

    def delete_job(self, job_id: str) -> None:
        return self._call(Req("DELETE", f"/v1/jobs/{job_id}", parse=_none))

    def report(self, job_id: str) -> dict[str, Any]:
        return self._call(Req("GET", f"/v1/jobs/{job_id}/report"))

    # -------------------------------------------------------------- webhooks
    def webhook_settings(self) -> WebhookSettingsOut:
        return self._call(Req("GET", "/v1/webhooks", parse=_model(WebhookSettingsOut)))

    def set_default_webhook(self, url: str | None) -> WebhookSettingsOut:
        return self._call(Req("PUT", "/v1/webhooks/default", json={"url": url},
                              parse=_model(WebhookSettingsOut)))

    def job_webhooks(self, job_id: str) -> JobWebhooksOut:
        return self._call(Req("GET", f"/v1/jobs/{job_id}/webhooks",
                              parse=_model(JobWebhooksOut)))


def _stream_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events/stream"


def _resume_headers(part: Path, etag: str | None) -> dict[str, str]:
    have = part.stat().st_size if part.exists() else 0
    if have and etag:
        return {"Range": f"bytes={have}-", "If-Range": etag}
    return {}


def _check_sha(path: Path, expected: str | None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    got = h.hexdigest()
    if expected and got != expected.lower():
        raise ChecksumMismatch(expected, got)
    return got


class Client(_Api):
    """Synchronous client. ``http``: an httpx.Client to use instead of a new one (tests)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, http: httpx.Client | None = None):
        super().__init__(url, api_key, retries=retries, backoff_s=backoff_s,
                         max_backoff_s=max_backoff_s)
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self.http.headers.update(self._headers())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, retried on connection errors and 429/503. ``content`` may be a
        zero-argument callable (a fresh body per attempt)."""
        for attempt in range(self.retries + 1):
            args = dict(kw)
            if callable(args.get("content")):
                args["content"] = args["content"]()
            try:
                r = self.http.request(method, path, **args)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                time.sleep(self._delay(attempt, r))
                continue
            return r
        raise AssertionError("unreachable")

    def _call(self, req: Req) -> Any:
        r = self._send(req.method, req.path, params=req.params, json=req.json,
                       headers=req.headers)
        return self._result(req, r)

    def upload_model(self, source: str | os.PathLike, name: str | None = None, *,
                     revision: str | None = None, progress: Progress | None = None) -> ModelOut:
        """A GGUF file, a tar of an HF directory, an HF directory (tarred on the fly) or, if
        ``source`` is not a local path, a hub model id."""
        p = Path(source)
        if not p.exists():
            return self.register_hub_model(str(source), revision, name)
        tmp = _tar_dir(p) if p.is_dir() else None
        try:
            up = Upload(tmp or p, name if name is not None else (p.name if tmp else None))
            r = self._send("POST", "/v1/models", content=lambda: up.chunks(progress),
                           headers={"Content-Type": up.content_type,
                                    "Content-Length": str(up.length()),
                                    "Idempotency-Key": uuid.uuid4().hex}, timeout=None)
            return self._result(Req("POST", "", parse=_model(ModelOut)), r)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def iter_jobs(self, **filters: Any) -> Iterator[JobOut]:
        """Every job matching ``filters``, page after page."""
        cursor = None
        while True:
            page = self.list_jobs(cursor=cursor, **filters)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def stream_events(self, job_id: str, after: int | None = None,
                      on_progress: Callable[[dict], None] | None = None,
                      until: float | None = None) -> Iterator[EventOut]:
        """The job's events as they happen (Server-Sent Events), reconnecting with
        Last-Event-ID after a dropped connection, until the server ends the stream (after the
        job's terminal state) or ``until`` (time.monotonic(); checked at every event and
        keep-alive)."""
        last = after
        for attempt in range(self.retries + 1):
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream("GET", _stream_path(job_id), headers=headers,
                                      timeout=httpx.Timeout(60.0, read=90.0)) as r:
                    if r.status_code != 200:
                        r.read()
                        if r.status_code in RETRY_STATUS and attempt < self.retries:
                            time.sleep(self._delay(attempt, r))
                            continue
                        raise api_error(r)
                    sse = SseParser()
                    for line in r.iter_lines():
                        if until is not None and time.monotonic() > until:
                            return
                        if (got := sse.feed(line)) is None:
                            continue
                        kind, data, _ = got
                        if kind == "log":
                            ev = EventOut.model_validate_json(data)
                            last = ev.id
                            yield ev
                        elif kind == "progress" and on_progress:
                            on_progress(json.loads(data))
                    return  # the server ended the stream: the job is finished
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(self._delay(attempt, None))

    def wait(self, job_id: str, timeout: float | None = None,
             on_event: Callable[[EventOut], None] | None = None,
             on_progress: Callable[[dict], None] | None = None,
             poll_s: float = 2.0) -> JobOut:
        """Block until the job is finished; returns it. Follows the event stream (again from
        the last event if the server ends it early); polls while the stream is unavailable.
        ``timeout`` seconds -> TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: int | None = None
        while True:
            streamed = True
            try:
                for ev in self.stream_events(job_id, after=last, on_progress=on_progress,
                                             until=deadline):
                    last = ev.id
                    if on_event:
                        on_event(ev)
            except (httpx.TransportError, ApiError) as e:
                if isinstance(e, ApiError) and e.status not in RETRY_STATUS:
                    raise
                streamed = False
            job = self.get_job(job_id)
            if job.state in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            if not streamed:
                if on_progress:
                    on_progress({"state": job.state, "progress": job.progress,
                                 "stage": job.stage})
                time.sleep(poll_s)

    def download(self, job_id: str, dest: str | os.PathLike,
                 progress: Progress | None = None) -> Path:
        """The job's artifact to ``dest``, written to ``dest.part`` first: an interrupted
        download resumes with Range + If-Range (the server sends the whole file if the artifact
        changed). The SHA-256 is checked before ``dest`` appears; a mismatch -> ChecksumMismatch."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        etag_file = dest.with_name(dest.name + ".etag")
        for attempt in range(self.retries + 1):
            etag = etag_file.read_text() if etag_file.exists() else None
            try:
                sha = self._download_once(job_id, part, etag_file, etag, progress)
                break
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(self._delay(attempt, None))
        try:
            _check_sha(part, sha)
        except ChecksumMismatch:
            part.unlink(missing_ok=True)
            etag_file.unlink(missing_ok=True)
            raise
        part.replace(dest)
        etag_file.unlink(missing_ok=True)
        return dest

    def _download_once(self, job_id: str, part: Path, etag_file: Path, etag: str | None,
                       progress: Progress | None) -> str | None:
        headers = _resume_headers(part, etag)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact", headers=headers,
                              follow_redirects=True, timeout=httpx.Timeout(60.0)) as r:
            if r.status_code not in (200, 206):
                r.read()
                raise api_error(r)
            sha = r.headers.get("x-checksum-sha256")
            if r.headers.get("etag"):
                etag_file.write_text(r.headers["etag"])
            done = part.stat().st_size if r.status_code == 206 else 0
            total = done + int(r.headers.get("content-length") or 0)
            with open(part, "ab" if r.status_code == 206 else "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        return sha or (self.get_job(job_id).artifact or _NoArt).sha256


class _NoArt:
    sha256 = None


class AsyncClient(_Api):
    """Asynchronous client: the same calls, awaited (``await c.get_job(id)``)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 timeout: float = 60.0, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, http: httpx.AsyncClient | None = None):
        super().__init__(url, api_key, retries=retries, backoff_s=backoff_s,
                         max_backoff_s=max_backoff_s)
        self.http = http or httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self.http.headers.update(self._headers())

    if TYPE_CHECKING:  # the calls inherited from _Api return awaitables here (see _call)
        async def register_hub_model(  # type: ignore[override]
                self, source: str, revision: str | None = None, name: str | None = None
        ) -> ModelOut: ...

        async def get_job(self, job_id: str) -> JobOut: ...  # type: ignore[override]

        async def list_jobs(  # type: ignore[override]
                self, *, state: str | None = None, model_id: str | None = None,
                method: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage: ...

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            args = dict(kw)
            if callable(args.get("content")):
                args["content"] = args["content"]()
            try:
                r = await self.http.request(method, path, **args)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUS and attempt < self.retries:
                await asyncio.sleep(self._delay(attempt, r))
                continue
            return r
        raise AssertionError("unreachable")

    async def _call(self, req: Req) -> Any:
        r = await self._send(req.method, req.path, params=req.params, json=req.json,
                             headers=req.headers)
        return self._result(req, r)

    async def upload_model(self, source: str | os.PathLike, name: str | None = None, *,
                           revision: str | None = None,
                           progress: Progress | None = None) -> ModelOut:
        p = Path(source)
        if not p.exists():
            return await self.register_hub_model(str(source), revision, name)
        tmp = await asyncio.to_thread(_tar_dir, p) if p.is_dir() else None
        try:
            up = Upload(tmp or p, name if name is not None else (p.name if tmp else None))

            async def body() -> AsyncIterator[bytes]:
                it = up.chunks(progress)
                while (chunk := await asyncio.to_thread(next, it, None)) is not None:
                    yield chunk

            r = await self._send("POST", "/v1/models", content=body,
                                 headers={"Content-Type": up.content_type,
                                          "Content-Length": str(up.length()),
                                          "Idempotency-Key": uuid.uuid4().hex}, timeout=None)
            return self._result(Req("POST", "", parse=_model(ModelOut)), r)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[JobOut]:
        cursor = None
        while True:
            page = await self.list_jobs(cursor=cursor, **filters)
            for j in page.items:
                yield j
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def download(self, job_id: str, dest: str | os.PathLike,
                       progress: Progress | None = None) -> Path:
        """As :meth:`Client.download`: resumable, SHA-256 checked."""
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        etag_file = dest.with_name(dest.name + ".etag")
        for attempt in range(self.retries + 1):
            etag = etag_file.read_text() if etag_file.exists() else None
            try:
                sha = await self._download_once(job_id, part, etag_file, etag, progress)
                break
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
        try:
            await asyncio.to_thread(_check_sha, part, sha)
        except ChecksumMismatch:
            part.unlink(missing_ok=True)
            etag_file.unlink(missing_ok=True)
            raise
        part.replace(dest)
        etag_file.unlink(missing_ok=True)
        return dest

    async def _download_once(self, job_id: str, part: Path, etag_file: Path,
                             etag: str | None, progress: Progress | None) -> str | None:
        headers = _resume_headers(part, etag)
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact", headers=headers,
                                    follow_redirects=True, timeout=httpx.Timeout(60.0)) as r:
            if r.status_code not in (200, 206):
                await r.aread()
                raise api_error(r)
            sha = r.headers.get("x-checksum-sha256")
            if r.headers.get("etag"):
                etag_file.write_text(r.headers["etag"])
            done = part.stat().st_size if r.status_code == 206 else 0
            total = done + int(r.headers.get("content-length") or 0)
            with open(part, "ab" if r.status_code == 206 else "wb") as f:
                async for chunk in r.aiter_bytes(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        if sha:
            return sha
        art = (await self.get_job(job_id)).artifact
        return art.sha256 if art else None

    async def stream_events(self, job_id: str, after: int | None = None,
                            on_progress: Callable[[dict], None] | None = None
                            ) -> AsyncIterator[EventOut]:
        last = after
        for attempt in range(self.retries + 1):
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self.http.stream("GET", _stream_path(job_id), headers=headers,
                                            timeout=httpx.Timeout(60.0, read=90.0)) as r:
                    if r.status_code != 200:
                        await r.aread()
                        if r.status_code in RETRY_STATUS and attempt < self.retries:
                            await asyncio.sleep(self._delay(attempt, r))
                            continue
                        raise api_error(r)
                    sse = SseParser()
                    async for line in r.aiter_lines():
                        if (got := sse.feed(line)) is None:
                            continue
                        kind, data, _ = got
                        if kind == "log":
                            ev = EventOut.model_validate_json(data)
                            last = ev.id
                            yield ev
                        elif kind == "progress" and on_progress:
                            on_progress(json.loads(data))
                    return
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, None))

    async def wait(self, job_id: str, timeout: float | None = None,
                   on_event: Callable[[EventOut], None] | None = None,
                   on_progress: Callable[[dict], None] | None = None,
                   poll_s: float = 2.0) -> JobOut:
        """As :meth:`Client.wait`: follows the event stream, polls while it is unavailable;
        ``timeout`` seconds -> TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: int | None = None

        async def follow() -> None:
            nonlocal last
            async for ev in self.stream_events(job_id, after=last, on_progress=on_progress):
                last = ev.id
                if on_event:
                    on_event(ev)

        while True:
            streamed = True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(follow(), left)
            except TimeoutError:
                pass
            except (httpx.TransportError, ApiError) as e:
                if isinstance(e, ApiError) and e.status not in RETRY_STATUS:
                    raise
                streamed = False
            job = await self.get_job(job_id)
            if job.state in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            if not streamed:
                await asyncio.sleep(poll_s)

"""Streaming multipart/form-data parsing: the file part goes straight to a temporary file (never
into memory), hashed on the way, and the request is cut off with 413 as soon as it passes the
size limit. Small text fields (``name``) are kept in memory with a small cap."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from .errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

T = TypeVar("T")

MAX_FIELD_BYTES = 64 * 1024
#: allowance for multipart framing and small fields on top of the file size limit
FRAMING_SLACK = 1024 * 1024


@dataclass
class UploadedFile:
    path: Path
    filename: str
    bytes: int
    sha256: str


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def cleanup(self) -> None:
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


class _Collector:
    def __init__(self, tmp_dir: Path, limit: int):
        self.tmp_dir, self.limit = tmp_dir, limit
        self.form = ParsedForm()
        self._hdr_field = b""
        self._hdr_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._filename: str | None = None
        self._fh: BinaryIO | None = None
        self._tmp: Path | None = None
        self._hash = hashlib.sha256()  # of the file part being written (new for each)
        self._size = 0
        self._buf = bytearray()

    # header callbacks
    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hdr_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hdr_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hdr_field.strip().lower()] = self._hdr_value.strip()
        self._hdr_field = self._hdr_value = b""

    def on_part_begin(self) -> None:
        self._headers = {}
        self._name = self._filename = None
        self._size = 0
        self._buf = bytearray()

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = opts.get(b"name")
        if name is None:
            raise BadRequest("multipart part without a name")
        self._name = name.decode("utf-8", "replace")
        fn = opts.get(b"filename")
        if fn is not None:
            if self._name in self.form.files:
                raise BadRequest(f"more than one file in field {self._name!r}")
            self._filename = os.path.basename(fn.decode("utf-8", "replace")) or "upload"
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix=".upload-")
            self._fh = os.fdopen(fd, "wb")
            self._tmp = Path(tmp)
            self._hash = hashlib.sha256()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        self._size += len(chunk)
        if self._fh is not None:
            if self._size > self.limit:
                raise PayloadTooLarge(f"upload is larger than the limit of {self.limit} bytes")
            self._fh.write(chunk)
            self._hash.update(chunk)
        else:
            if self._size > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"form field {self._name!r} is too large")
            self._buf += chunk

    def on_part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            assert self._tmp is not None and self._name is not None
            self.form.files[self._name] = UploadedFile(self._tmp, self._filename or "upload",
                                                       self._size, self._hash.hexdigest())
            self._tmp = None
        elif self._name is not None:
            try:
                self.form.fields[self._name] = self._buf.decode("utf-8")
            except UnicodeDecodeError:
                raise Unprocessable(f"form field {self._name!r} is not UTF-8") from None

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        self.form.cleanup()


async def parse_multipart(request: Request, tmp_dir: Path, limit: int) -> ParsedForm:
    """Parse the request body as multipart/form-data. The caller owns ``cleanup()`` of the
    returned form's temporary files; on any error they are already removed."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise UnsupportedMediaType("expected multipart/form-data with a boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + FRAMING_SLACK:
        raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    c = _Collector(tmp_dir, limit)
    parser = MultipartParser(opts[b"boundary"], callbacks={
        "on_part_begin": c.on_part_begin, "on_part_data": c.on_part_data,
        "on_part_end": c.on_part_end, "on_header_field": c.on_header_field,
        "on_header_value": c.on_header_value, "on_header_end": c.on_header_end,
        "on_headers_finished": c.on_headers_finished,
    }, max_size=limit + FRAMING_SLACK)
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except BaseException as e:
        c.abort()
        if isinstance(e, Exception) and not hasattr(e, "status_code"):
            raise BadRequest(f"malformed multipart body: {e}") from e
        raise
    return c.form


async def receive_file(request: Request, tmp_dir: Path, limit: int,
                       register: Callable[[UploadedFile, str | None], T]) -> T:
    """Parse a multipart upload with a required ``file`` field (and an optional ``name``),
    hand it to ``register`` in a worker thread, and remove the temporary file whatever happens."""
    from fastapi.concurrency import run_in_threadpool

    form = await parse_multipart(request, tmp_dir, limit)
    try:
        upload = form.files.get("file")
        if upload is None:
            raise Unprocessable("multipart field `file` is required", code="validation_error")
        return await run_in_threadpool(register, upload, form.fields.get("name"))
    finally:
        form.cleanup()

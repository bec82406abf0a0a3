"""Serving a job's artifact: streamed from the local store with Range support, or a redirect to
a presigned URL on S3."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from modelpress.domain.models import Artifact
from modelpress.domain.store import CHUNK, ArtifactStore

from ..errors import Conflict, NotFound, RangeNotSatisfiable
from ..guards import clip
from .jobs import get_job

_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def ready_artifact(session: Session, owner: str, job_id: str) -> Artifact:
    job = get_job(session, owner, job_id)
    art = job.artifact
    if art is None or not art.ready:
        why = "has no artifact" if art is None else "has an artifact that is not ready"
        raise Conflict(f"job {job_id} {why} (state: {job.state})", code="artifact_not_ready")
    return art


def filename(art: Artifact) -> str:
    return f"{art.job_id}.tar.gz"


def digest_header(sha256_hex: str) -> str:
    return "sha-256=" + base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range -> (start, end inclusive); None = send the whole file (no
    header, or several ranges, which a server may ignore). Invalid or unsatisfiable -> 416."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec.strip():
        raise RangeNotSatisfiable(f"invalid Range header {clip(header)}",
                                  headers={"Content-Range": f"bytes */{size}"})
    if "," in spec:
        return None
    m = _RANGE.match(spec)
    if m is None or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"invalid Range header {clip(header)}",
                                  headers={"Content-Range": f"bytes */{size}"})
    a, b = m.group(1), m.group(2)
    if not a:  # suffix: the last N bytes
        n = int(b)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range",
                                      headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(f"range {clip(header)} is outside 0-{size - 1}",
                                  headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size - 1)


def if_range_matches(if_range: str | None, sha256_hex: str) -> bool:
    """Whether a Range request may be honoured: no ``If-Range``, or one naming the artifact's
    strong ETag. A date (we send no Last-Modified) or another ETag -> False (RFC 9110 13.1.5)."""
    if if_range is None:
        return True
    return if_range.strip() == f'"{sha256_hex}"'


def iter_file(path: Path, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


@dataclass
class LocalDownload:
    path: Path
    size: int
    start: int
    end: int
    partial: bool


def local_download(store: ArtifactStore, art: Artifact, range_header: str | None) -> LocalDownload:
    path = store.path(art.store_key)  # type: ignore[attr-defined]
    if not path.is_file():
        raise NotFound(f"the artifact of job {art.job_id} is missing from the store",
                       code="artifact_missing")
    size = path.stat().st_size
    rng = parse_range(range_header, size)
    if rng is None:
        return LocalDownload(path, size, 0, size - 1, False)
    return LocalDownload(path, size, rng[0], rng[1], True)

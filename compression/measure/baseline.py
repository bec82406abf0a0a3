"""A cache of the source model's measured numbers, so a second job on the same model does not
measure it again.

The key is a SHA-256 over everything the numbers depend on: the model's identity (the bytes of
its files for a local source, else its name and revision), the hashes of the texts and
datasets measured on, the device and the measurement settings (incl. library versions). Entries
are JSON files under a folder the caller names (a worker's cache dir, ``--baseline-cache``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: how often :meth:`BaselineCache.get` found / missed an entry in this process (tests, logs)
COUNTERS = {"hits": 0, "misses": 0, "stores": 0}


def text_hash(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path, h: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def model_identity(source: str, revision: str | None) -> dict[str, Any]:
    """What names the model's weights: a hash of a local file or folder's contents (paths
    relative to it, sizes and bytes), else the hub name and revision."""
    p = Path(source)
    if p.is_file():
        h = hashlib.sha256()
        _file_digest(p, h)
        return {"sha256": h.hexdigest()}
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0" + str(f.stat().st_size).encode())
            _file_digest(f, h)
        return {"sha256": h.hexdigest()}
    return {"name": source, "revision": revision}


def cache_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class BaselineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"invalid baseline key {key!r}")
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            COUNTERS["misses"] += 1
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            COUNTERS["misses"] += 1
            return None
        COUNTERS["hits"] += 1
        return entry

    def put(self, key: str, identity: dict[str, Any], metrics: dict[str, Any],
            measured_at: str, extra: dict[str, Any] | None = None) -> None:
        """Atomic write (a temp file renamed into place): concurrent jobs never read half."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = {**(extra or {}), "key": key, "identity": identity, "metrics": metrics,
                 "measured_at": measured_at}
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, self._path(key))
        COUNTERS["stores"] += 1

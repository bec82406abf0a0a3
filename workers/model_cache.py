"""The worker's bounded cache of uploaded models: ``work_dir/cache/models/<model id>/<sha256>/``.

A job that uses an entry holds a shared ``flock`` on the entry's ``.lock`` file for as long as it
runs (several jobs, in several processes on this host, may share an entry). Eviction takes the
exclusive lock without waiting, so an entry in use is never removed; a process that opened the
lock file of an entry being removed notices the file was replaced and takes the lock again.
Recency is the lock file's mtime, touched at every use. Entries of models that no longer exist
are dropped first; then the least recently used ones until the cache fits its cap.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".lock"


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Lease:
    """A shared lock on one cache entry; ``release()`` when the job is done with it."""

    def __init__(self, entry: Path):
        self.entry = entry
        lock = entry / LOCK
        while True:
            entry.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the entry was removed after our mkdir
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # evicted between open and lock: start again on a fresh entry
        self._fd: int | None = fd
        os.utime(lock)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@dataclass
class Entry:
    path: Path
    model_id: str
    used_at: float
    bytes: int


class ModelCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, model_id: str, sha256: str | None) -> Path:
        return self.root / model_id / (sha256 or "nosha")

    def lease(self, model_id: str, sha256: str | None) -> Lease:
        return Lease(self.entry(model_id, sha256))

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir():
                continue
            for e in model_dir.iterdir():
                if e.is_dir():
                    lock = e / LOCK
                    used = lock.stat().st_mtime if lock.exists() else e.stat().st_mtime
                    out.append(Entry(e, model_dir.name, used, tree_bytes(e)))
        return out

    def _remove_if_unused(self, e: Entry) -> bool:
        lock = e.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a running job uses it
            # unlink the lock first: a process waiting on the old file sees it was replaced
            lock.unlink(missing_ok=True)
            shutil.rmtree(e.path, ignore_errors=True)
            try:
                e.path.parent.rmdir()
            except OSError:
                pass  # other versions of this model remain
            return True
        finally:
            os.close(fd)

    def evict(self, max_bytes: int,
              model_exists: Callable[[Iterable[str]], set[str]] | None = None) -> list[Path]:
        """Drop entries of deleted models, then least recently used entries until the cache
        holds at most ``max_bytes``. Entries in use are skipped. Returns what was removed."""
        entries = self.entries()
        removed: list[Path] = []
        if model_exists is not None and entries:
            live = model_exists({e.model_id for e in entries})
            for e in [e for e in entries if e.model_id not in live]:
                if self._remove_if_unused(e):
                    removed.append(e.path)
                    entries.remove(e)
        total = sum(e.bytes for e in entries)
        for e in sorted(entries, key=lambda e: e.used_at):
            if total <= max_bytes:
                break
            if self._remove_if_unused(e):
                removed.append(e.path)
                total -= e.bytes
        for p in removed:
            log.info("model cache: evicted %s", p)
        return removed

"""A job's inputs on the worker: the uploaded model fetched, verified and unpacked (safe tar
members only, within the archive limits; never pickle weights), and an uploaded dataset's text."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from modelpress.compression.base import CompressionError
from modelpress.domain.archives import (
    ArchiveLimitError,
    ArchiveLimits,
    Budget,
    check_headers,
    weights_problem,
)
from modelpress.domain.models import Dataset, ModelSource
from modelpress.domain.store import ArtifactStore, sha256_file


class SourceError(CompressionError):
    """The uploaded model could not be fetched or unpacked (a bad upload, not a crash)."""


class UnsafeWeights(SourceError):
    """The uploaded checkpoint's weights are pickle files (never loaded)."""


def safe_extract(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Extract a tar holding only regular files and folders with relative, in-tree names,
    within ``limits`` (default: the settings' caps for an archive of this size): checked from
    the headers before anything is written, and again on the bytes written while extracting."""
    dest = Path(dest)
    try:
        limits = limits or ArchiveLimits.for_archive(Path(archive).stat().st_size)
        with tarfile.open(archive, "r:*") as tf:
            members = check_headers(tf, limits)
            for m in members:
                p = Path(m.name)
                if p.is_absolute() or ".." in p.parts:
                    raise SourceError(f"unsafe path in archive: {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise SourceError(f"archive entry {m.name!r} is not a regular file")
            written = Budget(limits)
            for m in members:
                tf.extract(m, dest, filter="data")
                written.add_member(os.lstat(dest / m.name).st_size if m.isfile() else 0)
    except ArchiveLimitError as e:
        raise SourceError(f"the model archive is refused: {e}") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SourceError(f"cannot unpack the model archive: {type(e).__name__}: {e}") from e


def check_weights(model_dir: Path) -> None:
    """Refuse a checkpoint whose weights are pickle files only (loading them unpickles)."""
    names = [str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()]
    problem = weights_problem(names)
    if problem:
        raise UnsafeWeights(problem)


def hf_root(d: Path) -> Path:
    """The folder holding config.json: the root or its single top folder."""
    if (d / "config.json").is_file():
        return d
    subs = [p for p in d.iterdir() if p.is_dir()]
    files = [p for p in d.iterdir() if p.is_file()]
    if len(subs) == 1 and not files and (subs[0] / "config.json").is_file():
        return subs[0]
    raise SourceError("the model archive has no config.json at its root or in a single top folder")


def _fetch_verified(store: ArtifactStore, key: str, dest: Path, sha256: str | None) -> Path:
    """Download ``key`` to ``dest`` atomically (temp name + rename) and check its SHA-256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        if store.head(key) is None:
            raise SourceError(f"the uploaded model file {key!r} is missing from the store")
        store.get_file(key, tmp)
        if sha256 and sha256_file(tmp) != sha256:
            raise SourceError(f"the uploaded model file {key!r} does not match its SHA-256")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def materialize_model(store: ArtifactStore, src: ModelSource, cache_root: Path) -> tuple[str, str | None]:
    """What run_pipeline gets as SOURCE: a local .gguf path, a local HF dir, or the hub id.
    Uploaded models are cached under ``cache_root/<model id>/<sha256>`` (model rows are
    immutable, so a cached copy is reused by later jobs on this worker)."""
    if src.kind == "hub":
        if not src.source:
            raise SourceError(f"model {src.id} has no hub id")
        return src.source, src.revision
    if not src.store_key:
        raise SourceError(f"model {src.id} has no uploaded file")
    base = cache_root / src.id / (src.sha256 or "nosha")
    if src.kind == "gguf":
        target = base / "model.gguf"
        if not (target.is_file() and (src.bytes is None or target.stat().st_size == src.bytes)):
            _fetch_verified(store, src.store_key, target, src.sha256)
        return str(target), None
    if src.kind == "hf-dir":
        done = base / "dir"
        if not done.is_dir():
            base.mkdir(parents=True, exist_ok=True)
            tar = base / "model.tar"
            _fetch_verified(store, src.store_key, tar, src.sha256)
            tmp = Path(tempfile.mkdtemp(dir=base, prefix=".extract-"))
            try:
                safe_extract(tar, tmp)
                check_weights(hf_root(tmp))  # validate before publishing the cached copy
                try:
                    os.replace(tmp, done)
                except OSError:  # another worker on this host finished first
                    if not done.is_dir():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                tar.unlink(missing_ok=True)
        root = hf_root(done)
        check_weights(root)
        return str(root), None
    raise SourceError(f"unknown model kind {src.kind!r}")


def dataset_text(store: ArtifactStore, ds: Dataset, scratch: Path) -> str:
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"dataset-{ds.id}.txt"
    try:
        store.get_file(ds.store_key, tmp)
        raw = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompressionError(f"dataset {ds.id} is not UTF-8 text: {e}") from e

"""What a failed job says: its error code (from the exception and where it was raised), a
one-line reason, and server paths redacted from what the caller sees."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path
from typing import Any

from modelpress.compression.base import CompressionError, UnsupportedModelError
from modelpress.domain.settings import Settings

from .inputs import SourceError, UnsafeWeights

#: errno values and messages (Rust/C++ libraries such as safetensors report it in text) of a
#: full disk or an exceeded quota
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull")


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything in its cause/context chain (each once)."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or anything in its cause/context chain is a full disk or quota."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
    return False


def is_time_limit(exc: BaseException) -> bool:
    """True if Celery's soft or hard time limit interrupted the job, even where the library code
    it interrupted wrapped it (e.g. in a CompressionError while reading the model)."""
    try:
        from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(e, (SoftTimeLimitExceeded, TimeLimitExceeded)) for e in exception_chain(exc))


#: the compression modules that read a model's files (GGUF, safetensors, config)
MODEL_READERS = frozenset({"modelpress.compression.models",
                           "modelpress.compression.streaming.gguf",
                           "modelpress.compression.streaming.source"})


def reraise_time_limit(exc: BaseException) -> None:
    """Re-raise a job's time limit that a best-effort write caught: Celery raises it wherever the
    job is, and swallowed there the job would run on past its limit and succeed."""
    if is_time_limit(exc):
        raise exc


def error_code_for(exc: BaseException) -> str:
    """Map an exception to the job's error_code."""
    if is_disk_full(exc):
        return "disk_full"
    if isinstance(exc, UnsafeWeights):
        return "unsafe_weights"
    if is_time_limit(exc):
        return "timeout"
    try:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return "invalid_params"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (UnsupportedModelError, SourceError)):
        return "invalid_model"
    if isinstance(exc, CompressionError):
        # Raised while reading the model (MODEL_READERS) -> the model is the problem;
        # anywhere else (recipe validation, a method's own checks) -> the params are.
        tb = exc.__traceback__
        last_mp = None
        while tb is not None:
            mod = tb.tb_frame.f_globals.get("__name__", "")
            if mod.startswith("modelpress.compression"):
                last_mp = mod
            tb = tb.tb_next
        return "invalid_model" if last_mp in MODEL_READERS else "invalid_params"
    return "error"


def one_line(exc: BaseException, limit: int = 1000) -> str:
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:limit]


class Redactor:
    """Replaces this server's paths in text and JSON with neutral names: the model's local copy
    with the model's id, the job's scratch, work, store and home folders with ``<work>`` etc.
    (what the caller sees must not show where things live on the server)."""

    def __init__(self, settings: Settings):
        pairs = [(settings.resolved_work_dir, "<work>"), (settings.resolved_store_dir, "<store>"),
                 (settings.home.resolve(), "<home>"), (Path(tempfile.gettempdir()).resolve(),
                                                       "<tmp>")]
        self.pairs: list[tuple[str, str]] = [(str(p), name) for p, name in pairs]

    def add(self, path: str | Path, name: str) -> None:
        self.pairs.append((str(Path(path).resolve()), name))
        self.pairs.append((str(path), name))

    def text(self, value: str) -> str:
        for path, name in sorted(self.pairs, key=lambda p: -len(p[0])):
            if path and path != "/" and path in value:
                value = value.replace(path, name)
        return value

    def json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value

    def json_files(self, folder: Path, max_bytes: int = 64 * 1024 * 1024) -> None:
        """Rewrite the JSON files of an output folder (config.json's ``_name_or_path``, the
        report's ``source``) in place when they mention a server path."""
        for f in folder.rglob("*.json"):
            if not f.is_file() or f.stat().st_size > max_bytes:
                continue
            raw = f.read_text(errors="replace")
            if not any(path in raw for path, _ in self.pairs if path and path != "/"):
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            f.write_text(json.dumps(self.json(data), indent=2))

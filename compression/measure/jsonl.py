"""Reading an uploaded JSONL set line by line, with errors that name the line."""

from __future__ import annotations

import json
from typing import Any

from ..base import CompressionError


class DatasetFormatError(CompressionError):
    """An uploaded task or prompt set is not what its format says (the message names the line)."""


def records(text: str, what: str, max_records: int) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{what} line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DatasetFormatError(f"{what} line {n}: expected a JSON object")
        out.append((n, rec))
        if len(out) > max_records:
            raise DatasetFormatError(f"{what}: more than {max_records} records")
    if not out:
        raise DatasetFormatError(f"{what}: no records (one JSON object per line)")
    return out


def text_field(rec: dict[str, Any], keys: tuple[str, ...], what: str, n: int) -> str:
    for k in keys:
        if k in rec:
            v = rec[k]
            if not isinstance(v, str) or not v:
                raise DatasetFormatError(f"{what} line {n}: {k!r} must be a non-empty string")
            return v
    raise DatasetFormatError(f"{what} line {n}: needs one of {', '.join(map(repr, keys))}")

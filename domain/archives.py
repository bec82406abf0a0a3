"""Limits on what an uploaded model tar may unpack to, and which weight files it may hold.

Used at upload (the API refuses the tar before storing it) and by the worker (before and while
extracting), so a decompression bomb never reaches a disk and a pickle checkpoint is never
loaded. Everything here reads tar headers only; nothing is extracted or unpickled.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from .settings import Settings, get_settings

#: weight files that are pickles (torch.load): never loaded, never accepted without safetensors
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_WEIGHT_SUFFIX = ".safetensors"


class ArchiveLimitError(ValueError):
    """The archive would unpack to more bytes or files than allowed."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int
    max_members: int

    @classmethod
    def for_archive(cls, archive_bytes: int, settings: Settings | None = None) -> ArchiveLimits:
        """The byte cap is the smaller of the absolute cap and the ratio cap (with a floor, so
        small archives of compressible JSON are not refused)."""
        s = settings or get_settings()
        by_ratio = max(int(archive_bytes * s.max_archive_ratio), s.archive_ratio_floor_bytes)
        return cls(min(s.max_extracted_bytes, by_ratio), s.max_archive_members)


class Budget:
    """Counts members and bytes against the limits; raises as soon as one is passed."""

    def __init__(self, limits: ArchiveLimits):
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def add_member(self, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveLimitError(f"the archive holds more than {self.limits.max_members} "
                                    "files and folders")
        self.add_bytes(size)

    def add_bytes(self, n: int) -> None:
        self.bytes += max(0, int(n))
        if self.bytes > self.limits.max_bytes:
            raise ArchiveLimitError(f"the archive unpacks to more than {self.limits.max_bytes} "
                                    "bytes (decompression bomb?)")


def check_headers(tf: tarfile.TarFile, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    """Read the member headers one by one, stopping at the first limit passed (so a tar of a
    million empty files is not listed whole). Sparse members are refused (their header size
    is not what they unpack to)."""
    budget = Budget(limits)
    members = []
    for m in tf:
        if m.issparse():
            raise ArchiveLimitError(f"archive entry {m.name!r} is a sparse file")
        budget.add_member(m.size if m.isfile() else 0)
        members.append(m)
    return members


def weights_problem(names: Iterable[str]) -> str | None:
    """Why these file names are not an acceptable Hugging Face checkpoint, or None: pickle
    weights (``pytorch_model.bin``, ``.pt``, ``.pth``, ``.ckpt``) without any safetensors file
    are refused (loading them means unpickling, which can run code)."""
    paths = [PurePosixPath(n) for n in names]
    if any(p.suffix.lower() == SAFE_WEIGHT_SUFFIX for p in paths):
        return None
    pickles = sorted({p.name for p in paths if p.suffix.lower() in PICKLE_WEIGHT_SUFFIXES})
    if pickles:
        return ("the checkpoint's weights are pickle files only ("
                + ", ".join(pickles[:5]) + "); upload safetensors weights "
                "(model.save_pretrained(dir, safe_serialization=True))")
    return None

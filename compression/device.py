"""The one place that chooses where tensors run."""

from __future__ import annotations

import os

import torch


def choose_device(preference: str | None = None) -> torch.device:
    """``preference`` (or ``MODELPRESS_DEVICE``): "cuda", "cpu" or "auto" (default): CUDA if
    present, else CPU."""
    pref = (preference or os.environ.get("MODELPRESS_DEVICE") or "auto").lower()
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("MODELPRESS_DEVICE asks for CUDA but no CUDA device is available")
        return torch.device(pref)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gpu_available() -> bool:
    return torch.cuda.is_available()

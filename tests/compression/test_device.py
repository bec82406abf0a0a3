"""compression/device.py: device choice and giving memory back."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelpress.compression.device import choose_device, release_pages


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_choose_device_cpu():
    assert choose_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(sys.platform != "linux", reason="madvise + /proc are Linux's")
def test_release_pages_frees_written_pages_of_a_mapped_checkpoint(tmp_path):
    """safetensors maps the file privately; pages written into a loaded tensor stay resident
    after the tensor is dropped (the mapping outlives it) unless released."""
    save_file({"a": torch.zeros(16, 2**20), "b": torch.zeros(16, 2**20)}, str(tmp_path / "w.st"))
    sd = load_file(str(tmp_path / "w.st"))  # 2 x 64 MB
    a = sd.pop("a")
    before = _rss_mb()
    a.fill_(1.0)  # copy-on-write: 64 MB of new resident pages
    written = _rss_mb()
    assert written - before > 48
    release_pages(a)
    del a
    assert _rss_mb() - before < 16
    assert torch.all(sd["b"] == 0)  # the rest of the mapping is untouched

"""Worker safeguards that need no services: archive limits (decompression bombs), pickle-only
checkpoints, the bounded model cache, disk-full classification, server paths redacted."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from modelpress.domain.archives import ArchiveLimits, weights_problem
from modelpress.domain.settings import Settings
from modelpress.workers.failures import Redactor, error_code_for, is_disk_full
from modelpress.workers.inputs import SourceError, UnsafeWeights, check_weights, safe_extract
from modelpress.workers.model_cache import ModelCache


def _gz_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def test_bomb_refused_from_headers_before_anything_is_written(tmp_path):
    # 4 MB of zeros gzip to ~4 KB: a ratio of ~1000, like the 14.6 MB -> 2 GiB bomb
    arc = _gz_tar(tmp_path / "bomb.tar.gz", {"m/config.json": b"{}",
                                             "m/model.safetensors": b"\0" * (4 << 20)})
    s = Settings(max_archive_ratio=20, archive_ratio_floor_bytes=64 * 1024)
    limits = ArchiveLimits.for_archive(arc.stat().st_size, s)
    assert limits.max_bytes == 20 * arc.stat().st_size < 4 << 20
    with pytest.raises(SourceError, match=f"refused.*more than {limits.max_bytes} bytes"):
        safe_extract(arc, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_member_count_and_absolute_caps(tmp_path):
    arc = _gz_tar(tmp_path / "many.tar.gz", {f"m/f{i}.json": b"{}" for i in range(50)})
    with pytest.raises(SourceError, match="more than 10 files"):
        safe_extract(arc, tmp_path / "out", ArchiveLimits(max_bytes=10**9, max_members=10))
    assert not any((tmp_path / "out").rglob("*.json")) if (tmp_path / "out").exists() else True
    s = Settings(max_extracted_bytes=1000, archive_ratio_floor_bytes=10**9)
    assert ArchiveLimits.for_archive(10**6, s).max_bytes == 1000


def test_within_limits_extracts_every_byte(tmp_path):
    data = os.urandom(50_000)
    arc = _gz_tar(tmp_path / "ok.tar.gz", {"m/config.json": b"{}", "m/model.safetensors": data})
    safe_extract(arc, tmp_path / "out", ArchiveLimits(max_bytes=50_002, max_members=3))
    assert (tmp_path / "out/m/model.safetensors").read_bytes() == data


@pytest.mark.parametrize("names,refused", [
    (["config.json", "pytorch_model.bin"], True),
    (["m/config.json", "m/weights.pt", "m/tokenizer.json"], True),
    (["config.json", "model.ckpt"], True),
    (["config.json", "pytorch_model.bin", "model.safetensors"], False),
    (["config.json", "model-00001-of-00002.safetensors"], False),
    (["config.json", "tokenizer.json"], False),
])
def test_pickle_only_checkpoints(tmp_path, names, refused):
    problem = weights_problem(names)
    assert (problem is not None) == refused
    d = tmp_path / "m"
    for n in names:
        (d / n).parent.mkdir(parents=True, exist_ok=True)
        (d / n).write_bytes(b"x")
    if refused:
        assert "pickle" in problem and "safetensors" in problem
        with pytest.raises(UnsafeWeights) as ei:
            check_weights(d)
        assert error_code_for(ei.value) == "unsafe_weights"
    else:
        check_weights(d)


def test_disk_full_is_recognised_through_wrappers():
    enospc = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise enospc
        except OSError as e:
            raise SourceError("cannot unpack the model archive") from e
    except SourceError as wrapped:
        assert is_disk_full(wrapped) and error_code_for(wrapped) == "disk_full"
    assert error_code_for(OSError(errno.EDQUOT, "quota")) == "disk_full"
    assert error_code_for(RuntimeError("IoError(Os { code: 28, kind: StorageFull })")) == "disk_full"
    assert error_code_for(OSError(errno.EACCES, "denied")) == "error"
    assert error_code_for(SourceError("bad")) == "invalid_model"


def test_redactor_hides_server_paths(tmp_path):
    s = Settings(home=tmp_path / "home")
    r = Redactor(s)
    local = s.resolved_work_dir / "cache/models/M1/abc/dir/tiny"
    r.add(local, "M1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"_name_or_path": str(local), "a": 1}))
    (out / "report.json").write_text(json.dumps({"source": str(local), "x": [str(local)]}))
    r.json_files(out)
    assert json.loads((out / "config.json").read_text()) == {"_name_or_path": "M1", "a": 1}
    assert json.loads((out / "report.json").read_text()) == {"source": "M1", "x": ["M1"]}
    msg = r.text(f"OSError: cannot open {s.resolved_work_dir}/job-x-a1-q/ckpt/a.tar")
    assert str(tmp_path) not in msg and "<work>/job-x-a1-q/ckpt/a.tar" in msg


def _entry(cache: ModelCache, mid: str, nbytes: int, used_at: float) -> Path:
    e = cache.entry(mid, "sha")
    (e / "dir").mkdir(parents=True)
    (e / "dir" / "w.safetensors").write_bytes(b"\0" * nbytes)
    (e / ".lock").touch()
    os.utime(e / ".lock", (used_at, used_at))
    return e


def test_cache_evicts_lru_unused_entries_and_deleted_models(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    now = time.time()
    old = _entry(cache, "old", 4000, now - 300)
    busy = _entry(cache, "busy", 4000, now - 200)
    mid = _entry(cache, "mid", 4000, now - 100)
    new = _entry(cache, "new", 4000, now)
    gone = _entry(cache, "gone", 10, now)
    lease = cache.lease("busy", "sha")  # a running job holds it (and touches it: now recent)
    os.utime(busy / ".lock", (now - 200, now - 200))
    try:
        removed = cache.evict(9000, model_exists=lambda ids: set(ids) - {"gone"})
    finally:
        lease.release()
    # deleted model first; then LRU: old goes, busy is skipped (in use), mid goes -> 8000
    assert set(removed) == {gone, old, mid}
    assert busy.is_dir() and new.is_dir() and not old.exists() and not (tmp_path / "cache/gone").exists()
    # once released, busy is the least recently used and goes when the cap requires it
    assert cache.evict(4000) == [busy]


def test_lease_survives_an_eviction_race(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    e = _entry(cache, "m", 100, time.time() - 1000)
    assert cache.evict(0) == [e] and not e.exists()
    lease = cache.lease("m", "sha")  # re-creates the entry and locks it
    try:
        assert (e / ".lock").is_file() and cache.evict(0) == []
    finally:
        lease.release()

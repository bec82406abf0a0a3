"""The worker's building blocks that need no running services: archive handling, checkpoints
in the store, error classification."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from modelpress.domain.store import LocalStore, sha256_file
from modelpress.workers.execution import StoreCheckpoints, jsonable
from modelpress.workers.failures import error_code_for, one_line
from modelpress.workers.inputs import SourceError, hf_root, safe_extract
from modelpress.workers.uploads import make_archive


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return path


@pytest.mark.parametrize("name,kind", [("../evil", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE),
                                       ("m/link", tarfile.SYMTYPE), ("m/dev", tarfile.CHRTYPE)])
def test_safe_extract_refuses_unsafe_members(tmp_path, name, kind):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    if kind == tarfile.SYMTYPE:
        ti.linkname = "/etc/passwd"
    arc = _tar(tmp_path / "a.tar", [(ti, b"x" if kind == tarfile.REGTYPE else None)])
    with pytest.raises(SourceError):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_safe_extract_and_hf_root(tmp_path):
    cfg = tarfile.TarInfo("model/config.json")
    w = tarfile.TarInfo("model/model.safetensors")
    arc = _tar(tmp_path / "a.tar", [(cfg, b"{}"), (w, b"123")])
    safe_extract(arc, tmp_path / "out")
    assert hf_root(tmp_path / "out") == tmp_path / "out" / "model"
    assert hf_root(tmp_path / "out" / "model") == tmp_path / "out" / "model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="config.json"):
        hf_root(tmp_path / "empty")
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all")
    with pytest.raises(SourceError, match="cannot unpack"):
        safe_extract(tmp_path / "bad.tar", tmp_path / "out2")


def test_make_archive_one_top_folder_regular_files_only(tmp_path):
    d = tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.bin").write_bytes(b"\0" * 5000)
    (d / "link").symlink_to("/etc/passwd")
    n, sha = make_archive(d, "job123", tmp_path / "a.tgz")
    assert n == (tmp_path / "a.tgz").stat().st_size and sha == sha256_file(tmp_path / "a.tgz")
    with tarfile.open(tmp_path / "a.tgz") as tf:
        names = tf.getnames()
    assert sorted(names) == ["job123", "job123/config.json", "job123/sub", "job123/sub/w.bin"]


def test_store_checkpoints_files_and_folders(tmp_path):
    store = LocalStore(tmp_path / "store")
    ck = StoreCheckpoints(store, "j1", tmp_path / "scratch")
    f = tmp_path / "state.pt"
    f.write_bytes(b"abc")
    ck.save("0-distill/step-10.pt", f)
    assert store.head("jobs/j1/checkpoints/0-distill/step-10.pt").bytes == 3
    assert ck.load("0-distill/step-10.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == b"abc"
    folder = tmp_path / "dir"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.txt").write_text("hello")
    ck.save("model", folder)
    assert ck.load("model", tmp_path / "restored")
    assert (tmp_path / "restored" / "a" / "x.txt").read_text() == "hello"
    assert not ck.load("missing", tmp_path / "nothing")
    with pytest.raises(ValueError):
        ck.save("../escape", f)


def test_error_codes():
    from celery.exceptions import SoftTimeLimitExceeded
    from pydantic import BaseModel, ValidationError

    from modelpress.compression.base import CompressionError, UnsupportedModelError
    from modelpress.compression.models import load_gguf
    from modelpress.compression.recipe import RecipeError

    class P(BaseModel):
        x: int

    try:
        P(x="nope")
    except ValidationError as e:
        assert error_code_for(e) == "invalid_params"
    try:
        load_gguf("/nonexistent/model.gguf")
    except CompressionError as e:  # raised while loading the model
        assert error_code_for(e) == "invalid_model"
    assert error_code_for(UnsupportedModelError("bert only")) == "invalid_model"
    assert error_code_for(SourceError("bad tar")) == "invalid_model"
    assert error_code_for(RecipeError("terminal stage not last")) == "invalid_params"
    assert error_code_for(SoftTimeLimitExceeded()) == "timeout"
    assert error_code_for(RuntimeError("boom")) == "error"


def test_a_time_limit_wrapped_by_the_model_reader_is_still_a_timeout(tmp_path, monkeypatch):
    """The soft limit can land inside AutoConfig.from_pretrained, which load_model wraps in a
    CompressionError; the job must still say timeout, not invalid_model."""
    import transformers
    from celery.exceptions import SoftTimeLimitExceeded

    from modelpress.compression.base import CompressionError
    from modelpress.compression.models import load_pretrained

    def interrupted(*a, **k):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", interrupted)
    with pytest.raises(CompressionError) as ei:
        load_pretrained(tmp_path)
    assert error_code_for(ei.value) == "timeout"


def test_one_line_and_jsonable():
    assert one_line(ValueError("first\n  second\tthird")) == "ValueError: first second third"
    assert one_line(KeyError()) == "KeyError"
    assert len(one_line(RuntimeError("x" * 5000))) == 1000
    assert jsonable({"a": float("nan"), "b": [1.5, float("inf")], "c": Path("/x")}) == {
        "a": None, "b": [1.5, None], "c": "/x"}


def test_unreadable_gguf_is_invalid_model(tmp_path):
    """The GGUF reader (streaming.gguf, behind compression.models) blames the model."""
    from modelpress.compression.models import load_source

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 1000)
    with pytest.raises(Exception) as ei:
        load_source(bad)
    assert error_code_for(ei.value) == "invalid_model"


def test_best_effort_job_writes_do_not_swallow_the_time_limit(monkeypatch):
    """Celery raises the soft time limit wherever the job is; when that is inside a progress,
    event or cancel-flag write (best effort: other errors are logged), it must propagate, or the
    job runs on past its limit and succeeds."""
    from celery.exceptions import SoftTimeLimitExceeded

    from modelpress.domain.settings import Settings
    from modelpress.workers import execution as X

    def interrupted(*a, **k):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(X, "session_scope", interrupted)
    ch = X.JobChannel(X.Claim("j1", "w", "o", "m", [], None, None, None, 1), Settings(),
                      cache_s=0.0)
    for call in (lambda: ch.progress(50, "x"), lambda: ch.event("stage", {"message": "m"}),
                 ch.should_stop):
        with pytest.raises(SoftTimeLimitExceeded):
            call()
    monkeypatch.setattr(X, "session_scope", lambda: (_ for _ in ()).throw(OSError("db blip")))
    ch._progress_at = 0.0
    ch.progress(60, "y")  # any other failure stays best effort
    ch.event("stage", {"message": "m"})
    assert ch.should_stop() is False

"""POST /v1/models with hostile tars: decompression bombs, too many files, pickle-only weights.
Each is refused with a 4xx naming the reason, and nothing is stored."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient

CFG = json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                  "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2}).encode()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _stored(settings) -> list:
    root = settings.resolved_store_dir / "models"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def limited(settings_env, pg_url, redis_url, published):
    s = settings_env(database_url=pg_url, broker_url=redis_url, api_key="mp_archive_test_key",
                     archive_ratio_floor_bytes=1 << 20, max_archive_members=20)
    from modelpress.api.app import create_app

    with TestClient(create_app()) as c:
        yield c, {"Authorization": "Bearer mp_archive_test_key"}, s


@pytest.mark.parametrize("members,mode,status,code,words", [
    # 8 MiB of zeros in a ~8 KB tar.gz: ratio ~1000
    ({"m/config.json": CFG, "m/model.safetensors": b"\0" * (8 << 20)}, "w:gz", 413,
     "archive_too_large", "unpacks to more than"),
    ({"m/config.json": CFG, **{f"m/f{i}.txt": b"x" for i in range(30)}}, "w:gz", 413,
     "archive_too_large", "more than 20 files"),
    ({"m/config.json": CFG, "m/pytorch_model.bin": b"\x80\x04K\x01."}, "w", 422,
     "unsafe_weights", "pytorch_model.bin"),
])
def test_hostile_tar_refused_and_nothing_stored(limited, members, mode, status, code, words):
    c, h, s = limited
    before = c.get("/v1/models", headers=h).json()["items"]
    r = c.post("/v1/models", headers=h, files={"file": ("m.tar", _tar(members, mode))})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
    assert _stored(s) == []
    assert c.get("/v1/models", headers=h).json()["items"] == before


def test_safetensors_next_to_a_bin_is_accepted(limited):
    c, h, s = limited
    r = c.post("/v1/models", headers=h, files={"file": ("m.tar", _tar(
        {"m/config.json": CFG, "m/model.safetensors": b"{}", "m/training_args.bin": b"x"}))})
    assert r.status_code == 201, r.text
    assert len(_stored(s)) == 1

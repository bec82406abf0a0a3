"""POST/GET /v1/models: tar and GGUF uploads, hub ids, validation, isolation between owners."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time

import pytest

from .conftest import make_tar


def _store_files(settings):
    root = settings.resolved_store_dir / "models"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_upload_tiny_llama_tar(client, alice, bob, tiny_llama_tar, app_settings):
    r = client.post("/v1/models", headers=alice[1], data={"name": "tiny"},
                    files={"file": ("tiny-llama.tar", tiny_llama_tar, "application/x-tar")})
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["name"] == "tiny" and m["kind"] == "hf-dir"
    assert m["model_type"] == "llama" and m["architecture"] == "LlamaForCausalLM"
    assert m["config"]["hidden_size"] == 64 and m["config"]["num_key_value_heads"] == 2
    assert m["bytes"] == len(tiny_llama_tar)
    assert m["sha256"] == hashlib.sha256(tiny_llama_tar).hexdigest()
    stored = app_settings.resolved_store_dir / f"models/{m['id']}/model.tar"
    assert stored.read_bytes() == tiny_llama_tar

    assert client.get(f"/v1/models/{m['id']}", headers=alice[1]).json()["id"] == m["id"]
    assert [x["id"] for x in client.get("/v1/models", headers=alice[1]).json()["items"]] == [m["id"]]
    # invisible to another owner
    assert client.get(f"/v1/models/{m['id']}", headers=bob[1]).status_code == 404
    assert client.get("/v1/models", headers=bob[1]).json()["items"] == []


def test_upload_tar_without_top_folder(client, alice, tiny_llama_dir):
    data = make_tar(tiny_llama_dir, top=None)
    r = client.post("/v1/models", headers=alice[1], files={"file": ("m.tar", data)})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "m.tar" and r.json()["model_type"] == "llama"


def _tar(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, content in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content))
        if symlink:
            ti = tarfile.TarInfo(symlink)
            ti.type = tarfile.SYMTYPE
            ti.linkname = "/etc/passwd"
            tf.addfile(ti)
    return buf.getvalue()


CFG = json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 2, "num_attention_heads": 4,
                  "architectures": ["LlamaForCausalLM"]}).encode()


@pytest.mark.parametrize("payload,needle", [
    (b"hello, this is not a model at all" * 10, "neither a GGUF file nor a tar"),
    (b"GGUF" + b"\x00" * 200, "not a readable GGUF model"),
    (_tar({"m/weights.bin": b"x"}), "no config.json"),
    (_tar({"../config.json": CFG}), "unsafe path"),
    (_tar({"/abs/config.json": CFG}), "unsafe path"),
    (_tar({"config.json": CFG}, symlink="model.safetensors"), "not a regular file"),
    (_tar({"a/config.json": CFG, "b/x.txt": b"x"}), "no config.json"),
    (_tar({"config.json": b"{not json"}), "not valid JSON"),
    (_tar({"config.json": json.dumps({"model_type": "no-such-arch"}).encode()}),
     "unsupported model config"),
    (b"", "empty"),
])
def test_bad_uploads_are_refused_and_nothing_is_stored(client, alice, counts, app_settings,
                                                       payload, needle):
    before = counts()
    r = client.post("/v1/models", headers=alice[1], files={"file": ("x.bin", payload)})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    assert counts() == before
    assert _store_files(app_settings) == []
    assert list((app_settings.resolved_work_dir / "uploads").iterdir()) == []


def test_upload_without_file_field(client, alice, counts):
    before = counts()
    r = client.post("/v1/models", headers=alice[1], data={"name": "x"},
                    files={"other": ("x", b"abc")})
    assert r.status_code == 422 and "`file`" in r.json()["error"]["message"]
    assert counts() == before


def test_wrong_content_type(client, alice):
    r = client.post("/v1/models", headers={**alice[1], "Content-Type": "text/plain"}, content=b"x")
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_upload_over_limit_is_413(settings_env, pg_url, redis_url, published, tiny_llama_tar):
    from fastapi.testclient import TestClient

    from modelpress.api.app import create_app

    s = settings_env(database_url=pg_url, broker_url=redis_url, upload_max_bytes=10_000,
                     api_key="mp_limit_test_key")
    with TestClient(create_app()) as c:
        h = {"Authorization": "Bearer mp_limit_test_key"}
        r = c.post("/v1/models", headers=h, files={"file": ("big.tar", tiny_llama_tar)})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"
        assert _store_files(s) == []
        assert list((s.resolved_work_dir / "uploads").iterdir()) == []


def test_hub_source_failure_is_422_with_reason(client, alice, counts):
    before = counts()
    r = client.post("/v1/models", headers=alice[1],
                    json={"source": "no-such-org/no-such-model", "revision": "main"})
    assert r.status_code == 422, r.text
    assert "cannot fetch the config of 'no-such-org/no-such-model'" in r.json()["error"]["message"]
    # never a path on the server
    for src in ("/etc", "../../etc/passwd", "."):
        r = client.post("/v1/models", headers=alice[1], json={"source": src})
        assert r.status_code == 422 and "not a hub model id" in r.json()["error"]["message"]
    r = client.post("/v1/models", headers=alice[1], json={"source": "a/b", "bogus": 1})
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "body.bogus"
    assert counts() == before


@pytest.mark.slow
def test_upload_real_smollm2_gguf(client, alice, smollm2_gguf, app_settings):
    t0 = time.perf_counter()
    with open(smollm2_gguf, "rb") as f:
        r = client.post("/v1/models", headers=alice[1],
                        files={"file": ("SmolLM2-135M-Instruct.Q4_1.gguf", f)})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["kind"] == "gguf" and m["model_type"] == "llama"
    cfg = m["config"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 1536, 30, 9, 3)
    stored = app_settings.resolved_store_dir / f"models/{m['id']}/model.gguf"
    assert stored.stat().st_size == smollm2_gguf.stat().st_size == m["bytes"]
    print(f"GGUF upload + config read: {elapsed:.1f} s")


def test_truncated_gguf_is_refused(client, alice, smollm2_gguf, counts):
    with open(smollm2_gguf, "rb") as f:
        head = f.read(256 * 1024)
    before = counts()
    r = client.post("/v1/models", headers=alice[1], files={"file": ("cut.gguf", head)})
    assert r.status_code == 422, r.text
    assert counts() == before

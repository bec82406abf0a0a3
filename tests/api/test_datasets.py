"""POST/GET /v1/datasets."""

from __future__ import annotations

import hashlib


def test_upload_and_list(client, alice, bob, app_settings):
    text = "Ein Text mit Umlauten: äöü — and more.\n".encode() * 100
    r = client.post("/v1/datasets", headers=alice[1], data={"name": "calib"},
                    files={"file": ("c.txt", text, "text/plain")})
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["name"] == "calib" and d["bytes"] == len(text)
    assert d["sha256"] == hashlib.sha256(text).hexdigest()
    stored = app_settings.resolved_store_dir / f"datasets/{d['id']}/data.txt"
    assert stored.read_bytes() == text
    assert [x["id"] for x in client.get("/v1/datasets", headers=alice[1]).json()["items"]] == [d["id"]]
    assert client.get(f"/v1/datasets/{d['id']}", headers=alice[1]).json()["id"] == d["id"]
    assert client.get("/v1/datasets", headers=bob[1]).json()["items"] == []
    assert client.get(f"/v1/datasets/{d['id']}", headers=bob[1]).status_code == 404


def test_non_utf8_is_refused(client, alice, counts, app_settings):
    before = counts()
    bad = b"fine text " * 1000 + b"\xff\xfe broken"
    r = client.post("/v1/datasets", headers=alice[1], files={"file": ("x.txt", bad)})
    assert r.status_code == 422
    assert "not UTF-8" in r.json()["error"]["message"] and "offset 10000" in r.json()["error"]["message"]
    r = client.post("/v1/datasets", headers=alice[1], files={"file": ("x.txt", b"")})
    assert r.status_code == 422 and "empty" in r.json()["error"]["message"]
    assert counts() == before
    assert not (app_settings.resolved_store_dir / "datasets").exists()

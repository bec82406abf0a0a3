"""/healthz, /readyz, /metrics, /v1/methods and the OpenAPI document."""

from __future__ import annotations

import re
import socket

from fastapi.testclient import TestClient


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok",
                        "checks": {"database": "ok", "broker": "ok", "store": "ok"}}


def test_readyz_503_when_broker_is_down(settings_env, pg_url, published):
    from modelpress.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    settings_env(database_url=pg_url, broker_url=f"redis://127.0.0.1:{port}/0")
    with TestClient(create_app()) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok" and body["checks"]["store"] == "ok"
    assert body["checks"]["broker"] != "ok"


def test_prometheus_metrics(client, alice, model_id, published):
    j = client.post("/v1/jobs", headers=alice[1],
                    json={"model_id": model_id, "method": "magnitude"}).json()["id"]
    for _ in range(3):
        assert client.get(f"/v1/jobs/{j}", headers=alice[1]).status_code == 200
    client.get("/v1/jobs/nope", headers=alice[1])
    text = client.get("/metrics").text
    assert re.search(r'modelpress_http_requests_total\{method="GET",route="/v1/jobs/\{job_id\}",'
                     r'status="200"\} 3\.0', text)
    assert 'route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert re.search(r'modelpress_http_request_duration_seconds_bucket\{le="0\.05",method="GET",'
                     r'route="/v1/jobs/\{job_id\}"\}', text)
    assert 'modelpress_jobs_submitted_total{queue="cpu"} 1.0' in text
    queued = re.search(r'modelpress_jobs\{state="queued"\} (\d+)', text)
    assert queued and int(queued.group(1)) >= 1
    assert 'modelpress_jobs{state="succeeded"}' in text


def test_methods_listing_has_json_schemas(client, alice):
    import jsonschema

    from modelpress.compression.registry import methods

    r = client.get("/v1/methods", headers=alice[1])
    assert r.status_code == 200
    items = {m["name"]: m for m in r.json()["items"]}
    assert set(items) == set(methods())
    mag = items["magnitude"]
    assert mag["family"] == "pruning" and mag["terminal"] is False
    assert mag["architectures"] is None and mag["needs_calibration"] is False
    sp = mag["params_schema"]["properties"]["sparsity"]
    assert sp["exclusiveMinimum"] == 0 and sp["exclusiveMaximum"] == 1
    assert mag["params_schema"]["additionalProperties"] is False
    for m in items.values():
        jsonschema.Draft202012Validator.check_schema(m["params_schema"])
    v = jsonschema.Draft202012Validator(mag["params_schema"])
    assert v.is_valid({"sparsity": 0.5}) and not v.is_valid({"sparsity": 2})
    assert not v.is_valid({"bogus": 1})


def test_openapi_document(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/models", "/v1/models/{model_id}", "/v1/models/{model_id}/comparison",
              "/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
              "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifact",
              "/v1/jobs/{job_id}/report", "/v1/methods", "/healthz", "/readyz", "/metrics"):
        assert p in paths, p
        for op in paths[p].values():
            assert op.get("summary"), (p, op)
    body = paths["/v1/models"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    job = spec["components"]["schemas"]["JobCreate"]
    assert job["examples"][0]["method"] == "magnitude"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_validation_errors_share_the_error_shape(client, alice):
    r = client.post("/v1/jobs", headers=alice[1], json={"method": "magnitude"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    assert {"field": "body.model_id", "message": "Field required", "type": "missing"} in err["details"]
    r = client.get("/v1/nowhere", headers=alice[1])
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

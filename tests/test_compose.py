"""docker-compose.yml: valid against the Compose Specification, and wired the way we need.

No Docker engine runs in CI, so the file is checked statically: the official Compose
Specification JSON Schema (compose-spec/compose-spec, schema/compose-spec.json), as vendored by
the `check-jsonschema` PyPI package (a test dependency), plus assertions on services,
healthchecks, start-up order and the GPU reservation.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    res = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(res.read_text())


def test_schema_is_the_compose_spec(schema):
    assert schema["title"] == "Compose Specification"
    assert "services" in schema["properties"]


def test_valid_against_compose_spec(compose, schema):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_file(compose, schema):
    """The validation above has teeth: a typo'd key and a bad depends_on condition fail."""
    import copy

    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["helthcheck"] = bad["services"]["api"].pop("healthcheck")
    assert list(cls(schema).iter_errors(bad))
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert list(cls(schema).iter_errors(bad))


def test_services_present(compose):
    assert set(compose["services"]) >= {"postgres", "redis", "minio", "minio-init", "migrate",
                                        "api", "worker-gpu", "worker-cpu"}


@pytest.mark.parametrize("name", ["postgres", "redis", "minio", "api"])
def test_healthchecks(compose, name):
    hc = compose["services"][name]["healthcheck"]
    test = hc["test"]
    text = " ".join(test) if isinstance(test, list) else test
    expected = {"postgres": "pg_isready", "redis": "redis-cli ping", "minio": "mc ready",
                "api": "/healthz"}[name]
    assert expected in text


def test_start_up_order(compose):
    s = compose["services"]
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for svc in ("api", "worker-gpu", "worker-cpu"):
        dep = s[svc]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully", svc
        assert dep["minio-init"]["condition"] == "service_completed_successfully", svc
        assert dep["redis"]["condition"] == "service_healthy", svc
    assert s["migrate"]["command"] == ["modelpress", "migrate"]
    assert s["migrate"]["restart"] == "no" and s["minio-init"]["restart"] == "no"
    assert "mc mb" in " ".join(s["minio-init"]["entrypoint"])


def test_workers_and_gpu_reservation(compose):
    s = compose["services"]
    gpu, cpu = s["worker-gpu"], s["worker-cpu"]
    assert gpu["command"][:4] == ["modelpress", "worker", "--queues", "gpu"]
    assert cpu["command"][:4] == ["modelpress", "worker", "--queues", "cpu"]
    assert "--beat" in cpu["command"]  # somebody runs the sweep
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in cpu
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert gpu["environment"]["MODELPRESS_DEVICE"] == "cuda"


def test_services_configured_through_modelpress_env(compose):
    """API, migration and workers share one MODELPRESS_* environment pointing at the services."""
    from modelpress.domain.settings import Settings

    known = {f"MODELPRESS_{k.upper()}" for k in Settings.model_fields} | {
        "MODELPRESS_GPU_QUEUE_ENABLED"}  # read by the API (queue choice)
    for name in ("migrate", "api", "worker-gpu", "worker-cpu"):
        env = compose["services"][name]["environment"]
        mp = {k: v for k, v in env.items() if k.startswith("MODELPRESS_")}
        assert set(mp) <= known, f"{name}: unknown settings {set(mp) - known}"
        assert mp["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in mp["MODELPRESS_DATABASE_URL"]
        assert mp["MODELPRESS_BROKER_URL"] == "redis://redis:6379/0"
        assert mp["MODELPRESS_STORE"] == "s3"
        assert mp["MODELPRESS_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert mp["MODELPRESS_API_KEY"].startswith("${MODELPRESS_API_KEY:?")
    # the bucket minio-init creates is the one the services use
    assert compose["services"]["minio-init"]["environment"]["BUCKET"] == \
        compose["services"]["api"]["environment"]["MODELPRESS_S3_BUCKET"]


def test_dockerfile_pins_torch_and_builds_both_variants():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_VERSION=2\.13\.0", text)
    assert re.search(r"ARG TORCH_VARIANT=cpu", text)
    assert '"torch==${TORCH_VERSION}"' in text
    for folder in ("modelpress", "api", "workers", "compression", "domain", "migrations"):
        assert f"COPY {folder} ./{folder}" in text

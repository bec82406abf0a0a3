"""The `modelpress` command: migrate, keys create, compress dispatch (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys

from sqlalchemy import create_engine, inspect, select, text

from modelpress.domain.keys import hash_key
from modelpress.domain.models import ApiKey

TABLES = {"api_keys", "models", "datasets", "jobs", "job_events", "artifacts", "metrics"}


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "modelpress", *args], env=full,
                          capture_output=True, text=True, timeout=timeout)


def _head() -> str:
    from alembic.script import ScriptDirectory

    from modelpress.migrations.runner import alembic_config

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrate_embedded_sqlite_then_keys(tmp_path):
    env = {"MODELPRESS_HOME": str(tmp_path / "home")}
    r = run(["migrate"], env)
    assert r.returncode == 0, r.stderr
    db = tmp_path / "home" / "modelpress.db"
    assert db.is_file()
    eng = create_engine(f"sqlite:///{db}")
    assert TABLES <= set(inspect(eng).get_table_names())
    with eng.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head()
    # idempotent
    assert run(["migrate"], env).returncode == 0

    r = run(["keys", "create", "--owner", "carol", "--name", "laptop"], env)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("mp_") and len(key) > 30
    with eng.connect() as c:
        row = c.execute(select(ApiKey.owner, ApiKey.name, ApiKey.revoked)
                        .where(ApiKey.key_hash == hash_key(key))).one()
    assert tuple(row) == ("carol", "laptop", False)
    # the clear key is never stored
    assert key.encode() not in db.read_bytes()
    eng.dispose()


def test_migrate_postgres(scratch_db):
    with scratch_db("mp_cli") as url:
        r = run(["migrate"], {"MODELPRESS_DATABASE_URL": url})
        assert r.returncode == 0, r.stderr
        eng = create_engine(url)
        assert TABLES <= set(inspect(eng).get_table_names())
        r = run(["keys", "create", "--owner", "dave"], {"MODELPRESS_DATABASE_URL": url})
        assert r.returncode == 0, r.stderr
        with eng.connect() as c:
            owner = c.execute(select(ApiKey.owner).where(
                ApiKey.key_hash == hash_key(r.stdout.strip()))).scalar()
        assert owner == "dave"
        eng.dispose()


def test_keys_create_requires_owner(tmp_path):
    r = run(["keys", "create"], {"MODELPRESS_HOME": str(tmp_path)})
    assert r.returncode == 2 and "--owner" in r.stderr


def test_compress_dispatches_to_the_pipeline_cli(tmp_path):
    r = run(["compress", "--help"], {"MODELPRESS_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    # the help is cli_compress's own, not the top-level parser's
    assert r.stdout.startswith("usage: modelpress compress")
    assert "--method" in r.stdout and "--output" in r.stdout
    assert "COMMAND" not in r.stdout


def test_compress_arguments_reach_cli_compress(monkeypatch):
    """`modelpress compress ARGS` calls cli_compress.main(ARGS) and returns its exit code."""
    import types

    from modelpress import cli

    seen = {}
    fake = types.ModuleType("modelpress.compression.cli_compress")

    def main(argv):
        seen["argv"] = argv
        return 3

    fake.main = main
    monkeypatch.setitem(sys.modules, "modelpress.compression.cli_compress", fake)
    assert cli.main(["compress", "model.gguf", "--method", "magnitude", "-o", "out"]) == 3
    assert seen["argv"] == ["model.gguf", "--method", "magnitude", "-o", "out"]


def test_help_lists_commands():
    r = run(["--help"], {})
    assert r.returncode == 0
    for cmd in ("up", "api", "worker", "migrate", "keys", "compress"):
        assert cmd in r.stdout
    r = run(["worker", "--queues", "gpu,tpu"], {})
    assert r.returncode == 2 and "tpu" in r.stderr

"""The ``modelpress`` command.

    modelpress up [--host H] [--port N]     embedded mode: migrate, worker, sweep, API; one command
    modelpress api [--host H] [--port N] [--workers N]
    modelpress worker [--queues gpu,cpu] [--concurrency N] [--pool P] [--beat]
    modelpress migrate
    modelpress keys create --owner NAME [--name LABEL]
    modelpress compress ...                  offline compression (see `modelpress compress --help`)
    modelpress models|jobs|compare|methods   against a running service (MODELPRESS_URL; see
                                             `modelpress jobs --help`, modelpress.cli_remote)

Everything is configured through MODELPRESS_* environment variables
(:mod:`modelpress.domain.settings`); with none set, state lives under ./var (SQLite database,
SQLite-backed Celery transport, local artifact directory).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

APP_FACTORY = "modelpress.api.app:create_app"
CELERY_APP = "modelpress.workers.celery_app"
BOOTSTRAP_OWNER = "admin"


def _settings():
    from modelpress.domain.settings import get_settings

    return get_settings()


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --------------------------------------------------------------------------- migrate / keys


def cmd_migrate(_args: argparse.Namespace) -> int:
    from modelpress.migrations.runner import upgrade

    url = _settings().resolved_database_url
    upgrade(url)
    print(f"database migrated to head: {_redact(url)}")
    return 0


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


def cmd_keys_create(args: argparse.Namespace) -> int:
    from modelpress.domain.db import session_scope
    from modelpress.domain.keys import create_key

    with session_scope() as s:
        key = create_key(s, args.owner, name=args.name or "")
    print(key)
    return 0


def ensure_bootstrap_key(settings) -> tuple[str, bool]:
    """The embedded-mode API key: MODELPRESS_API_KEY if set, else the one saved in
    ``$MODELPRESS_HOME/api-key``, else a new one saved there (mode 0600). Stored hashed for owner
    'admin'. Returns (key, newly_generated)."""
    from modelpress.domain.db import session_scope
    from modelpress.domain.keys import create_key, generate_key

    key_file = settings.home / "api-key"
    generated = False
    if settings.api_key is not None:
        key = settings.api_key.get_secret_value()
    elif key_file.is_file() and key_file.read_text().strip():
        key = key_file.read_text().strip()
    else:
        key = generate_key()
        settings.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        generated = True
    with session_scope() as s:
        create_key(s, BOOTSTRAP_OWNER, key=key, name="bootstrap")
    return key, generated


# --------------------------------------------------------------------------- worker / api


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM if `modelpress up` itself dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def worker_argv(queues: str, concurrency: int, pool: str | None, loglevel: str = "INFO",
                hostname: str | None = None) -> list[str]:
    argv = ["worker", "-Q", queues, "--concurrency", str(concurrency), "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]
    if pool:
        argv += ["--pool", pool]
    if hostname:
        argv += ["--hostname", hostname]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    _logging(args.loglevel)
    loop = None
    if args.beat:
        from modelpress.workers.sweeper import SweepLoop

        loop = SweepLoop()
        loop.start()
    from modelpress.workers.celery_app import celery_app

    try:
        celery_app.worker_main(worker_argv(args.queues, args.concurrency, args.pool,
                                           args.loglevel, args.hostname))
    finally:
        if loop is not None:
            loop.stop()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    s = _settings()
    if s.api_key is not None:
        # idempotent; the API may do it too at start-up
        try:
            ensure_bootstrap_key(s)
        except Exception as e:  # noqa: BLE001 - the DB may not be migrated yet
            print(f"warning: could not store the bootstrap API key: {e}", file=sys.stderr)
    from modelpress.api.server import HTTP_PROTOCOL

    # HTTP_PROTOCOL sets TCP_NODELAY: with --workers N uvicorn's own socket leaves Nagle on
    # (every keep-alive request after the first waited ~40 ms for a delayed ACK)
    uvicorn.run(APP_FACTORY, factory=True, host=args.host or s.host, port=args.port or s.port,
                workers=args.workers, log_level=args.loglevel.lower(), proxy_headers=True,
                http=HTTP_PROTOCOL)
    return 0


# --------------------------------------------------------------------------- up


class _Terminate(Exception):
    pass


def _stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded mode in one command: everything under $MODELPRESS_HOME, nothing external."""
    _logging(args.loglevel)
    log = logging.getLogger("modelpress.up")

    def _on_term(signum, _frame):
        raise _Terminate(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _on_term)

    # children must see the same absolute paths whatever their working directory
    home = Path(os.environ.get("MODELPRESS_HOME", "var")).resolve()
    os.environ["MODELPRESS_HOME"] = str(home)
    from modelpress.domain.settings import get_settings

    get_settings.cache_clear()
    s = get_settings()
    home.mkdir(parents=True, exist_ok=True)

    from modelpress.migrations.runner import upgrade

    upgrade(s.resolved_database_url)
    key, generated = ensure_bootstrap_key(s)
    if generated:
        print(f"\nmodelpress: a new API key was generated (owner '{BOOTSTRAP_OWNER}'); it is "
              f"shown only once and saved in {home / 'api-key'}:\n\n    {key}\n", flush=True)
    elif s.api_key is None:
        print(f"modelpress: using the API key saved in {home / 'api-key'}", flush=True)

    worker_cmd = [sys.executable, "-m", "celery", "-A", CELERY_APP,
                  *worker_argv("cpu,gpu", 1, args.pool, args.loglevel, "embedded@%h")]
    worker = subprocess.Popen(worker_cmd, env=os.environ.copy(), start_new_session=True,
                              preexec_fn=_parent_death_signal)
    log.info("worker started (pid %d): %s", worker.pid, " ".join(worker_cmd))

    from modelpress.workers.sweeper import SweepLoop

    loop = SweepLoop()
    loop.start()
    host, port = args.host or s.host, args.port or s.port
    print(f"modelpress: API on http://{host}:{port} (state in {home}); Ctrl-C stops everything",
          flush=True)
    try:
        import uvicorn

        from modelpress.api.server import HTTP_PROTOCOL

        uvicorn.run(APP_FACTORY, factory=True, host=host, port=port,
                    log_level=args.loglevel.lower(), http=HTTP_PROTOCOL)
    except (KeyboardInterrupt, _Terminate):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        loop.stop()
        _stop_process(worker)
        log.info("stopped")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelpress", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="embedded mode: API + worker + sweep, state under "
                        "$MODELPRESS_HOME (default ./var)")
    up.add_argument("--host", default=None, help="default MODELPRESS_HOST or 127.0.0.1")
    up.add_argument("--port", type=int, default=None, help="default MODELPRESS_PORT or 8000")
    up.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                    help="Celery pool of the embedded worker (prefork enforces time limits)")
    up.add_argument("--loglevel", default="INFO")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.add_argument("--workers", type=int, default=1)
    api.add_argument("--loglevel", default="INFO")
    api.set_defaults(func=cmd_api)

    w = sub.add_parser("worker", help="run a Celery worker")
    w.add_argument("--queues", default="gpu,cpu", help="comma-separated: gpu, cpu")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--pool", default=None, choices=["prefork", "solo", "threads"])
    w.add_argument("--hostname", default=None, help="Celery node name (default celery@host)")
    w.add_argument("--beat", action="store_true",
                   help="also run the periodic sweep (re-dispatch + reaper) in this process")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    m.set_defaults(func=cmd_migrate)

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create a key and print it (shown only once)")
    kc.add_argument("--owner", required=True)
    kc.add_argument("--name", default="")
    kc.set_defaults(func=cmd_keys_create)

    sub.add_parser("compress", help="compress a model offline (all options: "
                   "`modelpress compress --help`)", add_help=False)
    from .cli_remote import add_commands  # models, jobs, compare, methods: against a service

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compress":
        from modelpress.compression.cli_compress import main as compress_main

        return int(compress_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    for name in ("queues",):
        if getattr(args, name, None):
            bad = {q.strip() for q in args.queues.split(",")} - {"gpu", "cpu"}
            if bad:
                build_parser().error(f"unknown queue(s): {', '.join(sorted(bad))}")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

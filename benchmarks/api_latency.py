"""Issue 2 benchmark: HTTP API latency and throughput against PostgreSQL + Redis.

Starts the API as it is deployed (``modelpress api --workers N``) on a loopback port against a
FRESH PostgreSQL database and a Redis broker database, registers a tiny llama (a tar of a HF
directory built here), then measures

* latency, sequential on one keep-alive connection (httpx): GET /healthz (the floor: no auth, no
  database), GET /v1/jobs/{id}, POST /v1/jobs: p50 / p95 / p99 and server CPU per request
* GET /v1/jobs/{id} throughput with C concurrent keep-alive connections (a raw asyncio HTTP/1.1
  client: cheap enough that the 2-core machine spends its time in the server, not the client);
  the server's and the load generator's CPU per request are printed (they share the cores)
* POST /v1/jobs under load: ``--load-clients`` concurrent keep-alive connections (default 200)
  each submitting jobs back to back for ``--load-seconds`` (default 30): every response must be a
  201 (no 5xx, no 429, no timeout); prints throughput and latency under load
* optionally (``--pickup N``) submit -> worker start latency with a real ``modelpress worker``

Goals: POST p99 <= 50 ms, GET >= 1,000 req/s. Everything stays on 127.0.0.1; counts are
bounded. The database is dropped and the Redis database flushed at the end.

    python benchmarks/api_latency.py [--workers 2] [--posts 500] [--gets 6000] [--clients 16]
                                     [--load-clients 200] [--load-seconds 30] [--plain-uvicorn]

``--plain-uvicorn`` serves with ``uvicorn --workers N`` and its default protocol instead (how this
benchmark started the server before): with N > 1 uvicorn leaves Nagle's algorithm on for every
connection and each keep-alive request after the first waits ~40 ms (see api/server.py).

The per-owner active-job quota is switched off for the run (the jobs stay queued: no worker);
the per-owner rate limit keeps its default.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import httpx

PG_ADMIN = os.environ.get("MODELPRESS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def tiny_llama_tar() -> bytes:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for f in sorted(Path(d).iterdir()):
                tf.add(f, arcname=f"tiny-llama/{f.name}")
    return buf.getvalue()


class Env:
    """A fresh database, a Redis db, a temp home; torn down on exit."""

    def __init__(self, redis_db: int):
        from sqlalchemy import create_engine, text

        from modelpress.migrations.runner import upgrade

        self.name = f"mp_bench_{uuid.uuid4().hex[:10]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + self.name
        upgrade(self.db_url)
        self.redis_url = f"{REDIS}/{redis_db}"
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()
        self.home = tempfile.TemporaryDirectory(prefix="mp-bench-")
        self.key = "mp_" + secrets.token_urlsafe(24)
        self.env = {**os.environ, "MODELPRESS_DATABASE_URL": self.db_url,
                    "MODELPRESS_BROKER_URL": self.redis_url, "MODELPRESS_HOME": self.home.name,
                    "MODELPRESS_API_KEY": self.key, "HF_HUB_OFFLINE": "1",
                    "MODELPRESS_MAX_ACTIVE_JOBS_PER_OWNER": "0",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def close(self) -> None:
        import redis
        from sqlalchemy import text

        redis.Redis.from_url(self.redis_url).flushdb()
        with self.admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           f"WHERE datname = '{self.name}'"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}"'))
        self.admin.dispose()
        self.home.cleanup()


def start(argv: list[str], env: dict) -> subprocess.Popen:
    """The process's stderr goes to a file (a pipe nobody reads would fill up and block the
    server as soon as it logs more than 64 KiB). It runs in the temp home: ``python -m`` puts
    the working directory first on sys.path, and the checkout's ``modelpress/`` folder (the CLI
    only) would shadow the installed package."""
    log = tempfile.NamedTemporaryFile(prefix="mp-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, env=env, start_new_session=True, cwd=env["MODELPRESS_HOME"],
                            stdout=subprocess.DEVNULL, stderr=log)
    proc.log_path = log.name  # type: ignore[attr-defined]
    log.close()
    return proc


def log_tail(proc: subprocess.Popen, n: int = 3000) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tree_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) used so far by the server process and its children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def server_argv(port: int, workers: int, plain_uvicorn: bool) -> list[str]:
    if plain_uvicorn:
        return [sys.executable, "-m", "uvicorn", "--factory", "modelpress.api.app:create_app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--no-access-log", "--log-level", "warning"]
    return [sys.executable, "-m", "modelpress", "api", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--loglevel", "WARNING"]


def sequential(client: httpx.Client, server: subprocess.Popen, n: int, method: str, url: str,
               status: int, **kw: object) -> tuple[list[float], float]:
    """``n`` requests one after another on one keep-alive connection: latencies (s) and the
    server's CPU seconds per request."""
    lat: list[float] = []
    cpu0 = tree_cpu(server)
    for _ in range(n):
        t = time.perf_counter()
        r = client.request(method, url, **kw)  # type: ignore[arg-type]
        lat.append(time.perf_counter() - t)
        assert r.status_code == status, r.text
    return lat, (tree_cpu(server) - cpu0) / n


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_tail(proc)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{url} did not come up: {log_tail(proc)}")


# ------------------------------------------------------------------------------ GET load
async def _get_worker(port: int, request: bytes, n: int, lat: list[float], errors: list[str]):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(str(status))
    finally:
        writer.close()


async def get_load(port: int, path: str, key: str, total: int, clients: int):
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n").encode()
    lat: list[float] = []
    errors: list[str] = []
    per = total // clients
    t0 = time.perf_counter()
    await asyncio.gather(*(_get_worker(port, request, per, lat, errors) for _ in range(clients)))
    return time.perf_counter() - t0, lat, errors


# ----------------------------------------------------------------------------- POST load
async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return int(head[9:12])


async def _post_worker(port: int, request: bytes, deadline: float, lat: list[float],
                       codes: dict[str, int], timeout_s: float = 60.0) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
        return
    try:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            writer.write(request)
            try:
                status = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (TimeoutError, asyncio.IncompleteReadError, OSError) as e:
                codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
                return
            lat.append(time.perf_counter() - t)
            codes[str(status)] = codes.get(str(status), 0) + 1
    finally:
        writer.close()


async def post_load(port: int, key: str, body: dict, clients: int, seconds: float):
    """``clients`` connections submitting jobs back to back for ``seconds``."""
    data = json.dumps(body).encode()
    request = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    lat: list[float] = []
    codes: dict[str, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(_post_worker(port, request, t0 + seconds, lat, codes)
                           for _ in range(clients)))
    return time.perf_counter() - t0, lat, codes


# --------------------------------------------------------------------------- pickup hook
def measure_pickup(env: Env, client: httpx.Client, model_id: str, n: int) -> list[float] | None:
    """Submit -> the worker starts the job (Job.started_at - the moment the POST was sent), with a real
    ``modelpress worker``. Returns None when the worker cannot start."""
    import redis
    from sqlalchemy import create_engine, text

    eng = create_engine(env.db_url)
    # the latency runs left hundreds of queued jobs: drop them so each pickup sees an idle worker
    with eng.begin() as c:
        c.execute(text("UPDATE jobs SET state='cancelled' WHERE state='queued'"))
    redis.Redis.from_url(env.redis_url).flushdb()
    worker = start([sys.executable, "-m", "modelpress", "worker", "--queues", "cpu,gpu",
                    "--concurrency", "1"], env.env)
    out: list[float] = []
    try:
        time.sleep(3)
        for _ in range(n):
            sent = time.time()  # before the request: the worker may start before the response
            r = client.post("/v1/jobs", json={"model_id": model_id, "method": "magnitude",
                                              "params": {"sparsity": 0.5}})
            job_id = r.json()["id"]
            deadline = time.time() + 60
            while time.time() < deadline:
                with eng.connect() as c:
                    row = c.execute(text("SELECT started_at, state FROM jobs WHERE id=:i"),
                                    {"i": job_id}).one()
                if row.started_at is not None and row.state != "queued":
                    out.append(row.started_at.timestamp() - sent)
                    break
                if worker.poll() is not None:
                    return None
                time.sleep(0.02)
            # let it finish (or fail) before the next one so each pickup sees an idle worker
            while time.time() < deadline:
                with eng.connect() as c:
                    st = c.execute(text("SELECT state FROM jobs WHERE id=:i"), {"i": job_id}).scalar()
                if st in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
    finally:
        stop(worker)
        eng.dispose()
    return out


def wrk_load(url: str, key: str, clients: int, seconds: int = 10) -> float | None:
    """GET throughput measured by wrk (a C load generator: unlike the Python client above it
    takes little of the 2 CPUs the server needs). None when wrk is not installed."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "-H",
                          f"Authorization: Bearer {key}", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} error responses:\n{out}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else None


def count_jobs(db_url: str) -> int:
    from sqlalchemy import create_engine, text

    eng = create_engine(db_url)
    with eng.connect() as c:
        n = c.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    eng.dispose()
    return n


def _sigterm(_sig, _frame):
    raise KeyboardInterrupt  # run the finally blocks: stop the server, drop the database


def main() -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--posts", type=int, default=500)
    ap.add_argument("--gets", type=int, default=6000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--load-clients", type=int, default=200,
                    help="concurrent connections submitting jobs (0: skip the load phase)")
    ap.add_argument("--load-seconds", type=float, default=30.0)
    ap.add_argument("--pickup", type=int, default=0, help="jobs for the worker pickup measure")
    ap.add_argument("--redis-db", type=int, default=13)
    ap.add_argument("--plain-uvicorn", action="store_true",
                    help="serve with `uvicorn --workers N` and its default protocol (Nagle on)")
    args = ap.parse_args()

    load_start = os.getloadavg()[0]
    env = Env(args.redis_db)
    port = free_port()
    server = None
    try:
        server = start(server_argv(port, args.workers, args.plain_uvicorn), env.env)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", server)
        h = {"Authorization": f"Bearer {env.key}"}
        client = httpx.Client(base_url=base, headers=h, timeout=30)
        r = client.post("/v1/models", files={"file": ("tiny-llama.tar", tiny_llama_tar())})
        r.raise_for_status()
        model_id = r.json()["id"]
        body = {"model_id": model_id, "method": "magnitude", "params": {"sparsity": 0.5}}

        for _ in range(60):  # warm-up: every worker process, caches, prepared statements
            client.post("/v1/jobs", json=body).raise_for_status()
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        seq_n = min(args.posts, 300)
        health_lat, health_cpu = sequential(client, server, seq_n, "GET", "/healthz", 200)
        seq_get_lat, seq_get_cpu = sequential(client, server, seq_n, "GET", f"/v1/jobs/{job_id}",
                                              200)
        post_lat, post_cpu = sequential(client, server, args.posts, "POST", "/v1/jobs", 201,
                                        json=body)

        asyncio.run(get_load(port, f"/v1/jobs/{job_id}", env.key, 400, args.clients))  # warm
        cpu0, own0 = tree_cpu(server), time.process_time()
        wall, get_lat, errors = asyncio.run(
            get_load(port, f"/v1/jobs/{job_id}", env.key, args.gets, args.clients))
        get_cpu = (tree_cpu(server) - cpu0) / len(get_lat)
        get_client_cpu = (time.process_time() - own0) / len(get_lat)
        assert not errors, errors[:5]

        wrk_rps = wrk_load(base + f"/v1/jobs/{job_id}", env.key, args.clients)
        load = None
        if args.load_clients:
            cpu0, own0 = tree_cpu(server), time.process_time()
            load = asyncio.run(post_load(port, env.key, body, args.load_clients,
                                         args.load_seconds))
            load_cpu = (tree_cpu(server) - cpu0) / max(1, len(load[1]))
            load_client_cpu = (time.process_time() - own0) / max(1, len(load[1]))
            load_committed = count_jobs(env.db_url)
        pickup = measure_pickup(env, client, model_id, args.pickup) if args.pickup else None
        metrics = client.get("/metrics").text
        client.close()
        server_log = log_tail(server, 4000)
    finally:
        if server is not None:
            stop(server)
        env.close()

    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    rows = [
        ("GET /healthz", f"n={len(health_lat)} sequential", f"p50 {ms(pct(health_lat, 50))} ms",
         f"p95 {ms(pct(health_lat, 95))} ms", f"p99 {ms(pct(health_lat, 99))} ms",
         f"server CPU {ms(health_cpu)} ms/req", ""),
        ("GET /v1/jobs/{id}", f"n={len(seq_get_lat)} sequential",
         f"p50 {ms(pct(seq_get_lat, 50))} ms", f"p95 {ms(pct(seq_get_lat, 95))} ms",
         f"p99 {ms(pct(seq_get_lat, 99))} ms", f"server CPU {ms(seq_get_cpu)} ms/req", ""),
        ("POST /v1/jobs", f"n={len(post_lat)} sequential", f"p50 {ms(pct(post_lat, 50))} ms",
         f"p95 {ms(pct(post_lat, 95))} ms", f"p99 {ms(pct(post_lat, 99))} ms",
         f"server CPU {ms(post_cpu)} ms/req",
         "goal p99 <= 50 ms: " + ("MET" if pct(post_lat, 99) <= 0.05 else "MISSED")),
        ("GET /v1/jobs/{id}", f"n={len(get_lat)} c={args.clients}",
         f"{len(get_lat) / wall:.0f} req/s", f"p50 {ms(pct(get_lat, 50))} ms",
         f"p99 {ms(pct(get_lat, 99))} ms",
         f"server CPU {ms(get_cpu)} ms/req (client {get_client_cpu * 1000:.2f})",
         "goal >= 1000 req/s: " + ("MET" if len(get_lat) / wall >= 1000 else "MISSED")),
    ]
    if wrk_rps is not None:
        rows.append(("GET /v1/jobs/{id} (wrk)", f"10 s c={args.clients}", f"{wrk_rps:.0f} req/s",
                     "", "", "", "goal >= 1000 req/s: " + ("MET" if wrk_rps >= 1000 else "MISSED")))
    if load is not None:
        lwall, llat, lcodes = load
        errs = {k: v for k, v in lcodes.items() if k != "201"}
        rows.append(("POST /v1/jobs under load", f"{args.load_seconds:g} s c={args.load_clients}",
                     f"{len(llat) / lwall:.0f} req/s", f"p50 {ms(pct(llat, 50))} ms",
                     f"p99 {ms(pct(llat, 99))} ms",
                     f"server CPU {ms(load_cpu)} ms/req (client {load_client_cpu * 1000:.2f})",
                     f"{lcodes.get('201', 0)} x 201; goal 0 errors: "
                     + ("MET" if not errs else f"MISSED {errs}")))
    if pickup:
        rows.append(("submit -> worker start", f"n={len(pickup)}",
                     f"p50 {ms(statistics.median(pickup))} ms", f"max {ms(max(pickup))} ms", "", "", ""))
    elif args.pickup:
        rows.append(("submit -> worker start", "worker did not start", "", "", "", "", ""))
    served = ("plain uvicorn --workers" if args.plain_uvicorn else "modelpress api --workers")
    print(f"\nmodelpress API benchmark: {served} {args.workers}, PostgreSQL + Redis, "
          f"{os.cpu_count()} CPUs (shared machine: numbers are noisy)\n")
    widths = [max(len(str(r[i])) for r in rows) for i in range(7)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nserver CPU = CPU seconds of the API processes / requests (excludes PostgreSQL and "
          f"Redis); client = this load generator's CPU per request (it shares the cores); "
          f"machine load average at the start / end of the run: {load_start:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    if load is not None and any(k != "201" for k in load[2]):
        print("\nserver log (tail):\n" + server_log)
    if load is not None:
        expected = 61 + args.posts + load[2].get("201", 0)  # warm-up, the GET target, sequential
        print(f"jobs in the database after the load phase: {load_committed} "
              f"(201 answers: {expected}; " + ("every one committed once)" if
                                               load_committed == expected else "MISMATCH)"))
    submitted = [ln for ln in metrics.splitlines() if ln.startswith("modelpress_jobs_submitted_total")]
    print("\n(one worker process's counter) " + "; ".join(submitted))
    return 0


if __name__ == "__main__":
    sys.exit(main())

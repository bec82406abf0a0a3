"""End-to-end helpers: real processes (uvicorn API, celery worker, `modelpress up`) talking over
HTTP, killed at teardown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without any MODELPRESS_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO):
        self.log = log
        self.args = args
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_log(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if not self.alive():
                raise AssertionError(f"{self.args[:4]} exited {self.popen.returncode}:\n"
                                     f"{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not seen after {timeout} s:\n{self.text()[-4000:]}")

    def wait_http(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.args[:4]} exited {self.popen.returncode}:\n"
                                     f"{self.text()[-4000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} not up after {timeout} s:\n{self.text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode


@pytest.fixture
def procs(tmp_path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list[str], env: dict[str, str], cwd: Path = REPO) -> Proc:
        p = Proc(args, env, logs / f"{name}.log", cwd)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        if p.alive():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.popen.wait(10)


class Client:
    """A thin API client for the tests."""

    def __init__(self, base: str, key: str):
        self.base = base.rstrip("/")
        self.http = httpx.Client(base_url=self.base, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"})

    def upload_model(self, path: Path, name: str) -> dict:
        with open(path, "rb") as f:
            r = self.http.post("/v1/models", files={"file": (path.name, f)},
                               data={"name": name}, timeout=600)
        assert r.status_code == 201, r.text
        return r.json()

    def submit(self, **body) -> dict:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float, logs: Callable[[], str] = lambda: "") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job(job_id)
            if j["state"] in TERMINAL:
                return j
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} still {j['state']} ({j['progress']}% "
                             f"{j['stage']!r}) after {timeout} s\n{logs()[-6000:]}")

    def events(self, job_id: str) -> list[dict]:
        r = self.http.get(f"/v1/jobs/{job_id}/events")
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def download(self, job_id: str, dest: Path) -> httpx.Response:
        """GET the artifact, following a presigned redirect (the Authorization header is not
        sent to another origin)."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact", follow_redirects=True,
                              timeout=600) as r:
            assert r.status_code == 200, r.read()
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
        return r


def untar(archive: Path, dest: Path) -> list[str]:
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        tf.extractall(dest, filter="data")
    return names


def metric(job: dict, stage: str, name: str) -> float:
    for m in job["metrics"]:
        if m["stage"] == stage and m["name"] == name:
            return m["value"]
    raise KeyError(f"no metric {stage}/{name} in {[(m['stage'], m['name']) for m in job['metrics']]}")


def python() -> str:
    return sys.executable

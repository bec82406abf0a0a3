"""The client's retries against a server that drops connections and answers 503/429 with
Retry-After: a POST retried this way keeps its Idempotency-Key (one job, however many tries)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from modelpress.client import ApiError, Client

JOB = {"id": "j1", "model_id": "m1", "method": "rtn", "params": {"bits": 8},
       "recipe": [{"method": "rtn", "params": {"bits": 8}}], "queue": "cpu", "state": "queued",
       "progress": 0, "stage": None, "attempt": 0, "cancel_requested": False, "error": None,
       "metrics": [], "artifact": None, "has_report": False,
       "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
       "dispatched_at": None, "started_at": None, "finished_at": None}


class FlakyServer:
    """Answers each connection with the next scripted action: 'drop' (close without a byte),
    or (status, headers, body). Records every request's head and arrival time."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[tuple[float, str]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.script:
            conn, _ = self.sock.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                h, _, rest = head.partition(b"\r\n\r\n")
                n = int(next((ln.split(b":")[1] for ln in h.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")), b"0"))
                while len(rest) < n:
                    rest += conn.recv(65536)
                self.requests.append((time.monotonic(), h.decode()))
                action = self.script.pop(0)
                if action == "drop":
                    conn.shutdown(socket.SHUT_RDWR)
                    continue
                status, headers, body = action
                raw = json.dumps(body).encode()
                lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(raw)}",
                         "Content-Type: application/json", "Connection: close",
                         *[f"{k}: {v}" for k, v in headers.items()]]
                conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)


def _header(head: str, name: str) -> str:
    for ln in head.split("\r\n"):
        k, _, v = ln.partition(":")
        if k.lower() == name.lower():
            return v.strip()
    raise KeyError(name)


def test_submit_survives_a_dropped_connection_and_503s_honouring_retry_after():
    busy = {"error": {"code": "database_unavailable", "message": "busy"}}
    srv = FlakyServer(["drop", (503, {"Retry-After": "1"}, busy),
                       (429, {"Retry-After": "1"}, busy), (201, {}, JOB)])
    with Client(srv.url, "k", backoff_s=0.05) as c:
        job = c.submit("m1", method="rtn", params={"bits": 8})
    assert job.id == "j1" and job.state == "queued"
    times = [t for t, _ in srv.requests]
    assert len(times) == 4
    assert times[2] - times[1] >= 0.95 and times[3] - times[2] >= 0.95, "Retry-After honoured"
    assert times[1] - times[0] < 0.9, "a dropped connection is retried after a short backoff"
    keys = {_header(h, "Idempotency-Key") for _, h in srv.requests}
    assert len(keys) == 1, "every retry carries the same Idempotency-Key"
    assert all(_header(h, "Authorization") == "Bearer k" for _, h in srv.requests)


def test_gives_up_after_its_retries_with_the_api_error():
    busy = {"error": {"code": "database_unavailable", "message": "busy"}}
    srv = FlakyServer([(503, {"Retry-After": "0"}, busy)] * 3)
    with Client(srv.url, "k", retries=2, backoff_s=0.01) as c, pytest.raises(ApiError) as e:
        c.get_job("j1")
    assert (e.value.status, e.value.code) == (503, "database_unavailable")
    assert len(srv.requests) == 3


def test_a_4xx_is_not_retried():
    srv = FlakyServer([(422, {}, {"error": {"code": "invalid_params", "message": "bad"}}),
                       (201, {}, JOB)])
    with Client(srv.url, "k", backoff_s=0.01) as c, pytest.raises(ApiError) as e:
        c.submit("m1", method="rtn", params={"bits": 99})
    assert e.value.code == "invalid_params" and len(srv.requests) == 1

"""The HTTP protocol the API is served with turns Nagle's algorithm off on every connection, also
on a listening socket bound the way ``uvicorn --workers N`` binds it (``Config.bind_socket``:
``proto`` 0, so asyncio does not set ``TCP_NODELAY`` itself). With Nagle on, each keep-alive
request after the first waited ~40 ms for the client's delayed ACK of the response head."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import pytest
import uvicorn

from modelpress.api.server import HTTP_PROTOCOL, NoDelayH11Protocol


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _server_side_nodelay(http: str) -> list[int]:
    """TCP_NODELAY of the server's accepted sockets, uvicorn serving a pre-bound socket."""
    config = uvicorn.Config(_ok, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            http=http)
    sock = config.bind_socket()  # what the --workers N supervisor hands each worker
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"{}"):
                chunk = c.recv(4096)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            socks = [p.transport.get_extra_info("socket") for p in server.server_state.connections]
            return [s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_protocol_sets_nodelay_on_a_prebound_socket():
    flags = _server_side_nodelay(HTTP_PROTOCOL)
    assert len(flags) == 1 and flags[0] != 0, flags


def test_cli_serves_the_api_with_the_nodelay_protocol(monkeypatch: pytest.MonkeyPatch):
    from modelpress import cli

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(cli, "_settings", lambda: argparse.Namespace(api_key=None, host="h",
                                                                     port=1))
    cli.cmd_api(argparse.Namespace(host=None, port=None, workers=2, loglevel="INFO"))
    assert calls and calls[0]["http"] == HTTP_PROTOCOL and calls[0]["workers"] == 2
    assert uvicorn.importer.import_from_string(HTTP_PROTOCOL) is NoDelayH11Protocol

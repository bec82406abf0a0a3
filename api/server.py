"""How uvicorn serves the API: the HTTP protocol class every entry point passes to it.

``uvicorn --workers N`` (N > 1) binds the listening socket itself with ``proto`` 0; accepted
sockets inherit that, and asyncio only turns on ``TCP_NODELAY`` for sockets that report
``IPPROTO_TCP`` (uvicorn issue #3149, open). Nagle's algorithm then stays on: h11 writes a
response as two segments (the head, then the body), the body waits for the client to ACK the
head, and the client delays that ACK by ~40 ms on Linux. Every request on a keep-alive
connection after the first took 40-48 ms, whatever the route cost (``/healthz`` included); a
fresh connection per request did not see it. With one worker uvicorn lets asyncio bind the
socket from ``getaddrinfo`` (``proto`` 6) and the option is set.

:class:`NoDelayH11Protocol` sets ``TCP_NODELAY`` on every accepted TCP connection, whichever way
the socket was bound (``--workers N``, ``--fd``, a gunicorn worker). It is uvicorn's h11 protocol,
which is what ``--http auto`` picks when ``httptools`` is not installed (it is not a dependency).

    uvicorn --factory modelpress.api.app:create_app --http modelpress.api.server:NoDelayH11Protocol
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

#: the ``http`` argument of ``uvicorn.run`` / ``--http`` of the uvicorn command line
HTTP_PROTOCOL = "modelpress.api.server:NoDelayH11Protocol"


def set_nodelay(transport: asyncio.BaseTransport) -> bool:
    """Turn Nagle's algorithm off on a TCP transport's socket; False if it has none (a Unix
    socket, a test transport) or the option cannot be set."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with ``TCP_NODELAY`` on each connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)

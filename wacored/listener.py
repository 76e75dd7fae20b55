"""The listening socket: bound once, before any actor starts, and lent to each hypercorn run.

Binding first means a port in use stops `wacored run` before it has migrated, recovered or started
anything, with one line naming the address (`ListenError`), instead of after the writer and the
forwarders are up, with a supervisor's traceback. The daemon keeps the socket for its whole life;
hypercorn gets a duplicate of its descriptor at each start (``fd://``), which it closes when it stops,
so an ingress restarted by the supervisor serves on the same port without binding again.

Error handling:
    `ListenError` (an `OSError`) when the address cannot be bound: in use, not ours, no such host.
"""

from __future__ import annotations

import os
import socket

from .config import ServerConfig

BACKLOG = 1024
"""Connections the kernel queues before `accept` (hypercorn's default is 100): a burst of Meta's
retries after an outage arrives at once."""


class ListenError(OSError):
    """The listen address cannot be bound."""


def open_listener(server: ServerConfig) -> socket.socket:
    """A listening TCP socket on ``[server] listen`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((server.host, server.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {server.listen}: {exc.strerror or exc}") from exc
    return sock


def lend(sock: socket.socket) -> str:
    """A hypercorn bind for a duplicate of `sock`'s descriptor (hypercorn closes it when it stops)."""
    return f"fd://{os.dup(sock.fileno())}"

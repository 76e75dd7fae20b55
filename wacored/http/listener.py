"""The listening socket: bound once, before any actor starts, and lent to each hypercorn run.

Binding first means a port in use stops `wacored run` before it has migrated, recovered or started
anything, with one line naming the address (`ListenError`), instead of after the writer and the
forwarders are up, with a supervisor's traceback. The daemon keeps the socket for its whole life;
hypercorn gets a duplicate of its descriptor at each start (``fd://``), which it closes when it stops,
so an ingress restarted by the supervisor serves on the same port without binding again.

Under ``[server] processes = N`` the supervisor holds the port without listening (`reserve`) and
each worker listens on its own SO_REUSEPORT socket bound to the same address (`share`).

Error handling:
    `ListenError` (an `OSError`) when the address cannot be bound: in use, not ours, no such host.
"""

from __future__ import annotations

import os
import socket

from ..config import ServerConfig

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


def reserve(server: ServerConfig) -> socket.socket:
    """The port of ``[server] listen`` held for workers that listen on it with SO_REUSEPORT sockets of
    their own (`share`): bound, not listening, so the kernel never queues a connection on it.

    Error handling:
        `ListenError` when the address cannot be bound (in use by anyone, us included).
    """
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((server.host, server.port))
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {server.listen}: {exc.strerror or exc}") from exc
    return sock


def share(reserved: socket.socket) -> socket.socket:
    """A listening socket of this worker's own on `reserved`'s address (SO_REUSEPORT: the kernel
    spreads new connections over every worker's socket by a hash of their addresses).

    Why not every worker accepting from the one inherited listening socket: whichever worker's loop
    wakes first takes a whole burst of connections. Measured with `bench/spread.py` (2 workers, 2000
    POSTs over 32 keep-alive connections, 8 rounds each): the busiest worker served 50-84 % of the
    requests from one shared socket (median 69 %), 53-66 % with SO_REUSEPORT (median 58 %, what a
    fair coin gives for 32 connections), and the load took 4.3-8.5 s against 6.3-7.9 s. The price:
    connections waiting in a dying worker's own accept queue are reset rather than taken by another.
    """
    sock = socket.socket(reserved.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(reserved.getsockname()[:2])
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, f"cannot listen on {reserved.getsockname()[:2]}: {exc.strerror or exc}") from exc
    return sock


def lend(sock: socket.socket) -> str:
    """A hypercorn bind for a duplicate of `sock`'s descriptor (hypercorn closes it when it stops)."""
    return f"fd://{os.dup(sock.fileno())}"

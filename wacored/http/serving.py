"""Serving HTTP with hypercorn: its settings, and the two tasks that end a drain cleanly.

`hypercorn_config` turns ``[server]`` into hypercorn's settings (timeouts measured and explained
below); `answered_in_flight` is hypercorn's shutdown trigger, and `mark_draining` tells ingress and
systemd that the daemon is stopping.

Error handling: `hypercorn_config` raises `TLSError` (an `OSError`) naming the file when the
certificate or key is unusable, before anything starts.
"""

from __future__ import annotations

import logging
import math

import hypercorn.config
import trio

from ..config import Config
from ..observe.systemd import Notifier
from ..runtime import Runtime
from .tls import check_server_tls

KEEP_ALIVE_S = 5.0
"""Hypercorn's default, stated: longer than nginx's upstream ``keepalive_timeout`` (deploy/nginx/)."""
ANSWER_SLACK_S = 5.0
IN_FLIGHT_WAIT_S = 5.0


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    """Hypercorn's settings for `config`; HTTPS when ``[server] certfile``/``keyfile`` are set.

    Error handling:
        Raises `TLSError` (an `OSError`) naming the file when the certificate or key is unusable.
    """
    hc = hypercorn.config.Config()
    hc.bind = [config.server.listen]
    if config.server.tls:
        check_server_tls(config.server.certfile, config.server.keyfile)
        hc.certfile, hc.keyfile = config.server.certfile, config.server.keyfile
    hc.accesslog = None
    # Hypercorn's messages go through our handlers (JSON lines) instead of its own format.
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 10.0
    # Hypercorn's own cap must not cut a body before ingress can answer 413 itself. It also bounds a
    # request head: a longer one is refused 431 by hypercorn.
    hc.h11_max_incomplete_size = 64 * 1024
    # A connection's idle timer runs from accept until a whole request head is parsed, and again
    # after each answer: an idle connection, or a slowloris on headers, is closed after this long.
    hc.keep_alive_timeout = KEEP_ALIVE_S
    # Hypercorn's read_timeout bounds each receive, not a whole body (a trickle resets it), and it
    # keeps running while the app works out an answer (the caller is silent then): so it is only a
    # backstop for a connection gone silent, and must outlast ingress's own body deadline (or a
    # stalled body would be closed without its 408) plus the slowest answer, a commit waiting
    # ``busy_timeout_ms`` for SQLite's lock.
    hc.read_timeout = math.ceil(config.server.read_timeout_s + config.store.busy_timeout_ms / 1000 + ANSWER_SLACK_S)
    return hc


async def answered_in_flight(rt: Runtime, stop: trio.Event) -> None:
    """Hypercorn's shutdown trigger: once `stop` is set, and the requests being handled then have been
    answered (those answers said ``Connection: close`` if they were built after `stop`).

    Why wait: a response still being sent when hypercorn 0.18 starts its graceful stop can leave its
    kept-alive connection waiting for a next request it never reads, which holds the stop for the
    whole ``graceful_timeout`` (measured: 10 s, in about half of the stops under keep-alive load).
    """
    await stop.wait()
    rt.draining = True
    with trio.move_on_after(IN_FLIGHT_WAIT_S):
        while rt.in_flight:  # noqa: ASYNC110 -- a count kept by the app; a few ms at most
            await trio.sleep(0.005)


async def mark_draining(rt: Runtime, stop: trio.Event, notifier: Notifier) -> None:
    await stop.wait()
    rt.draining = True
    notifier.stopping("draining")

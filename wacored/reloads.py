"""Config reloads (SIGHUP): the request the signal handler sends the daemon, and what a reload may
not change while the process runs.

`daemon.Daemon.reload` loads and validates the new config off the event loop and swaps it in whole
between two requests; `keep_restart_only` gives back what needs a new process (listen address, TLS
files, the body read deadline, the store, the trace exporter, a service's lane count) its old value,
logged; `refused` counts and logs a reload that did not happen (the old config stays).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .http.admission import ensure_fd_limit
from .observe.counts import ReloadCounts, bump
from .store.writer import Reply

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ReloadRequest:
    """Load a new config (`load` raises `ConfigError`) and swap it in; `done` says whether it was."""

    load: Callable[[], Config]
    done: Reply[bool] = field(default_factory=Reply)


def refused(counts: ReloadCounts, problems: list[str]) -> bool:
    bump(counts.results, "failed")
    counts.last_ok = False
    for problem in problems:
        log.error("config reload refused", extra={"event": "reload_failed", "problem": problem})
    return False


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new`, except what only a restart can change, which keeps its `old` value (logged)."""
    server = dataclasses.replace(
        new.server,
        host=old.server.host,
        port=old.server.port,
        certfile=old.server.certfile,
        keyfile=old.server.keyfile,
        read_timeout_s=old.server.read_timeout_s,
        processes=old.server.processes,
    )
    if new.server.max_connections != old.server.max_connections:
        ensure_fd_limit(new.server.max_connections)
    # read_timeout_s also sets hypercorn's read_timeout (`hypercorn_config`), fixed at start: the two
    # must stay consistent, so the body deadline waits for the restart too.
    for what, before, after in (
        ("server.listen", old.server.listen, new.server.listen),
        ("server.read_timeout_s", old.server.read_timeout_s, new.server.read_timeout_s),
        ("server.processes", old.server.processes, new.server.processes),
        (
            "server.certfile/keyfile",
            (old.server.certfile, old.server.keyfile),
            (new.server.certfile, new.server.keyfile),
        ),
        ("store.path", old.store.path, new.store.path),
        ("store.url", old.store.url, new.store.url),
        ("cluster.node_id", old.cluster.node_id, new.cluster.node_id),
        ("sessions.cache_size", old.sessions.cache_size, new.sessions.cache_size),
        (
            "telemetry.traces/otlp_endpoint/service_name",
            (old.telemetry.traces, old.telemetry.otlp_endpoint, old.telemetry.service_name),
            (new.telemetry.traces, new.telemetry.otlp_endpoint, new.telemetry.service_name),
        ),
    ):
        if before != after:
            log.warning(
                "this change needs a restart; the old value stays until then",
                extra={"event": "reload_needs_restart", "key": what},
            )
    for name, svc in new.services.items():
        if name in old.services and svc.forwarding.concurrency != old.services[name].forwarding.concurrency:
            log.warning(
                "a new lane count applies after a restart",
                extra={"event": "reload_needs_restart", "key": f"services.{name}.concurrency"},
            )
        if name in old.services and svc.ca_file != old.services[name].ca_file:
            log.warning(
                "a new CA file applies after a restart (the lanes' connections keep their TLS context)",
                extra={"event": "reload_needs_restart", "key": f"services.{name}.ca_file"},
            )
    sessions = dataclasses.replace(new.sessions, cache_size=old.sessions.cache_size)
    cluster = dataclasses.replace(new.cluster, node_id=old.cluster.node_id)
    return dataclasses.replace(new, server=server, store=old.store, sessions=sessions, cluster=cluster)

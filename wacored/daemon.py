"""The daemon: the nursery tree of actors around one SQLite store, and its signals.

Nesting follows shutdown order (STYLE.md, lesson 3). Outermost, the writer: it outlives everything
that writes. Inside it the forwarders, and inside them ingress. On stop, ingress stops taking
requests and answers the ones it has read; then the forwarders are cancelled (what they had not
delivered stays queued on disk); then the writer commits what is left and closes the store.

Start-up: migrate the schema, load live sessions, and mark every target with queued rows as spilled
from its oldest one, so its forwarder reads them back from disk before anything new (recovery).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from .api import create_app
from .config import Config
from .forwarder import run_forwarder, targets_of
from .runtime import ActorState, Runtime
from .sessions import SessionTable
from .store import Reader, WriteConnection, migrate
from .systemd import Notifier, open_watchdog, run_beating
from .tls import check_server_tls
from .writer import DeliveryQueue, WriteOp, run_writer

log = logging.getLogger(__name__)

WRITE_BUFFER = 4096
QUEUE_BUFFER = 1024


async def run_actor(
    rt: Runtime,
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """Run one actor, recording in `rt.actors` whether it is running and how it ended."""
    state = rt.actors.setdefault(name, ActorState())
    state.running, state.error = True, ""
    try:
        await fn(*args, task_status=task_status, **kwargs)
    except Exception as exc:
        state.error = f"{type(exc).__name__}: {exc}"
        log.exception("actor crashed", extra={"event": "actor_crashed", "actor": name})
        raise
    finally:
        state.running = False


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
    # Hypercorn's own cap must not cut a body before ingress can answer 413 itself.
    hc.h11_max_incomplete_size = 64 * 1024
    return hc


async def recover(
    config: Config, reader: Reader, targets: Iterable[str], wall_clock: Callable[[], float], queue_buffer: int
) -> tuple[SessionTable, dict[str, DeliveryQueue]]:
    """Load live sessions, and queue every accepted-but-undelivered message again."""
    since = wall_clock() - config.sessions.ttl_s
    sessions = SessionTable(config.sessions.ttl_s, await trio.to_thread.run_sync(reader.sessions, since))
    queues = {name: DeliveryQueue(name, queue_buffer) for name in targets}
    for target, oldest in (await trio.to_thread.run_sync(reader.queued_targets)).items():
        if target in queues:
            queues[target].spill_from = oldest
            log.info("re-queued undelivered messages", extra={"event": "recovered", "service": target})
        else:
            log.warning(
                "messages queued for a service no longer configured stay on disk",
                extra={"event": "orphaned_queue", "service": target},
            )
    return sessions, queues


async def run_daemon(
    config: Config,
    *,
    stop: trio.Event | None = None,
    wall_clock: Callable[[], float] = time.time,
    queue_buffer: int = QUEUE_BUFFER,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run wacored until `stop` is set; `task_status.started` gets the bound URLs once serving.

    `queue_buffer` is how many deliveries each target holds in memory before the rest wait on disk.
    `notifier` tells systemd READY=1 once serving and STOPPING=1 once `stop` is set, and runs the
    watchdog when systemd asked for one (see `wacored.systemd`).
    """
    stop = stop if stop is not None else trio.Event()
    notifier = notifier if notifier is not None else Notifier(None)
    hc = hypercorn_config(config)  # first: an unreadable certificate stops us before anything starts
    await trio.to_thread.run_sync(migrate, config.store.path)
    targets = targets_of(config)
    reader = Reader(config.store.path)
    try:
        sessions, queues = await recover(config, reader, targets, wall_clock, queue_buffer)
        writes, writes_receive = trio.open_memory_channel[WriteOp](WRITE_BUFFER)
        conn = WriteConnection(config.store.path, config.store.busy_timeout_ms)
        rt = Runtime.build(config, writes, queues, reader, sessions, wall_clock)
        async with open_watchdog(rt, notifier), trio.open_nursery() as root:
            await root.start(run_actor, rt, "writer", run_writer, conn, writes_receive, queues, sessions)
            async with writes, trio.open_nursery() as workers:
                for name, target in targets.items():
                    forwarder = partial(run_forwarder, target, queues[name], writes.clone(), clock=wall_clock)
                    await workers.start(run_actor, rt, f"forwarder.{name}", forwarder)
                async with trio.open_nursery() as front:
                    front.start_soon(_mark_draining, rt, stop, notifier)
                    serve = partial(hypercorn.trio.serve, create_app(rt), hc, shutdown_trigger=stop.wait)
                    # Ingress has no loop of its own to beat from: beat while hypercorn serves.
                    urls = await front.start(run_actor, rt, "ingress", partial(run_beating, rt, "ingress", serve))
                    log.info("listening", extra={"event": "listening", "urls": urls})
                    task_status.started(urls)
                    notifier.ready(f"listening on {' '.join(urls)}")
                workers.cancel_scope.cancel(reason="daemon stopping")
    finally:
        reader.close()
    log.info("stopped", extra={"event": "stopped"})


async def _mark_draining(rt: Runtime, stop: trio.Event, notifier: Notifier) -> None:
    await stop.wait()
    rt.draining = True
    notifier.stopping("draining")


Reload = Callable[[], Awaitable[None]]
"""What SIGHUP runs. It handles its own failures (a bad new config keeps the old one running)."""


async def _log_reload() -> None:
    log.info("SIGHUP: reload is not implemented yet", extra={"event": "reload_skipped"})


async def serve_until_signalled(
    config: Config, *, notifier: Notifier | None = None, reload: Reload = _log_reload
) -> int:
    """`run_daemon` under signals. SIGTERM/SIGINT: the first one stops gracefully (exit 0), a second
    one stops at once (exit 1); either way nothing accepted is lost: it is on disk. SIGHUP runs
    `reload` between RELOADING=1 and READY=1 to systemd, one reload at a time."""
    stop = trio.Event()
    notifier = notifier if notifier is not None else Notifier(None)
    forced = False
    # The receiver stays open for the whole drain: a second signal must reach us, not the default
    # handler (STACK_NOTES, "Signals and systemd"). SIGHUP's default handler would kill us.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal forced
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await _reload(reload, notifier, stop)
                    elif stop.is_set():
                        log.warning("second signal: stopping now", extra={"event": "forced_stop"})
                        forced = True
                        nursery.cancel_scope.cancel(reason="second signal")
                        return
                    else:
                        log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
                        stop.set()

            nursery.start_soon(watch)
            await run_daemon(config, stop=stop, notifier=notifier)
            nursery.cancel_scope.cancel(reason="daemon stopped")
    return 1 if forced else 0


async def _reload(reload: Reload, notifier: Notifier, stop: trio.Event) -> None:
    if stop.is_set():
        log.info("SIGHUP while stopping: ignored", extra={"event": "reload_ignored"})
        return
    notifier.reloading()
    try:
        await reload()
    finally:
        if not stop.is_set():
            notifier.ready("serving (reloaded)")

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
from opentelemetry.trace import Tracer

from .api import create_app
from .config import Config
from .forwarder import run_forwarder, targets_of
from .runtime import ActorState, Runtime
from .sessions import SessionTable
from .store import Reader, WriteConnection, migrate
from .telemetry import Tracing
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
    hc = hypercorn.config.Config()
    hc.bind = [config.server.listen]
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
    tracer: Tracer | None = None,
    process_start: float | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run wacored until `stop` is set; `task_status.started` gets the bound URLs once serving.

    `queue_buffer` is how many deliveries each target holds in memory before the rest wait on disk.
    `tracer` replaces the one `[telemetry]` asks for (tests); `process_start` (`time.monotonic()`)
    is where the cold start is measured from, by default this call.
    """
    process_start = time.monotonic() if process_start is None else process_start
    stop = stop if stop is not None else trio.Event()
    await trio.to_thread.run_sync(migrate, config.store.path)
    targets = targets_of(config)
    reader = Reader(config.store.path)
    tracing = Tracing.from_config(config.telemetry) if tracer is None else Tracing(None)
    try:
        sessions, queues = await recover(config, reader, targets, wall_clock, queue_buffer)
        writes, writes_receive = trio.open_memory_channel[WriteOp](WRITE_BUFFER)
        conn = WriteConnection(config.store.path, config.store.busy_timeout_ms)
        rt = Runtime.build(config, writes, queues, reader, sessions, wall_clock)
        rt.tracer = tracer or tracing.tracer
        async with trio.open_nursery() as root:
            await root.start(run_actor, rt, "writer", run_writer, conn, writes_receive, queues, sessions)
            async with writes, trio.open_nursery() as workers:
                for name, target in targets.items():
                    forwarder = partial(run_forwarder, target, queues[name], writes.clone(), clock=wall_clock,
                                        tracer=rt.tracer)
                    await workers.start(run_actor, rt, f"forwarder.{name}", forwarder)
                async with trio.open_nursery() as front:
                    front.start_soon(_mark_draining, rt, stop)
                    serve = partial(hypercorn.trio.serve, create_app(rt), hypercorn_config(config),
                                    shutdown_trigger=stop.wait)
                    urls = await front.start(run_actor, rt, "ingress", serve)
                    log.info("listening", extra={"event": "listening", "urls": urls})
                    task_status.started(urls)
                    rt.slo.record_cold_start(time.monotonic() - process_start, config.slo.cold_start_ms)
                workers.cancel_scope.cancel(reason="daemon stopping")
    finally:
        reader.close()
        await tracing.aclose()
    log.info("stopped", extra={"event": "stopped"})


async def _mark_draining(rt: Runtime, stop: trio.Event) -> None:
    await stop.wait()
    rt.draining = True


async def serve_until_signalled(config: Config, *, process_start: float | None = None) -> int:
    """`run_daemon` under SIGTERM/SIGINT: the first signal stops gracefully (exit 0), a second one
    stops at once (exit 1). Either way nothing accepted is lost: it is on disk."""
    stop = trio.Event()
    forced = False
    # The receiver stays open for the whole drain: a second signal must reach us, not the default
    # handler (STACK_NOTES, "Signals and systemd").
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal forced
                async for signum in signals:
                    if stop.is_set():
                        log.warning("second signal: stopping now", extra={"event": "forced_stop"})
                        forced = True
                        nursery.cancel_scope.cancel(reason="second signal")
                        return
                    log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
                    stop.set()

            nursery.start_soon(watch)
            await run_daemon(config, stop=stop, process_start=process_start)
            nursery.cancel_scope.cancel(reason="daemon stopped")
    return 1 if forced else 0

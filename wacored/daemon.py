"""The daemon: the nursery tree of supervised actors around the store, and how a reload changes them.

Nesting follows shutdown order (docs/conventions.md). Outermost, the writer: it outlives everything
that writes. Inside it the workers (a forwarder per target, and the periodic actors: DLQ retrier,
reaper, stats), and inside them ingress. On stop, ingress stops taking requests and answers the ones
it has read; then the periodic actors are cancelled and the forwarders get ``[server]
drain_timeout_s`` to finish the deliveries in hand (what they had not delivered stays queued on
disk); then the writer commits what is left and closes the store. Every actor runs under
`supervisor.supervise`.

Start-up: migrate the schema, split queued rows over the configured lane counts, read the paused
services before any forwarder starts (`pausewatch`), and take this process's share of the lane
leases before saying it is ready (`actors/lanes.py`): the lanes then read what is queued from the
store. Nothing is recovered into memory; sessions are not loaded either (the writer reads them from
the store as senders write, `store/ingest.py`), so start-up and memory do not grow with the backlog
nor with the number of senders. Signals are `signals.py`'s; the reload rules `reloads.py`'s.

Reload (`ReloadRequest`, sent on SIGHUP): the new config is loaded and validated off the event loop,
then swapped in whole between two requests: routing, business numbers, rate limits, menu, sessions, DLQ and
forwarding settings, targets (a service added gets a forwarder, a removed one's forwarder stops and
its undelivered messages wait in the store), log level, admin token, SLO targets. Pauses live in the
store, not the config: a reload keeps them. What needs a new process
(listen address, TLS files, the body read deadline, store path, trace exporter, a service's lane
count) keeps its old
value and is logged. On any problem the old config stays, every problem logged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from opentelemetry.trace import Tracer

from .actors.deadletters import run_dlq_retrier
from .actors.forwarder import run_forwarder
from .actors.lanes import LaneBoard, release, run_lease_keeper, run_relay
from .actors.pausewatch import run_pause_watch
from .actors.reaper import run_reaper
from .actors.stats import run_stats
from .actors.supervisor import supervise
from .actors.targets import targets_of
from .config import Config, ConfigError, StoreConfig
from .core.breaker import Breaker
from .core.leases import DLQ_RETRIER, REAPER
from .core.numbers import Numbers
from .core.ratelimit import RateLimit
from .core.routing import RoutingTable
from .http.admission import ensure_fd_limit
from .http.api import create_app
from .http.listener import lend, open_listener
from .http.serving import answered_in_flight, hypercorn_config, mark_draining
from .http.tls import check_ca_file
from .observe import logs
from .observe.counts import bump
from .observe.systemd import Notifier, open_watchdog, run_beating
from .observe.telemetry import Tracing
from .ops.pauses import Pause
from .reloads import ReloadRequest, keep_restart_only, refused
from .runtime import Runtime
from .siblings import Place, Siblings
from .store import LaneReader, Reader, StoreUnavailable, WriteConnection, migrate
from .store.interface import LaneReads, Reads, RowsListener, WriteTx
from .store.writer import Write, WriteOp, run_writer

log = logging.getLogger(__name__)

WRITE_BUFFER = 4096
RELEASE_WAIT_S = 2.0


async def recover(reader: Reads, targets: Iterable[str]) -> None:
    """Say which queued messages wait for a service no longer configured (sessions stay in the store,
    and the lanes read their rows from it)."""
    for target in (await trio.to_thread.run_sync(reader.queued_targets)).keys() - set(targets):
        log.warning(
            "messages queued for a service no longer configured stay on disk",
            extra={"event": "orphaned_queue", "service": target},
        )


@dataclass(frozen=True)
class StoreParts:
    """The store implementation the config names (the one place that picks it): the SQLite file at
    ``[store] path``, or the PostgreSQL database at ``[store] url`` when that is set."""

    config: StoreConfig

    # The PostgreSQL classes are imported here, by a daemon configured for them: a SQLite daemon never
    # loads psycopg (0.2 s of start-up and ~10 MB of RSS a worker, `store.interface`).

    def migrate(self) -> int:
        """Create or upgrade the schema (blocking: in a worker thread); `SchemaError` when newer."""
        if self.config.url:
            from .store.postgres import pg_migrate

            return pg_migrate(self.config.url)
        return migrate(self.config.path)

    def writer(self) -> WriteTx:
        if self.config.url:
            from .store.postgres import PgWriteConnection

            return PgWriteConnection(self.config.url, self.config.busy_timeout_ms)
        return WriteConnection(self.config.path, self.config.busy_timeout_ms)

    def reader(self) -> Reads:
        if self.config.url:
            from .store.postgres import PgReader

            return PgReader(self.config.url)
        return Reader(self.config.path)

    def lane_reader(self) -> LaneReads:
        if self.config.url:
            from .store.postgres import PgLaneReader

            return PgLaneReader(self.config.url)
        return LaneReader(self.config.path)

    def rows_listener(self) -> RowsListener | None:
        """What wakes the relay when another node commits (None: SQLite, the relay polls)."""
        if self.config.url:
            from .store.postgres import PgRowsListener

            return PgRowsListener(self.config.url)
        return None


async def close_readers(*readers: Reads | LaneReads | RowsListener | None) -> None:
    """Close readers in a worker thread (a PostgreSQL reader's pool says goodbye over the network),
    shielded: it runs while the daemon stops."""
    with trio.CancelScope(shield=True):
        for reader in readers:
            if reader is not None:
                await trio.to_thread.run_sync(reader.close)


def split_all(parts: StoreParts, lanes: dict[str, int]) -> None:
    """Split each target's queued rows by its lane count now (`store.WriteConnection.split_lanes`), before any
    lane reads them; in a worker thread (it may wait for another process's write lock)."""
    conn = parts.writer()
    try:
        conn.begin_waiting()
        try:
            for target, count in lanes.items():
                if moved := conn.split_lanes(target, count):
                    log.info(
                        "queued messages split over a new lane count",
                        extra={"event": "lanes_split", "service": target, "lanes": count, "moved": moved},
                    )
            conn.commit()
        finally:
            conn.rollback()
    finally:
        conn.close()


class Daemon:
    """One running daemon's actors: how each is started, restarted, added and removed."""

    def __init__(
        self,
        rt: Runtime,
        writes: trio.MemorySendChannel[WriteOp],
        lane_reader: LaneReads,
        transport: Callable[[], Any] | None,
    ) -> None:
        self.rt = rt
        self.writes = writes
        self.lane_reader = lane_reader
        self.transport = transport
        self.workers: trio.Nursery | None = None
        self.forwarders: dict[str, trio.CancelScope] = {}

    async def start_forwarder(self, name: str) -> None:
        assert self.workers is not None
        rt, scope = self.rt, trio.CancelScope()
        lanes = rt.lanes.ensure(name, rt.targets[name].forwarding.concurrency)
        self.forwarders[name] = scope

        def start(task_status: trio.TaskStatus[Any]) -> Any:
            return run_forwarder(
                rt,
                name,
                lanes,
                self.lane_reader,
                self.writes.clone(),
                transport=self.transport,
                task_status=task_status,
            )

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await supervise(rt, f"forwarder.{name}", start, task_status=task_status)

        await self.workers.start(run)

    def stop_forwarder(self, name: str) -> None:
        self.forwarders.pop(name).cancel(reason="service removed from the config")
        self.rt.lanes.remove(name)
        self.rt.actors.pop(f"forwarder.{name}", None)

    async def run_periodic(self, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        """The DLQ retrier, reaper, stats and pause watcher actors, each with a reader of its own, and
        the relay (on the lanes' reader: it reads on this thread)."""
        rt = self.rt
        parts = StoreParts(rt.config.store)
        readers = [parts.reader() for _ in range(4)]
        listener = parts.rows_listener()
        try:
            async with trio.open_nursery() as nursery:
                retrier, reaper, stats, pauses = readers
                await nursery.start(
                    supervise,
                    rt,
                    "dlq_retrier",
                    lambda ts: run_dlq_retrier(
                        rt,
                        retrier,
                        self.writes.clone(),
                        transport=self.transport,
                        may_run=partial(rt.lanes.holds, DLQ_RETRIER),
                        task_status=ts,
                    ),
                )
                await nursery.start(
                    supervise,
                    rt,
                    "reaper",
                    lambda ts: run_reaper(
                        rt, reaper, self.writes.clone(), may_run=partial(rt.lanes.holds, REAPER), task_status=ts
                    ),
                )
                await nursery.start(
                    supervise,
                    rt,
                    "relay",
                    lambda ts: run_relay(
                        rt.lanes, self.lane_reader, beat=partial(rt.beat, "relay"), listener=listener, task_status=ts
                    ),
                )
                await nursery.start(supervise, rt, "stats", lambda ts: run_stats(rt, stats, task_status=ts))
                await nursery.start(
                    supervise,
                    rt,
                    "pause_watch",
                    lambda ts: run_pause_watch(rt.pauses, pauses, beat=partial(rt.beat, "pause_watch"), task_status=ts),
                )
                task_status.started(nursery.cancel_scope)
        finally:
            await close_readers(*readers, listener)

    async def serve_reloads(self, requests: trio.MemoryReceiveChannel[ReloadRequest]) -> None:
        async for request in requests:
            request.done.set(await self.reload(request.load))

    async def reload(self, load: Callable[[], Config]) -> bool:
        """Load, validate and swap in a new config; False (old config kept) on any problem."""
        rt = self.rt
        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            return refused(rt.reload_counts, exc.problems)
        except Exception as exc:
            # Whatever reading the files raised, a reload never takes the daemon down: the old
            # config keeps serving. (ConfigError is the expected way; this is the net.)
            log.exception("config reload raised", extra={"event": "reload_failed", "problem": str(exc)})
            return refused(rt.reload_counts, [])
        new = keep_restart_only(rt.config, new)
        old_targets, new_targets = rt.targets, targets_of(new)
        rt.config = new
        rt.routing = RoutingTable.from_config(new)
        rt.numbers = Numbers.from_config(new)
        # The next ingest reads both from `rt` (`ingest.IngestPolicy`); the hits and sessions are in
        # the store, so a new limit or TTL applies to them at once.
        rt.ratelimit = RateLimit(new.ratelimit.per_sender, new.ratelimit.window_s)
        for name, target in new_targets.items():
            fwd = target.forwarding
            if name in rt.breakers:
                rt.breakers[name].reconfigure(fwd.breaker_failures, fwd.breaker_open_s)
            else:
                rt.breakers[name] = Breaker(fwd.breaker_failures, fwd.breaker_open_s)
        rt.targets = new_targets
        for name in old_targets.keys() - new_targets.keys():
            self.stop_forwarder(name)
        for name in new_targets.keys() - old_targets.keys():
            # Whatever an earlier run left queued for it waits in lane 0: split it first.
            lanes = new_targets[name].forwarding.concurrency
            split: Write[int] = Write(_split(name, lanes))
            await self.writes.send(split)
            try:
                await split.reply.wait()
            except StoreUnavailable as exc:
                log.warning(
                    "queued messages of an added service not split yet; lane 0 delivers them",
                    extra={"event": "lanes_split_failed", "service": name, "error": str(exc)},
                )
            await self.start_forwarder(name)
        logging.getLogger().setLevel(new.telemetry.log_level.upper())
        bump(rt.reload_counts.results, "ok")
        rt.reload_counts.last_ok, rt.reload_counts.last_success_at = True, rt.wall_clock()
        log.info(
            "config reloaded",
            extra={
                "event": "reloaded",
                "added": sorted(new_targets.keys() - old_targets.keys()),
                "removed": sorted(old_targets.keys() - new_targets.keys()),
                "changed": sorted(
                    n for n in new_targets.keys() & old_targets.keys() if new_targets[n] != old_targets[n]
                ),
            },
        )
        return True


async def run_daemon(
    config: Config,
    *,
    stop: trio.Event | None = None,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None = None,
    wall_clock: Callable[[], float] = time.time,
    transport: Callable[[], Any] | None = None,
    notifier: Notifier | None = None,
    tracer: Tracer | None = None,
    process_start: float | None = None,
    node: str | None = None,
    listener: socket.socket | None = None,
    place: Place | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run wacored until `stop` is set; `task_status.started` gets the bound URLs once serving.

    `reloads` carries config reloads (SIGHUP). `transport` makes each forward lane's HTTP
    transport (tests pass `httpx.MockTransport`s). `notifier` tells systemd READY=1 once serving and
    STOPPING=1 once `stop` is set, and runs the watchdog when systemd asked for one (`systemd.py`).
    `tracer` replaces the one `[telemetry]` asks for (tests); `process_start` (`time.monotonic()`)
    is where the cold start is measured from, by default this call. `node` names this process in the
    attempts log, the leases and every log line of this daemon (default `node_name` of ``[cluster]
    node_id`` and the worker index).

    Under ``[server] processes = N`` (`workers.py`) a worker gets the supervisor's `listener` (bound
    once for all of them; it is then not closed here) and its `place`, and also serves on its
    private unix socket (`siblings.py`).
    """
    process_start = time.monotonic() if process_start is None else process_start
    stop = stop if stop is not None else trio.Event()
    notifier = notifier if notifier is not None else Notifier(None)
    hc = hypercorn_config(config)  # first: an unreadable certificate stops us before anything starts
    for name, svc in config.services.items():
        check_ca_file(name, svc.ca_file)
    ensure_fd_limit(config.server.max_connections)
    own = listener is None
    if listener is None:
        listener = open_listener(config.server)  # then the port: in use, nothing else has started
    place = place if place is not None else Place()
    if not place.alone:
        # Not TLS even when the port is: only this user can reach the directory (mode 0700).
        private = f"unix:{place.socket_path(place.index)}"
        if config.server.tls:
            hc.insecure_bind = [private]
        else:
            hc.bind = [*hc.bind, private]
    if node is None:
        node = node_name(config.cluster.node_id, None if place.alone else place.index)
    try:
        with logs.bound(node=node):
            await _run(
                config,
                hc,
                listener,
                stop,
                reloads,
                wall_clock,
                transport,
                notifier,
                tracer,
                process_start,
                node,
                place,
                task_status,
            )
    finally:
        if own:
            listener.close()


async def _run(
    config: Config,
    hc: hypercorn.config.Config,
    listener: socket.socket,
    stop: trio.Event,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None,
    wall_clock: Callable[[], float],
    transport: Callable[[], Any] | None,
    notifier: Notifier,
    tracer: Tracer | None,
    process_start: float,
    node: str,
    place: Place,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    parts = StoreParts(config.store)
    await trio.to_thread.run_sync(parts.migrate)
    targets = targets_of(config)
    await trio.to_thread.run_sync(split_all, parts, {name: t.forwarding.concurrency for name, t in targets.items()})
    reader = parts.reader()
    lane_reader = parts.lane_reader()
    tracing = Tracing.from_config(config.telemetry) if tracer is None else Tracing(None)
    try:
        await recover(reader, targets)
        writes, writes_receive = trio.open_memory_channel[WriteOp](WRITE_BUFFER)
        board = LaneBoard(config.cluster.lease_ttl_s)
        rt = Runtime.build(config, writes, board, reader, wall_clock, node=node)
        rt.tracer = tracer or tracing.tracer
        rt.siblings = Siblings(place)
        # Before any forwarder starts: messages queued for a paused service must wait too.
        paused = await trio.to_thread.run_sync(reader.pauses)
        rt.pauses.apply({service: Pause(at, reason) for service, at, reason in paused}, served=0)
        daemon = Daemon(rt, writes, lane_reader, transport)

        def writer(task_status: trio.TaskStatus[Any]) -> Any:
            conn = parts.writer()
            return run_writer(
                conn,
                writes_receive,
                rt.lanes,
                session_cache_size=rt.config.sessions.cache_size,
                cache_stats=rt.session_cache,
                beat=partial(rt.beat, "writer"),
                state=rt.store_writes,
                wall_clock=rt.wall_clock,
                task_status=task_status,
            )

        def keeper(task_status: trio.TaskStatus[Any]) -> Any:
            return run_lease_keeper(
                rt.lanes,
                writes.clone(),
                me=node,
                started_at=rt.started_at,
                wall_clock=rt.wall_clock,
                beat=partial(rt.beat, "lease_keeper"),
                task_status=task_status,
            )

        async with writes_receive, open_watchdog(rt, notifier), trio.open_nursery() as root:
            await root.start(supervise, rt, "writer", writer)
            async with writes, trio.open_nursery() as leasing:
                # Lanes are added before the first lease tick, so a node that starts alone holds
                # them all before it says it is ready.
                for name in targets:
                    rt.lanes.ensure(name, targets[name].forwarding.concurrency)
                await leasing.start(supervise, rt, "lease_keeper", keeper)
                async with trio.open_nursery() as workers:
                    daemon.workers = workers
                    for name in targets:
                        await daemon.start_forwarder(name)
                    periodic: trio.CancelScope = await workers.start(daemon.run_periodic)
                    async with trio.open_nursery() as front:
                        if reloads is not None:
                            front.start_soon(_until, stop, partial(daemon.serve_reloads, reloads))
                        front.start_soon(mark_draining, rt, stop, notifier)
                        app = create_app(rt)

                        async def serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                            # Each start gets its own duplicate to close (and binds the private socket again).
                            hc.bind = [lend(listener), *hc.bind[1:]]
                            await hypercorn.trio.serve(
                                app,
                                hc,
                                shutdown_trigger=partial(answered_in_flight, rt, stop),
                                task_status=task_status,
                            )

                        # Ingress has no loop of its own to beat from: beat while hypercorn serves.
                        urls = await front.start(
                            supervise, rt, "ingress", lambda ts: run_beating(rt, "ingress", serve, task_status=ts)
                        )
                        log.info("listening", extra={"event": "listening", "urls": urls})
                        task_status.started(urls)
                        notifier.ready(f"listening on {' '.join(urls)}")
                        rt.slo.record_cold_start(time.monotonic() - process_start, config.slo.cold_start_ms)
                    rt.stopping.set()
                    periodic.cancel(reason="daemon stopping")
                    workers.cancel_scope.deadline = trio.current_time() + rt.config.server.drain_timeout_s
                if workers.cancel_scope.cancelled_caught:
                    log.warning(
                        "drain timeout: deliveries in flight were cut short; they stay queued",
                        extra={"event": "drain_timeout"},
                    )
                # The lanes have stopped: give their leases back, so another node (or the next
                # start) takes over at once rather than when they expire.
                leasing.cancel_scope.cancel(reason="daemon stopping")
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_WAIT_S):
                    await release(writes, node)
    finally:
        await close_readers(reader, lane_reader)
        await tracing.aclose()
    log.info("stopped", extra={"event": "stopped"})


def _split(target: str, lanes: int) -> Callable[[WriteTx], int]:
    return lambda w: w.split_lanes(target, lanes)


def node_name(node_id: str = "", worker: int | None = None) -> str:
    """This process, as the leases, the attempts log and the log lines name it: ``host-pid``, or the
    configured `node_id` (``[cluster] node_id``), suffixed ``-w<index>`` for `worker` `index` under
    ``[server] processes = N`` so that each process is a node of its own (a default name is already
    one per process)."""
    if not node_id:
        return f"{socket.gethostname()}-{os.getpid()}"
    return node_id if worker is None else f"{node_id}-w{worker}"


async def _until(stop: trio.Event, fn: Callable[[], Any]) -> None:
    """Run `fn()` until `stop` is set."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fn)
        await stop.wait()
        nursery.cancel_scope.cancel(reason="daemon stopping")

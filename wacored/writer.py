"""The store writer actor: the only code that writes SQLite, committing whatever is queued at once.

Requests arrive on one memory channel: `Ingest` (a parsed webhook batch, rate-limited, routed and
inserted inside the transaction by `ingest.ingest`; the caller waits for the commit), `Record` (a
delivery outcome; fire and forget), `CatchUp` (a forwarder asking for queued rows its channel could
not hold), `Write` (any other write; the caller waits) and `Sweep` (look for queued rows nobody
delivers now: an operator queued some again). The writer takes everything waiting, runs it as one
transaction (group commit; the fsync in a worker thread), then hands the newly inserted rows to
their delivery queues and answers the callers.

Invariant: every committed ``queued`` row of a target is in exactly one of these places: its
queue's channel or a lane (its id in `DeliveryQueue.in_flight` until its outcome commits, the
outcome possibly held in `StoreWrites.held`), or on disk at or after the queue's `spill_from`, read
back by the next `CatchUp`. Rows that fall out of it (a crashed writer or forwarder lost them, a row
written by another process: ``wacored messages replay`` sets old rows back to ``queued``) are found by
the sweep (`stuck_from`, every `SWEEP_S`, or at once on a `Sweep`), which reads them back and hands
them to the forwarder itself.

Error handling:
    A failed transaction is rolled back. Its `Ingest`s are answered `StoreUnavailable` (ingress says
    503; Meta redelivers) and never again; its `CatchUp`s and `Write`s too (their callers retry).
    The session cache (`ingest.StoreSessions`) is cleared, since it may hold what was rolled back.
    Its `Record`s are kept in order in `StoreWrites.held`, with every later `Record`, and committed
    in a transaction of their own after a bounded backoff (`retry_delay_s`), again until they
    commit: an outcome is never dropped while the daemon runs (one a constraint refuses, which can
    never commit, is logged and left to the sweep). Every failure is counted in `StoreWrites`
    (/health, /metrics) until a commit that writes succeeds. An error other than `sqlite3.Error` is
    a bug: the callers are answered, the outcomes kept, and the writer crashes (the supervisor
    restarts it; `StoreWrites` belongs to the daemon, so the restarted writer carries on).

Cancellation:
    A worker thread waiting for a lock or running a COMMIT is never abandoned (`to_thread.run_sync`
    waits), and a group taken from the channel is committed under a shield, so cancelling the writer
    cannot cut a commit in half nor leave a caller unanswered. The writer ends when every sender of
    its channel is closed, after one last try of the outcomes it holds (any still failing then are
    lost from memory; their messages stay ``queued`` and are delivered again after the restart).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from .core.whatsapp import Batch
from .ingest import (
    DEFAULT_CACHE_SIZE,
    IngestContext,
    Ingested,
    IngestPolicy,
    SessionCacheStats,
    StoreSessions,
    ingest,
)
from .store import Delivery, Outcome, StoreUnavailable, WriteConnection

log = logging.getLogger(__name__)

MAX_GROUP = 512
"""Requests per transaction at most, so one commit never holds a caller for long."""
CATCH_UP_PAGE = 256
HEARTBEAT_S = 5.0
"""Every actor gives a sign of life at least this often, idle or not (the watchdog reads them)."""
SWEEP_S = HEARTBEAT_S
"""How often the writer looks for queued rows nobody is delivering (`stuck_from`)."""
RETRY_BASE_S = 0.1
RETRY_MAX_S = 5.0
"""Held outcomes are tried again after 0.1 s, doubling per consecutive failure, at most 5 s apart."""


T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer from the writer to a waiting caller."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


@dataclass(eq=False)
class Ingest:
    """A parsed webhook batch to rate-limit, route and insert in the transaction (`ingest.ingest`)."""

    batch: Batch
    policy: IngestPolicy
    context: IngestContext
    reply: Reply[Ingested] = field(default_factory=Reply)


@dataclass(eq=False)
class Record:
    outcome: Outcome


@dataclass(eq=False)
class CatchUp:
    target: str
    reply: Reply[list[Delivery]] = field(default_factory=Reply)


@dataclass(eq=False)
class Write(Generic[T]):
    """Any other write (a dead letter's retry, a reaper batch, a run record): `apply` runs on the write
    connection inside the group's transaction; its result is the reply once committed. `apply` is a
    typed call of a `WriteConnection` method (``partial(WriteConnection.reap, kind=..., ...)``), never
    a method named by a string."""

    apply: Callable[[WriteConnection], T]
    reply: Reply[T] = field(default_factory=Reply)


@dataclass(eq=False)
class Sweep:
    """Sweep the queues after this group rather than at the next `SWEEP_S` (fire and forget)."""


WriteOp = Ingest | Record | CatchUp | Write[Any] | Sweep


class DeliveryQueue:
    """One target's delivery channel, and where it spilled to disk when the channel was full.

    The writer offers each committed row; when the channel is full the row stays on disk only and
    `spill_from` remembers the first such row, so the forwarder reads the rest back in id order
    (`CatchUp`) once it has emptied its channel. Start-up recovery is a spill from the oldest queued row.
    `in_flight` holds the ids handed to the forwarder (channel or catch-up page) whose outcome has not
    committed yet: a catch-up never hands them out again, and the sweep knows they are being delivered.
    Owner: the writer (and `restart`, run by the supervisor while the forwarder is down).
    """

    def __init__(self, target: str, buffer: int = 1024) -> None:
        self.target = target
        self.send, self.receive = trio.open_memory_channel[Delivery](buffer)
        self.spill_from: int | None = None
        self.in_flight: set[int] = set()

    def offer(self, delivery: Delivery) -> None:
        if self.spill_from is None:
            try:
                self.send.send_nowait(delivery)
                self.in_flight.add(delivery.id)
                return
            except trio.WouldBlock:
                self.spill_from = delivery.id
                log.info(
                    "delivery queue full: deliveries wait on disk",
                    extra={"event": "queue_spilled", "service": self.target},
                )

    def depth(self) -> int:
        return self.receive.statistics().current_buffer_used

    def restart(self) -> None:
        """Before a crashed forwarder restarts: forget what the channel holds and read every queued
        row back from disk in order (some may be delivered twice, under the same Idempotency-Key)."""
        while True:
            try:
                self.receive.receive_nowait()
            except trio.WouldBlock:
                break
        self.in_flight.clear()
        self.spill_from = 0


@dataclass
class StoreWrites:
    """How the writer's commits are going, and the outcomes it holds until they commit.

    Owner: the writer actor, the only one to change it. The daemon keeps it (`Runtime.store_writes`),
    so a restarted writer carries on with what a crashed one held; /health and /metrics read it.
    """

    held: list[Record] = field(default_factory=list)
    """Outcomes of failed transactions (and every later one), in order, waiting to be committed."""
    failures: int = 0
    """Failed transactions since the daemon started."""
    consecutive: int = 0
    """Failed transactions since the last commit that wrote something."""
    failing_since: float | None = None
    """Wall-clock time of the first of the `consecutive` failures (None: commits succeed)."""
    last_error: str = ""
    last_error_at: float | None = None
    retry_at: float = 0.0
    """`trio.current_time()` at which the held outcomes are tried again."""

    def failed(self, error: str, now: float, mono: float) -> None:
        self.failures += 1
        self.consecutive += 1
        if self.failing_since is None:
            self.failing_since = now
        self.last_error, self.last_error_at = error, now
        self.retry_at = mono + retry_delay_s(self.consecutive)

    def succeeded(self) -> None:
        """A commit that wrote something: the store takes writes again (the last error is kept)."""
        self.consecutive = 0
        self.failing_since = None


def retry_delay_s(consecutive: int) -> float:
    """How long held outcomes wait after the `consecutive`-th failure in a row (bounded backoff)."""
    return float(min(RETRY_BASE_S * 2 ** max(consecutive - 1, 0), RETRY_MAX_S))


def store_writes_status(failing_since: float | None, now: float, unhealthy_after_s: float) -> str:
    """``ok``; ``failing`` while commits fail (degraded); ``down`` once they have failed for
    `unhealthy_after_s` (unhealthy)."""
    if failing_since is None:
        return "ok"
    return "down" if now - failing_since >= unhealthy_after_s else "failing"


def stuck_from(oldest_queued: int | None, in_flight: set[int], spill_from: int | None) -> int | None:
    """Where a target's queue must be read back from disk, given its oldest ``queued`` row: that row,
    when nobody is delivering it (not in flight, not behind a spill). In-flight ids are handed out in
    id order and stay queued until their outcome commits, so a queued row older than every one of
    them that is not one of them has been lost by whoever held it."""
    if oldest_queued is None or spill_from is not None or oldest_queued in in_flight:
        return None
    return oldest_queued


def _stage(
    conn: WriteConnection, ops: Sequence[WriteOp], spills: Mapping[str, int], sessions: StoreSessions | None
) -> list[object]:
    """Every op of the group, in order, inside the open transaction."""
    results: list[object] = []
    if sessions is not None:
        sessions.sync()
    for op in ops:
        if isinstance(op, Ingest):
            assert sessions is not None, "an ingest needs the session cache"
            results.append(ingest(conn, sessions, op.batch, op.policy, op.context))
        elif isinstance(op, Record):
            conn.record(op.outcome)
            results.append(None)
        elif isinstance(op, Write):
            results.append(op.apply(conn))
        elif isinstance(op, Sweep):
            results.append(None)
        else:
            from_id = spills.get(op.target)
            results.append([] if from_id is None else conn.queued(op.target, from_id, CATCH_UP_PAGE))
    return results


async def _transaction(
    conn: WriteConnection, ops: Sequence[WriteOp], spills: Mapping[str, int], sessions: StoreSessions | None = None
) -> list[object]:
    """Run the group as one transaction (`sessions`: the session cache, needed by an `Ingest`).

    The statements run right here on the event loop's thread: they are short, and a worker thread
    running them would take the GIL back after every statement, waiting up to the interpreter's
    switch interval each time while ingress keeps this thread busy (measured: 10.5 ms a group of 11
    rows under load). Only what may wait goes to a thread: a lock held by another process, and the
    COMMIT's fsync.
    """
    if not conn.try_begin():
        await trio.to_thread.run_sync(conn.begin_waiting)
    try:
        results = _stage(conn, ops, spills, sessions)
        await trio.to_thread.run_sync(conn.commit)
    except BaseException:
        conn.rollback()
        if sessions is not None:
            sessions.clear()
        raise
    return results


async def run_writer(
    conn: WriteConnection,
    receive: trio.MemoryReceiveChannel[WriteOp],
    queues: Mapping[str, DeliveryQueue],
    *,
    session_cache_size: int = DEFAULT_CACHE_SIZE,
    cache_stats: SessionCacheStats | None = None,
    beat: Callable[[], None] = lambda: None,
    state: StoreWrites | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Commit every request that arrives, in groups, until the channel is closed by all its senders.

    Owns: the write connection (closes it when done), and `state` (failures, held outcomes). The
    receive end and `state` belong to the daemon, so a restarted writer carries on with what is still
    queued in the channel and with the outcomes held. Owns the session cache (`ingest.StoreSessions`,
    at most `session_cache_size` sessions; its figures in `cache_stats`), new with each start: a
    restarted writer trusts nothing a crashed one cached. `beat` is called at least every `HEARTBEAT_S`, idle or
    not (the watchdog's sign of life). Held outcomes are retried when due, before the next group;
    every `SWEEP_S` the queues are swept for rows nobody delivers.
    """
    state = state if state is not None else StoreWrites()
    sessions = StoreSessions(conn, session_cache_size, cache_stats)
    task_status.started()
    next_sweep = trio.current_time() + SWEEP_S
    try:
        while True:
            beat()
            wake = min(trio.current_time() + HEARTBEAT_S, next_sweep)
            if state.held:
                wake = min(wake, state.retry_at)
            with trio.move_on_at(wake):
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    break
                ops: list[WriteOp] = [first]
                while len(ops) < MAX_GROUP:
                    try:
                        ops.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if any(isinstance(op, Sweep) for op in ops):
                    next_sweep = trio.current_time()
                    ops = [op for op in ops if not isinstance(op, Sweep)]
                with trio.CancelScope(shield=True):
                    # The group is out of the channel: it must be committed (or answered) whatever
                    # happens to this task, or its callers would wait forever.
                    await _commit_group(conn, ops, queues, sessions, state, wall_clock)
            now = trio.current_time()
            if state.held and now >= state.retry_at:
                with trio.CancelScope(shield=True):
                    await _commit_held(conn, queues, state, wall_clock)
            if now >= next_sweep:
                _sweep(conn, queues)
                next_sweep = now + SWEEP_S
        if state.held:  # stopping: one last try
            with trio.CancelScope(shield=True):
                await _commit_held(conn, queues, state, wall_clock)
    finally:
        conn.close()


def _failed(state: StoreWrites, exc: BaseException, wall_clock: Callable[[], float]) -> None:
    state.failed(str(exc) or type(exc).__name__, wall_clock(), trio.current_time())
    log.error(
        "store commit failed",
        extra={
            "event": "store_commit_failed",
            "error": str(exc),
            "consecutive": state.consecutive,
            "outcomes_held": len(state.held),
        },
    )


def _recorded(queues: Mapping[str, DeliveryQueue], record: Record) -> None:
    """`record` is committed (or given up): its message is no longer in flight."""
    if (queue := queues.get(record.outcome.target)) is not None:
        queue.in_flight.discard(record.outcome.message_id)


async def _commit_group(
    conn: WriteConnection,
    ops: list[WriteOp],
    queues: Mapping[str, DeliveryQueue],
    sessions: StoreSessions,
    state: StoreWrites,
    wall_clock: Callable[[], float],
) -> None:
    if not ops:
        return
    if state.held:
        # Outcomes keep their order: while older ones wait to be retried, newer ones wait behind them.
        state.held.extend(op for op in ops if isinstance(op, Record))
        ops = [op for op in ops if not isinstance(op, Record)]
        if not ops:
            return
    spills = {q.target: q.spill_from for q in queues.values() if q.spill_from is not None}
    changes = conn.changes()
    try:
        results = await _transaction(conn, ops, spills, sessions)
    except Exception as exc:
        # sqlite3.Error is the store refusing; anything else is a bug that crashes the writer (the
        # supervisor restarts it). Either way nothing of the group was stored: say so to every caller
        # but the outcomes, which are kept to be committed later (nobody would ever send them again).
        state.held.extend(op for op in ops if isinstance(op, Record))
        _failed(state, exc, wall_clock)
        for op in ops:
            if not isinstance(op, Record | Sweep):
                op.reply.fail(StoreUnavailable(str(exc)))
        if isinstance(exc, sqlite3.Error):
            return
        raise
    if conn.changes() != changes:
        state.succeeded()
    for op, result in zip(ops, results, strict=True):
        if isinstance(op, Ingest):
            assert isinstance(result, Ingested)
            for row, row_id in zip(result.rows, result.ids, strict=True):
                # A probe is routed but never delivered: it is stored ``probe``, no forwarder's.
                if row_id is not None and row.delivers and row.target in queues:
                    queues[row.target].offer(Delivery.from_row(row_id, row))
            op.reply.set(result)
        elif isinstance(op, Record):
            _recorded(queues, op)
        elif isinstance(op, CatchUp):
            page: list[Delivery] = result  # type: ignore[assignment]
            queue = queues[op.target]
            # Only this actor moves spill_from, and no commit ran since the read: the page is exact.
            queue.spill_from = page[-1].id + 1 if len(page) == CATCH_UP_PAGE else None
            if queue.spill_from is None:
                log.info(
                    "delivery queue caught up with the disk",
                    extra={"event": "queue_caught_up", "service": queue.target},
                )
            # A row already handed out (a sweep spilled from an older one) is not handed out twice.
            fresh = [d for d in page if d.id not in queue.in_flight]
            queue.in_flight.update(d.id for d in fresh)
            op.reply.set(fresh)
        elif isinstance(op, Write):
            op.reply.set(result)
        # A Sweep has no reply: it was acted on before the group.


async def _commit_held(
    conn: WriteConnection,
    queues: Mapping[str, DeliveryQueue],
    state: StoreWrites,
    wall_clock: Callable[[], float],
) -> None:
    """Commit the held outcomes, in order, in a transaction of their own (so one that can never
    commit does not take new ingests down with it)."""
    held = list(state.held)
    changes = conn.changes()
    try:
        await _transaction(conn, held, {})
    except sqlite3.OperationalError as exc:  # disk full, locked, I/O: the store, not the outcomes
        _failed(state, exc, wall_clock)
        return
    except sqlite3.Error:
        await _commit_one_by_one(conn, queues, state, wall_clock)
        return
    del state.held[: len(held)]
    if conn.changes() != changes:
        state.succeeded()
    for record in held:
        _recorded(queues, record)
    log.info("held outcomes committed", extra={"event": "outcomes_committed", "count": len(held)})


async def _commit_one_by_one(
    conn: WriteConnection,
    queues: Mapping[str, DeliveryQueue],
    state: StoreWrites,
    wall_clock: Callable[[], float],
) -> None:
    """A constraint refused one of the held outcomes: commit them one at a time, giving up only those
    the store refuses for what they are (their messages, if still queued, are left to the sweep)."""
    while state.held:
        record = state.held[0]
        try:
            await _transaction(conn, [record], {})
        except sqlite3.OperationalError as exc:
            _failed(state, exc, wall_clock)
            return
        except sqlite3.Error as exc:
            log.error(
                "outcome cannot be recorded",
                extra={
                    "event": "outcome_unrecordable",
                    "service": record.outcome.target,
                    "message_id": record.outcome.key,
                    "error": str(exc),
                },
            )
        del state.held[0]
        _recorded(queues, record)


def _sweep(conn: WriteConnection, queues: Mapping[str, DeliveryQueue]) -> None:
    """Resume every queue whose oldest queued row nobody is delivering (`stuck_from`). Between two
    groups, on the connection that commits every row: what it reads is exactly the state."""
    for queue in queues.values():
        if queue.spill_from is not None:
            continue
        try:
            oldest = conn.oldest_queued(queue.target)
            from_id = stuck_from(oldest, queue.in_flight, queue.spill_from)
            if from_id is not None:
                _resume(conn, queue, from_id)
        except sqlite3.Error as exc:
            log.warning("cannot look for stuck deliveries", extra={"event": "sweep_failed", "error": str(exc)})
            return
        if from_id is not None:
            log.warning(
                "queued messages nobody was delivering (lost, or queued again by an operator): read back from disk",
                extra={"event": "queue_resumed", "service": queue.target},
            )


def _resume(conn: WriteConnection, queue: DeliveryQueue, from_id: int) -> None:
    """Hand `queue`'s queued rows from `from_id` on to its forwarder now, as a `CatchUp` would: an
    idle forwarder waits on its channel (up to a heartbeat) and would not see a spill sooner."""
    page = conn.queued(queue.target, from_id, CATCH_UP_PAGE)
    for d in page:
        if d.id not in queue.in_flight:
            queue.offer(d)  # a full channel spills from here on: the rest are read back by CatchUp
    if len(page) == CATCH_UP_PAGE and queue.spill_from is None:
        queue.spill_from = page[-1].id + 1

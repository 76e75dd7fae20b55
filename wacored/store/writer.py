"""The store writer actor: the only code that writes the store, committing whatever is queued at once.

Requests arrive on one memory channel: `Ingest` (a parsed webhook batch, rate-limited, routed and
inserted inside the transaction by `ingest.ingest`; the caller waits for the commit), `Record` (a
delivery outcome; fire and forget) and `Write` (any other write, such as a lease tick; the caller
waits). The writer takes everything waiting, runs it as one transaction (group commit; the fsync in
a worker thread), then wakes the lanes of the newly inserted rows (`Lanes`) and answers the callers.

The writer hands no row to anyone: a committed row is in the store, and its lane reads it from there
(`lanes.py`), whichever process holds that lane. So a crashed writer, lane or process loses nothing:
what is ``queued`` is read again.

Error handling:
    A failed transaction is rolled back. Its `Ingest`s are answered `StoreUnavailable` (ingress says
    503; Meta redelivers) and never again; its `Write`s too (their callers retry).
    Its `Record`s are kept in order in `StoreWrites.held`, with every later `Record`, and committed
    in a transaction of their own after a bounded backoff (`retry_delay_s`), again until they
    commit: an outcome is never dropped while the daemon runs (one a constraint refuses, which can
    never commit, is logged, and its message, still ``queued``, is read again by its lane). Every
    failure is counted in `StoreWrites` (/health, /metrics) until a commit that writes succeeds. An
    error other than the driver's (`interface.STORE_ERRORS`) is a bug: the callers are answered, the
    outcomes kept, and the writer crashes (the supervisor restarts it; `StoreWrites` belongs to the daemon, so the
    restarted writer carries on). The session cache (`ingest.StoreSessions`) is cleared, since it may
    hold what was rolled back.

Cancellation:
    A worker thread waiting for a lock or running a COMMIT is never abandoned (`to_thread.run_sync`
    waits), and a group taken from the channel is committed under a shield, so cancelling the writer
    cannot cut a commit in half nor leave a caller unanswered. The writer ends when every sender of
    its channel is closed, after one last try of the outcomes it holds (any still failing then are
    lost from memory; their messages stay ``queued`` and are delivered again after the restart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio

from ..core.whatsapp import Batch
from . import NewRow, Outcome, StoreUnavailable, interface
from .ingest import (
    DEFAULT_CACHE_SIZE,
    IngestContext,
    Ingested,
    IngestPolicy,
    SessionCacheStats,
    StoreSessions,
    ingest,
)
from .interface import WriteTx

if TYPE_CHECKING:
    # trio's own result type: what `trio.lowlevel.start_thread_soon` delivers
    from outcome import Outcome as ThreadResult

log = logging.getLogger(__name__)

MAX_GROUP = 512
"""Requests per transaction at most, so one commit never holds a caller for long."""
HEARTBEAT_S = 5.0
"""Every actor gives a sign of life at least this often, idle or not (the watchdog reads them)."""
RETRY_BASE_S = 0.1
RETRY_MAX_S = 5.0
"""Held outcomes are tried again after 0.1 s, doubling per consecutive failure, at most 5 s apart."""


T = TypeVar("T")


class Reply(Generic[T]):
    """A one-shot answer from the writer to a waiting caller."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: tuple[T] | None = None
        self._error: BaseException | None = None

    def set(self, value: T) -> None:
        self._value = (value,)
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    async def wait(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None  # set() or fail() set `_done`
        return self._value[0]


@dataclass(eq=False)
class Ingest:
    """A parsed webhook batch to rate-limit, route and insert in the transaction (`ingest.ingest`)."""

    batch: Batch
    policy: IngestPolicy
    context: IngestContext
    reply: Reply[Ingested] = field(default_factory=Reply)
    _result: Ingested | None = field(default=None, init=False, repr=False)

    def stage(self, conn: WriteTx, sessions: StoreSessions | None, lanes: Lanes) -> None:
        assert sessions is not None, "an ingest needs the session cache"
        self._result = ingest(conn, sessions, self.batch, self.policy, self.context, lane_of=lanes.lane_of)

    def committed(self, lanes: Lanes) -> None:
        result = self._result
        assert result is not None, "committed before it was staged"
        # A probe is routed but never delivered: it is stored ``probe``, in no lane.
        lanes.committed(row for row, row_id in zip(result.rows, result.ids, strict=True) if row_id is not None)
        self.reply.set(result)


@dataclass(eq=False)
class Record:
    outcome: Outcome

    def stage(self, conn: WriteTx, sessions: StoreSessions | None, lanes: Lanes) -> None:
        conn.record(self.outcome)

    def committed(self, lanes: Lanes) -> None:
        """Committed: its message is no longer in hand."""
        lanes.recorded(self.outcome.target, self.outcome.message_id)

    def given_up(self, lanes: Lanes) -> None:
        """Never to be committed: its message is no longer in hand, and still ``queued`` (read again)."""
        lanes.recorded(self.outcome.target, self.outcome.message_id, again=True)


@dataclass(eq=False)
class Write(Generic[T]):
    """Any other write (a dead letter's retry, a reaper batch, a run record): `apply` runs on the write
    connection inside the group's transaction; its result is the reply once committed. `apply` is a
    typed call of a `store_api.WriteTx` method (``lambda w: w.reap(kind, cutoff, limit)``), never
    a method named by a string."""

    apply: Callable[[WriteTx], T]
    reply: Reply[T] = field(default_factory=Reply)
    _result: tuple[T] | None = field(default=None, init=False, repr=False)

    def stage(self, conn: WriteTx, sessions: StoreSessions | None, lanes: Lanes) -> None:
        self._result = (self.apply(conn),)

    def committed(self, lanes: Lanes) -> None:
        assert self._result is not None, "committed before it was staged"
        self.reply.set(self._result[0])


WriteOp = Ingest | Record | Write[Any]


class Lanes(Protocol):
    """What the writer tells the lanes (`lanes.LaneBoard`): rows committed, outcomes recorded."""

    def lane_of(self, target: str, sender: str) -> int: ...

    def committed(self, rows: Iterable[NewRow]) -> None: ...

    def recorded(self, target: str, message_id: int, *, again: bool = False) -> None: ...


class NoLanes:
    """For a writer nobody delivers from (tools, tests of the writer alone)."""

    def lane_of(self, target: str, sender: str) -> int:
        return 0

    def committed(self, rows: Iterable[NewRow]) -> None:
        pass

    def recorded(self, target: str, message_id: int, *, again: bool = False) -> None:
        pass


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


def _stage(conn: WriteTx, ops: Sequence[WriteOp], sessions: StoreSessions | None, lanes: Lanes) -> None:
    """Every op of the group, in order, inside the open transaction; each keeps its own result."""
    if sessions is not None:
        sessions.sync()
    for op in ops:
        op.stage(conn, sessions, lanes)


async def _transaction(
    conn: WriteTx, ops: Sequence[WriteOp], sessions: StoreSessions | None = None, lanes: Lanes | None = None
) -> None:
    """Run the group as one transaction (`sessions`: the session cache, needed by an `Ingest`; `lanes`:
    which lane each new row goes to).

    The statements run right here on the event loop's thread: they are short, and a worker thread
    running them would take the GIL back after every statement, waiting up to the interpreter's
    switch interval each time while ingress keeps this thread busy (measured: 10.5 ms a group of 11
    rows under load). Only what may wait goes to a thread: a lock held by another process, and the
    COMMIT's fsync.

    A store whose statements are network round trips (`WriteTx.blocking_statements`: PostgreSQL) must
    not run them here: there begin, statements and commit run in one worker-thread call
    (`_transaction_in_thread`), still one transaction per group.
    """
    if conn.blocking_statements:
        await trio.to_thread.run_sync(_transaction_in_thread, conn, ops, sessions, lanes or NoLanes())
        return
    if not conn.try_begin():
        await _begin_polling(conn)
    try:
        _stage(conn, ops, sessions, lanes or NoLanes())
        await _in_thread_now(conn.commit)
    except BaseException:
        conn.rollback()
        if sessions is not None:
            sessions.clear()
        raise


LOCK_POLL_S = 0.0005
LOCK_POLL_FOR_S = 0.05
"""A write lock another process holds is polled from the loop every `LOCK_POLL_S` for up to
`LOCK_POLL_FOR_S`, then waited for in a worker thread (SQLite's busy handler, up to the busy timeout).
Why not the busy handler at once: it sleeps 1, 2, 5, 10 ms... between tries, so with two workers
committing ~60 groups/s each, holding the lock ~3-5 ms a group, a begin that found the lock taken
waited ~10 ms on average (2.5 s of waits in a 10 s bench load, 40 % of the begins); a failed
``BEGIN IMMEDIATE`` costs microseconds, so polling it each half millisecond on the loop is cheap."""


async def _begin_polling(conn: WriteTx) -> None:
    """Open the write transaction once another process's write lock is free (see `LOCK_POLL_S`)."""
    give_up = trio.current_time() + LOCK_POLL_FOR_S
    while trio.current_time() < give_up:
        await trio.sleep(LOCK_POLL_S)
        if conn.try_begin():
            return
    await trio.to_thread.run_sync(conn.begin_waiting)


async def _in_thread_now(fn: Callable[[], T]) -> T:
    """`fn()` in a worker thread started right now, its result (or error) returned; not abandoned when
    cancelled: like ``trio.to_thread.run_sync``, the caller waits for it.

    Why not ``trio.to_thread.run_sync``: it yields to the scheduler before it starts the thread, and
    under load the loop runs a whole batch of request tasks first. For the COMMIT that wait is spent
    holding the store's write lock, which another worker process is waiting for: measured 1.6-1.9 ms
    a group of the 3.5-4.7 ms the lock was held, with two workers under the bench's load.
    """
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: ThreadResult[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver, name="wacored commit")
    result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    return result


def _transaction_in_thread(conn: WriteTx, ops: Sequence[WriteOp], sessions: StoreSessions | None, lanes: Lanes) -> None:
    """`_transaction` for a store whose statements block, in a worker thread. What the ops touch
    besides the connection is the writer's alone while it waits for this call (the ops, the session
    cache); `lanes.lane_of` only reads the lane counts."""
    conn.begin_waiting()
    try:
        _stage(conn, ops, sessions, lanes)
        conn.commit()
    except BaseException:
        conn.rollback()
        if sessions is not None:
            sessions.clear()
        raise


async def run_writer(
    conn: WriteTx,
    receive: trio.MemoryReceiveChannel[WriteOp],
    lanes: Lanes,
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
    restarted writer trusts nothing a crashed one cached. Tells `lanes` which rows and outcomes it
    committed.
    `beat` is called at least every `HEARTBEAT_S`, idle or not (the watchdog's sign of life). Held
    outcomes are retried when due, before the next group.
    """
    state = state if state is not None else StoreWrites()
    sessions = StoreSessions(conn, session_cache_size, cache_stats)
    task_status.started()
    try:
        while True:
            beat()
            wake = trio.current_time() + HEARTBEAT_S
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
                with trio.CancelScope(shield=True):
                    # The group is out of the channel: it must be committed (or answered) whatever
                    # happens to this task, or its callers would wait forever.
                    await _commit_group(conn, ops, lanes, sessions, state, wall_clock)
            if state.held and trio.current_time() >= state.retry_at:
                with trio.CancelScope(shield=True):
                    await _commit_held(conn, lanes, state, wall_clock)
        if state.held:  # stopping: one last try
            with trio.CancelScope(shield=True):
                await _commit_held(conn, lanes, state, wall_clock)
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


async def _commit_group(
    conn: WriteTx,
    ops: list[WriteOp],
    lanes: Lanes,
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
    changes = conn.changes()
    try:
        await _transaction(conn, ops, sessions, lanes)
    except Exception as exc:
        # A driver's error (STORE_ERRORS) is the store refusing; anything else is a bug that crashes the writer (the
        # supervisor restarts it). Either way nothing of the group was stored: say so to every caller
        # but the outcomes, which are kept to be committed later (nobody would ever send them again).
        state.held.extend(op for op in ops if isinstance(op, Record))
        _failed(state, exc, wall_clock)
        for op in ops:
            if not isinstance(op, Record):
                op.reply.fail(StoreUnavailable(str(exc)))
        if isinstance(exc, interface.STORE_ERRORS):
            return
        raise
    if conn.changes() != changes:
        state.succeeded()
    for op in ops:
        op.committed(lanes)


async def _commit_held(
    conn: WriteTx,
    lanes: Lanes,
    state: StoreWrites,
    wall_clock: Callable[[], float],
) -> None:
    """Commit the held outcomes, in order, in a transaction of their own (so one that can never
    commit does not take new ingests down with it)."""
    held = list(state.held)
    changes = conn.changes()
    try:
        await _transaction(conn, held)
    except interface.STORE_DOWN_ERRORS as exc:  # disk full, locked, I/O, connection: the store, not the outcomes
        _failed(state, exc, wall_clock)
        return
    except interface.STORE_ERRORS:
        await _commit_one_by_one(conn, lanes, state, wall_clock)
        return
    del state.held[: len(held)]
    if conn.changes() != changes:
        state.succeeded()
    for record in held:
        record.committed(lanes)
    log.info("held outcomes committed", extra={"event": "outcomes_committed", "count": len(held)})


async def _commit_one_by_one(
    conn: WriteTx,
    lanes: Lanes,
    state: StoreWrites,
    wall_clock: Callable[[], float],
) -> None:
    """A constraint refused one of the held outcomes: commit them one at a time, giving up only those
    the store refuses for what they are (their messages, if still queued, are read again by their lane)."""
    while state.held:
        record = state.held[0]
        try:
            await _transaction(conn, [record])
        except interface.STORE_DOWN_ERRORS as exc:
            _failed(state, exc, wall_clock)
            return
        except interface.STORE_ERRORS as exc:
            del state.held[0]
            record.given_up(lanes)
            log.error(
                "outcome cannot be recorded",
                extra={
                    "event": "outcome_unrecordable",
                    "service": record.outcome.target,
                    "message_id": record.outcome.key,
                    "error": str(exc),
                },
            )
            continue
        del state.held[0]
        record.committed(lanes)

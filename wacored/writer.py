"""The store writer actor: the only code that writes SQLite, committing whatever is queued at once.

Requests arrive on one memory channel: `Ingest` (a routed webhook batch; the caller waits for the
commit), `Record` (a delivery outcome; fire and forget) and `CatchUp` (a forwarder asking for queued
rows its channel could not hold). The writer takes everything waiting, runs it as one transaction (group
commit; the fsync in a worker thread), then hands the newly inserted rows to their delivery queues
and answers the callers. Because only this actor both commits rows and hands them on, a row is
either in its target's channel or found by that target's next catch-up read, never both, never neither.

Error handling:
    A failed transaction is rolled back and every `Ingest` in it is answered with `StoreUnavailable`
    (ingress says 503; Meta redelivers). Outcomes of a failed transaction are lost from memory, which is
    safe: their messages stay ``queued`` and are delivered again after a restart.

Cancellation:
    A worker thread waiting for a lock or running a COMMIT is never abandoned (`to_thread.run_sync`
    waits), and a group taken from the channel is committed under a shield, so cancelling the writer
    cannot cut a commit in half nor leave a caller unanswered. The writer ends when every sender of
    its channel is closed.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from .sessions import SessionChange, SessionTable
from .store import Delivery, NewRow, Outcome, StoreUnavailable, WriteConnection

log = logging.getLogger(__name__)

MAX_GROUP = 512
"""Requests per transaction at most, so one commit never holds a caller for long."""
CATCH_UP_PAGE = 256
HEARTBEAT_S = 5.0
"""Every actor gives a sign of life at least this often, idle or not (the watchdog reads them)."""


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
    rows: Sequence[NewRow]
    changes: Sequence[tuple[int, SessionChange]]
    reply: Reply[list[int | None]] = field(default_factory=Reply)


@dataclass(eq=False)
class Record:
    outcome: Outcome


@dataclass(eq=False)
class CatchUp:
    target: str
    reply: Reply[list[Delivery]] = field(default_factory=Reply)


@dataclass(eq=False)
class Write:
    """Any other write (a dead letter's retry, a reaper batch, a run record): `apply` runs on the write
    connection inside the group's transaction; its result is the reply once committed."""

    apply: Callable[[WriteConnection], object]
    reply: Reply[object] = field(default_factory=Reply)


WriteOp = Ingest | Record | CatchUp | Write


class DeliveryQueue:
    """One target's delivery channel, and where it spilled to disk when the channel was full.

    The writer offers each committed row; when the channel is full the row stays on disk only and
    `spill_from` remembers the first such row, so the forwarder reads the rest back in id order
    (`CatchUp`) once it has emptied its channel. Start-up recovery is a spill from the oldest queued row.
    """

    def __init__(self, target: str, buffer: int = 1024) -> None:
        self.target = target
        self.send, self.receive = trio.open_memory_channel[Delivery](buffer)
        self.spill_from: int | None = None

    def offer(self, delivery: Delivery) -> None:
        if self.spill_from is None:
            try:
                self.send.send_nowait(delivery)
                return
            except trio.WouldBlock:
                self.spill_from = delivery.id
                log.info("delivery queue full: deliveries wait on disk",
                         extra={"event": "queue_spilled", "service": self.target})

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
        self.spill_from = 0


def _stage(conn: WriteConnection, ops: Sequence[WriteOp], spills: Mapping[str, int]) -> list[object]:
    """Every op of the group, in order, inside the open transaction."""
    results: list[object] = []
    for op in ops:
        if isinstance(op, Ingest):
            results.append(conn.insert(op.rows, op.changes))
        elif isinstance(op, Record):
            conn.record(op.outcome)
            results.append(None)
        elif isinstance(op, Write):
            results.append(op.apply(conn))
        else:
            from_id = spills.get(op.target)
            results.append([] if from_id is None else conn.queued(op.target, from_id, CATCH_UP_PAGE))
    return results


async def _transaction(conn: WriteConnection, ops: Sequence[WriteOp], spills: Mapping[str, int]) -> list[object]:
    """Run the group as one transaction.

    The statements run right here on the event loop's thread: they are short, and a worker thread
    running them would take the GIL back after every statement, waiting up to the interpreter's
    switch interval each time while ingress keeps this thread busy (measured: 10.5 ms a group of 11
    rows under load). Only what may wait goes to a thread: a lock held by another process, and the
    COMMIT's fsync.
    """
    if not conn.try_begin():
        await trio.to_thread.run_sync(conn.begin_waiting)
    try:
        results = _stage(conn, ops, spills)
        await trio.to_thread.run_sync(conn.commit)
    except BaseException:
        conn.rollback()
        raise
    return results


async def run_writer(
    conn: WriteConnection,
    receive: trio.MemoryReceiveChannel[WriteOp],
    queues: Mapping[str, DeliveryQueue],
    sessions: SessionTable,
    *,
    beat: Callable[[], None] = lambda: None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Commit every request that arrives, in groups, until the channel is closed by all its senders.

    Owns: the write connection (closes it when done). The receive end belongs to the daemon, so a
    restarted writer carries on with what is still queued in the channel.
    Applies committed session changes to `sessions` itself, so memory follows the file even when
    the request that asked for them is cancelled (its client went away) while the commit runs.
    `beat` is called at least every `HEARTBEAT_S`, idle or not (the watchdog's sign of life).
    """
    task_status.started()
    try:
        while True:
            beat()
            with trio.move_on_after(HEARTBEAT_S):
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    return
                ops: list[WriteOp] = [first]
                while len(ops) < MAX_GROUP:
                    try:
                        ops.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                with trio.CancelScope(shield=True):
                    # The group is out of the channel: it must be committed (or answered) whatever
                    # happens to this task, or its callers would wait forever.
                    await _commit_group(conn, ops, queues, sessions)
    finally:
        conn.close()


async def _commit_group(
    conn: WriteConnection, ops: list[WriteOp], queues: Mapping[str, DeliveryQueue], sessions: SessionTable
) -> None:
    spills = {q.target: q.spill_from for q in queues.values() if q.spill_from is not None}
    try:
        results = await _transaction(conn, ops, spills)
    except Exception as exc:
        # sqlite3.Error is the store refusing; anything else is a bug that crashes the writer (the
        # supervisor restarts it). Either way nothing of the group was stored: say so to every caller.
        log.error("store commit failed", extra={"event": "store_commit_failed", "error": str(exc)})
        for op in ops:
            if not isinstance(op, Record):
                op.reply.fail(StoreUnavailable(str(exc)))
        if isinstance(exc, sqlite3.Error):
            return
        raise
    for op, result in zip(ops, results, strict=True):
        if isinstance(op, Ingest):
            ids: list[int | None] = result  # type: ignore[assignment]
            for row, row_id in zip(op.rows, ids, strict=True):
                if row_id is not None and row.target in queues:
                    queues[row.target].offer(Delivery.from_row(row_id, row))
            for index, change in op.changes:
                if ids[index] is not None:
                    sessions.apply(change)
            op.reply.set(ids)
        elif isinstance(op, CatchUp):
            page: list[Delivery] = result  # type: ignore[assignment]
            queue = queues[op.target]
            # Only this actor moves spill_from, and no commit ran since the read: the page is exact.
            queue.spill_from = page[-1].id + 1 if len(page) == CATCH_UP_PAGE else None
            if queue.spill_from is None:
                log.info("delivery queue caught up with the disk",
                         extra={"event": "queue_caught_up", "service": queue.target})
            op.reply.set(page)
        elif isinstance(op, Write):
            op.reply.set(result)

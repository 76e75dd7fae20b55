"""The store writer on a real SQLite file and a real PostgreSQL schema (`store`): group commit, dedupe,
outcomes, and the lanes it wakes."""

from __future__ import annotations

import sqlite3
import threading
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel

from wacored.actors.forwarder import Target, run_forwarder
from wacored.actors.lanes import LaneBoard
from wacored.config import ForwardingConfig
from wacored.core.delivery import lane_of
from wacored.core.leases import Lease
from wacored.store import Delivery, Outcome, StoreUnavailable, WriteConnection, migrate
from wacored.store.interface import LaneReads, WriteTx
from wacored.store.writer import (
    RETRY_MAX_S,
    Record,
    StoreWrites,
    Write,
    WriteOp,
    _in_thread_now,
    retry_delay_s,
    run_writer,
    store_writes_status,
)

from .conftest import StoreUnderTest, bare_runtime, rows
from .support import DiskFull, held_lanes, ingest_op, wait_until


async def start_writer(
    nursery: trio.Nursery, store: StoreUnderTest, lanes: int = 1
) -> tuple[trio.MemorySendChannel[WriteOp], LaneBoard]:
    store.migrate()
    return await start_writer_on(nursery, store.writer(), lanes)


async def start_writer_on(
    nursery: trio.Nursery, conn: WriteTx, lanes: int = 1, **options: Any
) -> tuple[trio.MemorySendChannel[WriteOp], LaneBoard]:
    """`run_writer` on `conn` (`options`: its keyword arguments), with `lanes` lanes of rides held."""
    board = LaneBoard()
    held_lanes(board, "rides", lanes)
    send, receive = trio.open_memory_channel[WriteOp](100)
    await nursery.start(partial(run_writer, conn, receive, board, **options))
    return send, board


async def ingest(writes: trio.MemorySendChannel[WriteOp], *keys: str, **how: Any) -> list[int | None]:
    """Ingest one POST of a text message per key ("rides" from s1 by default: routed to rides)."""
    op = ingest_op(*keys, **how)
    await writes.send(op)
    return list((await op.reply.wait()).ids)


async def barrier(writes: trio.MemorySendChannel[WriteOp]) -> None:
    """Wait until everything sent before is committed."""
    op: Write[None] = Write(lambda conn: None)
    await writes.send(op)
    await op.reply.wait()


async def test_duplicates_are_ignored_within_and_across_batches(store: StoreUnderTest) -> None:
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, store)
        first = await ingest(writes, "a", "b", "a")
        again = await ingest(writes, "b", "c")
        assert [i is not None for i in first] == [True, True, False]
        assert [i is not None for i in again] == [False, True]
        await writes.aclose()
    assert store.rows("SELECT key FROM messages ORDER BY id") == [("a",), ("b",), ("c",)]


async def test_a_commit_wakes_the_lanes_of_the_rows_it_inserted_and_no_other(store: StoreUnderTest) -> None:
    async with trio.open_nursery() as nursery:
        writes, board = await start_writer(nursery, store, lanes=3)
        lanes = board.lanes["rides"]
        for lane in lanes:
            lane.rearm()
        await ingest(writes, "a", sender="s1")
        woken = lane_of("s1", 3)
        assert [lane._wake.is_set() for lane in lanes] == [i == woken for i in range(3)]
        assert store.rows("SELECT lane FROM messages") == [(woken,)]
        lanes[woken].rearm()
        await ingest(writes, "a", sender="s1")  # a duplicate: nothing committed, nobody woken
        assert not any(lane._wake.is_set() for lane in lanes)
        await writes.aclose()


async def test_session_changes_apply_only_for_inserted_messages(store: StoreUnderTest) -> None:
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, store)
        await ingest(writes, "m1", text="rides", at=1000.0)
        # A redelivered message, now reading "menu", must not end the session it did not start.
        assert await ingest(writes, "m1", text="menu", at=1001.0) == [None]
        await ingest(writes, "m2", text="where is my car", at=1002.0)
        await writes.aclose()
    assert store.rows("SELECT number, sender, service, last_interaction FROM sessions") == [("", "s1", "rides", 1002.0)]
    assert store.rows("SELECT key, reason FROM messages ORDER BY id") == [("m1", "keyword"), ("m2", "state")]


async def test_outcomes_mark_delivered_or_dead_letter_once(store: StoreUnderTest) -> None:
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, store)
        ids = await ingest(writes, "ok", "down", "gone")
        await writes.send(Record(Outcome(ids[0], True, 1, 2000.0)))
        await writes.send(
            Record(Outcome(ids[1], False, 3, 2000.0, "HTTP 503: busy", target="rides", key="down", retry_at=2120.0))
        )
        await writes.send(
            Record(
                Outcome(
                    ids[2],
                    False,
                    1,
                    2000.0,
                    "HTTP 404: no",
                    permanent=True,
                    reason="permanent",
                    status_code=404,
                    target="rides",
                    key="gone",
                )
            )
        )
        await writes.aclose()
    states = dict(store.rows("SELECT key, state FROM messages"))
    assert states == {"ok": "delivered", "down": "dead_lettered", "gone": "dead_lettered"}
    dead = store.rows("SELECT key, state, reason, error, status_code, next_attempt_at FROM dead_letters ORDER BY key")
    assert dead == [
        ("down", "pending", "transient", "HTTP 503: busy", None, 2120.0),
        ("gone", "abandoned", "permanent", "HTTP 404: no", 404, None),
    ]
    reader = store.reader()
    try:
        assert reader.queued_targets() == {}
    finally:
        reader.close()


async def test_a_lane_delivers_a_backlog_from_the_store_once_each_in_order(
    store: StoreUnderTest, tmp_path: Path
) -> None:
    received: list[str] = []
    all_received = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        received.append(request.headers["idempotency-key"])
        if len(received) == 600:
            all_received.set()
        await trio.lowlevel.checkpoint()
        return httpx.Response(200)

    target = Target("rides", "http://rides.test/", ForwardingConfig(concurrency=1))
    keys = [f"m{i:03d}" for i in range(600)]  # several pages of a lane's reads
    lane_reader = store.lane_reader()
    async with trio.open_nursery() as nursery:
        writes, board = await start_writer(nursery, store)
        for start in range(0, 600, 50):
            await ingest(writes, *keys[start : start + 50])
        rt = bare_runtime(tmp_path, target)
        lanes = board.lanes["rides"]
        await nursery.start(
            partial(
                run_forwarder,
                rt,
                "rides",
                lanes,
                lane_reader,
                writes.clone(),
                transport=lambda: httpx.MockTransport(handler),
            )
        )
        with trio.fail_after(10):
            await all_received.wait()
        await wait_until(lambda: not lanes[0].handed)
        nursery.cancel_scope.cancel()
    lane_reader.close()
    assert received == keys
    assert store.rows("SELECT COUNT(*) FROM messages WHERE state = 'delivered'") == [(600,)]


class CountingReads:
    """A lane reader that counts its page reads."""

    def __init__(self, reads: LaneReads) -> None:
        self.reads, self.pages = reads, 0
        self.blocking_reads = reads.blocking_reads

    def page(self, target: str, lane: int, limit: int) -> list[Delivery]:
        self.pages += 1
        return self.reads.page(target, lane, limit)

    def newest_id(self) -> int:
        return self.reads.newest_id()

    def queued_lanes_after(self, after_id: int) -> set[tuple[str, int]]:
        return self.reads.queued_lanes_after(after_id)

    def leases(self) -> list[Lease]:
        return self.reads.leases()

    def close(self) -> None:
        self.reads.close()


async def test_a_lane_reads_the_store_again_only_when_woken_once_it_has_read_everything(
    store: StoreUnderTest, tmp_path: Path
) -> None:
    """One read for a backlog that fits a page, none for the outcomes committed after it; one per
    commit of new rows (the writer wakes the lane)."""
    delivered: list[str] = []
    target = Target("rides", "http://rides.test/", ForwardingConfig(concurrency=1))

    async def handler(request: httpx.Request) -> httpx.Response:
        delivered.append(request.headers["idempotency-key"])
        return httpx.Response(200)

    lane_reader = store.lane_reader()
    reads = CountingReads(lane_reader)
    async with trio.open_nursery() as nursery:
        writes, board = await start_writer(nursery, store)
        await ingest(writes, "a", "b", "c")
        (lane,) = board.lanes["rides"]
        await nursery.start(
            partial(
                run_forwarder,
                bare_runtime(tmp_path, target),
                "rides",
                [lane],
                reads,
                writes.clone(),
                transport=lambda: httpx.MockTransport(handler),
            )
        )
        await wait_until(lambda: len(delivered) == 3 and not lane.handed)
        await barrier(writes)
        assert reads.pages == 1
        await ingest(writes, "d")
        await wait_until(lambda: len(delivered) == 4 and not lane.handed)
        await barrier(writes)
        assert reads.pages == 2
        nursery.cancel_scope.cancel()
    lane_reader.close()
    assert delivered == ["a", "b", "c", "d"]


async def test_dead_lettering_a_message_again_never_resets_its_retries(store: StoreUnderTest) -> None:
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, store)
        (mid,) = await ingest(writes, "again")
        assert mid is not None
        failed = Outcome(mid, False, 3, 2000.0, "HTTP 503: busy", target="rides", key="again", retry_at=2120.0)
        await writes.send(Record(failed))
        await barrier(writes)  # the record above is committed
        store.execute("UPDATE dead_letters SET attempts = 2, next_attempt_at = 9000")
        await writes.send(
            Record(Outcome(mid, False, 1, 3000.0, "HTTP 502: again", target="rides", key="again", retry_at=3120.0))
        )
        await barrier(writes)
        await writes.aclose()
    assert store.rows("SELECT state, attempts, next_attempt_at, error FROM dead_letters") == [
        ("pending", 2, 9000.0, "HTTP 502: again")
    ]


def test_store_writes_are_failing_then_down_after_the_sustained_period() -> None:
    assert store_writes_status(None, 1000.0, 60.0) == "ok"
    assert store_writes_status(1000.0, 1000.0, 60.0) == "failing"
    assert store_writes_status(1000.0, 1059.9, 60.0) == "failing"
    assert store_writes_status(1000.0, 1060.0, 60.0) == "down"


def test_held_outcomes_back_off_exponentially_up_to_a_bound() -> None:
    delays = [retry_delay_s(n) for n in range(1, 12)]
    assert delays[:3] == [0.1, 0.2, 0.4]
    assert delays == sorted(delays)
    assert max(delays) == RETRY_MAX_S
    w = StoreWrites()
    w.failed("disk full", now=1000.0, mono=5.0)
    w.failed("disk full", now=1001.0, mono=6.0)
    assert (w.failing_since, w.consecutive, w.failures, w.retry_at) == (1000.0, 2, 2, 6.2)
    w.succeeded()
    assert (w.failing_since, w.consecutive, w.failures, w.last_error) == (None, 0, 2, "disk full")


async def test_outcomes_of_failed_commits_are_kept_in_order_and_committed_later(tmp_path: Path) -> None:
    """Injected SQLITE_FULL on the writer's COMMIT (see tests/test_store_errors.py for why not tmpfs)."""
    path = tmp_path / "db"
    migrate(path)
    disk, state = DiskFull(), StoreWrites()
    async with trio.open_nursery() as nursery:
        send, board = await start_writer_on(nursery, disk.connection(path), state=state)
        (lane,) = board.lanes["rides"]
        ids = await ingest(send, "a", "b")
        lane.handed.update(i for i in ids if i is not None)  # as the lane does once it has delivered them
        disk.full = True
        await send.send(Record(Outcome(ids[0], False, 1, 2000.0, "HTTP 503", target="rides", key="a", retry_at=2100.0)))
        await send.send(Record(Outcome(ids[0], True, 1, 2001.0, target="rides", key="a")))  # redelivered
        await send.send(Record(Outcome(ids[1], True, 1, 2002.0, target="rides", key="b")))
        with trio.fail_after(5):
            try:
                await ingest(send, "c")
                raise AssertionError("committed on a full disk")
            except StoreUnavailable:
                pass
            op = Write(lambda conn: conn.record_run("x", 1.0, None, "r"))
            await send.send(op)
            try:
                await op.reply.wait()
                raise AssertionError("committed on a full disk")
            except StoreUnavailable:
                pass
        assert len(state.held) == 3
        assert state.failing_since is not None
        assert lane.handed == set(ids)  # in hand until their outcomes commit: the lane skips them
        disk.full = False
        await wait_until(lambda: not state.held, timeout_s=10)
        assert rows(path, "SELECT key, state FROM messages ORDER BY id") == [("a", "delivered"), ("b", "delivered")]
        # In order: the dead letter written first, then its message delivered by the redelivery.
        assert rows(path, "SELECT state FROM dead_letters") == [("pending",)]
        assert lane.handed == set()
        assert state.failing_since is None
        assert state.consecutive == 0
        await send.aclose()


class CountingConnection(WriteConnection):
    """A write connection that counts its begins: `tries` (`try_begin`, polled from the loop) and
    `waits` (`begin_waiting`, SQLite's busy handler in a worker thread)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tries = self.waits = 0

    def try_begin(self) -> bool:
        self.tries += 1
        return super().try_begin()

    def begin_waiting(self) -> None:
        self.waits += 1
        super().begin_waiting()


@pytest.mark.parametrize("released", ["while polled", "while waited for"])
async def test_a_write_lock_another_process_holds_is_waited_for_then_the_group_commits(
    tmp_path: Path, released: str
) -> None:
    """Another process (here another connection) holds the write lock: the writer polls it from the
    loop, then waits for it in a thread once `LOCK_POLL_FOR_S` is up; either way the group commits as
    soon as the lock is released, and not before."""
    path = tmp_path / "db"
    migrate(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    conn = CountingConnection(path)
    async with trio.open_nursery() as nursery:
        send, _ = await start_writer_on(nursery, conn)
        op = ingest_op("locked")
        await send.send(op)
        if released == "while polled":
            await wait_until(lambda: conn.tries >= 3)
            assert conn.waits == 0
        else:
            await wait_until(lambda: conn.waits == 1)
        assert rows(path, "SELECT key FROM messages") == []
        other.execute("COMMIT")
        with trio.fail_after(5):
            result = await op.reply.wait()
        assert rows(path, "SELECT id, key FROM messages") == [(result.ids[0], "locked")]
        assert conn.waits == (0 if released == "while polled" else 1)
        await send.aclose()
    other.close()


class Recovering:
    """A connection's stand-in whose first `times` ``BEGIN IMMEDIATE`` answer as SQLite does while
    another process rebuilds the WAL index a killed one left (``SQLITE_BUSY_RECOVERY``)."""

    def __init__(self, conn: sqlite3.Connection, times: int) -> None:
        self.conn, self.times = conn, times

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE" and self.times:
            self.times -= 1
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = sqlite3.SQLITE_BUSY_RECOVERY  # type: ignore[misc] # as SQLite sets it
            raise error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


async def test_a_store_being_recovered_is_waited_for_like_a_lock_not_failed(tmp_path: Path) -> None:
    """Any busy code is busy: the group waits and commits, the writer neither fails it nor stops."""
    path = tmp_path / "db"
    migrate(path)
    conn = CountingConnection(path)
    recovering = Recovering(conn.conn, 3)
    conn.conn = recovering  # type: ignore[assignment] # the stand-in answers what the writer calls
    async with trio.open_nursery() as nursery:
        send, _ = await start_writer_on(nursery, conn)
        op = ingest_op("recovered")
        await send.send(op)
        with trio.fail_after(5):
            result = await op.reply.wait()
        assert rows(path, "SELECT id, key FROM messages") == [(result.ids[0], "recovered")]
        assert (recovering.times, conn.tries) == (0, 4)
        await send.aclose()


async def test_a_commit_runs_in_a_thread_started_at_once_and_its_error_reaches_the_caller() -> None:
    """`_in_thread_now`: the function's value or exception, from a thread other than the loop's."""
    loop_thread = threading.get_ident()
    assert await _in_thread_now(threading.get_ident) != loop_thread

    def fails() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        await _in_thread_now(fails)


class RefusingConnection(WriteConnection):
    """A write connection on which a constraint refuses the outcome of message `refused`."""

    def __init__(self, path: Path, refused: list[int]) -> None:
        super().__init__(path)
        self.refused = refused

    def record(self, outcome: Outcome) -> None:
        if outcome.message_id in self.refused:
            raise sqlite3.IntegrityError("FOREIGN KEY constraint failed")
        super().record(outcome)


async def test_an_outcome_the_store_refuses_is_given_up_and_its_lane_reads_the_row_again(tmp_path: Path) -> None:
    """A committed outcome does not wake its lane (its row is no longer queued); one that can never be
    committed does: its row is still ``queued``, out of hand, and must be delivered again."""
    path = tmp_path / "db"
    migrate(path)
    refused: list[int] = []
    async with trio.open_nursery() as nursery:
        send, board = await start_writer_on(nursery, RefusingConnection(path, refused))
        (lane,) = board.lanes["rides"]
        ok, bad = (i for i in await ingest(send, "ok", "bad") if i is not None)
        refused.append(bad)
        lane.handed.update((ok, bad))
        lane.rearm()
        await send.send(Record(Outcome(ok, True, 1, 2000.0, target="rides", key="ok")))
        await barrier(send)
        assert lane.handed == {bad}
        assert not lane._wake.is_set()
        await send.send(Record(Outcome(bad, True, 1, 2001.0, target="rides", key="bad")))
        with trio.fail_after(5):
            await lane.sleep(60)  # woken: the row is to be read again
        assert lane.handed == set()
        assert rows(path, "SELECT key, state FROM messages ORDER BY id") == [("ok", "delivered"), ("bad", "queued")]
        await send.aclose()

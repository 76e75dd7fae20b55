"""The store writer on a real SQLite file: group commit, dedupe, outcomes, and the lanes it wakes."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path

import httpx
import trio
import trio.lowlevel

from wacored.config import ForwardingConfig
from wacored.core.routing import SessionAction
from wacored.core.sessions import SessionChange, SessionTable
from wacored.forwarder import Target, run_forwarder
from wacored.lanes import LaneBoard
from wacored.store import NewRow, Outcome, Reader, StoreUnavailable, WriteConnection, migrate
from wacored.store_lanes import LaneReader
from wacored.writer import (
    RETRY_MAX_S,
    Ingest,
    Record,
    StoreWrites,
    Write,
    WriteOp,
    retry_delay_s,
    run_writer,
    store_writes_status,
)

from .conftest import bare_runtime, rows
from .support import DiskFull, held_lanes, wait_until


def row(key: str, sender: str = "s1", target: str = "rides", lane: int = 0) -> NewRow:
    return NewRow(key, "message", sender, target, "keyword", target, b"{}", "rid", "cid", "tp", 1000.0, lane=lane)


async def start_writer(
    nursery: trio.Nursery,
    path: Path,
    sessions: SessionTable | None = None,
    lanes: int = 1,
) -> tuple[trio.MemorySendChannel[WriteOp], LaneBoard]:
    migrate(path)
    board = LaneBoard()
    held_lanes(board, "rides", lanes)
    send, receive = trio.open_memory_channel[WriteOp](100)
    await nursery.start(
        run_writer,
        WriteConnection(path),
        receive,
        board,
        sessions if sessions is not None else SessionTable(3600),
    )
    return send, board


async def ingest(
    writes: trio.MemorySendChannel[WriteOp], rows: list[NewRow], changes: list[tuple[int, SessionChange]] = ()
) -> list[int | None]:
    op = Ingest(rows, list(changes))
    await writes.send(op)
    return await op.reply.wait()


async def test_duplicates_are_ignored_within_and_across_batches(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, tmp_path / "db")
        first = await ingest(writes, [row("a"), row("b"), row("a")])
        again = await ingest(writes, [row("b"), row("c")])
        assert [i is not None for i in first] == [True, True, False]
        assert [i is not None for i in again] == [False, True]
        await writes.aclose()
    assert rows(tmp_path / "db", "SELECT key FROM messages ORDER BY id") == [("a",), ("b",), ("c",)]


async def test_a_commit_wakes_the_lanes_of_the_rows_it_inserted_and_no_other(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        writes, board = await start_writer(nursery, tmp_path / "db", lanes=3)
        lanes = board.lanes["rides"]
        for lane in lanes:
            lane.rearm()
        await ingest(writes, [row("a", lane=2)])
        assert [lane._wake.is_set() for lane in lanes] == [False, False, True]
        lanes[2].rearm()
        await ingest(writes, [row("a", lane=1)])  # a duplicate: nothing committed, nobody woken
        assert not any(lane._wake.is_set() for lane in lanes)
        await writes.aclose()


async def test_session_changes_apply_only_for_inserted_messages(tmp_path: Path) -> None:
    path = tmp_path / "db"
    sessions = SessionTable(3600)
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, path, sessions=sessions)
        start = SessionChange("s1", SessionAction.START, "rides", 1000.0)
        await ingest(writes, [row("m1")], [(0, start)])
        # A redelivered "menu" must not end the session it did not start.
        end = SessionChange("s1", SessionAction.END, "wacored", 1001.0)
        await ingest(writes, [row("m1")], [(0, end)])
        await writes.aclose()
    assert list(Reader(path).all_sessions(0)) == [("", "s1", "rides", 1000.0)]
    assert sessions.service_of("s1", 1001.0) == "rides"  # memory follows the file


async def test_outcomes_mark_delivered_or_dead_letter_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, path)
        ids = await ingest(writes, [row("ok"), row("down"), row("gone")])
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
    db = sqlite3.connect(path)
    states = dict(db.execute("SELECT key, state FROM messages").fetchall())
    assert states == {"ok": "delivered", "down": "dead_lettered", "gone": "dead_lettered"}
    dead = db.execute(
        "SELECT key, state, reason, error, status_code, next_attempt_at FROM dead_letters ORDER BY key"
    ).fetchall()
    assert dead == [
        ("down", "pending", "transient", "HTTP 503: busy", None, 2120.0),
        ("gone", "abandoned", "permanent", "HTTP 404: no", 404, None),
    ]
    assert Reader(path).queued_targets() == {}


async def test_a_lane_delivers_a_backlog_from_the_store_once_each_in_order(tmp_path: Path) -> None:
    received: list[str] = []
    all_received = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        received.append(request.headers["idempotency-key"])
        if len(received) == 600:
            all_received.set()
        await trio.lowlevel.checkpoint()
        return httpx.Response(200)

    path = tmp_path / "db"
    target = Target("rides", "http://rides.test/", ForwardingConfig(concurrency=1))
    keys = [f"m{i:03d}" for i in range(600)]  # several pages of a lane's reads
    async with trio.open_nursery() as nursery:
        writes, board = await start_writer(nursery, path)
        for start in range(0, 600, 50):
            await ingest(writes, [row(k) for k in keys[start : start + 50]])
        rt = bare_runtime(tmp_path, target)
        lanes = board.lanes["rides"]
        await nursery.start(
            partial(
                run_forwarder,
                rt,
                "rides",
                lanes,
                LaneReader(path),
                writes.clone(),
                transport=lambda: httpx.MockTransport(handler),
            )
        )
        with trio.fail_after(10):
            await all_received.wait()
        await wait_until(lambda: not lanes[0].handed)
        nursery.cancel_scope.cancel()
    assert received == keys
    assert rows(path, "SELECT COUNT(*) FROM messages WHERE state = 'delivered'") == [(600,)]


async def test_dead_lettering_a_message_again_never_resets_its_retries(tmp_path: Path) -> None:
    path = tmp_path / "db"
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, path)
        (mid,) = await ingest(writes, [row("again")])
        assert mid is not None
        failed = Outcome(mid, False, 3, 2000.0, "HTTP 503: busy", target="rides", key="again", retry_at=2120.0)
        await writes.send(Record(failed))
        await ingest(writes, [])  # a barrier: the record above is committed
        with sqlite3.connect(path) as db:
            db.execute("UPDATE dead_letters SET attempts = 2, next_attempt_at = 9000")
        await writes.send(
            Record(Outcome(mid, False, 1, 3000.0, "HTTP 502: again", target="rides", key="again", retry_at=3120.0))
        )
        await ingest(writes, [])
        await writes.aclose()
    db = sqlite3.connect(path)
    assert db.execute("SELECT state, attempts, next_attempt_at, error FROM dead_letters").fetchall() == [
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
    board = LaneBoard()
    (lane,) = held_lanes(board, "rides")
    send, receive = trio.open_memory_channel[WriteOp](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, disk.connection(path), receive, board, SessionTable(3600), state=state))
        ids = await ingest(send, [row("a"), row("b")])
        lane.handed.update(i for i in ids if i is not None)  # as the lane does once it has delivered them
        disk.full = True
        await send.send(Record(Outcome(ids[0], False, 1, 2000.0, "HTTP 503", target="rides", key="a", retry_at=2100.0)))
        await send.send(Record(Outcome(ids[0], True, 1, 2001.0, target="rides", key="a")))  # redelivered
        await send.send(Record(Outcome(ids[1], True, 1, 2002.0, target="rides", key="b")))
        with trio.fail_after(5):
            try:
                await ingest(send, [row("c")])
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

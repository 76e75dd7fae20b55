"""The store writer and delivery queues on a real SQLite file: group commit, dedupe, spill to disk."""

from __future__ import annotations

import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.lowlevel

from wacored.config import ForwardingConfig
from wacored.forwarder import Target, run_forwarder
from wacored.store import Outcome, Reader, StoreUnavailable, WriteConnection, migrate
from wacored.writer import (
    RETRY_MAX_S,
    CatchUp,
    DeliveryQueue,
    Record,
    StoreWrites,
    Write,
    WriteOp,
    retry_delay_s,
    run_writer,
    store_writes_status,
    stuck_from,
)

from .conftest import bare_runtime, rows
from .support import DiskFull, ingest_op, wait_until


async def start_writer(
    nursery: trio.Nursery, path: Path, buffer: int = 1024
) -> tuple[trio.MemorySendChannel[WriteOp], DeliveryQueue]:
    migrate(path)
    queue = DeliveryQueue("rides", buffer=buffer)
    send, receive = trio.open_memory_channel[WriteOp](100)
    await nursery.start(run_writer, WriteConnection(path), receive, {"rides": queue})
    return send, queue


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


async def test_duplicates_are_ignored_within_and_across_batches(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        writes, queue = await start_writer(nursery, tmp_path / "db")
        first = await ingest(writes, "a", "b", "a")
        again = await ingest(writes, "b", "c")
        assert [i is not None for i in first] == [True, True, False]
        assert [i is not None for i in again] == [False, True]
        assert queue.depth() == 3
        await writes.aclose()


async def test_session_changes_apply_only_for_inserted_messages(tmp_path: Path) -> None:
    path = tmp_path / "db"
    async with trio.open_nursery() as nursery:
        writes, queue = await start_writer(nursery, path)
        await ingest(writes, "m1", text="rides", at=1000.0)
        # A redelivered message, now reading "menu", must not end the session it did not start.
        assert await ingest(writes, "m1", text="menu", at=1001.0) == [None]
        await ingest(writes, "m2", text="where is my car", at=1002.0)
        await writes.aclose()
    assert rows(path, "SELECT number, sender, service, last_interaction FROM sessions") == [("", "s1", "rides", 1002.0)]
    assert rows(path, "SELECT key, reason FROM messages ORDER BY id") == [("m1", "keyword"), ("m2", "state")]


async def test_a_full_channel_spills_to_disk_and_catch_up_reads_back_in_order(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        writes, queue = await start_writer(nursery, tmp_path / "db", buffer=2)
        await ingest(writes, *(f"m{i}" for i in range(5)))
        assert queue.depth() == 2
        assert queue.spill_from is not None
        in_memory = [queue.receive.receive_nowait().key for _ in range(2)]
        ask = CatchUp("rides")
        await writes.send(ask)
        spilled = [d.key for d in await ask.reply.wait()]
        assert in_memory + spilled == [f"m{i}" for i in range(5)]
        assert queue.spill_from is None
        # Caught up: new rows go to the channel again, and nothing is handed out twice.
        await ingest(writes, "m5")
        assert queue.receive.receive_nowait().key == "m5"
        await writes.aclose()


async def test_outcomes_mark_delivered_or_dead_letter_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, path)
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


async def test_forwarder_delivers_a_spilled_backlog_once_each_in_order(tmp_path: Path) -> None:
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
    keys = [f"m{i:03d}" for i in range(600)]  # more than two catch-up pages through a 3-slot channel
    async with trio.open_nursery() as nursery:
        writes, queue = await start_writer(nursery, path, buffer=3)
        for start in range(0, 600, 50):
            await ingest(writes, *keys[start : start + 50])
        rt = bare_runtime(tmp_path, target)
        await nursery.start(
            partial(run_forwarder, rt, "rides", queue, writes.clone(), transport=lambda: httpx.MockTransport(handler))
        )
        with trio.fail_after(10):
            await all_received.wait()
        nursery.cancel_scope.cancel()
    assert received == keys


async def test_dead_lettering_a_message_again_never_resets_its_retries(tmp_path: Path) -> None:
    path = tmp_path / "db"
    async with trio.open_nursery() as nursery:
        writes, _ = await start_writer(nursery, path)
        (mid,) = await ingest(writes, "again")
        assert mid is not None
        failed = Outcome(mid, False, 3, 2000.0, "HTTP 503: busy", target="rides", key="again", retry_at=2120.0)
        await writes.send(Record(failed))
        await barrier(writes)  # the record above is committed
        with sqlite3.connect(path) as db:
            db.execute("UPDATE dead_letters SET attempts = 2, next_attempt_at = 9000")
        await writes.send(
            Record(Outcome(mid, False, 1, 3000.0, "HTTP 502: again", target="rides", key="again", retry_at=3120.0))
        )
        await barrier(writes)
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


def test_a_queued_row_nobody_delivers_is_stuck() -> None:
    assert stuck_from(None, set(), None) is None  # nothing queued
    assert stuck_from(7, {7, 8}, None) is None  # being delivered
    assert stuck_from(7, set(), 3) is None  # a catch-up will read it
    assert stuck_from(7, {8, 9}, None) == 7  # older than everything in flight, and not in flight
    assert stuck_from(7, set(), None) == 7


async def test_outcomes_of_failed_commits_are_kept_in_order_and_committed_later(tmp_path: Path) -> None:
    """Injected SQLITE_FULL on the writer's COMMIT (see tests/test_store_errors.py for why not tmpfs)."""
    path = tmp_path / "db"
    migrate(path)
    disk, state = DiskFull(), StoreWrites()
    queue = DeliveryQueue("rides")
    send, receive = trio.open_memory_channel[WriteOp](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, disk.connection(path), receive, {"rides": queue}, state=state))
        ids = await ingest(send, "a", "b")
        assert queue.in_flight == set(ids)
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
        assert queue.in_flight == set(ids)  # still being delivered as far as the sweep is concerned
        disk.full = False
        await wait_until(lambda: not state.held, timeout_s=10)
        assert rows(path, "SELECT key, state FROM messages ORDER BY id") == [("a", "delivered"), ("b", "delivered")]
        # In order: the dead letter written first, then its message delivered by the redelivery.
        assert rows(path, "SELECT state FROM dead_letters") == [("pending",)]
        assert queue.in_flight == set()
        assert state.failing_since is None
        assert state.consecutive == 0
        await send.aclose()

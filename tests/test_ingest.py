"""wacored.store.ingest: the rate limit and routing run inside the writer's transaction, from the store.

Two writers on one store stand for two worker processes (or hosts) sharing it: each has its own write
connection (so its own session cache); SQLite's write lock serializes them as it would two
processes, and on PostgreSQL the store's advisory lock does (`store.postgres`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from wacored.core.ingest import plan_ingest
from wacored.store import WriteConnection, migrate
from wacored.store.ingest import Ingested, SessionCacheStats, StoreSessions
from wacored.store.writer import NoLanes, WriteOp, run_writer

from .conftest import Downstream, StoreUnderTest, make_config, open_daemon, rows
from .support import DictSessions, ingest_op, ingest_policy, text_batch

SENDER = "250788000501"


@asynccontextmanager
async def writers(
    store: StoreUnderTest, count: int = 2, cache_size: int = 1000
) -> AsyncIterator[list[tuple[trio.MemorySendChannel[WriteOp], SessionCacheStats]]]:
    """`count` writer actors, each with its own connection to `store`."""
    store.migrate()
    out = []
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            send, receive = trio.open_memory_channel[WriteOp](100)
            stats = SessionCacheStats()
            await nursery.start(
                partial(
                    run_writer,
                    store.writer(),
                    receive,
                    NoLanes(),
                    session_cache_size=cache_size,
                    cache_stats=stats,
                )
            )
            out.append((send, stats))
        yield out
        for send, _ in out:
            await send.aclose()


async def post(writes: trio.MemorySendChannel[WriteOp], key: str, text: str, **how: Any) -> Ingested:
    op = ingest_op(key, sender=how.pop("sender", SENDER), text=text, **how)
    await writes.send(op)
    return await op.reply.wait()


def routed(result: Ingested) -> list[tuple[str, str]]:
    return [(r.service, r.reason) for r in result.rows]


async def test_a_session_started_through_one_writer_routes_through_the_other(store: StoreUnderTest) -> None:
    async with writers(store) as [(a, a_cache), (b, _)]:
        assert routed(await post(a, "w1", "rides", at=1000.0)) == [("rides", "keyword")]
        assert routed(await post(b, "w2", "where is my car", at=1001.0)) == [("rides", "state")]
        # A reads the sender from its cache: it wrote the session itself...
        reads = a_cache.store_reads
        assert routed(await post(a, "w3", "and now?", at=1002.0)) == [("rides", "state")]
        # ...but B committed since, so A's cache was emptied and the session read again from the store.
        assert (a_cache.clears, a_cache.store_reads) == (1, reads + 1)
        # B ends the session; A, whose cache held it, must not route by it any more.
        assert routed(await post(b, "w4", "menu", at=1003.0)) == [("wacored", "home_menu")]
        assert routed(await post(a, "w5", "hello again", at=1004.0)) == [("wacored", "fallback")]
    assert store.rows("SELECT COUNT(*) FROM sessions") == [(0,)]


async def test_one_writer_alone_keeps_its_cache_warm(tmp_path: Path) -> None:
    """On SQLite (``data_version``); PostgreSQL cannot tell, and reads the store each transaction."""
    async with writers(StoreUnderTest("sqlite", tmp_path / "db"), count=1) as [(a, stats)]:
        await post(a, "w1", "rides", at=1000.0)
        for i in range(5):
            assert routed(await post(a, f"w{i + 2}", "hello", at=1001.0 + i)) == [("rides", "state")]
        assert (stats.store_reads, stats.clears, stats.entries) == (1, 0, 1)


async def test_the_rate_limit_holds_across_two_writers(store: StoreUnderTest) -> None:
    policy = ingest_policy(per_sender=5, window_s=60.0)
    results: list[Ingested] = []
    async with writers(store) as pair:

        async def send(i: int) -> None:
            writes = pair[i % 2][0]
            results.append(await post(writes, f"w{i}", "hello", at=1000.0, policy=policy))

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(send, i)
        admitted = [r for r in results if r.retry_after is None]
        refused = [r for r in results if r.retry_after is not None]
        assert (len(admitted), len(refused)) == (5, 7)
        assert {r.retry_after for r in refused} == {60}  # the hits leave the window 60 s on
        assert all(r.rows == () for r in refused)
        # A window later the sender is admitted again, through either writer.
        assert (await post(pair[1][0], "late", "hello", at=1061.0, policy=policy)).retry_after is None
    assert store.rows("SELECT COUNT(*) FROM messages") == [(6,)]
    # The sender's hits that left the window were deleted when it wrote again.
    assert store.rows("SELECT at, count FROM rate_hits") == [(1061.0, 1)]


async def test_a_refused_post_stores_nothing_and_counts_nothing(store: StoreUnderTest) -> None:
    policy = ingest_policy(per_sender=2, window_s=60.0)
    async with writers(store, count=1) as [(a, _)]:
        assert (await post(a, "w1", "rides", at=1000.0, policy=policy)).retry_after is None
        # Two messages of another sender and one more of this one: refused whole.
        op = ingest_op("w2", "w3", sender="250788000502", policy=policy, at=1001.0)
        await a.send(op)
        assert (await op.reply.wait()).retry_after is None
        both = ingest_op("w4", "w5", policy=policy, at=1002.0, sender=SENDER)
        await a.send(both)
        assert (await both.reply.wait()).retry_after == 58
        assert (await post(a, "w6", "hello", at=1003.0, policy=policy)).retry_after is None
    assert store.rows("SELECT key FROM messages ORDER BY id") == [("w1",), ("w2",), ("w3",), ("w6",)]


def test_the_cache_is_cleared_when_another_connection_commits(tmp_path: Path) -> None:
    path = tmp_path / "db"
    migrate(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("INSERT INTO sessions (number, sender, service, last_interaction) VALUES ('', 'a', 'rides', 1)")
    conn = WriteConnection(path)
    sessions = StoreSessions(conn, cache_size=10)
    assert conn.try_begin()
    sessions.sync()
    assert sessions.get("", "a") == ("rides", 1.0)
    conn.commit()
    other.execute("UPDATE sessions SET service = 'jobs', last_interaction = 2 WHERE sender = 'a'")
    assert sessions.get("", "a") == ("rides", 1.0)  # a cache indeed: it does not see the store by itself
    assert conn.try_begin()
    sessions.sync()  # what the writer does at the start of every transaction
    assert sessions.get("", "a") == ("jobs", 2.0)
    assert (sessions.stats.clears, sessions.stats.store_reads) == (1, 2)
    # This connection's own commits do not move data_version: the cache survives them.
    conn.commit()
    assert conn.try_begin()
    sessions.sync()
    assert sessions.get("", "a") == ("jobs", 2.0)
    assert sessions.stats.store_reads == 2
    conn.commit()
    conn.close()
    other.close()


def test_the_cache_is_bounded_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "db"
    migrate(path)
    conn = WriteConnection(path)
    sessions = StoreSessions(conn, cache_size=3)
    assert conn.try_begin()
    for i in range(10):
        assert sessions.get("", f"s{i}") is None  # absences are cached too
    assert (len(sessions.cache), sessions.stats.entries, sessions.stats.store_reads) == (3, 3, 10)
    assert sessions.get("", "s9") is None
    assert sessions.get("", "s0") is None
    assert sessions.stats.store_reads == 11  # s9 was cached, s0 had been dropped
    conn.rollback()
    conn.close()


def test_routing_reads_each_sender_once_per_batch(tmp_path: Path) -> None:
    """The plan reads sessions through the lookup it is given: the store's, or this dict."""
    stored = DictSessions({("", SENDER): ("jobs", 999.0)})
    policy = ingest_policy()
    batch = text_batch(("w1", SENDER, "hello"), ("w2", SENDER, "menu"), ("w3", SENDER, "hi"))
    plan = plan_ingest(batch, policy.numbers, stored, policy.session_ttl_s, 1000.0)
    assert [(r.service, r.reason) for r in plan.rows] == [
        ("jobs", "state"),
        ("wacored", "home_menu"),
        ("wacored", "fallback"),
    ]
    assert stored.reads == [("", SENDER)]


@pytest.mark.single_worker(
    "checks.sessions counts the session cache of the worker that answers /health, which need not be the "
    "one that took the POST"
)
async def test_a_daemon_routes_by_sessions_it_never_loaded(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Start-up reads no session: a store of 20 000 live sessions leaves the cache empty until a
    sender writes, and that sender is routed by its stored session."""
    config = make_config(tmp_path, services, graph)
    migrate(config.store.path)
    now = time.time()
    with sqlite3.connect(config.store.path) as db:
        db.executemany(
            "INSERT INTO sessions (number, sender, service, started_at, last_interaction) VALUES ('', ?, 'jobs', ?, ?)",
            [(f"2507{i:08d}", now - 60, now - 60) for i in range(20_000)],
        )
    async with open_daemon(config) as daemon:
        before = (await daemon.client.get(f"{daemon.url}/health")).json()["checks"]["sessions"]
        assert (before["cached"], before["store_reads"]) == (0, 0)
        r = await daemon.send_text("any news?", sender="250700012345")
        [route] = r.json()["routes"]
        assert (route["service"], route["reason"]) == ("jobs", "state")
        after = (await daemon.client.get(f"{daemon.url}/health")).json()["checks"]["sessions"]
        assert (after["cached"], after["store_reads"]) == (1, 1)


async def test_two_daemons_on_one_store_route_and_limit_a_sender_as_one(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Two daemons sharing a store, as worker processes will: the second routes by the session the
    first started, and their POSTs together meet the one per-sender limit (the contract's 429)."""
    config = make_config(tmp_path, services, graph, ratelimit={"per_sender": 3})
    async with open_daemon(config) as one, open_daemon(config) as two:
        sender = "250700000601"
        assert (await one.send_text("jobs", sender=sender)).headers["X-Routed-Service"] == "jobs"
        r = await two.send_text("I want to apply", sender=sender)
        assert (r.headers["X-Routed-Service"], r.json()["routes"][0]["reason"]) == ("jobs", "state")
        assert (await one.send_text("more", sender=sender)).status_code == 200
        refused = await two.send_text("and more", sender=sender)
        assert refused.status_code == 429
        assert refused.json() == {"error": "rate_limit_exceeded", "retryAfter": refused.json()["retryAfter"]}
        assert refused.headers["Retry-After"] == str(refused.json()["retryAfter"])
        assert (await one.send_text("again", sender=sender)).status_code == 429
    assert rows(config.store.path, "SELECT COUNT(*) FROM messages WHERE sender = ?", sender) == [(3,)]

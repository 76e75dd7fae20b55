"""wacored.actors.reaper: the schedule (pure), what a reap deletes and keeps on a real file, and the actor."""

from __future__ import annotations

import sqlite3
import time
from functools import partial
from pathlib import Path

import trio

from wacored.actors.reaper import BATCH, reap, run_reaper
from wacored.config import SessionsConfig
from wacored.core.schedule import DAY_S, cutoffs, missed, next_reap
from wacored.store import Reader, WriteConnection, migrate
from wacored.store.writer import NoLanes, WriteOp, run_writer

from .conftest import World, bare_runtime, rows

TWO_AM = 120
MIDNIGHT = 1_700_006_400.0  # 2023-11-15T00:00:00Z
SESSIONS = SessionsConfig(ttl_hours=24, dlq_retention_days=7, abandoned_retention_days=30, seen_retention_days=8)


def test_next_reap_is_today_at_reap_at_or_tomorrow() -> None:
    assert next_reap(MIDNIGHT + 3600, TWO_AM) == MIDNIGHT + 7200
    assert next_reap(MIDNIGHT + 7200, TWO_AM) == MIDNIGHT + DAY_S + 7200
    assert next_reap(MIDNIGHT + 10 * 3600, TWO_AM) == MIDNIGHT + DAY_S + 7200


def test_a_reap_was_missed_when_its_time_passed_since_the_last_run() -> None:
    assert missed(MIDNIGHT - 3600, MIDNIGHT + 3 * 3600, TWO_AM)
    assert not missed(MIDNIGHT + 7300, MIDNIGHT + 10 * 3600, TWO_AM)
    assert not missed(None, MIDNIGHT + 10 * 3600, TWO_AM)


def test_cutoffs_follow_the_retention_settings() -> None:
    assert cutoffs(SESSIONS, 100 * DAY_S, rate_window_s=60.0) == {
        "sessions": 99 * DAY_S,
        "rate_hits": 100 * DAY_S - 60.0,
        "dead_letters_delivered": 93 * DAY_S,
        "dead_letters_abandoned": 70 * DAY_S,
        "attempts": 92 * DAY_S,
        "messages": 92 * DAY_S,
    }


def populate(path: Path, now: float) -> None:
    """Rows on both sides of every cutoff; two attempts logged for every message."""
    migrate(path)
    day = DAY_S
    with sqlite3.connect(path) as db:

        def message(key: str, age_days: float, state: str) -> int:
            cur = db.execute(
                "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
                " VALUES (?, 'message', '2507', 'rides', 'keyword', 'rides', x'7b7d', ?, ?)",
                (key, now - age_days * day, state),
            )
            assert cur.lastrowid is not None
            db.executemany(
                "INSERT INTO attempts (message_id, service, number, kind, started_at, duration_ms, status_code,"
                " node) VALUES (?, 'rides', ?, 'delivery', ?, 1.5, 503, 'host-1')",
                [(cur.lastrowid, n, now - age_days * day) for n in (1, 2)],
            )
            return cur.lastrowid

        def dead(key: str, age_days: float, state: str, dl_age_days: float) -> None:
            mid = message(key, age_days, "dead_lettered")
            db.execute(
                "INSERT INTO dead_letters (message_id, key, service, state, reason, error, attempts, created_at,"
                " updated_at) VALUES (?, ?, 'rides', ?, 'transient', 'x', 0, ?, ?)",
                (mid, key, state, now - dl_age_days * day, now - dl_age_days * day),
            )

        message("old-delivered", 9, "delivered")
        message("new-delivered", 7, "delivered")
        message("old-queued", 20, "queued")
        dead("old-pending", 40, "pending", 40)
        dead("delivered-dl-old", 9, "delivered", 8)
        dead("delivered-dl-new", 9, "delivered", 6)
        dead("abandoned-old", 40, "abandoned", 31)
        dead("abandoned-new", 40, "abandoned", 29)
        db.executemany(
            "INSERT INTO sessions (sender, service, started_at, last_interaction) VALUES (?,?,?,?)",
            [("idle", "rides", 0, now - 25 * 3600), ("live", "jobs", 0, now - 23 * 3600)],
        )
        # The rate limit's hits of a sender quiet for longer than the window, and of one inside it.
        db.executemany(
            "INSERT INTO rate_hits (number, sender, at, count) VALUES ('', ?, ?, 1)",
            [("quiet", now - 61), ("quiet", now - 120), ("active", now - 30)],
        )


def keys(path: Path) -> tuple[set[str], set[str], set[str]]:
    with sqlite3.connect(path) as db:
        return (
            {r[0] for r in db.execute("SELECT key FROM messages")},
            {r[0] for r in db.execute("SELECT key FROM dead_letters")},
            {r[0] for r in db.execute("SELECT sender FROM sessions")},
        )


def test_a_reap_deletes_what_is_old_and_keeps_what_is_owed(tmp_path: Path) -> None:
    path = tmp_path / "db"
    now = MIDNIGHT + 7200
    populate(path, now)
    counts = reap(WriteConnection(path), SESSIONS, now, rate_window_s=60.0)
    assert counts == {
        "sessions": 1,
        "rate_hits": 2,
        "dead_letters_delivered": 1,
        "dead_letters_abandoned": 1,
        "attempts": 6,
        "messages": 3,
    }
    messages, dead_letters, sessions = keys(path)
    # The attempts log goes with its message, and only with it.
    with sqlite3.connect(path) as db:
        logged = db.execute(
            "SELECT m.key, COUNT(*) FROM attempts AS a LEFT JOIN messages AS m"
            " ON m.id = a.message_id GROUP BY a.message_id"
        ).fetchall()
    assert dict(logged) == dict.fromkeys(messages, 2)
    # Queued and still-dead-lettered messages are never forgotten, however old.
    assert messages == {"new-delivered", "old-queued", "old-pending", "delivered-dl-new", "abandoned-new"}
    assert dead_letters == {"old-pending", "delivered-dl-new", "abandoned-new"}
    assert sessions == {"live"}
    assert rows(path, "SELECT sender FROM rate_hits") == [("active",)]
    assert Reader(path).last_run("reaper") == now


def test_a_large_reap_goes_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "db"
    migrate(path)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
            " VALUES (?, 'message', '2507', 'rides', 'keyword', 'rides', x'7b7d', 0, 'delivered')",
            [(f"m{i}",) for i in range(2 * BATCH + 7)],
        )
    assert reap(WriteConnection(path), SESSIONS, 100 * DAY_S, rate_window_s=60.0)["messages"] == 2 * BATCH + 7


async def test_the_actor_runs_a_missed_reap_soon_after_start(tmp_path: Path, store_clock: trio.abc.Clock) -> None:
    start = MIDNIGHT + 10 * 3600  # 10:00, and the last reap was two days ago
    send, receive = trio.open_memory_channel[WriteOp](100)
    rt = bare_runtime(tmp_path, writes=send, wall_clock=lambda: start + trio.current_time())
    path = tmp_path / "bare.db"
    populate(path, start)
    conn = WriteConnection(path)
    conn.try_begin()
    conn.record_run("reaper", start - 2 * DAY_S, None, "")
    conn.commit()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, WriteConnection(path), receive, NoLanes()))
        await nursery.start(partial(run_reaper, rt, Reader(path), send.clone()))
        await trio.sleep(59)
        assert rt.reap_counts.reaped == {}
        with trio.fail_after(600):  # a transaction per kind, from 60 s on: wait for the last one
            while "messages" not in rt.reap_counts.reaped:  # noqa: ASYNC110 -- a count the reaper keeps
                await trio.sleep(1)
        assert rt.reap_counts.reaped["messages"] == 3
        assert rt.actors["reaper"].next_run == MIDNIGHT + DAY_S + 7200  # then daily at 02:00
        nursery.cancel_scope.cancel()
    assert Reader(path).last_run("reaper") is not None


async def test_the_actor_reaps_daily_at_reap_at(tmp_path: Path, store_clock: trio.abc.Clock) -> None:
    start = MIDNIGHT + 7200 - 60  # 01:59: never reaped before, so nothing was missed
    send, receive = trio.open_memory_channel[WriteOp](100)
    rt = bare_runtime(tmp_path, writes=send, wall_clock=lambda: start + trio.current_time())
    path = tmp_path / "bare.db"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, WriteConnection(path), receive, NoLanes()))
        await nursery.start(partial(run_reaper, rt, Reader(path), send.clone()))
        await trio.sleep(55)
        assert rt.actors["reaper"].last_run is None
        # The reap starts at 02:00 and takes a transaction per kind: each fsync may outlast the clock's
        # 20 ms threshold on a busy machine, so wait for the run to end rather than a fixed 10 s.
        with trio.fail_after(600):
            while rt.actors["reaper"].last_run is None:  # noqa: ASYNC110 -- a field the reaper sets
                await trio.sleep(1)
        assert rt.actors["reaper"].last_run == MIDNIGHT + 7200  # the run's own start, 02:00
        nursery.cancel_scope.cancel()


async def test_status_and_health_agree_on_the_reapers_next_run(world: World) -> None:
    """Before the first reap too: the planned run is in the store, where `wacored status` reads it."""
    from wacored.ops import operations as ops

    db = world.tmp_path / "wacored.db"
    with trio.fail_after(10):
        while not rows(db, "SELECT next_run FROM runs WHERE actor = 'reaper'"):  # noqa: ASYNC110 -- the file
            await trio.sleep(0.02)
    health = (await world.daemon.client.get(f"{world.daemon.url}/health")).json()
    conn = ops.open_store(db)
    try:
        report = ops.status(conn, session_ttl_s=3600, now=time.time(), path=db)
    finally:
        conn.close()
    assert report["runs"]["reaper"]["next_run"] == health["checks"]["actors"]["reaper"]["next_run"]
    assert report["runs"]["reaper"]["next_run"] is not None
    assert report["runs"]["reaper"]["last_run"] is None  # it has not run yet: "never"

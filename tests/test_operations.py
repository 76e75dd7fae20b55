"""Operator queries on real stores built with their own schema: a SQLite file, and a PostgreSQL schema
of the test's own (the `store` fixture; the same SQL through `ops.connection`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from wacored.config import Config, StoreConfig
from wacored.ops import operations as ops
from wacored.ops.connection import OpsConnection, open_ops, store_where
from wacored.store import SCHEMA_VERSION, SchemaError, migrate
from wacored.store.postgres import pg_migrate

from .conftest import Downstream, Received, StoreUnderTest, config_mapping, open_daemon
from .postgres import own_schema
from .support import add_dead_letter, add_message, operator_config, run_cli, store_rows, wait_until

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "wacored.db"
    migrate(path)
    return path


@pytest.fixture
def conn(store: StoreUnderTest) -> Iterator[OpsConnection]:
    store.migrate()
    c = open_ops(StoreConfig(path=store.path, url=store.url))
    yield c
    c.close()


def row(conn: OpsConnection, dl_id: int) -> tuple[str, int, float | None, float | None]:
    return conn.execute(  # type: ignore[no-any-return]
        "SELECT state, attempts, next_attempt_at, updated_at FROM dead_letters WHERE id = ?", (dl_id,)
    ).fetchone()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400), (" 2D ", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert ops.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7w", "-1d", "7 d", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        ops.parse_duration(text)


def test_a_missing_database_is_never_created(tmp_path: Path) -> None:
    with pytest.raises(ops.StoreMissing, match="no database at"):
        ops.open_store(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_a_newer_schema_is_refused(db: Path) -> None:
    with sqlite3.connect(db) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer than this wacored"):
        ops.open_store(db)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    with pytest.raises(ops.NotAStore):
        ops.open_store(tmp_path / "empty.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ops.NotAStore):
        ops.open_store(tmp_path / "junk.db")


def test_list_is_oldest_first_and_filters(conn: OpsConnection) -> None:
    b = add_dead_letter(conn, "wamid.B", created_at=NOW - 100, state="pending", next_attempt_at=NOW + 60)
    a = add_dead_letter(conn, "wamid.A", created_at=NOW - 200, service="jobs")
    c = add_dead_letter(conn, "wamid.C", created_at=NOW - 50, state="delivered")
    assert [d.id for d in ops.list_dead_letters(conn)] == [a, b, c]
    assert [d.id for d in ops.list_dead_letters(conn, state="pending")] == [b]
    assert [d.id for d in ops.list_dead_letters(conn, service="jobs")] == [a]
    assert ops.list_dead_letters(conn, state="abandoned", service="rides") == []
    with pytest.raises(ValueError, match="state must be one of"):
        ops.list_dead_letters(conn, state="queued")


def test_the_json_shape(conn: OpsConnection) -> None:
    dl = add_dead_letter(conn, "wamid.A", created_at=0.0, state="pending", next_attempt_at=90.0)
    [entry] = ops.list_dead_letters(conn)
    assert entry.to_json() == {
        "id": dl,
        "message_id": "wamid.A",
        "message_row_id": entry.message_row_id,
        "service": "rides",
        "state": "pending",
        "reason": "transient",
        "error": "HTTP 503",
        "status_code": 503,
        "attempts": 3,
        "retries": 3,
        "next_attempt_at": "1970-01-01T00:01:30Z",
        "created_at": "1970-01-01T00:00:00Z",
        "updated_at": "1970-01-01T00:00:00Z",
    }


def test_replay_by_row_id_or_wamid_makes_entries_due_now_with_a_fresh_budget(conn: OpsConnection) -> None:
    a = add_dead_letter(conn, "wamid.A")
    b = add_dead_letter(conn, "wamid.B", state="pending", next_attempt_at=NOW + 600, attempts=2)
    c = add_dead_letter(conn, "wamid.C", state="delivered")
    result = ops.replay(conn, [str(a), "wamid.B", "wamid.C", "999", "wamid.nope"], NOW)
    assert result == ops.ReplayResult(2, unknown=["999", "wamid.nope"], delivered=["wamid.C"])
    assert row(conn, a) == ("pending", 0, NOW, NOW)
    assert row(conn, b) == ("pending", 0, NOW, NOW)
    assert row(conn, c) == ("delivered", 3, None, NOW - DAY)


def test_replay_all_takes_abandoned_entries_unless_told_otherwise(conn: OpsConnection) -> None:
    a = add_dead_letter(conn, "wamid.A")
    j = add_dead_letter(conn, "wamid.J", service="jobs")
    p = add_dead_letter(conn, "wamid.P", state="pending", next_attempt_at=NOW + 600)
    d = add_dead_letter(conn, "wamid.D", state="delivered")
    assert ops.replay_all(conn, NOW, service="jobs") == 1
    assert row(conn, j)[0] == "pending"
    assert row(conn, a)[0] == "abandoned"
    assert ops.replay_all(conn, NOW) == 1
    assert row(conn, a) == ("pending", 0, NOW, NOW)
    assert ops.replay_all(conn, NOW + 1, state="pending") == 3
    assert row(conn, p)[2] == NOW + 1
    assert row(conn, d)[0] == "delivered"
    with pytest.raises(ValueError, match="state must be one of abandoned, pending"):
        ops.replay_all(conn, NOW, state="delivered")


def test_purge_deletes_only_old_entries_of_the_state_asked(conn: OpsConnection) -> None:
    old = add_dead_letter(conn, "wamid.OLD", state="delivered", updated_at=NOW - 8 * DAY)
    add_dead_letter(conn, "wamid.NEW", state="delivered", updated_at=NOW - 6 * DAY)
    add_dead_letter(conn, "wamid.AB", state="abandoned", updated_at=NOW - 30 * DAY)
    add_dead_letter(conn, "wamid.P", state="pending", updated_at=NOW - 30 * DAY)
    assert ops.purge(conn, state="delivered", older_than_s=7 * DAY, now=NOW) == 1
    assert row(conn, old) is None
    assert {d.message_id for d in ops.list_dead_letters(conn)} == {"wamid.NEW", "wamid.AB", "wamid.P"}
    with pytest.raises(ValueError, match="state must be one of delivered, abandoned"):
        ops.purge(conn, state="pending", older_than_s=0, now=NOW)


def test_status_counts(conn: OpsConnection) -> None:
    add_dead_letter(conn, "wamid.P1", state="pending", created_at=NOW - 300)
    oldest = add_dead_letter(conn, "wamid.P0", state="pending", created_at=NOW - 900)
    add_dead_letter(conn, "wamid.A", state="abandoned")
    add_message(conn, "wamid.Q1", target="rides", received_at=NOW - 30)
    add_message(conn, "wamid.Q2", target="rides", received_at=NOW - 20)
    add_message(conn, "wamid.Q3", target="whatsapp", received_at=NOW - 5)
    add_message(conn, "wamid.D", target="jobs", state="delivered")
    for sender, at in [("a", NOW - 10), ("b", NOW - 3599), ("c", NOW - 3601)]:
        conn.execute("INSERT INTO sessions (sender, service, last_interaction) VALUES (?, 'rides', ?)", (sender, at))
    conn.execute("INSERT INTO runs VALUES ('reaper', ?, ?, 'sessions=1')", (NOW - DAY, NOW + 3600))
    report = ops.status(conn, session_ttl_s=3600, now=NOW)
    assert report["dead_letters"] == {
        "pending": 2,
        "abandoned": 1,
        "delivered": 0,
        "replayed": 0,
        "oldest_pending": {
            "id": oldest,
            "message_id": "wamid.P0",
            "service": "rides",
            "created_at": ops.iso(NOW - 900),
            "age_s": 900.0,
        },
    }
    assert report["sessions"] == {"active": 2, "stale": 1}
    assert report["queued"] == {
        "rides": {"count": 2, "oldest_received_at": ops.iso(NOW - 30), "age_s": 30.0},
        "whatsapp": {"count": 1, "oldest_received_at": ops.iso(NOW - 5), "age_s": 5.0},
    }
    assert report["runs"] == {
        "dlq_retrier": {"last_run": None, "next_run": None, "result": None},
        "reaper": {"last_run": ops.iso(NOW - DAY), "next_run": ops.iso(NOW + 3600), "result": "sessions=1"},
    }
    assert not conn.in_transaction


def test_status_of_an_empty_store(conn: OpsConnection) -> None:
    report = ops.status(conn, session_ttl_s=3600, now=NOW)
    assert report["dead_letters"]["oldest_pending"] is None
    assert report["sessions"] == {"active": 0, "stale": 0}
    assert report["queued"] == {}


def test_writes_wait_for_the_lock_and_fail_cleanly_past_the_busy_timeout(db: Path) -> None:
    other = sqlite3.connect(db, isolation_level=None)
    conn = ops.open_store(db, busy_timeout_ms=10)
    try:
        add_dead_letter(conn, "wamid.A")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ops.replay_all(conn, NOW)
        assert not conn.in_transaction
        other.execute("ROLLBACK")
        assert ops.replay_all(conn, NOW) == 1
    finally:
        conn.close()
        other.close()


def test_writes_go_ahead_while_another_connection_reads(db: Path) -> None:
    conn = ops.open_store(db)
    add_dead_letter(conn, "wamid.A")
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (1,)
        assert ops.replay(conn, ["wamid.A"], NOW).replayed == 1
        assert ops.purge(conn, state="abandoned", older_than_s=0, now=NOW) == 0
        assert reader.execute("SELECT state FROM dead_letters").fetchone() == ("abandoned",)  # its snapshot
        reader.execute("COMMIT")
    finally:
        reader.close()
        conn.close()


def test_status_names_the_lanes_and_singletons_each_worker_holds() -> None:
    from wacored.ops.operations import daemon_lines

    health = {
        "url": "http://127.0.0.1:8080",
        "status": "healthy",
        "workers": [
            {
                "index": 0,
                "pid": 11,
                "node": "h-11",
                "status": "healthy",
                "ready": True,
                "started_at": "t",
                "restarts": 0,
                "lanes_held": ["lane:rides:0", "lane:rides:1", "lane:rides:3", "lane:jobs:1"],
                "singletons": ["dlq_retrier"],
            },
            {"index": 1, "status": "down"},
        ],
    }
    lines = daemon_lines(health)
    assert lines[2] == "    lanes held: jobs 1, rides 0-1,3; runs: dlq_retrier"
    assert lines[3] == "  worker 1: down (not answering)"


async def test_dlq_status_and_reap_from_the_cli_beside_a_daemon_on_postgresql(
    tmp_path: Path, pg_url: str, services: Downstream, graph: Downstream
) -> None:
    """The operator's commands, each in a process of its own, on the database a running daemon uses."""
    refuse = True

    async def respond(_: Received) -> int:
        return 400 if refuse else 200  # a permanent refusal: dead-lettered, abandoned

    services.respond = respond
    with own_schema(pg_url) as url:
        data = config_mapping(
            tmp_path,
            services.url,
            graph.url,
            store={"url": url},
            forwarding={"retries": 0},
            dlq={"interval_s": 0.2, "backoff_s": [60.0], "max_attempts": 3},
        )
        cli = ["-c", str(operator_config(tmp_path, data)), "--env-file", str(tmp_path / "none.env")]
        config = Config.from_mapping(data, {})
        async with open_daemon(config) as daemon:
            sent = await daemon.send_text("rides", sender="250788000301")
            key = sent.json()["routes"][0]["message_id"]
            await wait_until(lambda: store_rows(config.store, "SELECT state FROM dead_letters") == [("abandoned",)])

            listed = await run_cli("dlq", "list", "--json", *cli)
            assert listed.returncode == 0, listed.stderr
            [entry] = json.loads(listed.stdout)
            assert (entry["message_id"], entry["state"], entry["reason"]) == (key, "abandoned", "permanent")

            refuse = False
            replayed = await run_cli("dlq", "replay", key, *cli)
            assert (replayed.returncode, replayed.stdout) == (0, b"replayed 1 dead letter(s): due now\n")
            [retry] = await services.wait_for(1, "/rides")  # the daemon's retrier read it from the database
            assert retry.headers["x-dlq-retry"] == "true"
            await wait_until(lambda: store_rows(config.store, "SELECT state FROM dead_letters") == [("delivered",)])

            status = await run_cli("status", "--json", *cli)
            assert status.returncode == 0, status.stderr
            report = json.loads(status.stdout)
            assert {k: report["dead_letters"][k] for k in ops.STATES} == {
                "pending": 0,
                "abandoned": 0,
                "delivered": 1,
                "replayed": 0,
            }
            assert report["sessions"] == {"active": 1, "stale": 0}
            assert report["database"]["path"].startswith("postgresql://")
            assert "@" not in report["database"]["path"]

            reaped = await run_cli("sessions", "reap", "--json", *cli)
            assert reaped.returncode == 0, reaped.stderr
            assert json.loads(reaped.stdout)["sessions"] == 0  # the sender's session is live
            purged = await run_cli("dlq", "purge", "--state", "delivered", "--older-than", "0s", *cli)
            assert (purged.returncode, purged.stdout) == (0, b"purged 1 delivered dead letter(s)\n")
            assert store_rows(config.store, "SELECT result FROM runs WHERE actor = 'reaper'")[0][0].startswith(
                "sessions 0"
            )


def test_an_empty_postgresql_database_is_not_a_store(pg_url: str) -> None:
    with own_schema(pg_url) as url:
        with pytest.raises(ops.NotAStore, match="no wacored tables"):
            open_ops(StoreConfig(url=url))
        assert "@" not in store_where(StoreConfig(url=url))


def test_a_row_held_past_the_busy_timeout_fails_cleanly_on_postgresql(pg_url: str) -> None:
    """PostgreSQL's ``lock_timeout`` is the busy timeout: an operator's write waits for a row the
    daemon holds that long, then fails whole, and the connection is usable again."""
    with own_schema(pg_url) as url:
        pg_migrate(url)
        conn = open_ops(StoreConfig(url=url, busy_timeout_ms=50))
        other = psycopg.connect(url, autocommit=True)
        try:
            add_dead_letter(conn, "wamid.A")
            other.execute("BEGIN")
            other.execute("UPDATE dead_letters SET error = 'held'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                ops.replay_all(conn, NOW)
            assert not conn.in_transaction
            other.execute("ROLLBACK")
            assert ops.replay_all(conn, NOW) == 1
        finally:
            other.close()
            conn.close()

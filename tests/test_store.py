"""The schema: created in WAL mode (SQLite), versioned, migrated forward only, on both stores."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from wacored.store import SCHEMA_VERSION, SchemaError, migrate
from wacored.store.postgres import pg_migrate

from .conftest import StoreUnderTest
from .postgres import own_schema


def test_a_new_database_is_created_at_the_current_version_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wacored.db"
    assert migrate(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables >= {"messages", "sessions", "dead_letters"}


def test_migrating_again_changes_nothing(store: StoreUnderTest) -> None:
    store.migrate()
    store.execute("INSERT INTO sessions (sender, service, last_interaction) VALUES ('s', 'rides', 1.0)")
    assert store.migrate() == SCHEMA_VERSION
    assert store.rows("SELECT sender FROM sessions") == [("s",)]


def test_a_database_from_a_newer_wacored_is_refused(store: StoreUnderTest) -> None:
    store.migrate()
    if store.url:
        store.execute("UPDATE schema_version SET version = ?", SCHEMA_VERSION + 1)
    else:
        with closing(sqlite3.connect(store.path)) as db:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer than this wacored"):
        store.migrate()


def test_the_reader_reports_the_schema_version(store: StoreUnderTest) -> None:
    store.migrate()
    reader = store.reader()
    try:
        assert reader.ping() == SCHEMA_VERSION
    finally:
        reader.close()


def test_nodes_starting_at_once_migrate_a_new_postgresql_database_once(pg_url: str) -> None:
    """pg_migrate holds an advisory lock: the others wait, then find the schema current."""
    with own_schema(pg_url) as url:
        versions: list[int] = []
        threads = [threading.Thread(target=lambda: versions.append(pg_migrate(url))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert versions == [SCHEMA_VERSION] * 4
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
            tables = {t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
        assert tables >= {"messages", "sessions", "dead_letters", "runs", "attempts", "service_pauses", "rate_hits"}
        assert tables >= {"lane_counts", "leases", "nodes"}


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite_utils

    from wacored.store import MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    MIGRATIONS[0](sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
        " VALUES ('wamid.1', 'message', '2507', 'rides', 'keyword', 'rides', x'7b7d', 1.0, 'queued')"
    )
    conn.commit()
    conn.close()
    assert migrate(path) == SCHEMA_VERSION == 8
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT key, state FROM messages").fetchall() == [("wamid.1", "queued")]
        assert db.execute("SELECT count(*) FROM rate_hits").fetchone() == (0,)  # v7: the rate limit's hits
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM attempts").fetchone() == (0,)  # v4: the attempts log
        assert db.execute("SELECT count(*) FROM service_pauses").fetchone() == (0,)
        # v3: the old row still dedupes its own key, now within its kind.
        db.execute(
            "INSERT OR IGNORE INTO messages (key, kind, sender, service, reason, target, body, received_at)"
            " VALUES ('wamid.1', 'message', '2507', 'rides', 'keyword', 'rides', x'7b7d', 2.0)"
        )
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)


def test_messages_and_statuses_dedupe_in_separate_namespaces(tmp_path: Path) -> None:
    """A wamid shaped like a status key cannot dedupe a status away (nor the other way round)."""
    path = tmp_path / "db"
    migrate(path)
    insert = (
        "INSERT OR IGNORE INTO messages (key, kind, sender, service, reason, target, body, received_at)"
        " VALUES ('status:wamid.9:read', ?, '2507', 'rides', 'status', 'rides', x'7b7d', 1.0)"
    )
    with closing(sqlite3.connect(path)) as db, db:
        assert db.execute(insert, ("message",)).rowcount == 1
        assert db.execute(insert, ("status",)).rowcount == 1
        assert db.execute(insert, ("status",)).rowcount == 0


def test_ids_written_as_null_by_hand_read_as_empty_strings(store: StoreUnderTest) -> None:
    """A header is never None, whoever wrote the row (an operator's repair, an old import)."""
    store.migrate()
    store.execute(
        "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
        " VALUES ('wamid.1', 'message', '2507', 'rides', 'keyword', 'rides', ?, 1.0, 'dead_lettered')",
        b"{}",
    )
    (mid,) = store.rows("SELECT id FROM messages")[0]
    store.execute(
        "INSERT INTO dead_letters (message_id, key, service, state, reason, error, attempts, next_attempt_at,"
        " created_at) VALUES (?, 'wamid.1', 'rides', 'pending', 'transient', 'x', 0, 5.0, 1.0)",
        mid,
    )
    reader = store.reader()
    try:
        (due,) = reader.due_dead_letters(10.0, 5)
    finally:
        reader.close()
    d = due.delivery
    assert (d.key, d.request_id, d.correlation_id, d.traceparent) == ("wamid.1", "", "", "")

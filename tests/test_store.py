"""The schema: created in WAL mode, versioned, migrated forward only."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from wacored.store import SCHEMA_VERSION, Reader, SchemaError, migrate


def test_a_new_database_is_created_at_the_current_version_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wacored.db"
    assert migrate(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables >= {"messages", "sessions", "dead_letters"}


def test_migrating_again_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "wacored.db"
    migrate(path)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO sessions (sender, service, last_interaction) VALUES ('s', 'rides', 1.0)")
    db.commit()
    assert migrate(path) == SCHEMA_VERSION
    assert db.execute("SELECT sender FROM sessions").fetchall() == [("s",)]


def test_a_database_from_a_newer_wacored_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wacored.db"
    migrate(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaError, match="newer than this wacored"):
        migrate(path)


def test_the_reader_reports_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "wacored.db"
    migrate(path)
    reader = Reader(path)
    try:
        assert reader.ping() == SCHEMA_VERSION
    finally:
        reader.close()


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


def test_ids_written_as_null_by_hand_read_as_empty_strings(tmp_path: Path) -> None:
    """A header is never None, whoever wrote the row (an operator's repair, an old import)."""
    path = tmp_path / "db"
    migrate(path)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
            " VALUES ('wamid.1', 'message', '2507', 'rides', 'keyword', 'rides', x'7b7d', 1.0, 'dead_lettered')"
        )
        db.execute(
            "INSERT INTO dead_letters (message_id, key, service, state, reason, error, attempts, next_attempt_at,"
            " created_at) VALUES (1, 'wamid.1', 'rides', 'pending', 'transient', 'x', 0, 5.0, 1.0)"
        )
    (due,) = Reader(path).due_dead_letters(10.0, 5)
    d = due.delivery
    assert (d.key, d.request_id, d.correlation_id, d.traceparent) == ("wamid.1", "", "", "")

"""The schema: created in WAL mode, versioned, migrated forward only."""

from __future__ import annotations

import sqlite3
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

"""The SQLite schema: forward-only migrations, and the connection every SQLite user opens.

The schema version is ``PRAGMA user_version``; migration i takes it from version i to i+1 (append
only; never edit a released one). `migrate` refuses a database newer than this code (`SchemaError`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import sqlite_utils

from .rows import SchemaError

SCHEMA_VERSION = 8


def _v1(db: sqlite_utils.Database) -> None:
    db.table("messages").create(
        {
            "id": int,
            "key": str,
            "kind": str,
            "sender": str,
            "service": str,
            "reason": str,
            "target": str,
            "body": bytes,
            "request_id": str,
            "correlation_id": str,
            "traceparent": str,
            "received_at": float,
            "state": str,
            "attempts": int,
            "done_at": float,
        },
        pk="id",
        not_null={"key", "kind", "sender", "service", "reason", "target", "body", "received_at", "state"},
        defaults={"state": "queued", "attempts": 0},
    )
    db.table("messages").create_index(["key"], unique=True)
    db.execute("CREATE INDEX messages_queued ON messages(target, id) WHERE state = 'queued'")
    db.table("sessions").create(
        {"sender": str, "service": str, "started_at": float, "last_interaction": float},
        pk="sender",
        not_null={"service", "last_interaction"},
    )
    db.table("dead_letters").create(
        {
            "id": int,
            "message_id": int,
            "key": str,
            "service": str,
            "state": str,
            "reason": str,
            "error": str,
            "status_code": int,
            "attempts": int,
            "next_attempt_at": float,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        not_null={"message_id", "key", "service", "state", "reason", "error", "attempts", "created_at"},
        foreign_keys=[("message_id", "messages", "id")],
    )
    db.table("dead_letters").create_index(["message_id"], unique=True)
    db.execute("CREATE INDEX dead_letters_due ON dead_letters(state, next_attempt_at)")


def _v2(db: sqlite_utils.Database) -> None:
    """What the retrier and reaper need: when each periodic actor last ran and runs next (so `wacored
    status` can tell, and a reap missed while the daemon was down runs soon after start), and indexes
    for the reaper's age-bounded deletes."""
    db.table("runs").create(
        {"actor": str, "last_run": float, "next_run": float, "result": str},
        pk="actor",
        not_null={"actor"},
    )
    db.execute("CREATE INDEX messages_received ON messages(received_at)")
    db.execute("CREATE INDEX dead_letters_done ON dead_letters(state, updated_at)")
    db.execute("CREATE INDEX sessions_idle ON sessions(last_interaction)")


def _v3(db: sqlite_utils.Database) -> None:
    """Messages and status updates dedupe in separate namespaces: unique on (kind, key), not key alone."""
    db.execute("CREATE UNIQUE INDEX messages_kind_key ON messages(kind, key)")
    db.execute("DROP INDEX idx_messages_key")
    # Lookups by key alone (an operator's `dlq replay WAMID`) still want an index.
    db.execute("CREATE INDEX messages_key ON messages(key)")


def _v4(db: sqlite_utils.Database) -> None:
    """The attempts log: one row per delivery attempt. No foreign key to ``messages``: an attempt is a
    record of what happened, and an outcome whose message an operator deleted by hand must still
    commit (a refused insert would hold the whole group). The reaper deletes them with their message."""
    db.execute(
        "CREATE TABLE attempts (id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL, service TEXT NOT NULL,"
        " number INTEGER NOT NULL, kind TEXT NOT NULL, started_at REAL NOT NULL, duration_ms REAL NOT NULL,"
        " status_code INTEGER, error TEXT NOT NULL DEFAULT '', node TEXT NOT NULL DEFAULT '')"
    )
    db.execute("CREATE INDEX attempts_message ON attempts(message_id, id)")


def _v5(db: sqlite_utils.Database) -> None:
    """Operators pause and resume a service (`pauses.py`): a paused service's row says since when and
    why. In the store, not the config, so a pause survives restarts and config reloads, and the CLI
    can set one while the daemon runs."""
    db.execute(
        "CREATE TABLE service_pauses (service TEXT PRIMARY KEY, paused_at REAL NOT NULL,"
        " reason TEXT NOT NULL DEFAULT '')"
    )


def _v6(db: sqlite_utils.Database) -> None:
    """Several business numbers: each message keeps the number it was written to (replies go from it,
    forwards name it), and sessions are per (number, sender). Rows and sessions from before are the
    default number's: ``""``."""
    db.execute("ALTER TABLE messages ADD COLUMN number TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE sessions RENAME TO sessions_v3")
    db.execute("DROP INDEX sessions_idle")
    db.execute(
        "CREATE TABLE sessions (number TEXT NOT NULL DEFAULT '', sender TEXT NOT NULL, service TEXT NOT NULL,"
        " started_at FLOAT, last_interaction FLOAT NOT NULL, PRIMARY KEY (number, sender))"
    )
    db.execute(
        "INSERT INTO sessions (number, sender, service, started_at, last_interaction)"
        " SELECT '', sender, service, started_at, last_interaction FROM sessions_v3"
    )
    db.execute("DROP TABLE sessions_v3")
    db.execute("CREATE INDEX sessions_idle ON sessions(last_interaction)")


def _v7(db: sqlite_utils.Database) -> None:
    """Sessions and the rate limit come from the store, not from one process's memory: the rate
    limit's hits get a table (`WriteConnection.rate_hits`), read by (number, sender) in the window
    and reaped by age. (Sessions are read by their primary key, which exists.)"""
    db.execute(
        "CREATE TABLE rate_hits (number TEXT NOT NULL, sender TEXT NOT NULL, at REAL NOT NULL, count INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX rate_hits_window ON rate_hits(number, sender, at)")
    db.execute("CREATE INDEX rate_hits_at ON rate_hits(at)")


def _v8(db: sqlite_utils.Database) -> None:
    """The store is the hand-off between ingress and delivery: each queued row names its lane, and a
    lane is read by whichever worker holds its lease (``leases``); live workers say so in ``nodes``.
    ``lane_counts`` keeps the lane count the queued rows of each target were split by, so a restart
    with another ``concurrency`` splits them again (rows from before this version have none: all
    split again at the next start)."""
    db.execute("ALTER TABLE messages ADD COLUMN lane INTEGER NOT NULL DEFAULT 0")
    db.execute("DROP INDEX messages_queued")
    db.execute("CREATE INDEX messages_lane ON messages(target, lane, id) WHERE state = 'queued'")
    db.execute("CREATE TABLE lane_counts (target TEXT PRIMARY KEY, lanes INTEGER NOT NULL)")
    db.execute("CREATE TABLE leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)")
    db.execute("CREATE TABLE nodes (name TEXT PRIMARY KEY, started_at REAL NOT NULL, seen_at REAL NOT NULL)")


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
"""Migration i takes the schema from version i to i+1. Append only; never edit a released one."""


def connect(path: Path, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection with the pragmas every connection needs, usable from the event loop's thread and
    from worker threads (one at a time)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # How long a write waits for another process's lock (an operator's shell, a CLI) before failing.
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # FULL: a 200 to Meta promises the message survives power loss, not just a process crash.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(path: Path) -> int:
    """Create or upgrade the database at `path`; return the schema version it ends at."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {version}, newer than this wacored ({SCHEMA_VERSION})")
        db = sqlite_utils.Database(conn, execute_plugins=False)
        for step in range(version, SCHEMA_VERSION):
            with conn:
                MIGRATIONS[step](db)
                conn.execute(f"PRAGMA user_version = {step + 1}")
        return SCHEMA_VERSION
    finally:
        conn.close()

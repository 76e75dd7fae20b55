"""The SQLite store: the one write connection of a process, and its readers (the `store.interface`
Protocols, implemented on a SQLite file in WAL mode).

Tables (schema version in ``PRAGMA user_version``, forward-only migrations in `MIGRATIONS`):

- ``messages``: every accepted update, keyed by its kind and dedupe key (the wamid, or
  ``status:<id>:<status>``; schema v3 made the kind part of the key, so a wamid that looks like a
  status key cannot dedupe a status away, nor the other way round)
  with its route, the business number it was written to (``number``, schema v6: a number key of
  `numbers.py`, ``""`` for the default number), the exact bytes to deliver and its delivery ``state``
  (``queued`` -> ``delivered`` | ``dead_lettered``; ``unrouted`` for a message kept only to dedupe it,
  one to a number ``numbers = "listed"`` does not know; ``probe`` for a probe, `probe.py`, routed and
  never forwarded). The row id is commit order, which is delivery order.
- ``sessions``: the service each sender is in with each business number, and when it last interacted
  (schema v6 keyed it by (number, sender); sessions from before are the default number's, ``""``).
- ``dead_letters``: one row per message that could not be delivered: ``state`` (``pending`` -> retried
  by the DLQ retrier -> ``delivered`` | ``abandoned``), ``reason`` (``transient``, ``permanent``,
  ``breaker_open``, ``internal_error``), the last error, retries made (``attempts``) and when the next one is due.
- ``runs``: each periodic actor's last and next run (schema v2).
- ``attempts``: one row per delivery attempt (schema v4): the message's row id, the service, the
  attempt's number within its delivery (or the dead letter's retry number), its kind (``delivery`` or
  ``dlq_retry``), when it started (wall clock), how long it took, the HTTP status or the error (already
  masked, `untrusted.excerpt`) and the node (``host-pid``) that made it. Written with the outcome it
  belongs to, in the writer's group commit; reaped just before its message.
- ``service_pauses``: one row per service an operator has paused (``paused_at``, ``reason``); no row,
  not paused (schema v5).
- ``rate_hits``: the per-sender rate limit's windows (schema v7): one row per admitted POST and
  (number, sender), with when and how many messages it carried. Written in the ingest transaction,
  so every process sharing the store counts the same hits; a sender's rows that left the window are
  deleted when it writes again, and the reaper deletes those of senders gone quiet.

`Store` methods are synchronous and run in a worker thread (`trio.to_thread`): the writer actor owns
the write connection, readers open their own (WAL lets them read while the writer commits).

Error handling:
    `sqlite3.Error` propagates; the writer turns it into `StoreUnavailable` for every waiting request
    of the failed transaction, which ingress answers with 503 (Meta retries; nothing was
    acknowledged), and keeps its delivery outcomes to commit them later (`writer.py`).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.leases import Held, Lease
from ..core.sessions import SessionChange
from . import lanes as store_lanes
from .rows import (
    DEAD_LETTER_STATES,
    DeadLetter,
    Delivery,
    NewRow,
    _delivery,
    _delivery_columns,
)
from .schema import connect
from .writes import MESSAGE_COLUMNS, MESSAGE_PLACEHOLDERS, SharedWrites, message_values

_INSERT = f"INSERT OR IGNORE INTO messages ({MESSAGE_COLUMNS}) VALUES ({MESSAGE_PLACEHOLDERS})"
_PAGE = (
    f"SELECT {_delivery_columns()} FROM messages WHERE target = ? AND lane = ? AND state = 'queued' ORDER BY id LIMIT ?"
)
"""A lane's page read, built once: it runs about once per message delivered."""


class WriteConnection(SharedWrites):
    """The single write connection. `insert`, `record` and `queued` run inside a transaction opened
    by `try_begin` or `begin_waiting` and closed by `commit` or `rollback`.

    Statements never wait for a lock (busy timeout 0): they run on the event loop's thread, and only
    `begin_waiting` and `commit`, which may wait (for another process's lock; for fsync), belong in a
    worker thread.
    """

    blocking_statements = False

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.conn = connect(path, busy_timeout_ms=0)
        self.busy_timeout_ms = busy_timeout_ms
        self._data_version: int | None = None

    def _sql(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def close(self) -> None:
        self.conn.close()

    def try_begin(self) -> bool:
        """Open the write transaction now; False if another connection holds the write lock, or is
        rebuilding the WAL index after a crash (``SQLITE_BUSY_RECOVERY``: any busy code is busy)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            # The extended code's low byte is its primary code. With no busy timeout, BEGIN IMMEDIATE
            # in a process starting beside one that opened a store a killed worker left answers
            # SQLITE_BUSY_RECOVERY (261, "database is locked") too: measured 1 in 30 racing opens.
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                return False
            raise
        return True

    def begin_waiting(self) -> None:
        """Open the write transaction, waiting up to the busy timeout for another process's lock."""
        self.conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        finally:
            self.conn.execute("PRAGMA busy_timeout = 0")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def others_committed(self) -> bool:
        """Whether another connection (another process, the CLI) may have committed since this one
        last asked: then anything cached from what this connection read may be stale. True the first
        time. SQLite says it with ``PRAGMA data_version``, which moves for other connections' commits
        only (~1 us, docs/stack-notes.md); another store may answer True whenever it cannot tell."""
        version = int(self.conn.execute("PRAGMA data_version").fetchone()[0])
        changed, self._data_version = version != self._data_version, version
        return changed

    def session(self, number: str, sender: str) -> tuple[str, float] | None:
        """The stored session of (number, sender): (service, last interaction), expired or not."""
        row = self.conn.execute(
            "SELECT service, last_interaction FROM sessions WHERE number = ? AND sender = ?", (number, sender)
        ).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    def rate_hits(self, number: str, sender: str, after: float) -> list[tuple[float, int]]:
        """(number, sender)'s admitted POSTs later than `after`, oldest first: (time, messages)."""
        return [
            (float(at), int(n))
            for at, n in self.conn.execute(
                "SELECT at, count FROM rate_hits WHERE number = ? AND sender = ? AND at > ? ORDER BY at",
                (number, sender, after),
            )
        ]

    def add_rate_hits(self, counts: Iterable[tuple[tuple[str, str], int]], at: float, horizon: float) -> None:
        """Record one admitted POST's messages per (number, sender) at `at`, and forget those
        senders' hits at or before `horizon` (out of the window), so the table follows the senders
        active in the window; the reaper deletes the rest (`REAP_SQL`, ``rate_hits``)."""
        cur = self.conn.cursor()
        for (number, sender), n in counts:
            cur.execute("DELETE FROM rate_hits WHERE number = ? AND sender = ? AND at <= ?", (number, sender, horizon))
            cur.execute("INSERT INTO rate_hits (number, sender, at, count) VALUES (?,?,?,?)", (number, sender, at, n))

    def insert(self, rows: Sequence[NewRow], changes: Iterable[tuple[int, SessionChange]]) -> list[int | None]:
        """Insert `rows` (a duplicate key inserts nothing: None), then the session changes of the
        rows that were inserted; `changes` pairs a row index with its change."""
        ids: list[int | None] = []
        cur = self.conn.cursor()
        for r in rows:
            cur.execute(
                _INSERT,
                message_values(r),
            )
            ids.append(cur.lastrowid if cur.rowcount == 1 else None)
        self.apply_changes(ids, changes)
        return ids

    def reap(self, kind: str, cutoff: float, limit: int) -> int:
        """Delete at most `limit` rows of `kind` older than `cutoff`; how many were deleted."""
        return self.conn.execute(REAP_SQL[kind], (cutoff, limit)).rowcount

    def keep_leases(
        self,
        *,
        me: str,
        lanes: Sequence[str],
        singletons: Sequence[str],
        release: Sequence[str],
        now: float,
        ttl_s: float,
        started_at: float,
        dead: Callable[[str], bool],
    ) -> Held:
        """One lease tick for node `me` (`store_lanes.keep_leases`)."""
        return store_lanes.keep_leases(
            self.conn,
            me=me,
            lanes=lanes,
            singletons=singletons,
            release=release,
            now=now,
            ttl_s=ttl_s,
            started_at=started_at,
            dead=dead,
        )

    def release_leases(self, me: str) -> int:
        """Drop every lease of `me`; how many it held (`store_lanes.release_leases`)."""
        return store_lanes.release_leases(self.conn, me=me)

    def split_lanes(self, target: str, lanes: int) -> int:
        """Make `target`'s queued rows follow `lanes` lanes; how many moved (`store_lanes.split_lanes`)."""
        return store_lanes.split_lanes(self.conn, target=target, lanes=lanes)

    def changes(self) -> int:
        """Rows changed on this connection so far (a commit that changed none wrote nothing)."""
        return self.conn.total_changes


def as_time(value: object) -> float | None:
    """A time read from the store, or None when the row holds something else: a row written by hand
    (an operator's repair, an old import) must not crash the actor that reads it."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def queued_by_target(conn: sqlite3.Connection) -> dict[str, tuple[int, float]]:
    """Messages accepted and neither delivered nor dead-lettered, per target: (count, oldest received_at).

    Only numeric times are compared (a row written by hand with another value is counted, not dated)."""
    return dict(
        (target, (count, oldest))
        for target, count, oldest in conn.execute(
            "SELECT target, COUNT(*), COALESCE(MIN(CASE WHEN typeof(received_at) IN ('integer', 'real')"
            " THEN received_at END), 0.0) FROM messages WHERE state = 'queued' GROUP BY target ORDER BY target"
        )
    )


@dataclass(frozen=True)
class StoreFigures:
    queued: dict[str, tuple[int, float]]
    """Per target: messages queued, and the oldest one's ``received_at``."""
    dead_letters: dict[tuple[str, str], int]
    """Dead letters by (service, state)."""
    oldest_pending_at: float | None
    size_bytes: int


def size_on_disk(path: Path) -> int:
    """The store's bytes on disk: the database file and its write-ahead log (and shared-memory index),
    which between checkpoints can hold as much again."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except FileNotFoundError:
            pass
    return total


def dead_letters_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """How many dead letters are in each state (every state named, 0 when none)."""
    counts = dict.fromkeys(DEAD_LETTER_STATES, 0)
    counts.update(conn.execute("SELECT state, COUNT(*) FROM dead_letters GROUP BY state").fetchall())
    return counts


REAP_SQL = {
    "sessions": "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions WHERE last_interaction < ? LIMIT ?)",
    # Hits of senders quiet for a whole window (an active sender's are deleted as it writes).
    "rate_hits": "DELETE FROM rate_hits WHERE rowid IN (SELECT rowid FROM rate_hits WHERE at < ? LIMIT ?)",
    "dead_letters_delivered": "DELETE FROM dead_letters WHERE id IN"
    " (SELECT id FROM dead_letters WHERE state = 'delivered' AND updated_at < ? LIMIT ?)",
    "dead_letters_abandoned": "DELETE FROM dead_letters WHERE id IN"
    " (SELECT id FROM dead_letters WHERE state = 'abandoned' AND updated_at < ? LIMIT ?)",
    # The attempts of exactly the messages the next kind deletes (same cutoff), just before them.
    "attempts": "DELETE FROM attempts WHERE id IN (SELECT a.id FROM messages AS m JOIN attempts AS a"
    " ON a.message_id = m.id WHERE m.received_at < ? AND m.state != 'queued'"
    " AND NOT EXISTS (SELECT 1 FROM dead_letters AS d WHERE d.message_id = m.id) LIMIT ?)",
    # A message still queued, or still behind a dead letter, is never forgotten: only finished ones,
    # old enough that Meta can no longer redeliver them, lose their dedupe row.
    "messages": "DELETE FROM messages WHERE id IN (SELECT id FROM messages AS m WHERE received_at < ?"
    " AND state != 'queued' AND NOT EXISTS (SELECT 1 FROM dead_letters AS d WHERE d.message_id = m.id) LIMIT ?)",
}
"""What the reaper deletes, in this order (dead letters and attempts before the messages they hold)."""


class Reader:
    """A connection of its own for reads (start-up recovery, health checks), so they never wait on
    the writer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)

    def close(self) -> None:
        self.conn.close()

    def ping(self) -> int:
        """The schema version; raises `sqlite3.Error` when the database cannot be read."""
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def queued_targets(self) -> dict[str, int]:
        """Each target with queued messages, and its oldest queued row id (start-up recovery)."""
        return dict(
            self.conn.execute("SELECT target, MIN(id) FROM messages WHERE state = 'queued' GROUP BY target").fetchall()
        )

    def sessions_active(self, since: float) -> int:
        """Sessions whose last interaction is after `since`: an index range (``sessions_idle``),
        measured at 16 ms for 1 M live sessions (bench/prefill.py's store)."""
        return int(
            self.conn.execute("SELECT COUNT(*) FROM sessions WHERE last_interaction > ?", (since,)).fetchone()[0]
        )

    def due_dead_letters(self, now: float, limit: int) -> list[DeadLetter]:
        """Pending dead letters due at `now`, oldest due first, with the messages to deliver."""
        rows = self.conn.execute(
            f"SELECT d.id, d.attempts, {_delivery_columns('m')} FROM dead_letters AS d"
            " JOIN messages AS m ON m.id = d.message_id"
            " WHERE d.state = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (now, limit),
        ).fetchall()
        return [DeadLetter(row[0], row[1], _delivery(row[2:])) for row in rows]

    def next_due(self) -> float | None:
        """When the earliest pending dead letter is due (None: none pending)."""
        value = self.conn.execute("SELECT MIN(next_attempt_at) FROM dead_letters WHERE state = 'pending'").fetchone()[0]
        return as_time(value)

    def pauses(self) -> list[tuple[str, float, str]]:
        """Every paused service: (service, paused_at, reason)."""
        return [
            (str(s), float(at), str(reason))
            for s, at, reason in self.conn.execute(
                "SELECT service, paused_at, reason FROM service_pauses ORDER BY service"
            )
        ]

    def last_run(self, actor: str) -> float | None:
        row = self.conn.execute("SELECT last_run FROM runs WHERE actor = ?", (actor,)).fetchone()
        return None if row is None else as_time(row[0])

    def figures(self) -> StoreFigures:
        """What the stats actor caches: queued messages, dead letters, the store's size."""
        dead = {
            (service, state): n
            for service, state, n in self.conn.execute(
                "SELECT service, state, COUNT(*) FROM dead_letters GROUP BY service, state"
            )
        }
        oldest = self.conn.execute("SELECT MIN(created_at) FROM dead_letters WHERE state = 'pending'").fetchone()[0]
        return StoreFigures(queued_by_target(self.conn), dead, as_time(oldest), size_on_disk(self.path))


class LaneReader:
    """A read connection for lanes and the relay, used on the event loop's thread only: each read is
    one indexed range read of a few rows (the partial index ``messages_lane`` holds only queued rows),
    cheaper than the hop to a worker thread."""

    blocking_reads = False

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection = connect(path)

    def close(self) -> None:
        self.conn.close()

    def page(self, target: str, lane: int, limit: int) -> list[Delivery]:
        """The lane's first `limit` queued rows in id order (commit order)."""
        rows = self.conn.execute(_PAGE, (target, lane, limit)).fetchall()
        return [_delivery(row) for row in rows]

    def newest_id(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])

    def queued_lanes_after(self, after_id: int) -> set[tuple[str, int]]:
        """The (target, lane) of every row committed after `after_id` and still queued."""
        return {
            (str(target), int(lane))
            for target, lane in self.conn.execute(
                "SELECT DISTINCT target, lane FROM messages WHERE id > ? AND state = 'queued'", (after_id,)
            )
        }

    def leases(self) -> list[Lease]:
        return [
            Lease(str(n), str(o), float(at))
            for n, o, at in self.conn.execute("SELECT name, owner, expires_at FROM leases ORDER BY name")
        ]

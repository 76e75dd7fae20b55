"""What an operator asks of the store: list, replay and purge dead letters, and the daemon's status.

Shared by the CLI (``wacored dlq ...``, ``wacored status``) and the admin API (``/admin/``), with
the text the CLI shows a person (`dead_letter_table`, `status_text`). The queries take an
`connection.OpsConnection` (SQLite's from `open_store`, either store's from `connection.open_ops`:
the same SQL on both) and are synchronous: the CLI calls them directly, the admin API from a worker
thread (`trio.to_thread`). All of it is meant to run while the daemon runs: each call
is one short transaction (`OpsConnection.write` for writes: on SQLite ``BEGIN IMMEDIATE``, so a
write waits for the daemon's lock up to the busy timeout instead of failing half-way), and reads
never block the daemon's writer (WAL; PostgreSQL's MVCC).

Dead letters are named by their row id (``dead_letters.id``) or by their WhatsApp message id (the
wamid, ``dead_letters.key``). In what these functions return, ``message_id`` is the wamid and
``message_row_id`` the ``messages`` row; timestamps are ISO-8601 UTC strings.

Error handling::

    OperationsError         what the operator asked cannot be done as asked
     ├── StoreMissing       no database file at the configured path (it is never created here)
     └── NotAStore          the file is not a wacored database (schema version 0)
    store.SchemaError       the database was written by a newer wacored
    sqlite3.Error           anything else SQLite refuses (e.g. a lock held past the busy timeout)
    psycopg.Error           anything PostgreSQL refuses (down, ``lock_timeout``)
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import DEAD_LETTER_STATES, SCHEMA_VERSION, SchemaError, interface
from .connection import OpsConnection, SqliteOps

STATES = DEAD_LETTER_STATES

REPLAYABLE = ("abandoned", "pending")
"""States `replay_all` takes; delivered entries are never replayed."""
PURGEABLE = ("delivered", "abandoned")
"""Pending entries are still owed a delivery, so they can never be purged."""
PERIODIC_ACTORS = ("dlq_retrier", "reaper")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_COLUMNS = (
    "id, message_id, key, service, state, reason, error, status_code, attempts, next_attempt_at,"
    " created_at, updated_at, (SELECT m.attempts FROM messages AS m WHERE m.id = dead_letters.message_id)"
)


class OperationsError(Exception):
    """What the operator asked cannot be done as asked."""


class StoreMissing(OperationsError):
    """There is no database at the configured path."""


class NotAStore(OperationsError):
    """The file exists but is not a wacored database."""


def refusals() -> tuple[type[Exception], ...]:
    """What the CLI and the admin API report as the store refusing (`connection.open_ops`, the drivers
    loaded now: psycopg's errors join once `store.postgres` is imported, see `store.interface`)."""
    return (OperationsError, SchemaError, *interface.STORE_ERRORS)


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (or ``1.5h``) in seconds; `ValueError` for anything else."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 90s, 30m, 12h, 7d)")
    return float(match[1]) * _UNIT_S[match[2]]


def iso(ts: float | None, timespec: str = "seconds") -> str | None:
    """An epoch time as ISO-8601 UTC (``2026-01-02T03:04:05Z``; `timespec` as `datetime.isoformat`
    takes it), None for None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def open_store(path: Path, busy_timeout_ms: int = 5000) -> SqliteOps:
    """A connection of our own to the existing database at `path`, checked to be one this wacored
    understands. Never creates the file (``mode=rw``): a mistyped path must not leave an empty
    database behind. The caller closes it."""
    if not path.is_file():
        raise StoreMissing(f"no database at {path} (has the daemon run with this config?)")
    # Autocommit (isolation_level=None): transactions are opened explicitly and kept short.
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError:
        conn.close()
        raise NotAStore(f"{path} is not a wacored database") from None
    if version > SCHEMA_VERSION or version == 0:
        conn.close()
        if version == 0:
            raise NotAStore(f"{path} is not a wacored database (schema version 0)")
        raise SchemaError(f"{path} has schema version {version}, newer than this wacored ({SCHEMA_VERSION})")
    return SqliteOps(conn)


@dataclass(frozen=True)
class DeadLetter:
    """One ``dead_letters`` row."""

    id: int
    message_row_id: int
    message_id: str
    service: str
    state: str
    reason: str
    error: str
    status_code: int | None
    attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float | None
    attempts_made: int | None = None
    """Every attempt made for the message, its first delivery's included (None: the message row is gone)."""

    def to_json(self) -> dict[str, Any]:
        """The object ``dlq list --json`` and ``GET /admin/dlq`` show: ``attempts`` is every attempt made
        (first delivery and retries), ``retries`` the retries counted towards ``max_attempts``."""
        return {
            "id": self.id,
            "message_id": self.message_id,
            "message_row_id": self.message_row_id,
            "service": self.service,
            "state": self.state,
            "reason": self.reason,
            "error": self.error,
            "status_code": self.status_code,
            "attempts": self.attempts if self.attempts_made is None else max(self.attempts_made, self.attempts),
            "retries": self.attempts,
            "next_attempt_at": iso(self.next_attempt_at),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


def list_dead_letters(conn: OpsConnection, *, state: str | None = None, service: str | None = None) -> list[DeadLetter]:
    """Dead letters, oldest first, optionally only those in `state` and/or for `service`."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters WHERE (CAST(? AS TEXT) IS NULL OR state = ?)"
        " AND (CAST(? AS TEXT) IS NULL OR service = ?)"
        " ORDER BY created_at, id",
        (state, state, service, service),
    ).fetchall()
    return [DeadLetter(*row) for row in rows]


def list_dead_letters_of(conn: OpsConnection, message_row_id: int) -> DeadLetter | None:
    """The dead letter of the ``messages`` row `message_row_id` (None: it has none)."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM dead_letters WHERE message_id = ?", (message_row_id,)).fetchone()
    return None if row is None else DeadLetter(*row)


@dataclass(frozen=True)
class ReplayResult:
    """What `replay` did: how many entries are due now, and which of the ids asked for were not
    replayed (unknown, already delivered, or ``replayed``: their message is queued again by
    ``wacored messages replay``, and the forwarder has it)."""

    replayed: int
    unknown: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"replayed": self.replayed, "unknown": self.unknown, "delivered": self.delivered, "queued": self.queued}


# An operator's replay is a new decision: due now, with a fresh retry budget.
_REPLAY = "UPDATE dead_letters SET state = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"


def replay(conn: OpsConnection, ids: Sequence[str | int], now: float) -> ReplayResult:
    """Make the dead letters named by `ids` (row ids or wamids) pending and due at `now`, in one
    transaction. Delivered entries are left alone and reported, like ids that match nothing."""
    replayed, unknown, delivered, queued = 0, [], [], []
    with conn.write():
        for ident in ids:
            column, value = _identify(ident)
            row = conn.execute(f"SELECT id, state FROM dead_letters WHERE {column} = ?", (value,)).fetchone()
            # The UPDATE checks the state again: on PostgreSQL the DLQ retrier may change the row
            # between the two statements (`connection` module docstring).
            if row is not None and row[1] in REPLAYABLE:
                cur = conn.execute(f"{_REPLAY} WHERE id = ? AND state IN (?, ?)", (now, now, row[0], *REPLAYABLE))
                if cur.rowcount:
                    replayed += 1
                    continue
                row = conn.execute("SELECT id, state FROM dead_letters WHERE id = ?", (row[0],)).fetchone()
            if row is None:
                unknown.append(str(ident))
            elif row[1] == "delivered":
                delivered.append(str(ident))
            else:
                queued.append(str(ident))  # replayed: the forwarder has its message, the retrier must not too
    return ReplayResult(replayed, unknown, delivered, queued)


def replay_all(conn: OpsConnection, now: float, *, state: str = "abandoned", service: str | None = None) -> int:
    """Make every dead letter in `state` (``abandoned`` or ``pending``), optionally of one
    `service`, pending and due at `now`; return how many."""
    if state not in REPLAYABLE:
        raise ValueError(f"state must be one of {', '.join(REPLAYABLE)}, got {state!r}")
    with conn.write():
        cur = conn.execute(
            f"{_REPLAY} WHERE state = ? AND (CAST(? AS TEXT) IS NULL OR service = ?)",
            (now, now, state, service, service),
        )
    return cur.rowcount


def purge(conn: OpsConnection, *, state: str, older_than_s: float, now: float) -> int:
    """Delete the dead letters in `state` (``delivered`` or ``abandoned``) last changed more than
    `older_than_s` seconds before `now`; return how many."""
    if state not in PURGEABLE:
        raise ValueError(f"state must be one of {', '.join(PURGEABLE)}, got {state!r}")
    if older_than_s < 0:
        raise ValueError("older_than must not be negative")
    with conn.write():
        cur = conn.execute(
            "DELETE FROM dead_letters WHERE state = ? AND COALESCE(updated_at, created_at) < ?",
            (state, now - older_than_s),
        )
    return cur.rowcount


def status(conn: OpsConnection, *, session_ttl_s: float, now: float, path: Path | str | None = None) -> dict[str, Any]:
    """What ``wacored status`` and ``GET /admin/status`` show: dead letters by state and the oldest
    pending one, sessions active (last interaction within `session_ttl_s`) and stale, undelivered
    messages per target, and each periodic actor's last and next run; `path` is shown as the
    database's (`connection.store_where`). One read transaction, so the figures are of one moment; it
    never blocks the daemon's writer."""
    with conn.read():
        return {
            "timestamp": iso(now),
            "database": {"path": None if path is None else str(path)},
            "dead_letters": _dead_letter_counts(conn, now),
            "sessions": _session_counts(conn, now - session_ttl_s),
            "queued": _queued(conn, now),
            "runs": _runs(conn),
        }


def _dead_letter_counts(conn: OpsConnection, now: float) -> dict[str, Any]:
    counts: dict[str, Any] = dict.fromkeys(DEAD_LETTER_STATES, 0)
    counts.update(conn.execute("SELECT state, COUNT(*) FROM dead_letters GROUP BY state").fetchall())
    oldest = conn.execute(
        "SELECT id, key, service, created_at FROM dead_letters WHERE state = 'pending' ORDER BY created_at, id LIMIT 1"
    ).fetchone()
    counts["oldest_pending"] = (
        None
        if oldest is None
        else {
            "id": oldest[0],
            "message_id": oldest[1],
            "service": oldest[2],
            "created_at": iso(oldest[3]),
            "age_s": round(now - oldest[3], 1),
        }
    )
    return counts


def _session_counts(conn: OpsConnection, live_after: float) -> dict[str, int]:
    active, total = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN last_interaction > ? THEN 1 ELSE 0 END), 0), COUNT(*) FROM sessions",
        (live_after,),
    ).fetchone()
    return {"active": int(active), "stale": int(total - active)}


def _queued(conn: OpsConnection, now: float) -> dict[str, dict[str, Any]]:
    return {
        target: {"count": count, "oldest_received_at": iso(oldest), "age_s": round(now - oldest, 1)}
        for target, (count, oldest) in conn.queued_by_target().items()
    }


def _runs(conn: OpsConnection) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {
        actor: {"last_run": None, "next_run": None, "result": None} for actor in PERIODIC_ACTORS
    }
    # A schema v1 database (an older daemon still running) has no runs table: nothing ran yet.
    if not conn.has_table("runs"):
        return runs
    for actor, last_run, next_run, result in conn.execute(
        "SELECT actor, last_run, next_run, result FROM runs ORDER BY actor"
    ):
        runs[actor] = {"last_run": iso(last_run), "next_run": iso(next_run), "result": result}
    return runs


_DLQ_COLUMNS = (
    "id",
    "message_id",
    "service",
    "state",
    "reason",
    "attempts",
    "retries",
    "next_attempt_at",
    "created_at",
    "error",
)


def dead_letter_table(entries: list[dict[str, Any]]) -> str:
    """`dlq list` for a person: one aligned line per entry of `DeadLetter.to_json`, the error last and
    whole (it is bounded where it is made: a status and a 200-character excerpt), so the cause of a
    failure is never hidden."""
    if not entries:
        return "no dead letters"
    rows = [[c.upper() for c in _DLQ_COLUMNS]] + [[_cell(e[c]) for c in _DLQ_COLUMNS] for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_DLQ_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _cell(value: object) -> str:
    return "-" if value is None else " ".join(str(value).split())


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def status_text(report: dict[str, Any]) -> str:
    """`wacored status` for a person, from what `status` returned."""
    dl, sessions = report["dead_letters"], report["sessions"]
    lines = [
        f"store         {report['database']['path']} at {report['timestamp']}",
        f"dead letters  pending {dl['pending']}, abandoned {dl['abandoned']}, delivered {dl['delivered']}"
        + (f", replayed {dl['replayed']}" if dl["replayed"] else ""),
    ]
    if (oldest := dl["oldest_pending"]) is not None:
        lines.append(
            f"  oldest pending: id {oldest['id']} ({oldest['message_id']}, {oldest['service']}),"
            f" created {_ago(oldest['age_s'])}"
        )
    lines.append(f"sessions      active {sessions['active']}, stale {sessions['stale']}")
    lines.append("queued        " + ("none" if not report["queued"] else ""))
    for target, q in report["queued"].items():
        lines.append(f"  {target}: {q['count']} (oldest received {_ago(q['age_s'])})")
    lines.append("periodic runs")
    for actor, run in report["runs"].items():
        result = f" ({run['result']})" if run["result"] else ""
        lines.append(f"  {actor}: last {run['last_run'] or 'never'}{result}, next {run['next_run'] or 'never'}")
    if (daemon := report.get("daemon")) is not None:
        lines += daemon_lines(daemon)
    return "\n".join(line.rstrip() for line in lines)


def daemon_lines(daemon: dict[str, Any]) -> list[str]:
    """The running daemon's workers (from its /health), or why it could not be asked."""
    if "error" in daemon:
        return [f"daemon        {daemon['url']}: {daemon['error']}"]
    workers = daemon.get("workers") or []
    lines = [f"daemon        {daemon['url']}: {daemon.get('status')}, {len(workers)} worker(s)"]
    for w in workers:
        if w.get("status") == "down":
            lines.append(f"  worker {w.get('index')}: down (not answering)")
            continue
        lines.append(
            f"  worker {w.get('index')}: pid {w.get('pid')} ({w.get('node')}), {w.get('status')},"
            f" {'ready' if w.get('ready') else 'not ready'}, since {w.get('started_at')}, restarts {w.get('restarts')}"
        )
        runs = ", ".join(w.get("singletons") or []) or "-"
        lines.append(f"    lanes held: {_lanes_text(w.get('lanes_held') or [])}; runs: {runs}")
    return lines


def _lanes_text(leases: list[str]) -> str:
    """``rides 0-3, jobs 1`` for the lane leases ``lane:rides:0`` .. ``lane:rides:3``, ``lane:jobs:1``."""
    by_target: dict[str, list[int]] = {}
    for name in leases:
        target, _, lane = str(name).removeprefix("lane:").rpartition(":")
        if target and lane.isdigit():
            by_target.setdefault(target, []).append(int(lane))
    if not by_target:
        return "none"
    return ", ".join(f"{target} {_ranges(sorted(lanes))}" for target, lanes in sorted(by_target.items()))


def _ranges(numbers: list[int]) -> str:
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _identify(ident: str | int) -> tuple[str, str | int]:
    """The column naming a dead letter: digits are a row id, anything else a wamid."""
    if isinstance(ident, int) or ident.strip().isdigit():
        return "id", int(ident)
    return "key", ident.strip()

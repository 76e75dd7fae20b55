"""What an operator asks about messages: where one went (`show`), which ones came (`list_messages`),
and sending some again (`plan_replay`, `plan_matching`, `requeue`).

Shared by the CLI (``wacored messages show|list|replay``) and the admin API (``/admin/messages``), on
an `connection.OpsConnection` (SQLite or PostgreSQL, the same SQL), synchronous (the admin API calls
them from a worker thread), safe while the daemon runs: reads never block its writer, and a replay
writes in short transactions (`OpsConnection.write`) of at most `BATCH` messages.

A message is named by its key: the wamid, or ``status:<id>:<status>`` for a forwarded status update.
In what these functions return, ``message_id`` is that key and ``id`` the ``messages`` row; times are
ISO-8601 UTC strings (attempts to the millisecond).

Replay: a message is queued again (``state = 'queued'``), with the same key and so the same
``Idempotency-Key``; the lane that holds it, on whichever process, reads it at its next wake (its
idle heartbeat, or at once when this process's admin API replays) and delivers it with a fresh retry
budget. Its dead
letter, if it has one, is kept but becomes ``replayed`` (the DLQ retrier only takes ``pending``
entries, so the message is not sent twice at once); when that delivery ends the entry becomes
``delivered``, or ``pending``/``abandoned`` again with a fresh retry budget (`store.WriteConnection.record`).
A replayed message may reach its service after newer messages of the same sender.
Only a message that was forwarded (``delivered``, ``dead_lettered``) is replayed: a probe (`probe.py`)
or an ``unrouted`` message has nowhere it must go, and named by its key it is reported unknown.

Error handling:
    `ValueError` for a selection that is not valid (a bad time, state, kind or limit): the CLI says so
    and exits 2, the admin API answers 400. The driver's errors propagate (see `operations`).

Cancellation:
    Nothing here awaits; a replay cut short (the process killed) has committed whole batches only, and
    a batch replayed is queued however the caller ends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .connection import OpsConnection
from .operations import iso, list_dead_letters_of, parse_duration

MESSAGE_STATES = ("queued", "delivered", "dead_lettered", "probe")
FORWARDED = ("delivered", "dead_lettered")
"""The states a replay takes a message from: it was forwarded once (a probe or an ``unrouted`` message
never is, and a bulk replay after an outage must not send verify.sh's probes to a service)."""
DEAD_LETTER_FILTERS = ("pending", "abandoned", "replayed")
"""States of a message's dead letter a selection may name: dead-lettered messages whose entry is so."""
STATE_FILTERS = MESSAGE_STATES + DEAD_LETTER_FILTERS
REPLAY_STATES = ("delivered", "dead_lettered", "pending", "abandoned")
"""What a replay may select: a queued message is already waiting, a replayed one already queued."""
KINDS = ("message", "status")
DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
BATCH = 500
"""Messages per replay transaction: short, so the daemon's writer never waits long for the lock."""


@dataclass(frozen=True)
class Selection:
    """Which messages: received in [`since`, `until`), of `service`, `state` and `kind` (None: any),
    at most `limit` of them (listing only; a replay takes every match)."""

    since: float | None = None
    until: float | None = None
    service: str | None = None
    state: str | None = None
    kind: str | None = None
    limit: int = DEFAULT_LIMIT


def parse_time(text: str, now: float) -> float:
    """An ISO-8601 time (UTC when it names no zone) or a duration back from `now` (``2h``, ``7d``), as
    epoch seconds; `ValueError` for anything else."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (expected ISO-8601, e.g. 2026-01-02T03:04:05Z, or 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def selection(
    now: float,
    *,
    since: str | None = None,
    until: str | None = None,
    service: str | None = None,
    state: str | None = None,
    kind: str | None = None,
    limit: int | str | None = None,
    states: Sequence[str] = STATE_FILTERS,
) -> Selection:
    """A checked `Selection` from what an operator typed (times as `parse_time` reads them)."""
    if state is not None and state not in states:
        raise ValueError(f"state must be one of {', '.join(states)}, got {state!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    count = DEFAULT_LIMIT if limit is None else _limit(limit)
    start = None if since is None else parse_time(since, now)
    end = None if until is None else parse_time(until, now)
    if start is not None and end is not None and end <= start:
        raise ValueError("until must be later than since")
    return Selection(start, end, service or None, state, kind, count)


def _limit(value: int | str) -> int:
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {value!r}")
    return int(text)


def _where(sel: Selection) -> tuple[str, list[Any]]:
    clauses, params = ["TRUE"], []
    for clause, value in (
        ("m.received_at >= ?", sel.since),
        ("m.received_at < ?", sel.until),
        ("m.service = ?", sel.service),
        ("m.kind = ?", sel.kind),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    if sel.state in MESSAGE_STATES:
        clauses.append("m.state = ?")
        params.append(sel.state)
    elif sel.state is not None:
        clauses.append("EXISTS (SELECT 1 FROM dead_letters AS d WHERE d.message_id = m.id AND d.state = ?)")
        params.append(sel.state)
    return " AND ".join(clauses), params


_SUMMARY = (
    "SELECT m.id, m.key, m.kind, m.service, m.reason, m.target, m.state, m.received_at, m.done_at,"
    " (SELECT COUNT(*) FROM attempts AS a WHERE a.message_id = m.id) FROM messages AS m"
)


def _summary(row: Sequence[Any]) -> dict[str, Any]:
    mid, key, kind, service, reason, target, state, received_at, done_at, attempts = row
    return {
        "id": mid,
        "message_id": key,
        "kind": kind,
        "service": service,
        "reason": reason,
        "target": target,
        "state": state,
        "received_at": iso(received_at),
        "done_at": iso(done_at),
        "attempts": attempts,
    }


def list_messages(conn: OpsConnection, sel: Selection) -> list[dict[str, Any]]:
    """The messages `sel` selects, newest first, at most `sel.limit`."""
    where, params = _where(sel)
    rows = conn.execute(
        f"{_SUMMARY} WHERE {where} ORDER BY m.received_at DESC, m.id DESC LIMIT ?", (*params, sel.limit)
    ).fetchall()
    return [_summary(r) for r in rows]


def show(conn: OpsConnection, key: str) -> dict[str, Any] | None:
    """Where the message of `key` went: its route, state, every attempt (oldest first) and its dead
    letter (None when none). A key both a message and a status update carry shows the message. None
    when there is no such message."""
    with conn.read():  # the attempts and the state of one moment
        row = conn.execute(f"{_SUMMARY} WHERE m.key = ? ORDER BY m.kind LIMIT 1", (key,)).fetchone()
        if row is None:
            return None
        report = _summary(row)
        report["attempts"] = [
            _attempt(a)
            for a in conn.execute(
                "SELECT number, kind, service, started_at, duration_ms, status_code, error, node FROM attempts"
                " WHERE message_id = ? ORDER BY id",
                (report["id"],),
            )
        ]
        dead = list_dead_letters_of(conn, report["id"])
        report["dead_letter"] = dead.to_json() if dead is not None else None
        return report


def _attempt(row: Sequence[Any]) -> dict[str, Any]:
    number, kind, service, started_at, duration_ms, status_code, error, node = row
    return {
        "number": number,
        "kind": kind,
        "service": service,
        "started_at": iso(started_at, "milliseconds"),
        "duration_ms": duration_ms,
        "status_code": status_code,
        "error": error,
        "node": node,
    }


@dataclass(frozen=True)
class ReplayPlan:
    """The rows a replay would queue again, and the keys asked for that it would not: unknown, or
    already queued (waiting to be delivered)."""

    ids: list[int]
    unknown: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)


def plan_replay(conn: OpsConnection, keys: Sequence[str]) -> ReplayPlan:
    """The messages named by `keys` (a key both a message and a status carry names both)."""
    ids: list[int] = []
    unknown: list[str] = []
    queued: list[str] = []
    for key in dict.fromkeys(keys):
        found = conn.execute(
            "SELECT id, state FROM messages WHERE key = ? AND state IN (?, ?, ?) ORDER BY id",
            (key, "queued", *FORWARDED),
        ).fetchall()
        if not found:
            unknown.append(key)
        elif all(state == "queued" for _, state in found):
            queued.append(key)
        ids.extend(mid for mid, state in found if state != "queued")
    return ReplayPlan(ids, unknown, queued)


def plan_matching(conn: OpsConnection, sel: Selection) -> ReplayPlan:
    """Every message `sel` selects that is not queued already (no limit), oldest first."""
    where, params = _where(sel)
    rows = conn.execute(
        f"SELECT m.id FROM messages AS m WHERE {where} AND m.state IN (?, ?) ORDER BY m.id", [*params, *FORWARDED]
    ).fetchall()
    return ReplayPlan([r[0] for r in rows])


def requeue(conn: OpsConnection, ids: Sequence[int], now: float) -> int:
    """Queue the messages of `ids` again (those not queued meanwhile), their dead letters ``replayed``,
    `BATCH` per transaction; how many were queued."""
    count = 0
    for start in range(0, len(ids), BATCH):
        with conn.write():
            for mid in ids[start : start + BATCH]:
                cur = conn.execute(
                    "UPDATE messages SET state = 'queued', done_at = NULL WHERE id = ? AND state IN (?, ?)",
                    (mid, *FORWARDED),
                )
                if cur.rowcount:
                    count += 1
                    conn.execute(
                        "UPDATE dead_letters SET state = 'replayed', updated_at = ? WHERE message_id = ?", (now, mid)
                    )
    return count


@dataclass(frozen=True)
class ReplayResult:
    replayed: int
    unknown: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"replayed": self.replayed, "unknown": self.unknown, "queued": self.queued}


def replay(conn: OpsConnection, plan: ReplayPlan, now: float) -> ReplayResult:
    """Carry out `plan`."""
    return ReplayResult(requeue(conn, plan.ids, now), plan.unknown, plan.queued)


_LIST_COLUMNS = ("id", "message_id", "kind", "service", "reason", "state", "received_at", "attempts")


def message_table(entries: list[dict[str, Any]]) -> str:
    """`messages list` for a person: one aligned line per message."""
    if not entries:
        return "no messages"
    rows = [[c.upper() for c in _LIST_COLUMNS]] + [[_cell(e[c]) for c in _LIST_COLUMNS] for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_LIST_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def show_text(report: dict[str, Any]) -> str:
    """`messages show` for a person, from what `show` returned."""
    lines = [
        f"message     {report['message_id']} (row {report['id']}, {report['kind']})",
        f"route       {report['service']} ({report['reason']}), target {report['target']}",
        f"state       {report['state']}",
        f"received    {report['received_at']}" + (f", done {report['done_at']}" if report["done_at"] else ""),
        f"attempts    {len(report['attempts']) or 'none'}",
    ]
    for a in report["attempts"]:
        result = a["error"] or f"HTTP {a['status_code']}"
        lines.append(
            f"  #{a['number']} {a['kind']:<9} {a['started_at']}  {a['duration_ms']:.1f} ms  {result}  ({a['node']})"
        )
    dead = report["dead_letter"]
    if dead is None:
        lines.append("dead letter none")
    else:
        lines.append(
            f"dead letter id {dead['id']}: {dead['state']} ({dead['reason']}), {dead['attempts']}"
            f" retries, next {dead['next_attempt_at'] or '-'}: {_cell(dead['error'])}"
        )
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    return "-" if value is None else " ".join(str(value).split())

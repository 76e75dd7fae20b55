"""Paused services: an operator's decision to hold a service's deliveries (pure checks, and the
``service_pauses`` table's queries).

A paused service's messages stay ``queued``: its lanes attempt nothing and dead-letter nothing, its
breaker is untouched, and the DLQ retrier reschedules its dead letters without counting an attempt.
On resume everything queued goes out in order. A pause is a row of ``service_pauses`` (schema v5),
so it survives restarts and config reloads, and the CLI can set one while the daemon runs; the
daemon's in-memory view of the table is `pausewatch.PauseBoard`.

Only configured services can be paused. The Graph API sender (``whatsapp``) is not a service: it
carries wacored's own replies (the home menu), which nobody downstream is waiting to take over, so
pausing it is refused. A pause left behind by a service since removed from the config can still be
resumed (so that a service added again later does not come back paused by surprise).

The queries are synchronous, on an `connection.OpsConnection` (SQLite or PostgreSQL, the same SQL;
the CLI calls them directly, the admin API from a worker thread); each write is one short
transaction (`OpsConnection.write`), safe while the daemon runs: its pause watcher reads the table
of either store.

Error handling::

    operations.OperationsError
     └── PauseRefused        the request cannot be done as asked
          ├── UnknownService  not a configured service (admin API: 404)
          └── BadPause        the Graph API sender, or a reason that is not short printable text (400)
    sqlite3.Error           what SQLite refuses (a lock held past the busy timeout)
    psycopg.Error           what PostgreSQL refuses (down, ``lock_timeout``)

Cancellation:
    Nothing here awaits; the admin API runs these in a worker thread, which finishes its short
    transaction even when the request is cancelled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import GRAPH_SENDER
from .connection import OpsConnection
from .operations import OperationsError, iso

POLL_S = 1.0
"""How often the running daemon re-reads the table (`pausewatch`): how long a pause or resume written
by the CLI takes to be in force."""
MAX_REASON = 200
"""Characters of a pause's reason at most: a note for the next operator, not a document."""


class PauseRefused(OperationsError):
    """A pause or resume that cannot be done as asked."""


class UnknownService(PauseRefused):
    """The name is not a configured service (nor, for a resume, a paused one)."""


class BadPause(PauseRefused):
    """The Graph API sender, or a reason that is not short printable text."""


@dataclass(frozen=True)
class Pause:
    """One paused service: since when (wall clock) and why."""

    since: float
    reason: str = ""


def may_attempt(name: str, paused: Mapping[str, Pause]) -> bool:
    """May a delivery to target `name` be attempted now, as far as pauses go? (The breaker decides
    the rest.)"""
    return name not in paused


def paused_seconds(pause: Pause | None, now: float) -> float:
    """How long `pause` has lasted at `now` (0 when not paused; never negative: clocks step)."""
    return 0.0 if pause is None else max(0.0, now - pause.since)


def reason_problem(reason: object) -> str | None:
    """Why `reason` cannot be a pause's reason, or None when it can."""
    if not isinstance(reason, str):
        return "reason must be a string"
    if len(reason) > MAX_REASON:
        return f"reason must be at most {MAX_REASON} characters"
    # It reaches /health, logs and the admin API: one printable line, never a control character.
    if not reason.isprintable():
        return "reason must be printable text on one line"
    return None


def check_pause(name: str, services: Collection[str], reason: object) -> None:
    """Raise `PauseRefused` unless service `name` may be paused with `reason`."""
    if name == GRAPH_SENDER:
        raise BadPause(
            f"{GRAPH_SENDER!r} is the Graph API sender (wacored's own replies), not a service: it cannot be paused"
        )
    if name not in services:
        raise UnknownService(f"unknown service {name!r}")
    if (problem := reason_problem(reason)) is not None:
        raise BadPause(problem)


def read_pauses(conn: OpsConnection) -> dict[str, Pause]:
    """Every paused service, as the table has it now."""
    return {
        str(service): Pause(float(at), str(reason))
        for service, at, reason in conn.execute(
            "SELECT service, paused_at, reason FROM service_pauses ORDER BY service"
        )
    }


def pause(conn: OpsConnection, name: str, *, services: Collection[str], reason: str, now: float) -> bool:
    """Pause service `name` from `now`; False when it was already paused (its start time and reason
    are kept: the pause began then)."""
    check_pause(name, services, reason)
    with conn.write():
        cur = conn.execute(
            "INSERT INTO service_pauses (service, paused_at, reason) VALUES (?,?,?) ON CONFLICT(service) DO NOTHING",
            (name, now, reason),
        )
    return cur.rowcount == 1


def resume(conn: OpsConnection, name: str, *, services: Collection[str]) -> bool:
    """Resume service `name`; False when it was not paused. A name neither configured nor paused
    raises `UnknownService`."""
    with conn.write():
        cur = conn.execute("DELETE FROM service_pauses WHERE service = ?", (name,))
    if cur.rowcount == 0 and name not in services:
        raise UnknownService(f"unknown service {name!r}")
    return cur.rowcount == 1


def service_state(name: str, pause: Pause | None) -> dict[str, Any]:
    """One service's pause as the CLI and the admin API show it."""
    return {
        "service": name,
        "paused": pause is not None,
        "paused_since": None if pause is None else iso(pause.since),
        "pause_reason": None if pause is None else pause.reason,
    }


def list_services(conn: OpsConnection, services: Collection[str]) -> list[dict[str, Any]]:
    """Every configured service, and any paused one no longer configured, by name: paused or not,
    since when, why, and how many messages wait for it. One read transaction."""
    with conn.read():
        paused = read_pauses(conn)
        queued = {target: count for target, (count, _) in conn.queued_by_target().items()}
    return [
        {**service_state(name, paused.get(name)), "queued": queued.get(name, 0)}
        for name in sorted({*services, *paused})
    ]


def services_table(entries: list[dict[str, Any]]) -> str:
    """`services list` for a person: one aligned line per service."""
    if not entries:
        return "no services"
    rows = [["SERVICE", "STATE", "QUEUED", "SINCE", "REASON"]] + [
        [
            e["service"],
            "paused" if e["paused"] else "running",
            str(e["queued"]),
            e["paused_since"] or "-",
            e["pause_reason"] or "-",
        ]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)

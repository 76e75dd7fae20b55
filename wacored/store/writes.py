"""The write statements both stores run as written: outcomes and dead letters, retries, runs, and the
session changes of an ingest.

One SQL text per operation, with SQLite's ``?`` placeholders and nothing PostgreSQL would read
otherwise (an upsert is ``ON CONFLICT ... DO UPDATE``, a text parameter compared with a literal is
cast); the PostgreSQL write connection translates the placeholders (`postgres.qmark`). Each store's
write connection derives from `SharedWrites` and says how it runs one statement (`_sql`).

Error handling: the driver's error propagates (`interface.STORE_ERRORS`); the writer rolls the
transaction back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Protocol

from ..core.routing import SessionAction
from ..core.sessions import SessionChange
from .rows import AttemptRow, NewRow, Outcome, Retried

MESSAGE_COLUMNS = (
    "key, kind, sender, service, reason, target, body, request_id, correlation_id, traceparent, received_at,"
    " number, state, lane"
)
"""The columns of a new ``messages`` row, in the order of `message_values` (each store adds its own
way of skipping a duplicate and of reading the new id)."""
MESSAGE_PLACEHOLDERS = ",".join("?" * (MESSAGE_COLUMNS.count(",") + 1))


def message_values(r: NewRow) -> tuple[object, ...]:
    return (
        r.key,
        r.kind,
        r.sender,
        r.service,
        r.reason,
        r.target,
        r.body,
        r.request_id,
        r.correlation_id,
        r.traceparent,
        r.received_at,
        r.number,
        r.initial_state,
        r.lane,
    )


INSERT_ATTEMPT = (
    "INSERT INTO attempts (message_id, service, number, kind, started_at, duration_ms, status_code, error, node)"
    " VALUES (?,?,?,?,?,?,?,?,?)"
)


def attempt_values(a: AttemptRow) -> tuple[object, ...]:
    return (
        a.message_id,
        a.service,
        a.number,
        a.kind,
        a.started_at,
        round(a.duration_s * 1000, 3),
        a.status_code,
        a.error,
        a.node,
    )


class Counted(Protocol):
    """What a statement's result tells here: how many rows it changed."""

    @property
    def rowcount(self) -> int: ...


class SharedWrites(ABC):
    """The write operations whose SQL is the same on every store (see the module docstring)."""

    @abstractmethod
    def _sql(self, sql: str, params: Sequence[object] = ()) -> Counted:
        """Run one statement (``?`` placeholders) inside the open transaction."""

    def apply_changes(self, ids: Sequence[int | None], changes: Iterable[tuple[int, SessionChange]]) -> None:
        """The session changes of the rows that were inserted (`ids[i]` not None); `changes` pairs a
        row index with its change. A redelivered message changes no session."""
        for index, change in changes:
            if ids[index] is None:
                continue
            if change.action is SessionAction.END:
                self._sql("DELETE FROM sessions WHERE number = ? AND sender = ?", (change.number, change.sender))
            elif change.action is SessionAction.START:
                self._sql(
                    "INSERT INTO sessions (number, sender, service, started_at, last_interaction) VALUES (?,?,?,?,?)"
                    " ON CONFLICT (number, sender) DO UPDATE SET service = excluded.service,"
                    " started_at = excluded.started_at, last_interaction = excluded.last_interaction",
                    (change.number, change.sender, change.service, change.at, change.at),
                )
            elif change.action is SessionAction.TOUCH:
                self._sql(
                    "UPDATE sessions SET last_interaction = ? WHERE number = ? AND sender = ?",
                    (change.at, change.number, change.sender),
                )

    def record(self, outcome: Outcome) -> None:
        """Mark a message delivered, or dead-letter it (one dead letter per message, updated in place),
        and log its attempts."""
        for a in outcome.tries:
            self._sql(INSERT_ATTEMPT, attempt_values(a))
        state = "delivered" if outcome.delivered else "dead_lettered"
        self._sql(
            "UPDATE messages SET state = ?, attempts = attempts + ?, done_at = ? WHERE id = ?",
            (state, outcome.attempts, outcome.at, outcome.message_id),
        )
        if outcome.delivered:
            # A replayed message's dead letter ends with the delivery (an index probe; nothing to
            # change for almost every message).
            self._sql(
                "UPDATE dead_letters SET state = 'delivered', updated_at = ?"
                " WHERE message_id = ? AND state = 'replayed'",
                (outcome.at, outcome.message_id),
            )
            return
        self._sql(
            "INSERT INTO dead_letters (message_id, key, service, state, reason, error, status_code,"
            " attempts, next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            # Dead-lettered again (delivered twice after a crash): the entry keeps its retries made,
            # and one that is already final stays final, so nothing is ever retried without end.
            # A replayed entry is different: its message was queued again by an operator, and this
            # is that delivery's end, so the entry starts over (a fresh retry budget).
            " ON CONFLICT (message_id) DO UPDATE SET error = excluded.error, status_code = excluded.status_code,"
            " updated_at = excluded.updated_at,"
            " state = CASE WHEN dead_letters.state = 'replayed' THEN excluded.state ELSE dead_letters.state END,"
            " reason = CASE WHEN dead_letters.state = 'replayed' THEN excluded.reason ELSE dead_letters.reason END,"
            " attempts = CASE WHEN dead_letters.state = 'replayed' THEN 0 ELSE dead_letters.attempts END,"
            " next_attempt_at = CASE WHEN dead_letters.state = 'replayed' THEN excluded.next_attempt_at"
            " ELSE dead_letters.next_attempt_at END"
            " WHERE dead_letters.state IN ('pending', 'replayed')",
            (
                outcome.message_id,
                outcome.key,
                outcome.target,
                "abandoned" if outcome.permanent else "pending",
                outcome.reason,
                outcome.error,
                outcome.status_code,
                0,
                None if outcome.permanent else outcome.retry_at,
                outcome.at,
                outcome.at,
            ),
        )

    def retried(self, r: Retried) -> None:
        """Apply one retry's result to its dead letter, and to its message: one attempt more when it
        counted, and delivered once it is.

        Only a ``pending`` entry changes: an operator may have purged or replayed it meanwhile. The
        attempt made is logged whatever became of the entry.
        """
        if r.attempt is not None:
            self._sql(INSERT_ATTEMPT, attempt_values(r.attempt))
        cur = self._sql(
            "UPDATE dead_letters SET state = ?, attempts = attempts + ?, next_attempt_at = ?,"
            " error = CASE WHEN CAST(? AS TEXT) = '' THEN error ELSE ? END, status_code = COALESCE(?, status_code),"
            " reason = COALESCE(?, reason), updated_at = ? WHERE id = ? AND state = 'pending'",
            (
                r.state,
                1 if r.counted else 0,
                r.next_attempt_at,
                r.error,
                r.error,
                r.status_code,
                r.reason,
                r.at,
                r.dead_letter_id,
            ),
        )
        if cur.rowcount != 1:
            return
        if r.counted:
            # The message's `attempts` is every attempt made, first delivery and retries alike.
            self._sql("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", (r.message_id,))
        if r.state == "delivered":
            self._sql("UPDATE messages SET state = 'delivered', done_at = ? WHERE id = ?", (r.at, r.message_id))

    def plan_run(self, actor: str, next_run: float) -> None:
        """Record when `actor` runs next (keeping its last run), so `wacored status` says what /health
        says before the first run too."""
        self._sql(
            "INSERT INTO runs (actor, last_run, next_run, result) VALUES (?, NULL, ?, '')"
            " ON CONFLICT (actor) DO UPDATE SET next_run = excluded.next_run",
            (actor, next_run),
        )

    def record_run(self, actor: str, last_run: float, next_run: float | None, result: str) -> None:
        self._sql(
            "INSERT INTO runs (actor, last_run, next_run, result) VALUES (?,?,?,?) ON CONFLICT (actor)"
            " DO UPDATE SET last_run = excluded.last_run, next_run = excluded.next_run, result = excluded.result",
            (actor, last_run, next_run, result),
        )

"""Sender sessions: which service a sender is in, kept in memory in front of the SQLite table.

A session belongs to a (business number, sender) pair: a user writing to two of the business's
numbers has two independent sessions. The number is a number key (`numbers.py`; ``""`` is the
default number, and the default of every argument here, so one-number callers need not name it).

The daemon is the only writer of the ``sessions`` table, so the in-memory view loaded at start-up
and updated after every commit is exact; SQLite stays the durable copy. A session idle longer than
the TTL is treated as absent whether or not the reaper has deleted it yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .routing import SessionAction


@dataclass(frozen=True)
class SessionChange:
    """A session write decided by routing; applied to SQLite and memory only once committed."""

    sender: str
    action: SessionAction
    service: str
    at: float
    number: str = ""
    """The business number (key) the session is with."""

    @property
    def who(self) -> SessionKey:
        return session_key(self.number, self.sender)


SessionKey = str | tuple[str, str]
"""The default number's sessions are keyed by the sender alone, other numbers' by (number, sender):
a tuple key costs ~60 bytes a session more, and a daemon loads every live session at start. Measured
with 1 M sessions (bench/prefill.py, peak RSS): 497 MB with a tuple key for every session, 414 MB
with this key, 268 MB once the rows are also streamed and the service names shared."""


def session_key(number: str, sender: str) -> SessionKey:
    return sender if not number else (number, sender)


class SessionTable:
    """(number, sender) -> (service, last interaction time), with TTL applied on read (`SessionKey`).

    `rows` are the default number's sessions, (sender, service, at); `numbered` every number's,
    (number, sender, service, at), as `store.Reader.all_sessions` reads them."""

    def __init__(
        self,
        ttl_s: float,
        rows: Iterable[tuple[str, str, float]] = (),
        *,
        numbered: Iterable[tuple[str, str, str, float]] = (),
    ) -> None:
        self.ttl_s = ttl_s
        # One str per service name, not one per session: the store hands each row a fresh copy
        # (~55 bytes x a million sessions).
        names: dict[str, str] = {}
        self._live: dict[SessionKey, tuple[str, float]] = {
            sender: (names.setdefault(svc, svc), at) for sender, svc, at in rows
        }
        self._live.update(
            {session_key(number, sender): (names.setdefault(svc, svc), at) for number, sender, svc, at in numbered}
        )

    def __len__(self) -> int:
        return len(self._live)

    def service_of(self, sender: str, now: float, number: str = "") -> str | None:
        entry = self._live.get(session_key(number, sender))
        if entry is None or now - entry[1] >= self.ttl_s:
            return None
        return entry[0]

    def active(self, now: float) -> int:
        return sum(1 for _, at in self._live.values() if now - at < self.ttl_s)

    def prune(self, now: float) -> int:
        """Forget sessions idle for the TTL or longer (the reaper deletes their rows); how many."""
        dead = [key for key, (_, at) in self._live.items() if now - at >= self.ttl_s]
        for key in dead:
            del self._live[key]
        return len(dead)

    def apply(self, change: SessionChange) -> None:
        if change.action is SessionAction.END:
            self._live.pop(change.who, None)
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._live[change.who] = (change.service, change.at)

    def overlay(self) -> SessionOverlay:
        return SessionOverlay(self)


class SessionOverlay:
    """Staged changes over a `SessionTable`, so the messages of one batch are routed in order."""

    def __init__(self, base: SessionTable) -> None:
        self._base = base
        self._staged: dict[SessionKey, str | None] = {}

    def service_of(self, sender: str, now: float, number: str = "") -> str | None:
        if (key := session_key(number, sender)) in self._staged:
            return self._staged[key]
        return self._base.service_of(sender, now, number)

    def apply(self, change: SessionChange) -> None:
        if change.action is SessionAction.END:
            self._staged[change.who] = None
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._staged[change.who] = change.service

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
    def who(self) -> tuple[str, str]:
        return (self.number, self.sender)


class SessionTable:
    """(number, sender) -> (service, last interaction time), with TTL applied on read.

    `rows` are the default number's sessions, (sender, service, at); `numbered` every number's,
    (number, sender, service, at), as `store.Reader.all_sessions` reads them."""

    def __init__(self, ttl_s: float, rows: Iterable[tuple[str, str, float]] = (), *,
                 numbered: Iterable[tuple[str, str, str, float]] = ()) -> None:
        self.ttl_s = ttl_s
        self._live: dict[tuple[str, str], tuple[str, float]] = {("", sender): (svc, at) for sender, svc, at in rows}
        self._live.update({(number, sender): (svc, at) for number, sender, svc, at in numbered})

    def __len__(self) -> int:
        return len(self._live)

    def service_of(self, sender: str, now: float, number: str = "") -> str | None:
        entry = self._live.get((number, sender))
        if entry is None or now - entry[1] >= self.ttl_s:
            return None
        return entry[0]

    def active(self, now: float) -> int:
        return sum(1 for _, at in self._live.values() if now - at < self.ttl_s)

    def prune(self, now: float) -> int:
        """Forget sessions idle for the TTL or longer (the reaper deletes their rows); how many."""
        dead = [sender for sender, (_, at) in self._live.items() if now - at >= self.ttl_s]
        for sender in dead:
            del self._live[sender]
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
        self._staged: dict[tuple[str, str], str | None] = {}

    def service_of(self, sender: str, now: float, number: str = "") -> str | None:
        if (number, sender) in self._staged:
            return self._staged[(number, sender)]
        return self._base.service_of(sender, now, number)

    def apply(self, change: SessionChange) -> None:
        if change.action is SessionAction.END:
            self._staged[change.who] = None
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._staged[change.who] = change.service

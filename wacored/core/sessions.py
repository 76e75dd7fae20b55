"""Sender sessions: which service a sender is in, read from the store through a bounded cache.

A session belongs to a (business number, sender) pair: a user writing to two of the business's
numbers has two independent sessions. The number is a number key (`numbers.py`; ``""`` is the
default number, and the default of every argument here, so one-number callers need not name it).

The store's ``sessions`` table is the only copy that counts: several processes may share it, so
nothing here is loaded at start-up. Routing reads sessions through a `SessionLookup` (the writer's,
inside its transaction: `wacored.ingest.StoreSessions`); `SessionCache` is the bounded LRU it keeps
in front of the table. A session idle as long as the TTL or longer is treated as absent whether or
not the reaper has deleted it yet (`live_service`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from .routing import SessionAction

Session = tuple[str, float]
"""A stored session: (service, last interaction time)."""


@dataclass(frozen=True)
class SessionChange:
    """A session write decided by routing; applied to the store (and the cache) with its row."""

    sender: str
    action: SessionAction
    service: str
    at: float
    number: str = ""
    """The business number (key) the session is with."""

    @property
    def who(self) -> tuple[str, str]:
        return (self.number, self.sender)


class SessionLookup(Protocol):
    """Where routing reads the stored sessions from (the store through its cache; a dict in tests)."""

    def get(self, number: str, sender: str) -> Session | None:
        """The stored session of (number, sender), expired or not; None when there is none."""
        ...


def live_service(session: Session | None, now: float, ttl_s: float) -> str | None:
    """The session's service, or None when there is none or it has been idle for the TTL."""
    if session is None or now - session[1] >= ttl_s:
        return None
    return session[0]


class SessionOverlay:
    """Staged changes over a `SessionLookup`, so the messages of one batch are routed in order."""

    def __init__(self, base: SessionLookup, ttl_s: float) -> None:
        self._base = base
        self.ttl_s = ttl_s
        self._staged: dict[tuple[str, str], str | None] = {}

    def service_of(self, sender: str, now: float, number: str = "") -> str | None:
        if (key := (number, sender)) in self._staged:
            return self._staged[key]
        return live_service(self._base.get(number, sender), now, self.ttl_s)

    def apply(self, change: SessionChange) -> None:
        if change.action is SessionAction.END:
            self._staged[change.who] = None
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._staged[change.who] = change.service


class Miss(Enum):
    """`SessionCache.get`'s answer when the cache does not know (distinct from a known absence)."""

    MISS = "miss"


class SessionCache:
    """A bounded LRU of stored sessions, (number, sender) -> session or None (known to have none).

    Holds what its owner read from or wrote to the store; the owner clears it whenever the store may
    have changed under it (another process committed; a transaction was rolled back). At most `size`
    entries: the least recently used goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], Session | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, number: str, sender: str) -> Session | None | Miss:
        key = (number, sender)
        try:
            entry = self._entries[key]
        except KeyError:
            return Miss.MISS
        self._entries.move_to_end(key)
        return entry

    def put(self, number: str, sender: str, session: Session | None) -> None:
        key = (number, sender)
        self._entries[key] = session
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

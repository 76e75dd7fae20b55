"""Sender sessions: which service a sender is in, kept in memory in front of the SQLite table.

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


class SessionTable:
    """Sender -> (service, last interaction time), with TTL applied on read."""

    def __init__(self, ttl_s: float, rows: Iterable[tuple[str, str, float]] = ()) -> None:
        self.ttl_s = ttl_s
        self._live: dict[str, tuple[str, float]] = {sender: (svc, at) for sender, svc, at in rows}

    def __len__(self) -> int:
        return len(self._live)

    def service_of(self, sender: str, now: float) -> str | None:
        entry = self._live.get(sender)
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
            self._live.pop(change.sender, None)
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._live[change.sender] = (change.service, change.at)

    def overlay(self) -> SessionOverlay:
        return SessionOverlay(self)


class SessionOverlay:
    """Staged changes over a `SessionTable`, so the messages of one batch are routed in order."""

    def __init__(self, base: SessionTable) -> None:
        self._base = base
        self._staged: dict[str, str | None] = {}

    def service_of(self, sender: str, now: float) -> str | None:
        if sender in self._staged:
            return self._staged[sender]
        return self._base.service_of(sender, now)

    def apply(self, change: SessionChange) -> None:
        if change.action is SessionAction.END:
            self._staged[change.sender] = None
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            self._staged[change.sender] = change.service

"""Per-sender rate limit over a sliding window, without I/O (callers pass `now`).

A "sender" is any hashable key: the daemon limits each (business number, sender) pair apart, so a
user writing to two of the business's numbers has a window with each.

At most `limit` messages per sender in any `window_s` seconds. A POST is admitted or refused whole:
`admit` records every message of an admitted POST (duplicates included) and records nothing for a
refused one, so Meta's redelivery of a refused POST is not counted twice. One exception keeps a
batch from being refused forever: a POST with more than `limit` messages from one sender is admitted
when that sender's window is empty.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SlidingWindowLimiter(Generic[K]):
    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._hits: dict[K, deque[float]] = {}
        self._last_sweep = 0.0

    def __len__(self) -> int:
        """Senders with hits inside the window (state of idle senders is dropped)."""
        return len(self._hits)

    def _window(self, sender: K, now: float) -> deque[float] | None:
        hits = self._hits.get(sender)
        if hits is None:
            return None
        horizon = now - self.window_s
        while hits and hits[0] <= horizon:
            hits.popleft()
        if not hits:
            del self._hits[sender]
            return None
        return hits

    def retry_after(self, sender: K, count: int, now: float) -> int | None:
        """Seconds until `count` more messages from `sender` fit, or None if they fit now."""
        hits = self._window(sender, now)
        if hits is None:
            # An empty window admits any one POST, even one carrying more than `limit` messages:
            # Meta redelivers the same batch unchanged, so refusing it forever would lose it.
            return None
        used = len(hits)
        if used + count <= self.limit:
            return None
        # The oldest `used + count - limit` hits must leave the window first (all of them, for a
        # POST that only an empty window admits).
        index = min(used + count - self.limit, used) - 1
        return max(1, math.ceil(hits[index] + self.window_s - now))

    def admit(self, counts: Mapping[K, int], now: float) -> int | None:
        """Record a POST's messages if every sender fits; else return the longest retry-after."""
        self._sweep(now)
        waits = [w for sender, n in counts.items() if (w := self.retry_after(sender, n, now)) is not None]
        if waits:
            return max(waits)
        for sender, n in counts.items():
            self._hits.setdefault(sender, deque()).extend([now] * n)
        return None

    def _sweep(self, now: float) -> None:
        # Drop idle senders at most once a window, so memory follows active senders only.
        if now - self._last_sweep < self.window_s:
            return
        self._last_sweep = now
        for sender in list(self._hits):
            self._window(sender, now)

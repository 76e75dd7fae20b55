"""Per-sender rate limit over a sliding window: the arithmetic, without I/O (callers pass `now`).

A "sender" is any hashable key: the daemon limits each (business number, sender) pair apart, so a
user writing to two of the business's numbers has a window with each.

At most `limit` messages per sender in any `window_s` seconds. A POST is admitted or refused whole:
an admitted POST records every one of its messages (duplicates included) and a refused one records
nothing, so Meta's redelivery of a refused POST is not counted twice. One exception keeps a batch
from being refused forever: a POST with more than `limit` messages from one sender is admitted when
that sender's window is empty.

The hits themselves are counted in the store (``rate_hits``, `store.WriteConnection.rate_hits`), in
the ingest transaction, so every process sharing the store sees the same windows: a sender's window
is the list of its admitted POSTs inside the window, each as (time, messages), oldest first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

Hits = Sequence[tuple[float, int]]
"""One sender's admitted POSTs, oldest first: (wall-clock time, messages it carried)."""


@dataclass(frozen=True)
class RateLimit:
    limit: int
    window_s: float

    def horizon(self, now: float) -> float:
        """Hits at or before this time have left the window at `now`."""
        return now - self.window_s

    def retry_after(self, hits: Hits, count: int, now: float) -> int | None:
        """Seconds until `count` more messages fit beside `hits`, or None if they fit now."""
        horizon = self.horizon(now)
        live = [(at, n) for at, n in hits if at > horizon and n > 0]
        used = sum(n for _, n in live)
        if used == 0:
            # An empty window admits any one POST, even one carrying more than `limit` messages:
            # Meta redelivers the same batch unchanged, so refusing it forever would lose it.
            return None
        if used + count <= self.limit:
            return None
        # The oldest `used + count - limit` messages must leave the window first (all of them, for a
        # POST that only an empty window admits).
        need = min(used + count - self.limit, used)
        seen = 0
        for at, n in live:
            seen += n
            if seen >= need:
                return max(1, math.ceil(at + self.window_s - now))
        raise AssertionError("unreachable: need <= used")  # pragma: no cover

    def admit(self, windows: Mapping[K, Hits], counts: Mapping[K, int], now: float) -> int | None:
        """None if every sender's `counts[sender]` messages fit beside its `windows[sender]` hits (the
        caller then records them all); else the longest retry-after, and the caller records nothing."""
        waits = [
            w for sender, n in counts.items() if (w := self.retry_after(windows.get(sender, ()), n, now)) is not None
        ]
        return max(waits) if waits else None

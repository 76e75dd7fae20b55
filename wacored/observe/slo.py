"""Service level objectives: ack latency p95 over the last POSTs, and cold start (process start -> ready).

The policy is pure (`AckWindow`, `P95Monitor`, `cold_start_breached`): time and latencies are passed
in, so tests drive them with plain numbers. `SloState` is what one daemon keeps: the window, the last
cold start and how many times each SLO was breached; ingress feeds it, `/metrics` reads it, and the
events it logs keep the names that operators of the system it replaced already alert on:
``cold_start`` (with its ms) and ``slo_breach``
(``slo=p95`` or ``slo=cold_start``).

A p95 breach is logged when the window's p95 *crosses* above the target, not on every slow request:
one incident is one event, and the recovery (crossing back to or below the target) is logged once too.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

WINDOW = 120
"""POSTs in the sliding window whose p95 is judged (the figure the system it replaced used)."""


class Slo(StrEnum):
    P95 = "p95"
    COLD_START = "cold_start"


class AckWindow:
    """The last `size` ack latencies, kept both in arrival order and sorted (O(size) per add, no sort)."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, latency_s: float) -> None:
        if len(self._order) == self.size:
            oldest = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._order.append(latency_s)
        bisect.insort(self._sorted, latency_s)

    def p95(self) -> float:
        """The nearest-rank 95th percentile of the window (0 when empty)."""
        if not self._sorted:
            return 0.0
        rank = -(-95 * len(self._sorted) // 100)  # ceil(0.95 n), 1-based
        return self._sorted[rank - 1]


class Crossing(StrEnum):
    BREACHED = "breached"
    RECOVERED = "recovered"


class P95Monitor:
    """Watches the window's p95 against a target; reports only when it crosses the target."""

    def __init__(self, size: int = WINDOW) -> None:
        self.window = AckWindow(size)
        self.breaching = False

    def observe(self, latency_s: float, target_s: float) -> Crossing | None:
        """Add one ack latency; BREACHED when the p95 just went above `target_s`, RECOVERED when it
        just came back to or below it, else None. The target is passed in so a reload applies at once."""
        self.window.add(latency_s)
        above = self.window.p95() > target_s
        if above == self.breaching:
            return None
        self.breaching = above
        return Crossing.BREACHED if above else Crossing.RECOVERED


def cold_start_breached(cold_start_s: float, target_ms: int) -> bool:
    return cold_start_s * 1000 > target_ms


@dataclass
class SloState:
    """One daemon's SLO figures (exported by the metrics collector, logged on change)."""

    p95: P95Monitor = field(default_factory=P95Monitor)
    cold_start_s: float | None = None
    breaches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Slo, 0))

    def observe_ack(self, latency_s: float, target_ms: int) -> None:
        """Feed one POST's ack latency; log and count a breach when the p95 crosses `target_ms`."""
        crossing = self.p95.observe(latency_s, target_ms / 1000)
        if crossing is None:
            return
        p95_ms = round(self.p95.window.p95() * 1000, 1)
        if crossing is Crossing.BREACHED:
            self.breaches[Slo.P95] += 1
            log.warning(
                "ack latency p95 above its SLO",
                extra={
                    "event": "slo_breach",
                    "slo": Slo.P95.value,
                    "p95_ms": p95_ms,
                    "target_ms": target_ms,
                    "window": len(self.p95.window),
                },
            )
        else:
            log.info(
                "ack latency p95 back within its SLO",
                extra={"event": "slo_recovered", "slo": Slo.P95.value, "p95_ms": p95_ms, "target_ms": target_ms},
            )

    def record_cold_start(self, cold_start_s: float, target_ms: int) -> None:
        """Log the ``cold_start`` event once the daemon is ready, and a breach when it took too long."""
        self.cold_start_s = cold_start_s
        ms = round(cold_start_s * 1000, 1)
        log.info("ready", extra={"event": "cold_start", "ms": ms, "target_ms": target_ms})
        if cold_start_breached(cold_start_s, target_ms):
            self.breaches[Slo.COLD_START] += 1
            log.warning(
                "cold start above its SLO",
                extra={"event": "slo_breach", "slo": Slo.COLD_START.value, "ms": ms, "target_ms": target_ms},
            )


def process_started_at() -> float:
    """When this process started, on the `time.monotonic()` clock.

    Read from the kernel (``/proc/self/stat`` start time against ``/proc/uptime``) so the interpreter's
    own start-up and imports count towards the cold start; where that cannot be read, now.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started_ticks = int(fields[19])  # field 22 of proc(5); the first two fields are cut off above
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    age_s = uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - max(0.0, age_s)

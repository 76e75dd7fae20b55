"""The circuit breaker of one forwarding target: a pure state machine, time passed in.

::

    closed --(failures consecutive transient failures)--> open
    open --(open_s elapsed; the next `allow` grants the one probe)--> half_open
    half_open --probe succeeds--> closed
    half_open --probe fails--> open (for another open_s)

A success or a permanent refusal (a 4xx the service meant) resets the count of consecutive failures:
the service answered, so it is up. While the probe is out, every other delivery is refused, exactly
as while open. Time is whatever monotonic clock the caller uses (`trio.current_time()` in the daemon),
so tests drive it with explicit numbers.
"""

from __future__ import annotations

from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The value exported as ``wacored_breaker_state``: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half_open": 1, "open": 2}[self.value]


class Breaker:
    """One target's breaker. `allow(now)` before an attempt; then exactly one of `success()`,
    `failure(now)` or `release()` (the attempt was cut short and proved nothing)."""

    def __init__(self, failures: int, open_s: float) -> None:
        self.failures = failures
        self.open_s = open_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self.probing = False
        self.trips = 0
        """How many times the breaker has opened (closed or half-open -> open)."""

    def reconfigure(self, failures: int, open_s: float) -> None:
        """New settings (a config reload); the current state is kept."""
        self.failures, self.open_s = failures, open_s

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.probing or now >= self.opened_at + self.open_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, now: float) -> bool:
        """May an attempt go out now? In half-open, True once: the caller holds the probe."""
        if self.opened_at is None:
            return True
        if self.probing or now < self.opened_at + self.open_s:
            return False
        self.probing = True
        return True

    def retry_in(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self.opened_at is None or self.probing:
            return 0.0 if self.opened_at is None else self.open_s
        return max(0.0, self.opened_at + self.open_s - now)

    def success(self) -> None:
        """The service answered (2xx, or a permanent 4xx): close."""
        self.consecutive = 0
        self.opened_at = None
        self.probing = False

    def failure(self, now: float) -> None:
        """A transient failure: count it; open at the threshold, or reopen after a failed probe."""
        self.consecutive += 1
        if self.probing or (self.opened_at is None and self.consecutive >= self.failures):
            self.opened_at = now
            self.probing = False
            self.trips += 1

    def release(self) -> None:
        """An attempt ended without a verdict (cancelled): give the probe back if it held it."""
        self.probing = False

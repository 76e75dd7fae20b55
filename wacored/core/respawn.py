"""When the supervisor starts a dead worker process again (pure: durations passed in).

The first restart waits `FIRST_S`; each one after doubles it up to `MAX_S`, so a worker that cannot
start (its store unreadable, its config refused) costs a process start every 10 s, not a busy loop.
A worker that served `STEADY_S` before it died starts the series again: one crash a day restarts at
once.
"""

from __future__ import annotations

FIRST_S = 0.1
MAX_S = 10.0
STEADY_S = 60.0


def respawn_delay(previous_s: float, served_s: float) -> float:
    """The wait before starting a worker again that served `served_s` before it died, when the wait
    before its last start was `previous_s` (0: it had not been restarted)."""
    if served_s >= STEADY_S or previous_s <= 0:
        return FIRST_S
    return min(previous_s * 2, MAX_S)

"""What the actors tell about themselves and what the stats actor read of the store: the state
/health and /metrics show (plain data, no I/O).

Owners: `ActorState` the supervisor and the actor itself; `StoreStats` the stats actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..store import DEAD_LETTER_STATES


@dataclass
class ActorState:
    """What the supervisor and the actor itself tell about one actor."""

    running: bool = False
    error: str = ""
    """The last crash, if any (kept after a restart)."""
    restarts: int = 0
    heartbeat: float = 0.0
    """`trio.current_time()` of the actor's last sign of life; the watchdog wants it fresh."""
    last_run: float | None = None
    """Periodic actors: wall-clock time their last run ended."""
    next_run: float | None = None
    """Periodic actors: wall-clock time of their next run."""


@dataclass
class StoreStats:
    """Figures read from the store now and then (never at scrape time), cached for /health and metrics."""

    queued: dict[str, int] = field(default_factory=dict)
    """Accepted, not yet delivered nor dead-lettered, by target."""
    oldest_queued_at: dict[str, float] = field(default_factory=dict)
    """Wall-clock time the oldest queued message of each target was received."""
    dead_letters_by_service: dict[tuple[str, str], int] = field(default_factory=dict)
    """Dead letters by (service, state)."""
    size_bytes: int | None = None
    """The store's bytes on disk, write-ahead log included."""
    oldest_pending_at: float | None = None
    """Wall-clock time the oldest pending dead letter was created."""
    sessions_active: int = 0
    """Sessions whose last interaction is within the session TTL."""
    refreshed_at: float | None = None

    @property
    def dead_letters(self) -> dict[str, int]:
        """Dead letters by state, every state named (pending, abandoned, delivered, replayed)."""
        by_state = dict.fromkeys(DEAD_LETTER_STATES, 0)
        for (_, state), n in self.dead_letters_by_service.items():
            by_state[state] = by_state.get(state, 0) + n
        return by_state

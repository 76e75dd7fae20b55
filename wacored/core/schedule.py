"""When the reaper runs and what it deletes (pure; the time is passed in).

The daily reap runs at ``[sessions] reap_at`` UTC; a reap missed while the daemon was down runs soon
after it starts. Each kind of row has its own age past which it goes: idle sessions after the session
TTL, the rate limit's hits after its window, dead letters after their retention, finished messages
(and their attempts) after ``seen_retention_days``, which outlives Meta's 7 days of redelivery so dedupe keeps working.
"""

from __future__ import annotations

from ..config import SessionsConfig

DAY_S = 86400.0


def cutoffs(sessions: SessionsConfig, now: float, *, rate_window_s: float) -> dict[str, float]:
    """For each kind of row, the time before which it is deleted (in `REAP_SQL`'s order)."""
    return {
        "sessions": now - sessions.ttl_s,
        "rate_hits": now - rate_window_s,
        "dead_letters_delivered": now - sessions.dlq_retention_days * DAY_S,
        "dead_letters_abandoned": now - sessions.abandoned_retention_days * DAY_S,
        # The same cutoff as their messages: the attempts of the messages about to be deleted.
        "attempts": now - sessions.seen_retention_days * DAY_S,
        "messages": now - sessions.seen_retention_days * DAY_S,
    }


def next_reap(now: float, minute: int) -> float:
    """The first time strictly after `now` that is `minute` minutes past midnight UTC."""
    day = now - now % DAY_S
    at = day + minute * 60.0
    return at if at > now else at + DAY_S


def missed(last_run: float | None, now: float, minute: int) -> bool:
    """Whether a scheduled reap fell between `last_run` and `now` (a store never reaped has missed none)."""
    return last_run is not None and next_reap(last_run, minute) <= now

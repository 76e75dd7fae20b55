"""The reaper: once a day (``[sessions] reap_at``, UTC) it deletes what is no longer needed.

- sessions idle longer than ``ttl_hours``;
- the rate limit's hits older than ``[ratelimit] window_s`` (of senders quiet since: an active
  sender's are deleted as it writes);
- ``delivered`` dead letters older than ``dlq_retention_days``, ``abandoned`` ones older than
  ``abandoned_retention_days``;
- message rows (and with them their dedupe keys) older than ``seen_retention_days``, which must
  exceed Meta's 7-day redelivery horizon: only finished ones, never a queued message or one still
  held by a dead letter;
- the attempts log of those messages, just before them (`store.REAP_SQL`, ``attempts``).

Deletes run in batches of `BATCH` rows, each its own short transaction, so a large reap never holds
the write lock long enough to delay an ingest commit. A daemon that was down at ``reap_at`` runs the
missed reap `MISSED_REAP_DELAY_S` after it starts. `reap` is the same work for ``wacored sessions reap``,
on its own connection, safe beside a running daemon.

Error handling:
    A batch the store refuses (`StoreUnavailable`: disk full, locked) is tried again with the
    writer's bounded backoff until it commits (`deadletters.write_committed`): a reap waits out an
    outage instead of crashing the reaper in a loop.

Cancellation:
    Between batches; a batch is one transaction, committed whole or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..capabilities import Reaping
from ..config import SessionsConfig
from ..core.schedule import cutoffs, missed, next_reap
from ..observe.counts import bump
from ..store import interface
from ..store.interface import Reads, WriteTx
from ..store.writer import WriteOp
from .deadletters import sleep_until, write_committed

log = logging.getLogger(__name__)

ACTOR = "reaper"
BATCH = 500
MISSED_REAP_DELAY_S = 60.0


async def reap_with(
    run: Callable[[str, float, int], Awaitable[int]], sessions: SessionsConfig, now: float, rate_window_s: float
) -> dict[str, int]:
    """Every kind, batch by batch, through `run(kind, cutoff, limit) -> deleted` (awaitable)."""
    counts: dict[str, int] = {}
    for kind, cutoff in cutoffs(sessions, now, rate_window_s=rate_window_s).items():
        counts[kind] = 0
        while True:
            deleted = await run(kind, cutoff, BATCH)
            counts[kind] += deleted
            if deleted < BATCH:
                break
    return counts


def reap(conn: WriteTx, sessions: SessionsConfig, now: float, *, rate_window_s: float) -> dict[str, int]:
    """Run the reap once now, on `conn`, a write connection of its own (``wacored sessions reap``:
    `daemon.StoreParts.writer`, SQLite or PostgreSQL), closed on return; the counts by kind."""
    try:

        async def run(kind: str, cutoff: float, limit: int) -> int:
            conn.begin_waiting()
            try:
                deleted = conn.reap(kind, cutoff, limit)
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            return deleted

        counts = trio.run(reap_with, run, sessions, now, rate_window_s)
        conn.begin_waiting()
        conn.record_run(ACTOR, now, next_reap(now, sessions.reap_minute), _summary(counts))
        conn.commit()
        return counts
    finally:
        conn.close()


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.items())


async def run_reaper(
    rt: Reaping,
    reader: Reads,
    writes: trio.MemorySendChannel[WriteOp],
    *,
    may_run: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reap daily at ``reap_at`` until the daemon stops. Owns `writes` (closed on exit). Reaps only
    when `may_run()` at the due time: this node holds the reaper's lease, so one worker among all
    reaps (another that holds it then reaps at the next due time)."""
    async with writes:
        try:
            last = await trio.to_thread.run_sync(reader.last_run, ACTOR)
        except interface.STORE_ERRORS:
            last = None
        now = rt.wall_clock()
        due = now + MISSED_REAP_DELAY_S if missed(last, now, rt.config.sessions.reap_minute) else None
        task_status.started()
        while not rt.stopping.is_set():
            if due is None:
                due = next_reap(rt.wall_clock(), rt.config.sessions.reap_minute)
            rt.actor(ACTOR).next_run = due
            await write_committed(rt, ACTOR, writes, _planned(due))
            await sleep_until(rt, ACTOR, due)
            if may_run():
                await _reap_now(rt, writes)
            else:
                log.info("another node holds the reaper's lease", extra={"event": "reap_skipped"})
            due = None


def _planned(at: float) -> Callable[[WriteTx], None]:
    return lambda w: w.plan_run(ACTOR, at)


async def _reap_now(rt: Reaping, writes: trio.MemorySendChannel[WriteOp]) -> None:
    now = rt.wall_clock()
    sessions = rt.config.sessions

    async def run(kind: str, cutoff: float, limit: int) -> int:
        deleted = await write_committed(rt, ACTOR, writes, lambda w: w.reap(kind, cutoff, limit))
        rt.beat(ACTOR)
        return deleted

    counts = await reap_with(run, sessions, now, rt.config.ratelimit.window_s)
    for kind, n in counts.items():
        bump(rt.reap_counts.reaped, kind, n)
    state = rt.actor(ACTOR)
    state.last_run = now
    state.next_run = next_run = next_reap(now, sessions.reap_minute)
    summary = _summary(counts)
    await write_committed(rt, ACTOR, writes, lambda w: w.record_run(ACTOR, now, next_run, summary))
    log.info("reaped", extra={"event": "reaped", **counts})

"""The stats actor: reads the store's figures now and then into `Runtime.stats`, so /health, /metrics
and alerts see queue depths and dead letters without ever querying the database at request time."""

from __future__ import annotations

import logging
import sqlite3

import trio

from .runtime import Runtime, StoreStats
from .store import Reader

log = logging.getLogger(__name__)

ACTOR = "stats"
INTERVAL_S = 5.0


async def refresh(rt: Runtime, reader: Reader) -> None:
    """Read the figures once into `rt.stats` (kept as they were when the store cannot be read)."""
    try:
        queued, dead, oldest = await trio.to_thread.run_sync(reader.figures)
    except sqlite3.Error as exc:
        log.warning("cannot read store figures", extra={"event": "stats_failed", "error": str(exc)})
        return
    rt.stats = StoreStats(
        queued={target: count for target, (count, _) in queued.items()},
        oldest_queued_at={target: at for target, (_, at) in queued.items()},
        dead_letters=dead,
        oldest_pending_at=oldest,
        refreshed_at=rt.wall_clock(),
    )


async def run_stats(
    rt: Runtime, reader: Reader, *, interval_s: float = INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh `rt.stats` every `interval_s` until cancelled. Owns `reader`'s use (one thread at a time)."""
    await refresh(rt, reader)
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        await refresh(rt, reader)
        rt.beat(ACTOR)

"""The stats actor: reads the store's figures now and then into `Runtime.stats`, so /health, /metrics
and alerts see queue depths, dead letters and the store's size without ever querying the database at
request time.

Error handling:
    A store that cannot be read (`store.interface.STORE_ERRORS`, or `OSError` sizing its files) is
    logged and the
    last figures are kept until a read works; nothing here raises out of the loop for that.

Cancellation:
    The read runs in a worker thread that finishes its short query when the actor is cancelled
    (`to_thread.run_sync` waits for it); the figures are replaced whole, never half-written.
"""

from __future__ import annotations

import logging

import trio

from ..observe.state import StoreStats
from ..runtime import Runtime
from ..store import interface
from ..store.interface import Reads

log = logging.getLogger(__name__)

ACTOR = "stats"
INTERVAL_S = 5.0


async def refresh(rt: Runtime, reader: Reads) -> None:
    """Read the figures once into `rt.stats` (kept as they were when the store cannot be read)."""
    since = rt.wall_clock() - rt.config.sessions.ttl_s
    try:
        figures = await trio.to_thread.run_sync(reader.figures)
        sessions_active = await trio.to_thread.run_sync(reader.sessions_active, since)
    except interface.STORE_ERRORS + (OSError,) as exc:
        log.warning("cannot read store figures", extra={"event": "stats_failed", "error": str(exc)})
        return
    rt.stats = StoreStats(
        queued={target: count for target, (count, _) in figures.queued.items()},
        oldest_queued_at={target: at for target, (_, at) in figures.queued.items()},
        dead_letters_by_service=figures.dead_letters,
        oldest_pending_at=figures.oldest_pending_at,
        sessions_active=sessions_active,
        size_bytes=figures.size_bytes,
        refreshed_at=rt.wall_clock(),
    )


async def run_stats(
    rt: Runtime,
    reader: Reads,
    *,
    interval_s: float = INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh `rt.stats` every `interval_s` until cancelled. Owns `reader`'s use (one thread at a time)."""
    await refresh(rt, reader)
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        await refresh(rt, reader)
        rt.beat(ACTOR)

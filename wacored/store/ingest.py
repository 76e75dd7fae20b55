"""The ingest transaction: what the writer does with one webhook batch, inside its group's transaction.

Ingress hands the writer the parsed batch (`writer.Ingest`) with the policy it was read under
(`IngestPolicy`: business numbers, session TTL, rate limit) and what is not policy (`IngestContext`:
the request's ids, the time, each message's trace context). Here, on the write connection, after
``BEGIN IMMEDIATE`` (which serializes writers across processes on SQLite; on PostgreSQL the first
read takes the store's advisory lock, `postgres.WRITE_LOCK`, to the same end):

1. the rate limit: the hits of the batch's (number, sender) windows are read from the store and
   judged by the pure `core.ratelimit.RateLimit`; over the limit, nothing is written and the reply
   says how long to wait (ingress answers 429), else the POST's hits are recorded;
2. routing: the pure `core.ingest.plan_ingest` runs over the sessions the store holds now
   (`StoreSessions`), so whichever process ingests, it routes by the one committed session state;
3. the rows are inserted and the session changes of the inserted ones applied.

`StoreSessions` keeps a bounded LRU (`core.sessions.SessionCache`, ``[sessions] cache_size``) in
front of the ``sessions`` table, owned by the writer: what this process read or wrote. It is never
trusted across a commit of another connection: `sync` asks the store at the start of each
transaction (on SQLite, ``PRAGMA data_version``; PostgreSQL always says yes) and clears the cache
when another connection (another worker process, the CLI) has committed since. With one process the
cache stays warm; with several writing in turn it is cleared at nearly every transaction and routing
reads the store, which stays correct and costs one primary-key read per sender of the batch
(measured on bench/prefill.py's store of 1 M sessions, 5 M messages: 0.33 us from the cache, 8.7 us
from the store, 1.0 us for the ``data_version`` check and 1.8 us to read a sender's rate-limit
hits).

Error handling:
    The driver's error (`interface.STORE_ERRORS`) propagates to the writer, which rolls the
    transaction back, calls `StoreSessions.clear` (the cache may hold what the rollback undid) and
    answers `StoreUnavailable`.

Cancellation:
    Nothing here awaits: it runs inside the writer's shielded group, on the event loop's thread
    (SQLite) or in the group's worker thread (PostgreSQL, `writer._transaction`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import SessionsConfig
from ..core.ingest import PlannedRow, plan_ingest, windows
from ..core.numbers import Numbers
from ..core.ratelimit import RateLimit
from ..core.routing import SessionAction
from ..core.sessions import Miss, Session, SessionCache
from ..core.whatsapp import Batch
from . import NewRow
from .interface import WriteTx

DEFAULT_CACHE_SIZE = SessionsConfig.cache_size
"""``[sessions] cache_size``'s default."""


@dataclass(frozen=True)
class IngestPolicy:
    """The config an ingest is planned under, as ingress read it (a reload swaps it whole)."""

    numbers: Numbers
    session_ttl_s: float
    rate: RateLimit


@dataclass(frozen=True)
class IngestContext:
    """What a request adds to its rows that is not policy."""

    request_id: str
    correlation_id: str
    received_at: float
    """Wall-clock time of the request: the rows' ``received_at``, the sessions' and the rate limit's now."""
    traceparent: Callable[[PlannedRow], str]
    """The ``traceparent`` stored with one planned row (`telemetry.message_traceparent`)."""


@dataclass(frozen=True)
class Ingested:
    """The writer's answer to an ingest: refused by the rate limit, or the rows planned and their ids."""

    rows: tuple[NewRow, ...] = ()
    ids: tuple[int | None, ...] = ()
    """Each row's ``messages`` id, None for a duplicate (nothing inserted); in `rows`' order."""
    retry_after: int | None = None
    """Seconds to wait when the rate limit refused the POST (then nothing was stored)."""


@dataclass
class SessionCacheStats:
    """How the writer's session cache is doing, for /health. Owner: the writer (`StoreSessions`); kept
    by the daemon (`Runtime.session_cache`) so it survives a writer's restart."""

    entries: int = 0
    """Sessions (or known absences) in the cache now."""
    store_reads: int = 0
    """Sessions read from the store because the cache did not hold them."""
    clears: int = 0
    """Times the cache was emptied: another connection committed, or a transaction was rolled back."""


class StoreSessions:
    """The stored sessions as routing reads them (`core.sessions.SessionLookup`): the cache, else the
    write connection inside the open transaction. Owner: the writer."""

    def __init__(
        self, conn: WriteTx, cache_size: int = DEFAULT_CACHE_SIZE, stats: SessionCacheStats | None = None
    ) -> None:
        self.conn = conn
        self.cache = SessionCache(cache_size)
        self.stats = stats if stats is not None else SessionCacheStats()
        self.stats.entries = 0

    def sync(self) -> None:
        """At the start of a transaction (the write lock held, so nobody commits until it ends): forget
        the cache if another connection committed since the last one (`WriteConnection.others_committed`)."""
        if self.conn.others_committed():
            self.clear()

    def clear(self) -> None:
        """Forget every session (after a rollback too: the cache may hold what was undone)."""
        if len(self.cache):
            self.cache.clear()
            self.stats.clears += 1
            self.stats.entries = 0

    def get(self, number: str, sender: str) -> Session | None:
        cached = self.cache.get(number, sender)
        if cached is not Miss.MISS:
            return cached
        self.stats.store_reads += 1
        session = self.conn.session(number, sender)
        self.cache.put(number, sender, session)
        self.stats.entries = len(self.cache)
        return session

    def applied(self, number: str, sender: str, session: Session | None) -> None:
        """This transaction wrote (number, sender)'s session: the cache follows the store."""
        self.cache.put(number, sender, session)
        self.stats.entries = len(self.cache)


def ingest(
    conn: WriteTx,
    sessions: StoreSessions,
    batch: Batch,
    policy: IngestPolicy,
    context: IngestContext,
    *,
    lane_of: Callable[[str, str], int] = lambda target, sender: 0,
) -> Ingested:
    """Rate-limit, route and insert one batch inside the open transaction (see the module docstring).
    `lane_of(target, sender)` is the lane each new row goes to (`lanes.LaneBoard.lane_of`)."""
    now = context.received_at
    counts = windows(batch, policy.numbers)
    rate = policy.rate
    if counts:
        horizon = rate.horizon(now)
        hits = {key: conn.rate_hits(key[0], key[1], horizon) for key in counts}
        wait = rate.admit(hits, counts, now)
        if wait is not None:
            return Ingested(retry_after=wait)
        conn.add_rate_hits(counts.items(), now, horizon)
    plan = plan_ingest(batch, policy.numbers, sessions, policy.session_ttl_s, now)
    rows = tuple(
        NewRow(
            p.key,
            p.kind,
            p.sender,
            p.service,
            p.reason,
            p.target,
            p.body,
            context.request_id,
            context.correlation_id,
            context.traceparent(p),
            now,
            number=p.number,
            probe=p.probe,
            lane=lane_of(p.target, p.sender),
        )
        for p in plan.rows
    )
    ids = conn.insert(rows, plan.changes)
    for index, change in plan.changes:
        if ids[index] is None:
            continue  # a duplicate: `insert` applied nothing for it
        if change.action is SessionAction.END:
            sessions.applied(change.number, change.sender, None)
        elif change.action in (SessionAction.START, SessionAction.TOUCH):
            sessions.applied(change.number, change.sender, (change.service, change.at))
    return Ingested(rows, tuple(ids))

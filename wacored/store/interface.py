"""The store as the actors see it: what each may ask of it, whatever the database behind.

Three Protocols, each the narrow set one kind of caller needs. `store.WriteConnection`,
`store.LaneReader` and `store.Reader` are the SQLite implementation, the embedded default;
`postgres.PgWriteConnection`, `PgLaneReader` and `PgReader` the PostgreSQL one, a second set of
classes behind these same Protocols, never a second code path in the actors. The daemon is the one
place that picks the implementation (`daemon.StoreParts`).

- `WriteTx`: the single write connection of a process, used by the writer actor inside the
  transaction it opens for a group of operations (group commit): the ingest transaction (sessions,
  the rate-limit count, rows), delivery outcomes and dead letters, the periodic actors' runs, the
  reaper's deletes, and lane leases.
- `LaneReads`: what the lanes and the relay read, often and cheaply: a lane's next queued rows in
  order, the newest row id, which lanes rows committed after an id fall in.
- `Reads`: what the periodic actors and /health read now and then: due dead letters, pauses, runs,
  figures.

The operator's queries (`operations.py`, `messages.py`, `pauses.py`: listing, replaying, purging)
are not behind these Protocols yet: they run their own SQL on a connection of their own.

Error handling: each implementation raises its driver's error (`sqlite3.Error`, `psycopg.Error`:
`STORE_ERRORS`; of those, `STORE_DOWN_ERRORS` say the store, not the data, failed: disk full, locked,
connection lost); the writer turns a failed transaction into `StoreUnavailable` for its callers
(`writer.py`), and the readers' callers log it and try again later. psycopg's errors join the two
tuples when `store.postgres` is imported (`add_driver_errors`), which is before any PostgreSQL
connection exists: a SQLite daemon never imports psycopg (measured: 0.2 s of start-up and ~10 MB of
RSS a worker). So they are read from this module when an error is caught (``interface.STORE_ERRORS``),
never copied at import.

Blocking: SQLite statements are local and short, so the writer runs them on the event loop's thread
and the lanes read there; PostgreSQL statements are network round trips. An implementation whose
statements may block says so (`WriteTx.blocking_statements`, `LaneReads.blocking_reads`), and its
callers then run them in a worker thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..core.leases import Held, Lease
from ..core.sessions import SessionChange
from . import DeadLetter, Delivery, NewRow, Outcome, Retried, StoreFigures

STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)
"""What a store raises when it refuses or fails (any implementation's driver that is loaded)."""
STORE_DOWN_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
"""Of those, the store failing (disk, lock, connection), not the data: trying again may succeed."""


def add_driver_errors(error: type[Exception], down: type[Exception]) -> None:
    """A store implementation's driver, as it is imported: its base error class, and the one that says
    the store failed rather than refused the data. Set once per driver, at its module's import."""
    global STORE_ERRORS, STORE_DOWN_ERRORS
    if error not in STORE_ERRORS:
        STORE_ERRORS = (*STORE_ERRORS, error)
        STORE_DOWN_ERRORS = (*STORE_DOWN_ERRORS, down)


class WriteTx(Protocol):
    """The write connection (one per process, owned by the writer actor)."""

    blocking_statements: bool
    """True when a statement may block (a network round trip): the writer then runs a group's begin,
    statements and commit in one worker-thread call, never on the event loop's thread."""

    def try_begin(self) -> bool:
        """Open the write transaction now; False when another process holds the write lock."""
        ...

    def begin_waiting(self) -> None:
        """Open the write transaction, waiting for another process's lock (in a worker thread)."""
        ...

    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def changes(self) -> int:
        """Rows changed on this connection so far (a commit that changed none wrote nothing)."""
        ...

    def close(self) -> None: ...

    # The ingest transaction (`ingest.ingest`).
    def others_committed(self) -> bool:
        """Whether another connection committed since this one last asked (the session cache's check)."""
        ...

    def session(self, number: str, sender: str) -> tuple[str, float] | None: ...
    def rate_hits(self, number: str, sender: str, after: float) -> list[tuple[float, int]]: ...
    def add_rate_hits(self, counts: Iterable[tuple[tuple[str, str], int]], at: float, horizon: float) -> None: ...
    def insert(self, rows: Sequence[NewRow], changes: Iterable[tuple[int, SessionChange]]) -> list[int | None]: ...

    # Outcomes, dead letters, runs, reaping.
    def record(self, outcome: Outcome) -> None: ...
    def retried(self, r: Retried) -> None: ...
    def plan_run(self, actor: str, next_run: float) -> None: ...
    def record_run(self, actor: str, last_run: float, next_run: float | None, result: str) -> None: ...
    def reap(self, kind: str, cutoff: float, limit: int) -> int: ...

    # Lanes and leases (`lanes.py`).
    def keep_leases(
        self,
        *,
        me: str,
        lanes: Sequence[str],
        singletons: Sequence[str],
        release: Sequence[str],
        now: float,
        ttl_s: float,
        started_at: float,
        dead: Callable[[str], bool],
    ) -> Held: ...
    def release_leases(self, me: str) -> int: ...
    def split_lanes(self, target: str, lanes: int) -> int: ...


class LaneReads(Protocol):
    """The lanes' and the relay's reads (on the event loop's thread when each is short and local; in a
    worker thread when `blocking_reads`)."""

    blocking_reads: bool

    def page(self, target: str, lane: int, limit: int) -> list[Delivery]: ...
    def newest_id(self) -> int: ...
    def queued_lanes_after(self, after_id: int) -> set[tuple[str, int]]: ...
    def leases(self) -> list[Lease]: ...
    def close(self) -> None: ...


class RowsListener(Protocol):
    """What wakes the relay at once when another node commits rows (PostgreSQL's LISTEN/NOTIFY), where
    the store has it; called in a worker thread."""

    def wait(self, timeout_s: float) -> bool:
        """Until another connection commits rows, or `timeout_s` passes; whether one did."""
        ...

    def close(self) -> None: ...


class Reads(Protocol):
    """The periodic actors' and /health's reads (in worker threads)."""

    def ping(self) -> int: ...
    def queued_targets(self) -> dict[str, int]: ...
    def sessions_active(self, since: float) -> int: ...
    def due_dead_letters(self, now: float, limit: int) -> list[DeadLetter]: ...
    def next_due(self) -> float | None: ...
    def pauses(self) -> list[tuple[str, float, str]]: ...
    def last_run(self, actor: str) -> float | None: ...
    def figures(self) -> StoreFigures: ...
    def close(self) -> None: ...

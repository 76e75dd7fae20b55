"""The operator's connection to the store: one small adapter, so the operator commands and the admin
API run the same SQL on SQLite and on PostgreSQL.

`OpsConnection` is what `operations`, `messages` and `pauses` ask of a connection: statements with
SQLite's ``?`` placeholders, a write transaction (`write`), a read transaction of one moment
(`read`), and the two questions whose SQL differs (`queued_by_target`, `has_table`). `SqliteOps`
runs them on a `sqlite3.Connection` (from `operations.open_store`), `PgOps` on a psycopg connection
with ``?`` read as ``%s`` (`postgres.qmark`: the operator's statements hold no literal ``?`` nor
``%``). `open_ops` picks the one the config names, as `daemon.StoreParts` does for the daemon.

Writes. SQLite's ``BEGIN IMMEDIATE`` takes the file's one write lock up front (waiting up to the busy
timeout), so an operator's transaction waits for the daemon's writer once rather than failing midway.
PostgreSQL locks rows, not the database: an operator's write takes no advisory lock (it inserts no
message and touches no lease, `postgres.WRITE_LOCK`), and ``lock_timeout`` (= the busy timeout)
bounds its wait for a row the daemon is updating. The statements that decide on a row's state
re-check it in their ``WHERE`` (`operations.replay`, `messages.requeue`), which PostgreSQL
re-evaluates after such a wait, so a concurrent change is never overwritten. Reads on PostgreSQL are
``REPEATABLE READ READ ONLY``: a status of one moment, as SQLite's read transaction gives.

Error handling:
    `operations.StoreMissing`/`NotAStore` and `store.SchemaError` from `open_ops` (a database with no
    wacored tables, or a newer schema); then whatever the driver raises (`interface.STORE_ERRORS`:
    ``sqlite3.Error``, ``psycopg.Error``), which the CLI and the admin API report as the store refusing.

Cancellation:
    Nothing here awaits: the CLI calls it directly, the admin API from a worker thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..config import StoreConfig
from ..store import queued_by_target
from ..store.rows import SchemaError
from ..store.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg


class Rows(Protocol):
    """What a statement returns: both drivers' cursors."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class OpsConnection(Protocol):
    """A connection of the operator's own to either store (module docstring)."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows:
        """Run `sql` (``?`` placeholders)."""
        ...

    def write(self) -> AbstractContextManager[None]:
        """A write transaction: committed on exit, rolled back on an error."""
        ...

    def read(self) -> AbstractContextManager[None]:
        """A read transaction: every statement in it sees the same moment."""
        ...

    def queued_by_target(self) -> dict[str, tuple[int, float]]:
        """Messages queued per target: (count, oldest received_at)."""
        ...

    def has_table(self, name: str) -> bool: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


def store_where(store: StoreConfig) -> str:
    """Where the store is, for people: the SQLite file, or the PostgreSQL server and database (never
    the URL's user, password or options)."""
    if not store.url:
        return str(store.path)
    parts = urlsplit(store.url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class SqliteOps:
    """`OpsConnection` on a SQLite connection in autocommit mode (`operations.open_store`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def write(self) -> AbstractContextManager[None]:
        return _transaction(self.conn.execute, "BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[None]:
        return _transaction(self.conn.execute, "BEGIN")

    def queued_by_target(self) -> dict[str, tuple[int, float]]:
        return queued_by_target(self.conn)

    def has_table(self, name: str) -> bool:
        found = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return found.fetchone() is not None

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def close(self) -> None:
        self.conn.close()


class PgOps:
    """`OpsConnection` on a PostgreSQL database (``[store] url``): an autocommit psycopg connection
    of its own, ``lock_timeout`` set to the busy timeout."""

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        # Here, not at the top: a SQLite daemon never loads psycopg (`store.interface`).
        from ..store.postgres import connect, qmark, schema_version

        self._qmark = qmark
        self.conn = connect(url)
        try:
            self.conn.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
            version = schema_version(self.conn)
        except BaseException:
            self.conn.close()
            raise
        if version == 0 or version > SCHEMA_VERSION:
            self.conn.close()
            if version == 0:
                from .operations import NotAStore

                raise NotAStore(f"{store_where(StoreConfig(url=url))} has no wacored tables (has the daemon run?)")
            raise SchemaError(f"the database has schema version {version}, newer than this wacored ({SCHEMA_VERSION})")

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[tuple[Any, ...]]:
        # The operator's statements are the package's own literals; psycopg types them as str.
        return self.conn.execute(self._qmark(sql), tuple(params) or None)

    def write(self) -> AbstractContextManager[None]:
        return _transaction(self.conn.execute, "BEGIN")

    def read(self) -> AbstractContextManager[None]:
        return _transaction(self.conn.execute, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def queued_by_target(self) -> dict[str, tuple[int, float]]:
        # No typeof(): a double precision column holds nothing but numbers.
        rows = self.conn.execute(
            "SELECT target, COUNT(*), COALESCE(MIN(received_at), 0.0) FROM messages WHERE state = 'queued'"
            " GROUP BY target ORDER BY target"
        )
        return {str(target): (int(count), float(oldest)) for target, count, oldest in rows}

    def has_table(self, name: str) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return self.conn.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.conn.close()


@contextmanager
def _transaction(execute: Any, begin: str) -> Iterator[None]:
    """`begin` ... ``COMMIT`` (``ROLLBACK`` on any error, cancellation included)."""
    execute(begin)
    try:
        yield
    except BaseException:
        execute("ROLLBACK")
        raise
    execute("COMMIT")


def open_ops(store: StoreConfig) -> OpsConnection:
    """A connection of the operator's own to the store of `store` (the daemon may be running): the
    PostgreSQL database when ``url`` is set, else the SQLite file (never created here). The caller
    closes it."""
    if store.url:
        return PgOps(store.url, store.busy_timeout_ms)
    from .operations import open_store

    return open_store(store.path, store.busy_timeout_ms)

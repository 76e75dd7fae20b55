"""Where a message waits: the store, the hand-off between ingress and delivery.

`interface` holds the `Store` Protocols (`WriteTx`, `LaneReads`, `Reads`): what the writer, the lanes
and the periodic actors ask of any store. `sqlite` is the SQLite implementation (the embedded
default, `schema` its migrations, `lanes` its lease SQL), `postgres` the PostgreSQL one (``[store]
url``: its migrations and advisory locks; it shares `lanes`' SQL), `rows` the plain data every
implementation hands around. `writer` is the actor that owns a process's one write connection (group commit), and
`ingest` the transaction it runs for each webhook batch (rate limit, routing, rows).

This package re-exports the rows, errors and SQLite classes, so callers import them from
``wacored.store``; `writer`, `ingest` and `postgres` are imported by their own names.
"""

from .rows import (
    ATTEMPT_KINDS,
    DEAD_LETTER_STATES,
    AttemptRow,
    DeadLetter,
    Delivery,
    NewRow,
    Outcome,
    Retried,
    SchemaError,
    StoreUnavailable,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, connect, migrate
from .sqlite import (
    REAP_SQL,
    LaneReader,
    Reader,
    StoreFigures,
    WriteConnection,
    as_time,
    dead_letters_by_state,
    queued_by_target,
    size_on_disk,
)

__all__ = [
    "ATTEMPT_KINDS",
    "DEAD_LETTER_STATES",
    "MIGRATIONS",
    "REAP_SQL",
    "SCHEMA_VERSION",
    "AttemptRow",
    "DeadLetter",
    "Delivery",
    "LaneReader",
    "NewRow",
    "Outcome",
    "Reader",
    "Retried",
    "SchemaError",
    "StoreFigures",
    "StoreUnavailable",
    "WriteConnection",
    "as_time",
    "connect",
    "dead_letters_by_state",
    "migrate",
    "queued_by_target",
    "size_on_disk",
]

"""``wacored store copy --to URL``: a SQLite store copied into an empty PostgreSQL database, the move
from one host's file to a cluster's database (docs/operations.md, "Moving a store to PostgreSQL").

The database is migrated first (`postgres.pg_migrate`), then every table that is state rather than
liveness (`TABLES`: messages with their ids and states, sessions, rate hits, dead letters, attempts,
runs, pauses and the lane counts; not leases nor nodes, which belong to running processes) is copied in
id order (rowid order for tables without an id), `BATCH` rows at a time through ``COPY``, in one
transaction under the store's write lock (`postgres.WRITE_LOCK`), so no node ingests meanwhile and a
failed copy leaves the database as empty as it found it. Afterwards each identity sequence continues
after the highest id copied, so a new row never takes a copied id. The source is opened read-only;
the daemon must be stopped, or what it writes after the copy is not in the database.

Error handling:
    `CopyRefused` for what the operator must fix: a source that is missing or of another schema
    version, a target that already holds rows. `sqlite3.Error` and `psycopg.Error` propagate (the CLI
    prints them as one line); either way the target's transaction is rolled back.

Cancellation:
    A plain blocking function, run by the CLI, not in an event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..store import SCHEMA_VERSION
from ..store.postgres import WRITE_LOCK, connect, pg_migrate

TABLES = (
    "messages",
    "sessions",
    "rate_hits",
    "dead_letters",
    "attempts",
    "runs",
    "service_pauses",
    "lane_counts",
)
"""Copied, in this order (dead letters and attempts refer to messages)."""
IDENTITIES = ("messages", "dead_letters", "attempts")
"""Tables whose ``id`` is a PostgreSQL identity: its sequence continues after the copied ids."""
LIVENESS = ("leases", "nodes")
"""Not copied (a running process's), but must be empty too: a database with nodes is in use."""
BATCH = 1000
"""Rows read from SQLite and sent per ``COPY`` write; bounds the memory of a copy (a message row is
its body, a few KiB)."""


class CopyRefused(Exception):
    """The copy was not started: why, in one line."""


@dataclass(frozen=True)
class Copied:
    """Rows copied, by table."""

    rows: dict[str, int]


def copy_store(source: Path, url: str, *, progress: Callable[[str, int], None] = lambda _t, _n: None) -> Copied:
    """Copy the SQLite store at `source` into the empty PostgreSQL database at `url` (migrated here
    first); `progress(table, rows)` is called once each table is copied."""
    if not source.is_file():
        raise CopyRefused(f"{source}: no such store")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        version = int(src.execute("PRAGMA user_version").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise CopyRefused(
                f"{source} has schema version {version}, not this wacored's ({SCHEMA_VERSION}):"
                " start this wacored on it once (it migrates the file), stop it, then copy"
            )
        pg_migrate(url)
        copied: dict[str, int] = {}
        with connect(url) as dst, dst.transaction():
            dst.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            for table in (*TABLES, *LIVENESS):
                if dst.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(sql.Identifier(table))).fetchone():
                    raise CopyRefused(f"the database is not empty ({table} has rows): copy only into a new database")
            for table in TABLES:
                copied[table] = _copy_table(src, dst, table)
                progress(table, copied[table])
            for table in IDENTITIES:
                # setval(seq, max, true): the next id is max + 1; an empty table keeps its start (1).
                dst.execute(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({table}, 'id'), m)"
                        " FROM (SELECT max(id) AS m FROM {ident}) t WHERE m IS NOT NULL"
                    ).format(table=sql.Literal(table), ident=sql.Identifier(table))
                )
        return Copied(copied)
    finally:
        src.close()


def _copy_table(src: sqlite3.Connection, dst: psycopg.Connection[tuple[Any, ...]], table: str) -> int:
    columns = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
    target = {
        name
        for (name,) in dst.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = %s AND table_schema = current_schema()",
            (table,),
        )
    }
    if set(columns) != target:
        raise CopyRefused(f"{table}: the columns differ ({sorted(set(columns) ^ target)})")
    order = "id" if "id" in columns else "rowid"
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    cursor = src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")  # noqa: S608 -- names from the schema
    count = 0
    with dst.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), names)) as copy:
        while rows := cursor.fetchmany(BATCH):
            for row in rows:
                copy.write_row(row)
            count += len(rows)
    return count


def cmd_store_copy(args: Any, config_of: Callable[[Any], Any]) -> int:
    """``wacored store copy --to URL [-c CONFIG]``: the config's ``[store] path`` into `args.to`; one
    line per table, and exit 1 with one line on stderr when refused or failed."""
    import sys

    if (config := config_of(args)) is None:
        return 1
    source = Path(config.store.path)
    try:
        copied = copy_store(source, args.to, progress=lambda table, n: print(f"{table}: {n} row(s)"))
    except (CopyRefused, sqlite3.Error, psycopg.Error) as exc:
        first = str(exc).strip().splitlines()
        print(f"wacored: store copy: {first[0] if first else type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"copied {sum(copied.rows.values())} row(s) from {source}; now set [store] url and start wacored")
    return 0

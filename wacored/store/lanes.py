"""Lane leases and live nodes in SQL (`store.WriteConnection.keep_leases` and friends).

Each function takes the write connection (`Statements`: a `sqlite3.Connection`, or the PostgreSQL
store's `postgres.QmarkStatements`; the SQL is plain enough for both) and runs inside the writer's
transaction, as part of a `writer.Write` operation: on SQLite that transaction holds the database's
write lock from its first statement (``BEGIN IMMEDIATE``); on PostgreSQL the caller takes the store's
transaction-level advisory lock first (`postgres.PgWriteConnection`). Either way what a worker reads
of the leases there cannot change before it commits its claims, and two workers never both win one
lease. What to claim is decided by the pure `core.leases.plan`.

Error handling:
    The driver's error propagates. A lease write that fails is the writer's to report; the lease keeper
    keeps what it held until it expires (`lanes.run_lease_keeper`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.delivery import lane_of
from ..core.leases import Held, Lease, plan


class Statements(Protocol):
    """What these functions ask of a connection: ``execute`` with ``?`` placeholders, returning a
    cursor to iterate, ``fetchone``, ``fetchall`` or read the ``rowcount`` of."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


def keep_leases(
    c: Statements,
    *,
    me: str,
    lanes: Sequence[str],
    singletons: Sequence[str],
    release: Sequence[str],
    now: float,
    ttl_s: float,
    started_at: float,
    dead: Callable[[str], bool],
) -> Held:
    """One lease tick for node `me`: say it is alive, drop the leases in `release` (lanes it gave back
    and has emptied), renew the rest of its own, and claim what `core.leases.plan` says."""
    c.execute(
        "INSERT INTO nodes (name, started_at, seen_at) VALUES (?,?,?)"
        " ON CONFLICT(name) DO UPDATE SET seen_at = excluded.seen_at",
        (me, started_at, now),
    )
    # A node unseen for three TTLs is gone (its leases were free after one).
    c.execute("DELETE FROM nodes WHERE seen_at < ?", (now - 3 * ttl_s,))
    for name in release:
        c.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, me))
    c.execute("UPDATE leases SET expires_at = ? WHERE owner = ?", (now + ttl_s, me))
    rows = {
        name: Lease(name, owner, float(at))
        for name, owner, at in c.execute("SELECT name, owner, expires_at FROM leases")
    }
    live = tuple(n for (n,) in c.execute("SELECT name FROM nodes WHERE seen_at > ?", (now - ttl_s,)))
    gone = {lease.owner for lease in rows.values() if lease.owner != me and dead(lease.owner)}
    decided = plan(me, lanes, singletons, rows, [n for n in live if n not in gone], now, gone)
    for name in decided.claim:
        c.execute(
            "INSERT INTO leases (name, owner, expires_at) VALUES (?,?,?)"
            " ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
            (name, me, now + ttl_s),
        )
        rows[name] = Lease(name, me, now + ttl_s)
    mine = {name: lease.expires_at for name, lease in rows.items() if lease.owner == me}
    return Held(mine, decided, tuple(rows[n] for n in sorted(rows)), live)


def release_leases(c: Statements, *, me: str) -> int:
    """Drop every lease of `me` and its node row (a clean stop: the others take over at their next
    tick, not a TTL later). How many leases it held."""
    c.execute("DELETE FROM nodes WHERE name = ?", (me,))
    return int(c.execute("DELETE FROM leases WHERE owner = ?", (me,)).rowcount)


def split_lanes(c: Statements, *, target: str, lanes: int) -> int:
    """Make `target`'s queued rows follow a lane count of `lanes`, when they were split by another
    (``concurrency`` changed across a restart, or rows older than lanes); how many rows moved.

    Every worker runs it at start with the same config, so it is idempotent: a second run finds the
    count recorded and moves nothing."""
    row = c.execute("SELECT lanes FROM lane_counts WHERE target = ?", (target,)).fetchone()
    if row is not None and row[0] == lanes:
        return 0
    moved = 0
    for row_id, sender, lane in c.execute(
        "SELECT id, sender, lane FROM messages WHERE target = ? AND state = 'queued'", (target,)
    ).fetchall():
        if (want := lane_of(str(sender), lanes)) != lane:
            c.execute("UPDATE messages SET lane = ? WHERE id = ?", (want, row_id))
            moved += 1
    c.execute(
        "INSERT INTO lane_counts (target, lanes) VALUES (?,?) ON CONFLICT(target) DO UPDATE SET lanes = excluded.lanes",
        (target, lanes),
    )
    return moved


def this_host_dead(owner: str, host: str | None = None) -> bool:
    """Whether lease owner `owner` (``host-pid``) is a process of this host that no longer runs.

    Only a default name (`daemon.node_name`) has that shape: a configured ``[cluster] node_id`` may
    not end in ``-<digits>`` (`config`), and its workers' ``-w<index>`` do not either, so a configured
    node is never judged dead here, only taken over when its leases expire."""
    host = host if host is not None else socket.gethostname()
    prefix, _, pid = owner.rpartition("-")
    if prefix != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False

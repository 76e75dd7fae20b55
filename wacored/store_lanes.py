"""The store's side of lanes: lane leases, live nodes, and reading a lane's queued rows (SQLite).

Writes (`keep_leases`, `release_leases`, `split_lanes`) take the `WriteConnection` and run inside the
writer's transaction, as `writer.Write` operations: on SQLite that transaction holds the database's
write lock from its first statement (``BEGIN IMMEDIATE``), so what a worker reads of the leases there
cannot change before it commits its claims, and two workers never both win one lease. Reads
(`LaneReader`) use a connection of their own, on the event loop's thread: each is one indexed range
read of a few rows (the partial index ``messages_lane`` holds only queued rows), cheaper than the hop
to a worker thread.

Error handling:
    `sqlite3.Error` propagates. A lease write that fails is the writer's to report; the lease keeper
    keeps what it held until it expires (`leasekeeper.py`). A failed lane read is the lane's to retry.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .core.delivery import lane_of
from .core.leases import Lease, LeasePlan, plan
from .store import Delivery, WriteConnection, _delivery, _delivery_columns, connect


@dataclass(frozen=True)
class Held:
    """What a `keep_leases` tick ended with."""

    mine: dict[str, float]
    """The leases this node holds, by name, with their expiry (wall clock)."""
    plan: LeasePlan
    leases: tuple[Lease, ...]
    """Every lease row after the tick (/health, `wacored status`)."""
    live_nodes: tuple[str, ...]


def keep_leases(
    w: WriteConnection,
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
    c = w.conn
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


def release_leases(w: WriteConnection, *, me: str) -> int:
    """Drop every lease of `me` and its node row (a clean stop: the others take over at their next
    tick, not a TTL later). How many leases it held."""
    w.conn.execute("DELETE FROM nodes WHERE name = ?", (me,))
    return w.conn.execute("DELETE FROM leases WHERE owner = ?", (me,)).rowcount


def split_lanes(w: WriteConnection, *, target: str, lanes: int) -> int:
    """Make `target`'s queued rows follow a lane count of `lanes`, when they were split by another
    (``concurrency`` changed across a restart, or rows older than lanes); how many rows moved.

    Every worker runs it at start with the same config, so it is idempotent: a second run finds the
    count recorded and moves nothing."""
    c = w.conn
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
    """Whether lease owner `owner` (``host-pid``) is a process of this host that no longer runs."""
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


class LaneReader:
    """A read connection for lanes and the relay, used on the event loop's thread only."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection = connect(path)

    def close(self) -> None:
        self.conn.close()

    def page(self, target: str, lane: int, limit: int) -> list[Delivery]:
        """The lane's first `limit` queued rows in id order (commit order)."""
        rows = self.conn.execute(
            f"SELECT {_delivery_columns()} FROM messages WHERE target = ? AND lane = ? AND state = 'queued'"
            " ORDER BY id LIMIT ?",
            (target, lane, limit),
        ).fetchall()
        return [_delivery(row) for row in rows]

    def newest_id(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])

    def queued_lanes_after(self, after_id: int) -> set[tuple[str, int]]:
        """The (target, lane) of every row committed after `after_id` and still queued."""
        return {
            (str(target), int(lane))
            for target, lane in self.conn.execute(
                "SELECT DISTINCT target, lane FROM messages WHERE id > ? AND state = 'queued'", (after_id,)
            )
        }

    def leases(self) -> list[Lease]:
        return [
            Lease(str(n), str(o), float(at))
            for n, o, at in self.conn.execute("SELECT name, owner, expires_at FROM leases ORDER BY name")
        ]

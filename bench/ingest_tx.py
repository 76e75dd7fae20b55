"""The ingest transaction alone (`wacored.store.ingest.ingest`, no HTTP): CPU per message when routing reads
the sessions and counts the rate limit in the store, on an empty store and on a big one.

    .venv/bin/python bench/ingest_tx.py --big /tmp/big.db     # a store filled by bench/prefill.py --keep

Modes, each over the same posts (one text message each, 400 senders cycling key / 8 texts / menu, as
bench.py's mix), committed in groups of 16 as the writer does under load:

- ``memory``: the sessions from a dict and no rate-limit rows: what planning in process memory cost;
- ``store, 1 writer``: `StoreSessions` with its cache, the hits in ``rate_hits`` (one process);
- ``store, 2 writers``: two connections taking turns, so each finds the other's commit at every
  transaction and empties its cache (``data_version``): several processes sharing the store.

CPU is this process's (`time.process_time`), fsync included as the kernel bills it; the big store is
copied first and the copy deleted. Bounded: one process, a few thousand rows per mode. ``msgs/s`` is
wall-clock: on PostgreSQL (``--pg URL``: an empty schema of its own in that database, dropped after)
most of a transaction is round trips and the server's CPU, which this process's CPU does not see.

    .venv/bin/python bench/ingest_tx.py --pg postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collections.abc import Callable  # noqa: E402

import psycopg  # noqa: E402

from wacored.config import Config  # noqa: E402
from wacored.core.ingest import PlannedRow, plan_ingest  # noqa: E402
from wacored.core.numbers import Numbers  # noqa: E402
from wacored.core.ratelimit import RateLimit  # noqa: E402
from wacored.core.whatsapp import Batch, parse_webhook, text_webhook  # noqa: E402
from wacored.store import NewRow, WriteConnection, migrate  # noqa: E402
from wacored.store.ingest import IngestContext, IngestPolicy, StoreSessions, ingest  # noqa: E402
from wacored.store.interface import WriteTx  # noqa: E402
from wacored.store.postgres import PgWriteConnection, pg_migrate  # noqa: E402

GROUP = 16
SENDERS = 400


class Memory:
    """The sessions in a dict, as the daemon kept them before they came from the store."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[str, float]] = {}

    def get(self, number: str, sender: str) -> tuple[str, float] | None:
        return self.rows.get((number, sender))


def posts(count: int) -> list[Batch]:
    cycle = ["rides", *(f"where are you {i}" for i in range(8)), "menu"]
    out = []
    for i in range(count):
        sender = f"2507{(i % SENDERS) * 2477:08d}"  # spread over bench/prefill.py's 1 M senders
        text = cycle[(i // SENDERS) % len(cycle)]
        out.append(
            parse_webhook(text_webhook(text=text, sender=sender, wamid=f"wamid.{uuid.uuid4().hex}", timestamp=1))
        )
    return out


def measure(
    connect: Callable[[], WriteTx], batches: list[Batch], policy: IngestPolicy, mode: str
) -> tuple[float, float]:
    """CPU microseconds per message, and messages per second (wall clock)."""
    conns = [connect() for _ in range(2 if mode == "store, 2 writers" else 1)]
    caches = [StoreSessions(c, 50_000) for c in conns]
    memory = Memory()

    def trace(_: PlannedRow) -> str:
        return ""

    started, wall = time.process_time(), time.perf_counter()
    for n, start in enumerate(range(0, len(batches), GROUP)):
        conn, cache = conns[n % len(conns)], caches[n % len(conns)]
        conn.begin_waiting()
        cache.sync()
        for batch in batches[start : start + GROUP]:
            context = IngestContext("r", "c", time.time(), trace)
            if mode == "memory":
                plan = plan_ingest(batch, policy.numbers, memory, policy.session_ttl_s, context.received_at)
                rows = [
                    NewRow(p.key, p.kind, p.sender, p.service, p.reason, p.target, p.body, "r", "c", "", 0.0)
                    for p in plan.rows
                ]
                ids = conn.insert(rows, plan.changes)
                for index, change in plan.changes:
                    if ids[index] is not None:
                        memory.rows[change.who] = (change.service, change.at)
            else:
                ingest(conn, cache, batch, policy, context)
        conn.commit()
    used, elapsed = time.process_time() - started, time.perf_counter() - wall
    for c in conns:
        c.close()
    return used / len(batches) * 1e6, len(batches) / elapsed


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """An empty schema of this run's own in the database at `url`: a URL using it; dropped after."""
    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")  # type: ignore[arg-type]  # a name made here
    try:
        yield psycopg.conninfo.make_conninfo(url, options=f"-csearch_path={name}")
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE")  # type: ignore[arg-type]  # a name made here


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", type=Path, help="a store filled by bench/prefill.py (copied, never written)")
    p.add_argument("--posts", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3, help="best of this many runs per mode")
    p.add_argument("--pg", help="a PostgreSQL URL: also measure the store there (a schema of its own)")
    args = p.parse_args()
    config = Config.load(ROOT / "wacored.toml", {"WACORED_APP_SECRET": "bench"})
    policy = IngestPolicy(Numbers.from_config(config), config.sessions.ttl_s, RateLimit(1_000_000, 60.0))
    work = Path(tempfile.mkdtemp(prefix="wacored-ingest-tx-"))
    try:
        stores = [("empty", None)] + ([("big", args.big)] if args.big else [])
        print(f"{'store':8} {'mode':18} {'CPU us/msg':>10} {'msgs/s':>8}")
        for name, source in stores:
            for mode in ("memory", "store, 1 writer", "store, 2 writers"):
                best, rate = float("inf"), 0.0
                for _ in range(args.rounds):
                    path = work / "store.db"
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                    if source is None:
                        migrate(path)
                    else:
                        shutil.copyfile(source, path)
                        migrate(path)
                    cpu, per_s = measure(partial(WriteConnection, path), posts(args.posts), policy, mode)
                    best, rate = min(best, cpu), max(rate, per_s)
                print(f"{name:8} {mode:18} {best:10.0f} {rate:8.0f}")
        if args.pg:
            for mode in ("store, 1 writer", "store, 2 writers"):
                best, rate = float("inf"), 0.0
                for _ in range(args.rounds):
                    with pg_schema(args.pg) as url:
                        pg_migrate(url)
                        cpu, per_s = measure(partial(PgWriteConnection, url), posts(args.posts), policy, mode)
                    best, rate = min(best, cpu), max(rate, per_s)
                print(f"{'pg empty':8} {mode:18} {best:10.0f} {rate:8.0f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

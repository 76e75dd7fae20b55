"""Two processes committing to one SQLite store: how long a writer waits for the other's lock.

Run as ``.venv/bin/python bench/lock_wait.py [--commits 1500] [--rows 5]``. Each of two processes
opens wacored's write connection (`store.WriteConnection`: WAL, ``synchronous = FULL``) and commits
`--commits` transactions of `--rows` message rows each, as fast as it can, the way two workers'
writers do under load. Two ways to wait when the lock is taken are compared, one after the other on
a fresh store: ``busy`` (SQLite's own busy handler, `WriteConnection.begin_waiting`, which sleeps 1,
2, 5, 10 ms... between tries) and ``poll`` (try again every 0.2 ms, doubling to 2 ms). Prints the
commits per second of the two together and each begin's wait (mean, p50, p99). Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from multiprocessing.queues import Queue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wacored.store import NewRow, WriteConnection, migrate  # noqa: E402


def writer(path: str, strategy: str, commits: int, rows: int, who: int, out: Queue[list[float]]) -> None:
    conn = WriteConnection(Path(path), busy_timeout_ms=5000)
    waits: list[float] = []
    for i in range(commits):
        started = time.perf_counter()
        if not conn.try_begin():
            if strategy == "busy":
                conn.begin_waiting()
            else:
                delay = 0.0002
                while not conn.try_begin():
                    time.sleep(delay)
                    delay = min(delay * 2, 0.002)
        waits.append(time.perf_counter() - started)
        batch = [
            NewRow(f"w{who}-{i}-{r}", "message", f"s{r}", "rides", "keyword", "rides", b"{}", "r", "c", "", 1.0)
            for r in range(rows)
        ]
        conn.insert(batch, [])
        conn.commit()
    conn.close()
    out.put(waits)


def run(strategy: str, commits: int, rows: int) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wacored.db"
        migrate(path)
        out: Queue[list[float]] = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(target=writer, args=(str(path), strategy, commits, rows, who, out))
            for who in range(2)
        ]
        started = time.perf_counter()
        for p in procs:
            p.start()
        waits = [w for _ in procs for w in out.get()]
        for p in procs:
            p.join()
        return 2 * commits / (time.perf_counter() - started), waits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=1500)
    ap.add_argument("--rows", type=int, default=5)
    args = ap.parse_args()
    print(f"2 processes x {args.commits} commits of {args.rows} rows, one SQLite file (WAL, synchronous FULL)")
    print(f"{'wait':6} {'commits/s':>10} {'wait mean ms':>13} {'p50 ms':>8} {'p99 ms':>8}")
    for strategy in ("busy", "poll", "busy", "poll"):
        rate, waits = run(strategy, args.commits, args.rows)
        waits.sort()
        print(
            f"{strategy:6} {rate:10.0f} {statistics.mean(waits) * 1000:13.2f}"
            f" {waits[len(waits) // 2] * 1000:8.2f} {waits[int(len(waits) * 0.99)] * 1000:8.2f}"
        )


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    main()

"""What the attempts log costs the writer: commit cost per delivery outcome, with and without attempt rows.

Runs the writer's own statements (`WriteConnection.record` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``,
``synchronous = FULL``) on a fresh store in a temp dir, in groups as the group commit makes them
under load, and prints the cost per outcome side by side: outcomes carrying no attempt row (the
writer before the attempts log), one row (the usual delivery) and three rows (two retries).

Run as ``python bench/attempts.py [--outcomes N] [--group G]``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from wacored.store import AttemptRow, NewRow, Outcome, WriteConnection, migrate


def _store(path: Path, count: int) -> list[int]:
    migrate(path)
    conn = WriteConnection(path)
    conn.begin_waiting()
    rows = [
        NewRow(
            f"wamid.B{i}",
            "message",
            f"2507{i % 5000}",
            "rides",
            "keyword",
            "rides",
            b"{}" * 200,
            "rid",
            "cid",
            "tp",
            1.0,
        )
        for i in range(count)
    ]
    ids = conn.insert(rows, [])
    conn.commit()
    conn.close()
    return [i for i in ids if i is not None]


def _outcome(mid: int, tries: int) -> Outcome:
    rows = tuple(
        AttemptRow(
            mid,
            "rides",
            n,
            "delivery",
            1.0 + n,
            0.004,
            503 if n < tries else 200,
            "HTTP 503: busy" if n < tries else "",
            "bench-host-1",
        )
        for n in range(1, tries + 1)
    )
    return Outcome(mid, True, max(tries, 1), 2.0, target="rides", key=f"wamid.B{mid}", tries=rows)


def measure(tries: int, outcomes: int, group: int) -> float:
    """Microseconds per outcome committed, groups of `group`, each outcome with `tries` attempt rows."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        ids = _store(path, outcomes)
        conn = WriteConnection(path)
        started = time.perf_counter()
        for start in range(0, len(ids), group):
            conn.begin_waiting()
            for mid in ids[start : start + group]:
                conn.record(_outcome(mid, tries))
            conn.commit()
        took = time.perf_counter() - started
        conn.close()
    return took / len(ids) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--outcomes", type=int, default=20000)
    p.add_argument("--group", type=int, default=16, help="outcomes per transaction (a group commit under load)")
    p.add_argument("--runs", type=int, default=3, help="best of this many runs per case")
    args = p.parse_args()
    cases = {"no attempt rows (before)": 0, "1 attempt row": 1, "3 attempt rows": 3}
    best = {
        name: min(measure(tries, args.outcomes, args.group) for _ in range(args.runs)) for name, tries in cases.items()
    }
    base = best["no attempt rows (before)"]
    print(
        f"writer commit cost per delivered outcome ({args.outcomes} outcomes, groups of {args.group},"
        f" best of {args.runs}, synchronous=FULL)"
    )
    for name, us in best.items():
        print(f"  {name:<26} {us:8.1f} us/outcome   {us / base:5.2f}x")


if __name__ == "__main__":
    main()

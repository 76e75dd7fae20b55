"""Start-up and memory against a big store: pre-fill a SQLite store with N delivered messages and M live
sessions, then start `wacored run` on it and print how long it took to listen and its peak RSS, beside
the same figures on an empty store.

    .venv/bin/python bench/prefill.py                       # 5 000 000 messages, 1 000 000 sessions
    .venv/bin/python bench/prefill.py --messages 500000 --sessions 100000
    .venv/bin/python bench/prefill.py --store /tmp/big.db --keep   # reuse a filled store next time

What it shows: sessions are no longer loaded at start (the writer reads them from the store as senders
write, through a bounded cache, `wacored.store.ingest`), so start-up time and RSS no longer grow with the
number of senders (bench/README.md has the figures before and after). Bounded: one daemon at a
time on 127.0.0.1 port 0, stopped with SIGTERM; the store lives in a temp dir unless --store names one.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wacored.store import migrate  # noqa: E402

BATCH = 100_000
CONFIG = """
[server]
listen = "127.0.0.1:0"

[store]
path = "{path}"

[[home_menu.items]]
key = "rides"
title = "Rides"

[services.rides]
url = "http://127.0.0.1:9/rides"
keys = ["rides", "1"]
"""


def prefill(path: Path, messages: int, sessions: int, now: float) -> None:
    """`messages` delivered rows (one sender each, round robin over `sessions` senders) and `sessions`
    sessions touched within the last hour, written in big transactions (a few minutes for 5 M rows)."""
    migrate(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = OFF")  # a bench fixture: durability is not what is measured
    body = b'{"object":"whatsapp_business_account"}'
    try:
        for start in range(0, messages, BATCH):
            rows = [
                (
                    f"wamid.PREFILL{i:012d}",
                    "message",
                    f"2507{i % max(sessions, 1):08d}",
                    "rides",
                    "state",
                    "rides",
                    body,
                    "r",
                    "c",
                    "",
                    now - 3600 + i * 1e-6,
                    "delivered",
                    1,
                    now,
                )
                for i in range(start, min(start + BATCH, messages))
            ]
            conn.executemany(
                "INSERT INTO messages (key, kind, sender, service, reason, target, body, request_id,"
                " correlation_id, traceparent, received_at, state, attempts, done_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            conn.commit()
        for start in range(0, sessions, BATCH):
            rows2 = [
                ("", f"2507{i:08d}", "rides", now - 1800, now - 60) for i in range(start, min(start + BATCH, sessions))
            ]
            conn.executemany(
                "INSERT INTO sessions (number, sender, service, started_at, last_interaction) VALUES (?,?,?,?,?)", rows2
            )
            conn.commit()
    finally:
        conn.close()


def start_and_measure(path: Path, work: Path) -> tuple[float, int]:
    """Seconds from `wacored run` to its "listening" log line, and its peak RSS (VmHWM) in kB."""
    config = work / f"{path.stem}.toml"
    config.write_text(CONFIG.format(path=path))
    env = {**os.environ, "WACORED_APP_SECRET": "bench"}
    log = work / f"{path.stem}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "wacored"), "run", "-c", str(config), "--env-file", "/dev/null"],
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        deadline = started + 120
        while b'"event": "listening"' not in log.read_bytes():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"wacored did not start: see {log}")
            time.sleep(0.01)
        ready = time.monotonic() - started
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    return ready, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=5_000_000)
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--store", type=Path, help="the filled store (kept; filled only if it does not exist)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wacored-prefill-"))
    big = args.store or work / "big.db"
    if not big.exists():
        started = time.monotonic()
        prefill(big, args.messages, args.sessions, time.time())
        print(f"filled {big}: {args.messages} messages, {args.sessions} sessions in {time.monotonic() - started:.0f}s")
    empty = work / "empty.db"
    migrate(empty)
    rows = []
    for name, path in (("empty store", empty), (f"{args.messages} msgs, {args.sessions} sessions", big)):
        ready, peak = start_and_measure(path, work)
        rows.append((name, ready, peak / 1024))
    print(f"\n{'store':40} {'ready s':>8} {'peak RSS MB':>12}")
    for name, ready, peak_mb in rows:
        print(f"{name:40} {ready:8.2f} {peak_mb:12.0f}")
    print("\ntargets (issue 'Delivery from the store'): ready <= 0.875 s, peak RSS <= 80 MB per worker")
    if not args.keep and args.store is None:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()

"""What one webhook POST costs the serving process, beside what it costs the S1 no-op app.

A micro-benchmark of the request path, steadier than `bench.py` on a shared machine: the server runs
in this process on hypercorn (wacored's `run_daemon` with bench.py's config, or `noop.py`'s app), and
a client in another process sends `--requests` signed webhooks over `--connections` kept-alive
connections, each waiting for its answer before the next (so nothing queues) and opening a new
connection when an answer says ``Connection: close`` (hypercorn closes one after 1 000 requests); a
non-200 or a connection closed early fails the run instead of hanging it. The CPU time of this
process (user + system, every thread: `time.process_time`) is divided by the requests. `--calls`
runs the same load under cProfile (the event loop's thread) and prints Python function calls per
request instead: a deterministic count, the same from run to run up to the background actors' ticks.

``--kind statuses`` sends one ``delivered`` status update per POST to a wacored that drops them
(bench.py's statuses-dropped row); ``--kind messages`` sends bench.py's text messages and forwards
them to nginx (bench.py's downstream), and the measure runs until the store has none ``queued``: a
message's whole cost, ingest and delivery (the no-op app has nothing to deliver).

Run as ``python bench/ingress.py [--kind statuses] [--requests N] [--calls]``; ``PYTHONPATH`` (with
a working directory outside the repo) picks the wacored tree measured. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

# wacored first, from PYTHONPATH when set: bench.py puts this repo first on sys.path, which then
# only serves the modules not imported yet.
from wacored.config import Config
from wacored.daemon import run_daemon

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noop import app as noop_app  # noqa: E402

from bench import Procs, generate, generate_statuses, start_nginx, store_counts, wacored_env, write_config  # noqa: E402

SECRET = "bench-ingress-app-secret"

CLIENT = r"""
import os, socket, sys, threading
port, path, connections = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lines = open(path, encoding="utf-8").read().splitlines()
def fail(why):
    print(why, file=sys.stderr)
    os._exit(1)  # from a thread: sys.exit or an assert would end this thread only, and the run would hang
def run(mine):
    s = socket.create_connection(("127.0.0.1", port))
    data = b""
    for n, line in enumerate(mine):
        signature, body = line.split("\t", 1)
        raw = body.encode()
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"X-Hub-Signature-256: " + signature.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                fields = head.lower().split(b"\r\n")
                length = next(int(f.split(b":")[1]) for f in fields if f.startswith(b"content-length:"))
                if len(rest) >= length:
                    if not head.startswith(b"HTTP/1.1 200"):
                        fail(f"answer {n}: {head!r}")
                    data = rest[length:]
                    break
            chunk = s.recv(65536)
            if not chunk:
                fail(f"connection closed by the server after {n} answers, {data[:300]!r} unread")
            data += chunk
        if b"connection: close" in fields:  # hypercorn closes a connection after 1 000 requests
            s.close()
            s = socket.create_connection(("127.0.0.1", port))
    s.close()
threads = [threading.Thread(target=run, args=(lines[i::connections],)) for i in range(connections)]
for t in threads: t.start()
for t in threads: t.join()
"""


async def serve(
    app: str, config: Config, bodies: Path, connections: int, calls: bool
) -> tuple[float, pstats.Stats | None]:
    """Serve, send the warm-up file then the measured one (and deliver it); its CPU seconds and calls."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        if app == "noop":
            hc = hypercorn.config.Config()
            hc.bind = ["127.0.0.1:0"]
            hc.accesslog = None
            asgi: Any = noop_app
            urls = await nursery.start(partial(hypercorn.trio.serve, asgi, hc, shutdown_trigger=stop.wait))
        else:
            urls = await nursery.start(partial(run_daemon, config, stop=stop))
        port = str(urls[0]).rsplit(":", 1)[1].rstrip("/")
        client = [sys.executable, "-c", CLIENT, port]
        await trio.run_process([*client, f"{bodies}.warm", str(connections)])
        profile = cProfile.Profile() if calls else None
        started = time.process_time()
        if profile is not None:
            profile.enable()
        await trio.run_process([*client, str(bodies), str(connections)])
        while app != "noop" and (await trio.to_thread.run_sync(store_counts, config.store.path)).get("queued"):  # noqa: ASYNC110
            await trio.sleep(0.02)  # the store's state, polled: no event tells this loop it changed
        if profile is not None:
            profile.disable()
        cpu = time.process_time() - started
        stop.set()
    return cpu, None if profile is None else pstats.Stats(profile)


def bodies(tmp: Path, kind: str, requests: int) -> Path:
    """`requests` signed bodies in ``TMP/bodies`` and 500 others (unique ids) in ``TMP/bodies.warm``."""
    make = generate_statuses if kind == "statuses" else generate
    make(tmp / "all", SECRET, 1, requests + 500, 5000)
    lines = (tmp / "all.1").read_text().splitlines(keepends=True)
    (tmp / "bodies.warm").write_text("".join(lines[:500]))
    (tmp / "bodies").write_text("".join(lines[500:]))
    return tmp / "bodies"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("statuses", "messages"), default="statuses")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--calls", action="store_true", help="count Python function calls per request (cProfile)")
    p.add_argument("--apps", default="noop,wacored", help="which servers to measure, in order (default noop,wacored)")
    p.add_argument("--top", type=int, default=0, help="with --calls: also the N functions called most per request")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wacored-ingress-") as name:
        tmp = Path(name)
        path = bodies(tmp, args.kind, args.requests)
        procs = Procs()
        try:
            downstream = start_nginx(procs, tmp, None)[1] if args.kind == "messages" else "http://127.0.0.1:9"
            write_config(tmp / "wacored.toml", tmp / "store.db", downstream, statuses="")
            os.environ.update(wacored_env(SECRET))
            config = Config.load(tmp / "wacored.toml", dict(os.environ))
            apps = args.apps.split(",")
            runs = [(app, trio.run(serve, app, config, path, args.connections, args.calls)) for app in apps]
        finally:
            procs.stop_all()
        for app, (cpu, stats) in runs:
            per = args.requests
            if stats is None:
                what = f"{cpu / per * 1e6:.0f} us CPU"
            else:
                table = stats.stats  # type: ignore[attr-defined] # pstats keeps its table untyped
                what = f"{sum(nc for (_, nc, _, _, _) in table.values()) / per:.0f} calls"
            print(f"{app:8} {what} per request ({per} {args.kind} POSTs, {args.connections} connections)")
            if stats is not None and args.top:
                ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[: args.top]
                for (file, line, fn), (_, nc, _, _, _) in ranked:
                    print(f"    {nc / per:7.2f}  {fn} ({'/'.join(Path(file).parts[-2:])}:{line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

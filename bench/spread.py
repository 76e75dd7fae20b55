"""How evenly ``[server] processes = 2`` workers share the load: a short bounded load of signed
webhook POSTs over keep-alive connections, then each worker's own accepted count, read over its
private socket (``X-Wacored-Local``). Prints figures, asserts nothing.

    .venv/bin/python bench/spread.py [--requests 2000] [--connections 32] [--processes 2] [--rounds 3]

Every service URL points at a closed port (127.0.0.1:9): forwarding fails in the background and the
messages wait, which does not matter for who accepted them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

from wacored.core.whatsapp import sign, text_webhook

SECRET = "bench-spread-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(directory: Path, port: int, processes: int) -> Path:
    path = directory / "wacored.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nprocesses = {processes}\n'
        f'[store]\npath = "{directory / "wacored.db"}"\n'
        "[ratelimit]\nper_sender = 1000000\n"
        '[services.rides]\nurl = "http://127.0.0.1:9/rides"\nkeys = ["rides"]\n'
    )
    return path


async def load(url: str, requests: int, connections: int) -> float:
    per, sent = requests // connections, 0

    async def one_connection(n: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            for i in range(per):
                body = text_webhook(
                    text="hi", sender=f"2507{n:04d}{i:04d}", wamid=f"wamid.S{uuid.uuid4().hex}", timestamp=1700000000
                )
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)}
                response = await http.post(f"{url}/webhook", content=body, headers=headers)
                sent += response.status_code == 200

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(one_connection, n)
    return time.monotonic() - started


async def accepted(runtime_dir: str, index: int) -> int:
    transport = httpx.AsyncHTTPTransport(uds=os.path.join(runtime_dir, f"worker-{index}.sock"))
    async with httpx.AsyncClient(transport=transport, trust_env=False) as http:
        text = (await http.get("http://worker/metrics", headers={"X-Wacored-Local": "1"})).text
    for line in text.splitlines():
        if line.startswith('wacored_webhook_requests_total{outcome="accepted"}'):
            return int(float(line.split()[-1]))
    return 0


async def round_(args: argparse.Namespace) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="wacored-spread-") as directory:
        port = free_port()
        path = config(Path(directory), port, args.processes)
        runtime_dir = os.path.join(directory, "run")
        os.mkdir(runtime_dir)
        env = {**os.environ, "WACORED_APP_SECRET": SECRET, "RUNTIME_DIRECTORY": runtime_dir}
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wacored", "run", "-c", str(path)],
            env=env,
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(trust_env=False) as http:
                with trio.fail_after(30):
                    while True:
                        try:
                            workers = (await http.get(f"{url}/health")).json()["workers"]
                            if len(workers) == args.processes and all(w["ready"] for w in workers):
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.1)
            seconds = await load(url, args.requests, args.connections)
            counts = [await accepted(runtime_dir, i) for i in range(args.processes)]
            print(f"{sum(counts)} POSTs over {args.connections} keep-alive connections in {seconds:.1f} s: {counts}")
            return counts
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                await process.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    shares = []
    for _ in range(args.rounds):
        counts = trio.run(round_, args)
        shares.append(max(counts) / max(1, sum(counts)))
    print(f"busiest worker's share: {', '.join(f'{s:.0%}' for s in shares)} (even: {1 / args.processes:.0%})")


if __name__ == "__main__":
    main()

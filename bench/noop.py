"""A no-op ASGI app served by hypercorn's trio worker: the S1 ceiling, and the benchmark's downstream.

Answers every POST (any path) with 200 ``{}`` after reading the whole body. ``GET /count`` returns,
as JSON, how many POSTs it has answered and over how many TCP connections. ``GET /_gate/close`` makes
it hold every POST unanswered until ``GET /_gate/open`` (the benchmark's "forwarding held" diagnostic).

Run as ``python bench/noop.py``: it prints its bound URL on stdout once it is serving, and stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

POSTS = 0
PEERS: set[tuple[str, int]] = set()  # client (host, port) of every POST: one per TCP connection
GATE: trio.Event | None = None  # set while POSTs are held; opening sets the event
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global POSTS, GATE
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["method"] == "GET":
        if scope["path"] == "/_gate/close" and GATE is None:
            GATE = trio.Event()
        elif scope["path"] == "/_gate/open" and GATE is not None:
            GATE.set()
            GATE = None
        body = json.dumps({"posts": POSTS, "connections": len(PEERS)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    while True:  # read the whole body, as a real handler would
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    if GATE is not None:
        await GATE.wait()
    POSTS += 1
    if scope.get("client"):
        PEERS.add(tuple(scope["client"]))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"{}"})


async def main(host: str, port: int) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            asgi: Any = app
            urls = await nursery.start(partial(hypercorn.trio.serve, asgi, config, shutdown_trigger=stop.wait))
            print(urls[0], flush=True)
            async for _ in signals:
                stop.set()
                break


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    trio.run(main, args.host, args.port)
    sys.exit(0)

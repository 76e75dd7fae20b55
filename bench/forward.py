"""What one forward costs wacored's process: `forwarder.attempt` through a `LaneTransport`, alone.

A micro-benchmark of the forward path, steadier than `bench.py` on a shared machine: one lane posts
`--attempts` signed deliveries, one after another, to a minimal HTTP/1.1 downstream in another process
(a plain socket server answering ``200 {}``), and the CPU time of this process alone (user + system,
`time.process_time`) is divided by the attempts. `--calls` runs the same loop under cProfile and
prints Python function calls per attempt instead: a deterministic count, the same from run to run.

Run as ``python bench/forward.py [--attempts N] [--calls]``; ``PYTHONPATH`` picks the wacored tree
measured (to compare two commits, run it against each). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import time

import trio

from wacored.actors.forwarder import Target, attempt
from wacored.actors.transport import LaneTransport
from wacored.config import ForwardingConfig
from wacored.store import Delivery

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

SERVER = r"""
import socket, sys
ANSWER = (  # nginx's answer to `return 200 '{}'`, as bench.py's downstream sends it
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}"
)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
data = b""
while True:
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        if len(rest) < length:
            break
        data = rest[length:]
        conn.sendall(ANSWER)
"""


def delivery(i: int) -> Delivery:
    body = b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[]}],"n":"%d"}' % i
    return Delivery(
        key=f"wamid.B{i}",
        kind="message",
        sender="250788000001",
        service="rides",
        reason="session",
        target="rides",
        body=body * 6,
        request_id="6d3f2a8e-7d4b-4f4e-9c55-2f0d5f7a1c11",
        correlation_id="0c1f7e2b-5a3d-4c8e-a1f2-9b8e7d6c5a4b",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        received_at=0.0,
        number="106540352242922",
        id=i,
    )


async def run(url: str, attempts: int, profile: cProfile.Profile | None) -> float:
    target = Target(
        name="rides",
        url=url,
        forwarding=ForwardingConfig(timeout_ms=5000),
        signing_secrets=(SECRET,),
        default_number="106540352242922",
    )
    deliveries = [delivery(i) for i in range(attempts + 100)]
    async with LaneTransport() as transport:
        for d in deliveries[:100]:  # warm up: the connection, caches
            await attempt(transport, target, d)
        started = time.process_time()
        if profile is not None:
            profile.enable()
        for d in deliveries[100:]:
            result = await attempt(transport, target, d)
            assert result.status_code == 200, result
        if profile is not None:
            profile.disable()
        return time.process_time() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attempts", type=int, default=5000)
    p.add_argument("--calls", action="store_true", help="count Python function calls per attempt (cProfile)")
    args = p.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        profile = cProfile.Profile() if args.calls else None
        cpu = trio.run(run, f"http://127.0.0.1:{port}/webhook", args.attempts, profile)
    finally:
        server.kill()
        server.wait()
    if profile is not None:
        stats = pstats.Stats(profile)
        calls = sum(nc for (_, nc, _, _, _) in stats.stats.values())  # type: ignore[attr-defined]
        print(f"{calls / args.attempts:.1f} Python function calls per attempt ({args.attempts} attempts)")
    else:
        print(f"{cpu / args.attempts * 1e6:.0f} us CPU per attempt ({args.attempts} attempts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The daemon's memory under stalled webhook bodies: the "Bounded reads" finding, measured.

Run as ``.venv/bin/python bench/slow_bodies.py [--bodies 100] [--src DIR]``. Everything runs on
127.0.0.1: ``python -m wacored run`` as a subprocess on a fresh store and config (the defaults of
``[server]``, so an older wacored reads the same file), or the wacored at `--src` (a checkout of
another commit, e.g. from ``git archive``, to measure before and after). Then `--bodies` connections each send
the head of an unsigned ``POST /webhook`` declaring ``max_body_bytes`` - 1 bytes and all but 1 KiB
of that body, then stall. Once every body is sent (or its connection was answered and closed), the
daemon's RSS is read from ``/proc`` (``VmRSS``, and ``VmHWM``, its peak) and compared with its RSS
at idle, and the answers the connections got so far are counted.

The whole run is bounded (`--limit-s`, default 60 s) and stops the daemon at the end. Exit status 2
when the run could not be carried out.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
BODY_BYTES = 3 * 1024 * 1024 - 1
"""Just under the default ``max_body_bytes`` (3 MiB)."""
HELD_BACK = 1024


def config_text(tmp: Path, port: int) -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n[store]\npath = "{tmp / "wacored.db"}"\n\n'
        '[services.rides]\nurl = "http://127.0.0.1:9/rides"\nkeys = ["rides"]\n'
    )


def launcher(src: str) -> list[str]:
    """The command running wacored: this checkout's, or the one at `src`. The editable install's import
    hook would win over ``PYTHONPATH``, so it is removed before `src` is put first on the path."""
    if not src:
        return [sys.executable, "-m", "wacored"]
    code = (
        "import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
        f"getattr(f, '__module__', '')]; sys.path.insert(0, {str(Path(src).resolve())!r}); "
        "sys.argv[0] = 'wacored'; runpy.run_module('wacored', run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


async def wait_healthy(url: str, p: trio.Process) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        while p.poll() is None:
            try:
                if (await client.get(f"{url}/health", timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)
    raise SystemExit(f"wacored exited ({p.returncode}) before serving")


async def stalled_body(port: int, answers: Counter[str], sent: list[int], hold: trio.Event) -> None:
    """One connection: the head and all but `HELD_BACK` bytes of the body, then nothing until `hold`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY_BYTES}\r\n\r\n"
    ).encode()
    async with stream:
        try:
            await stream.send_all(head + b" " * (BODY_BYTES - HELD_BACK))
            sent.append(1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_note_answer, stream, answers, nursery.cancel_scope)
                await hold.wait()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            answers["closed while sending"] += 1
            sent.append(1)


async def _note_answer(stream: trio.SocketStream, answers: Counter[str], scope: trio.CancelScope) -> None:
    try:
        data = await stream.receive_some(4096)
    except trio.BrokenResourceError:
        data = b""
    answers[data.split(b"\r\n", 1)[0].decode("latin-1") or "closed"] += 1


async def measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="wacored-slow-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        config = tmp / "wacored.toml"
        config.write_text(config_text(tmp, port))
        env = {**os.environ, "WACORED_APP_SECRET": "bench-secret", "WACORED_VERIFY_TOKEN": "bench-token"}
        log = (tmp / "wacored.log").open("wb")
        p = await trio.lowlevel.open_process(
            [*launcher(args.src), "run", "-c", str(config), "--log-level", "warning"],
            env=env,
            stdout=log,
            stderr=log,
            cwd=tmp,
        )
        try:
            with trio.fail_after(args.limit_s):
                await wait_healthy(f"http://127.0.0.1:{port}", p)
                idle = proc_kib(p.pid, "VmRSS")
                answers: Counter[str] = Counter()
                sent: list[int] = []
                hold = trio.Event()
                started = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for _ in range(args.bodies):
                        nursery.start_soon(stalled_body, port, answers, sent, hold)
                    while len(sent) < args.bodies:  # noqa: ASYNC110 -- a bench's progress poll
                        await trio.sleep(0.05)
                    await trio.sleep(args.settle_s)  # let the daemon take in what the kernel holds
                    held = proc_kib(p.pid, "VmRSS")
                    peak = proc_kib(p.pid, "VmHWM")
                    elapsed = time.monotonic() - started
                    hold.set()
                alive = p.poll() is None
        finally:
            p.send_signal(signal.SIGTERM)
            with trio.CancelScope(shield=True), trio.move_on_after(15) as waited:
                await p.wait()
            if waited.cancelled_caught:
                p.kill()
            log.close()
    print(f"bodies: {args.bodies} x {BODY_BYTES - HELD_BACK} bytes of {BODY_BYTES}, stalled; src: {args.src or ROOT}")
    print(f"RSS idle: {idle / 1024:.0f} MB; holding: {held / 1024:.0f} MB; peak (VmHWM): {peak / 1024:.0f} MB")
    print(f"sent in {elapsed:.1f} s; answers while held: {dict(answers) or 'none'}; daemon alive: {alive}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=100)
    parser.add_argument("--src", default="", help="a wacored checkout to run instead of this one")
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--limit-s", type=float, default=60.0)
    args = parser.parse_args()
    try:
        return trio.run(measure, args)
    except trio.TooSlowError:
        print(f"the run took over {args.limit_s} s", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

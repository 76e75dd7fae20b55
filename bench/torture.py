"""wacored crash-safety torture: signed messages under load while the daemon is killed and restarted.

Run as ``.venv/bin/python bench/torture.py --mode kill|term|hup|worker-kill [--messages 3000] ...``; bench/README.md
explains the figures. Everything runs on 127.0.0.1:

- a recording downstream, served in this process by hypercorn: it notes the ``Idempotency-Key`` of
  every forward it receives (services and the Graph API sender alike) and answers 200;
- ``.venv/bin/wacored run`` as a subprocess, on a fresh store and config in a temp dir, every service
  and the Graph API pointing at the recorder, a fixed port so that restarts keep the address; with
  `--processes N` (default 2 in mode worker-kill, else 1) a supervisor of N worker processes;
- `--senders` concurrent senders posting `--messages` signed webhooks (one text message each, a unique
  wamid), each retried like Meta would until it is answered 200: after a refused or reset connection,
  or after any other status;
- the chaos: `--signals` times, at random points of the load (seeded), SIGKILL + restart (`kill`),
  SIGTERM + restart (`term`), or SIGHUP (`hup`: the daemon should reload and keep serving; if it dies
  instead, that is reported and it is restarted so that the run can finish); or SIGKILL to one worker
  picked at random from /health ``workers`` (`worker-kill`): the supervisor restarts it, the other
  worker keeps serving, and the dead worker's lanes are taken over (docs/architecture.md). The chaos
  waits until /health lists the restarted worker ready before it goes on.

Then a final SIGTERM and restart, and the store is polled (read-only) until nothing is ``queued``.

Each request that does not end in 200 is classified. *Not taken*: the connection was refused, or the
request was sent while the daemon was down or stopping (after a signal, before it was serving again);
Meta retries it and nothing is lost (docs/stack-notes.md, "Serving"). *Interrupted*:
sent before a SIGKILL and cut by it (in mode worker-kill: left unanswered while a worker was dead or
restarting, on a connection the dead worker held). *Failed*: any other request left unanswered, or any answer but
200; a SIGTERM or SIGHUP must leave none.

Figures: sent, acknowledged (200), delivered (distinct keys at the recorder), dead-lettered (the
store's ``dead_letters``), duplicates delivered (allowed: delivery is at least once) and LOST, the
acknowledged messages neither delivered nor dead-lettered. Exit status 1 when LOST > 0, or, in modes
term and hup, when a request failed (or in mode worker-kill when a killed worker was not restarted);
2 when the run itself could not be carried out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import httpx
import hypercorn.config
import hypercorn.trio
import trio

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WACORED = ROOT / ".venv" / "bin" / "wacored"

sys.path.insert(0, str(ROOT))
from wacored.core.whatsapp import sign, text_webhook  # noqa: E402

SERVICES = ("rides", "jobs", "wallet")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "hup": signal.SIGHUP, "worker-kill": signal.SIGKILL}
KILLS = ("kill", "worker-kill")
"""Modes whose SIGKILLs may cut requests (interrupted, not failed) and whose failed requests do not fail the run."""
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
HUP_GRACE_S = 1.0
"""After SIGHUP the daemon must still be running this much later."""
RETRY_PAUSE_S = (0.02, 0.1)
"""A refused message is posted again after a pause drawn from this range (Meta waits far longer)."""


class RunError(Exception):
    """The torture could not be carried out (the daemon did not start, did not stop, ...)."""


# --------------------------------------------------------------------------------------------------
# The recording downstream


@dataclass
class Recorder:
    """An ASGI app noting the ``Idempotency-Key`` of every POST before answering it 200.

    With `delay_s` it takes that long over each POST (more deliveries in flight when a signal comes);
    with `fail_rate` it answers that share of POSTs 503 instead, recording nothing (a transient
    failure: wacored retries, then dead-letters).
    """

    delay_s: float = 0.0
    fail_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    keys: Counter[str] = field(default_factory=Counter)
    posts: int = 0
    refused: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": f"{kind}.complete"})  # lifespan.startup / lifespan.shutdown
                if kind == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body", False):
            pass
        status = 200
        if scope["method"] == "POST":
            await trio.sleep(self.delay_s)
            self.posts += 1
            if self.rng.random() < self.fail_rate:
                status = 503
                self.refused += 1
            else:
                self.keys[dict(scope["headers"]).get(b"idempotency-key", b"").decode()] += 1
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


async def serve_recorder(nursery: trio.Nursery, recorder: Recorder) -> str:
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("torture.recorder")  # warnings and errors only (Python's last resort)
    hc.graceful_timeout = 0.5
    urls: list[str] = await nursery.start(partial(hypercorn.trio.serve, recorder, hc))
    return urls[0]


# --------------------------------------------------------------------------------------------------
# The daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, store: Path, port: int, downstream: str, processes: int = 1) -> None:
    q = json.dumps
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        f"processes = {processes}",
        "",
        "[whatsapp]",
        'phone_number_id = "TORTURE"',
        f"graph_api_url = {q(downstream + '/graph')}",
        "",
        "[store]",
        f"path = {q(str(store))}",
        "",
        "[ratelimit]",
        "per_sender = 1000000",
        "window_s = 60",
        "",  # the torture is not about 429
        "[forwarding]",
        "timeout_ms = 2000",
        "retries = 3",
        "retry_base_ms = 50",
        "concurrency = 4",
        "",
    ]
    for name in SERVICES:
        lines += ["[[home_menu.items]]", f"key = {q(name)}", f"title = {q(name.title())}", ""]
    for name in SERVICES:
        lines += [f"[services.{name}]", f"url = {q(f'{downstream}/{name}')}", f"keys = {q([name])}", ""]
    path.write_text("\n".join(lines))


@dataclass
class Daemon:
    """``wacored run`` as a subprocess that the chaos stops and starts again."""

    command: list[str]
    env: dict[str, str]
    url: str
    log: TextIO
    process: trio.Process | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)
    stop_s: list[float] = field(default_factory=list)
    """How long each exit took after its SIGTERM."""

    async def start(self, client: httpx.AsyncClient) -> None:
        started = time.monotonic()
        self.process = await trio.lowlevel.open_process(
            self.command, env=self.env, stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.starts += 1
        with trio.move_on_after(READY_TIMEOUT_S):
            while self.process.returncode is None:
                try:
                    # Connection: close: an idle keep-alive connection that last carried a Quart-served
                    # request (/health) holds a SIGTERM'd daemon for hypercorn's whole graceful_timeout.
                    health = await client.get(f"{self.url}/health", timeout=2.0, headers={"Connection": "close"})
                    if health.status_code == 200:
                        self.ready_s.append(time.monotonic() - started)
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.02)
        raise RunError(f"wacored did not become ready (exit code {self.process.returncode}); see its log")

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self) -> int:
        """The exit code, once the process has ended (callers bound the wait)."""
        assert self.process is not None
        code = await self.process.wait()
        self.exits.append(code)
        return code

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not end in time (which is reported as a failure)."""
        self.signal(signal.SIGTERM)
        signalled = time.monotonic()
        with trio.move_on_after(STOP_TIMEOUT_S):
            code = await self.wait()
            self.stop_s.append(time.monotonic() - signalled)
            return code
        self.signal(signal.SIGKILL)
        await self.wait()
        raise RunError(f"wacored did not stop within {STOP_TIMEOUT_S}s of SIGTERM")


# --------------------------------------------------------------------------------------------------
# Load and chaos


@dataclass
class Tally:
    """What the senders and the chaos saw."""

    acked: set[str] = field(default_factory=set)
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    not_taken: Counter[str] = field(default_factory=Counter)
    interrupted: int = 0
    failed: list[str] = field(default_factory=list)
    down_since: float | None = None
    """Set from a signal until the daemon serves again: requests sent meanwhile are not taken."""
    kills: list[float] = field(default_factory=list)
    """When each SIGKILL was sent (monotonic)."""
    outages: list[list[float]] = field(default_factory=list)
    """Mode worker-kill: [killed at, restarted at] of each killed worker (monotonic; the end is inf
    until /health lists its successor ready)."""
    restarted: list[float] = field(default_factory=list)
    """Mode worker-kill: how long each killed worker took to be listed ready again."""
    events: list[str] = field(default_factory=list)
    not_restarted: int = 0
    progress: trio.Event = field(default_factory=trio.Event)

    def acknowledge(self, wamid: str) -> None:
        self.acked.add(wamid)
        self.progress.set()
        self.progress = trio.Event()


def body_of(i: int, phones: int) -> tuple[str, bytes]:
    """Message `i`: a unique wamid from one of `phones` senders; a service key, free texts, "menu"."""
    wamid = f"wamid.TORTURE.{i:07d}"
    step = (i // phones) % 10
    text = SERVICES[i % len(SERVICES)] if step == 0 else "menu" if step == 9 else f"free text {i}"
    return wamid, text_webhook(
        text=text, sender=f"25078{i % phones:07d}", wamid=wamid, timestamp=1_700_000_000, phone_number_id="TORTURE"
    )


@dataclass
class SendClock:
    """An httpx trace hook noting when the request's bytes started to leave (none: never sent)."""

    sent_at: float | None = None

    async def __call__(self, event: str, _info: Mapping[str, Any]) -> None:
        if event == "http11.send_request_headers.started" and self.sent_at is None:
            self.sent_at = time.monotonic()


async def post_until_acked(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    wamid: str,
    body: bytes,
    tally: Tally,
    mode: str,
    rng: random.Random,
) -> None:
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(secret, body)}
    while True:
        clock = SendClock()
        tally.requests += 1
        try:
            r = await client.post(f"{url}/webhook", content=body, headers=headers, extensions={"trace": clock})
        except httpx.ConnectError:
            tally.not_taken["refused"] += 1
        except httpx.TransportError as exc:
            classify_unanswered(tally, mode, clock.sent_at, time.monotonic(), wamid, exc)
        else:
            tally.statuses[r.status_code] += 1
            if r.status_code == 200:
                tally.acknowledge(wamid)
                return
            tally.failed.append(f"{wamid}: HTTP {r.status_code} {r.text[:120]}")
        await trio.sleep(rng.uniform(*RETRY_PAUSE_S))


def classify_unanswered(
    tally: Tally, mode: str, sent_at: float | None, now: float, wamid: str, exc: httpx.TransportError
) -> None:
    """Not taken (sent while the daemon was down or stopping), interrupted (by a SIGKILL), or failed."""
    if sent_at is None or (tally.down_since is not None and sent_at >= tally.down_since):
        tally.not_taken["reset after a signal" if sent_at is not None else "not sent"] += 1
    elif mode == "kill" and any(sent_at < k <= now for k in tally.kills):
        tally.interrupted += 1
    elif mode == "worker-kill" and any(start <= now and sent_at <= end for start, end in tally.outages):
        tally.interrupted += 1  # in flight while a worker was dead: on one of its connections
    else:
        tally.failed.append(f"{wamid}: {type(exc).__name__} {exc}".rstrip())


async def send_all(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    args: argparse.Namespace,
    tally: Tally,
    receive: trio.MemoryReceiveChannel[int],
    rng: random.Random,
) -> None:
    async with receive:
        async for i in receive:
            wamid, body = body_of(i, args.phones)
            await post_until_acked(client, url, secret, wamid, body, tally, args.mode, rng)


async def chaos(
    daemon: Daemon, client: httpx.AsyncClient, args: argparse.Namespace, tally: Tally, rng: random.Random
) -> None:
    """At `--signals` random points of the load, signal the daemon; restart it unless it must survive."""
    points = sorted(rng.uniform(0.1, 0.9) * args.messages for _ in range(args.signals))
    for n, point in enumerate(points, 1):
        while len(tally.acked) < point:
            await tally.progress.wait()
        await trio.sleep(rng.uniform(0.0, 0.05))
        if args.mode == "worker-kill":
            await kill_a_worker(daemon, client, tally, rng, n, f"{len(tally.acked)}/{args.messages} acked")
            continue
        signum = SIGNALS[args.mode]
        at = f"{len(tally.acked)}/{args.messages} acked"
        tally.down_since = time.monotonic()
        if args.mode == "kill":
            tally.kills.append(tally.down_since)
        daemon.signal(signum)
        code: int | None = None
        if args.mode == "hup":
            with trio.move_on_after(HUP_GRACE_S):
                code = await daemon.wait()
            if code is None:
                tally.down_since = None
                tally.events.append(f"SIGHUP {n} at {at}: still serving")
                continue
            tally.events.append(f"SIGHUP {n} at {at}: the daemon DIED (exit code {code}); restarted")
        else:
            with trio.move_on_after(STOP_TIMEOUT_S):
                code = await daemon.wait()
                if signum == signal.SIGTERM:
                    daemon.stop_s.append(time.monotonic() - tally.down_since)
            if code is None:
                daemon.signal(signal.SIGKILL)
                await daemon.wait()
                tally.failed.append(f"{signal.Signals(signum).name} {n}: did not stop within {STOP_TIMEOUT_S}s")
            tally.events.append(f"{signal.Signals(signum).name} {n} at {at}: exit code {code}")
        await daemon.start(client)
        tally.down_since = None


async def workers_listed(daemon: Daemon, client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """/health ``workers`` (any worker answers for all; empty when no answer came)."""
    try:
        health = await client.get(f"{daemon.url}/health", timeout=2.0, headers={"Connection": "close"})
        return list(health.json().get("workers", []))
    except (httpx.TransportError, ValueError):
        return []


async def kill_a_worker(
    daemon: Daemon, client: httpx.AsyncClient, tally: Tally, rng: random.Random, n: int, at: str
) -> None:
    """SIGKILL one worker picked at random from /health, then wait (bounded) until /health lists its
    successor ready: the supervisor restarts it, and the port keeps serving meanwhile."""
    listed = [w for w in await workers_listed(daemon, client) if w.get("ready") and "pid" in w]
    if not listed:
        raise RunError("no worker listed ready in /health")
    victim = rng.choice(listed)
    outage = [time.monotonic(), math.inf]
    tally.kills.append(outage[0])
    tally.outages.append(outage)
    os.kill(int(victim["pid"]), signal.SIGKILL)
    with trio.move_on_after(READY_TIMEOUT_S):
        while True:
            now = {w.get("index"): w for w in await workers_listed(daemon, client)}
            successor = now.get(victim["index"], {})
            if successor.get("ready") and successor.get("pid") not in (None, victim["pid"]):
                outage[1] = time.monotonic()
                tally.restarted.append(outage[1] - outage[0])
                tally.events.append(
                    f"SIGKILL {n} to worker {victim['index']} (pid {victim['pid']}, {len(victim.get('lanes_held', []))}"
                    f" lanes) at {at}: restarted as pid {successor['pid']}, ready after {tally.restarted[-1]:.2f}s"
                )
                return
            await trio.sleep(0.05)
    tally.failed.append(f"SIGKILL {n}: worker {victim['index']} not listed ready again within {READY_TIMEOUT_S}s")
    tally.not_restarted += 1


# --------------------------------------------------------------------------------------------------
# The store, read-only


def read_store(store: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5.0)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def wait_delivered(store: Path, recorder: Recorder) -> None:
    """Poll until no message is queued and the recorder has seen nothing new for a moment (callers
    bound the wait)."""
    last = -1
    while True:
        [(queued,)] = read_store(store, "SELECT COUNT(*) FROM messages WHERE state = 'queued'")
        if queued == 0 and recorder.posts == last:
            return
        last = recorder.posts
        await trio.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Result:
    sent: int
    acked: int
    delivered: int
    dead_lettered: int
    duplicates: int
    lost: list[str]
    drained: bool
    wall_s: float
    refused: int
    tally: Tally
    daemon: Daemon
    problems: list[str]


async def torture(args: argparse.Namespace, tmp: Path, log: TextIO) -> Result:
    started = time.monotonic()
    rng = random.Random(args.seed)
    secret = secrets.token_hex(16)
    store = tmp / "wacored.db"
    recorder = Recorder(args.downstream_delay_ms / 1000, args.fail_rate, random.Random(rng.random()))
    tally = Tally()
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(
            trust_env=False, timeout=10.0, limits=httpx.Limits(max_connections=args.senders + 4)
        ) as client,
    ):
        downstream = await serve_recorder(nursery, recorder)
        port = free_port()
        write_config(tmp / "wacored.toml", store, port, downstream, args.processes)
        config = ["-c", str(tmp / "wacored.toml"), "--env-file", str(tmp / "none.env")]
        command = [*shlex.split(args.wacored), "run", *config]
        env = {**os.environ, "WACORED_APP_SECRET": secret, "WACORED_ACCESS_TOKEN": "torture-token"}
        daemon = Daemon(command, env, f"http://127.0.0.1:{port}", log)
        try:
            await daemon.start(client)
            sent = await load(daemon, client, secret, args, tally, rng)
            loaded = time.monotonic()
            tally.events.append(f"load phase: {loaded - started:.1f}s")
            tally.events.append(f"final restart: SIGTERM (exit code {await daemon.stop()}), start")
            await daemon.start(client)
            drained = False
            with trio.move_on_after(args.drain_timeout):
                await wait_delivered(store, recorder)
                drained = True
            tally.events.append(f"final restart and drain: {time.monotonic() - loaded:.1f}s")
            await daemon.stop()
        finally:
            if daemon.process is not None and daemon.process.returncode is None:
                daemon.process.kill()
        nursery.cancel_scope.cancel()
    dead = {key for (key,) in read_store(store, "SELECT key FROM dead_letters")}
    wamids = {body_of(i, args.phones)[0] for i in range(sent)}
    delivered = {k for k in recorder.keys if k in wamids}
    log.flush()
    problems = [
        ln[:240]
        for ln in (tmp / "wacored.log").read_text().splitlines()
        if ('"actor_crashed"' in ln or '"level": "error"' in ln)
        and not (args.mode == "worker-kill" and '"event": "worker_exited"' in ln and '"SIGKILL"' in ln)
    ]
    return Result(
        sent=sent,
        acked=len(tally.acked),
        delivered=len(delivered),
        dead_lettered=len(dead & wamids),
        duplicates=sum(1 for k in delivered if recorder.keys[k] > 1),
        lost=sorted(tally.acked - delivered - dead),
        drained=drained,
        wall_s=time.monotonic() - started,
        refused=recorder.refused,
        tally=tally,
        daemon=daemon,
        problems=problems,
    )


async def load(
    daemon: Daemon, client: httpx.AsyncClient, secret: str, args: argparse.Namespace, tally: Tally, rng: random.Random
) -> int:
    """Send every message (within `--max-load-s`), with the chaos alongside; how many were sent."""
    send, receive = trio.open_memory_channel[int](0)
    sent = 0
    chaos_done = trio.Event()

    async def run_chaos() -> None:
        await chaos(daemon, client, args, tally, rng)
        chaos_done.set()

    with trio.move_on_after(args.max_load_s) as deadline:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_chaos)
            async with receive:
                for _ in range(args.senders):
                    nursery.start_soon(
                        send_all, client, daemon.url, secret, args, tally, receive.clone(), random.Random(rng.random())
                    )
            async with send:
                for i in range(args.messages):
                    await send.send(i)
                    sent += 1
            while len(tally.acked) < sent:
                await tally.progress.wait()
            await chaos_done.wait()
            nursery.cancel_scope.cancel(reason="every message acknowledged")
    if deadline.cancelled_caught:
        tally.events.append(
            f"load stopped by --max-load-s {args.max_load_s}s: {sent - len(tally.acked)} messages"
            " sent but never acknowledged (not lost: Meta would still be retrying them)"
        )
        if daemon.process is not None and daemon.process.returncode is not None:
            await daemon.start(client)
    return sent


def report(args: argparse.Namespace, r: Result) -> str:
    t = r.tally
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(t.not_taken.items())) or "none"
    statuses = ", ".join(f"{s} x {n}" for s, n in sorted(t.statuses.items()))
    ready = f"{sum(r.daemon.ready_s) / len(r.daemon.ready_s):.2f}s" if r.daemon.ready_s else "-"
    died = sum(1 for e in t.events if "DIED" in e)
    verdict = "PASS" if passed(args, r) else "FAIL"
    lines = [
        f"wacored torture, mode {args.mode}: {args.messages} messages from {args.senders} concurrent senders"
        f" ({args.phones} phone numbers), {args.processes} process(es), {args.signals} x {SIGNALS[args.mode].name}"
        f"{' to a worker' if args.mode == 'worker-kill' else ''}, seed {args.seed};"
        f" downstream delay {args.downstream_delay_ms:g} ms, fail rate {args.fail_rate:g}",
        "",
        f"sent            {r.sent}",
        f"acknowledged    {r.acked}  (answered 200)",
        f"delivered       {r.delivered}  (distinct Idempotency-Keys at the downstream)",
        f"dead-lettered   {r.dead_lettered}  (the downstream answered {r.refused} forwards 503)",
        f"duplicates      {r.duplicates}  (keys delivered more than once: at-least-once, allowed)",
        f"LOST            {len(r.lost)}  (acknowledged, neither delivered nor dead-lettered)",
        "",
        f"requests        {t.requests}: {statuses}",
        f"not taken       {sum(t.not_taken.values())}  ({kinds}; retried)",
        f"interrupted     {t.interrupted}  (sent before a SIGKILL, cut by it; retried)",
        *(
            [
                f"workers killed  {len(t.kills)}, restarted {len(t.restarted)}"
                f" (listed ready again after {', '.join(f'{s:.2f}s' for s in t.restarted) or '-'})"
            ]
            if args.mode == "worker-kill"
            else []
        ),
        f"failed          {len(t.failed)}  (unanswered though sent while the daemon was serving, or not 200)",
        f"daemon          {r.daemon.starts} starts, ready after {ready} on average; exit codes {r.daemon.exits};"
        f" SIGTERM to exit {', '.join(f'{s:.1f}s' for s in r.daemon.stop_s)}",
        f"drain           {'every message delivered or dead-lettered' if r.drained else 'TIMED OUT'}"
        f" after the final restart",
        f"wall time       {r.wall_s:.1f}s",
        *(
            [
                f"SIGHUP killed the daemon {died} of {args.signals} times (exit code -1: the signal's default action,"
                " no handler caught it); the requests it was serving failed"
            ]
            if died
            else []
        ),
        f"verdict         {verdict}",
        "",
        *t.events,
        *(f"  failed: {f}" for f in t.failed[:10]),
        *(f"  lost: {k}" for k in r.lost[:10]),
        *(f"  daemon log: {p}" for p in r.problems[:5]),
    ]
    return "\n".join(lines)


def passed(args: argparse.Namespace, r: Result) -> bool:
    """Nothing lost, everything drained; in modes term and hup no failed request; in mode worker-kill
    every killed worker restarted."""
    failed = bool(r.tally.failed) and args.mode not in KILLS
    return not r.lost and r.drained and not failed and not r.tally.not_restarted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="wacored crash-safety torture (see the module docstring)")
    p.add_argument("--mode", choices=sorted(SIGNALS), required=True)
    p.add_argument("--messages", type=int, default=3000, help="signed messages to send (default 3000)")
    p.add_argument("--senders", type=int, default=8, help="concurrent senders (default 8)")
    p.add_argument("--phones", type=int, default=200, help="distinct WhatsApp senders in the messages (default 200)")
    p.add_argument("--signals", type=int, default=4, help="signals sent during the load (default 4)")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="[server] processes: worker processes behind a supervisor (default 2 in mode worker-kill, else 1)",
    )
    p.add_argument(
        "--downstream-delay-ms",
        type=float,
        default=0.0,
        help="the downstream takes this long over each forward (default 0)",
    )
    p.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="share of forwards the downstream answers 503 (default 0; some end dead-lettered)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the signal points and retry pauses (default 1)")
    p.add_argument("--max-load-s", type=float, default=80.0, help="bound on the load phase (default 80)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="bound on waiting for deliveries after the final restart (default 30)",
    )
    p.add_argument(
        "--wacored",
        default=str(WACORED),
        help="command that runs wacored (default .venv/bin/wacored); `run -c FILE ...` is appended",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (store, config, daemon log)")
    args = p.parse_args(argv)
    if args.processes is None:
        args.processes = 2 if args.mode == "worker-kill" else 1
    if args.mode == "worker-kill" and args.processes < 2:
        p.error("mode worker-kill needs --processes 2 or more (one process has no worker to kill alone)")
    tmp = Path(tempfile.mkdtemp(prefix="wacored-torture-"))
    try:
        with open(tmp / "wacored.log", "w", encoding="utf-8") as log:
            result = trio.run(torture, args, tmp, log)
    except RunError as exc:
        print(f"torture: {exc} (temp dir {tmp})", file=sys.stderr)
        args.keep = True
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(args, result))
    print(f"\n(temp dir {tmp}{' kept' if args.keep else ' removed'})")
    return 0 if passed(args, result) else 1


if __name__ == "__main__":
    sys.exit(main())

"""sd_notify and the watchdog: pure parsing and freshness, then real datagram sockets, then the daemon.

Every socket test binds a real ``AF_UNIX`` datagram socket (a path in a short temp dir, or an abstract
name) and reads what the daemon sent, the way systemd would.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from wacored.config import Config
from wacored.observe.state import ActorState
from wacored.observe.systemd import (
    Notifier,
    open_watchdog,
    run_beating,
    run_watchdog,
    socket_address,
    stale_actors,
    watchdog_interval,
)
from wacored.signals import serve_until_signalled

from .conftest import Downstream, config_mapping, make_config, open_daemon
from .support import clean_env, free_port, toml_text

Message = dict[str, str]


# --- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [(None, None), ("", None), ("/run/systemd/notify", "/run/systemd/notify"), ("@sd/notify", "\0sd/notify")],
)
def test_notify_socket_is_a_path_or_an_abstract_name(value: str | None, address: str | None) -> None:
    assert socket_address(value) == address


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "42"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # another process is watched
    ],
)
def test_watchdog_interval_comes_from_watchdog_usec_for_our_pid(env: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(env, pid=42) == interval


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-1"},
        {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"},
    ],
)
def test_a_malformed_watchdog_variable_is_an_error(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"\$WATCHDOG_"):
        watchdog_interval(env, pid=42)


def test_only_running_actors_with_old_heartbeats_are_stale() -> None:
    actors = {
        "writer": ActorState(running=True, heartbeat=95.0),
        "forwarder.rides": ActorState(running=True, heartbeat=80.0),
        "forwarder.jobs": ActorState(running=False, heartbeat=10.0),  # the supervisor's business
        "ingress": ActorState(running=True, heartbeat=85.0),  # exactly stale_after old: still fresh
    }
    assert stale_actors(actors, now=100.0, stale_after=15.0) == {"forwarder.rides": 20.0}
    assert stale_actors({}, now=100.0, stale_after=15.0) == {}


def test_without_notify_socket_every_message_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.dropped == 0


def test_a_malformed_watchdog_usec_leaves_notifications_on_and_the_watchdog_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "soon"})
    assert notifier.enabled
    assert notifier.watchdog_s is None
    assert "WATCHDOG_USEC" in caplog.text
    notifier.close()


# --- a real datagram socket -------------------------------------------------------------------


@dataclass
class Receiver:
    """systemd's end: a bound datagram socket, and the `NOTIFY_SOCKET` value naming it."""

    sock: socket.socket
    env_value: str
    received: list[Message] = field(default_factory=list)
    """Every message drained so far, in order."""
    seen: int = 0
    """How many of `received` `wait_for` has looked at."""
    notifiers: list[Notifier] = field(default_factory=list)

    def drain(self) -> list[Message]:
        """Every message waiting now (never blocks)."""
        got: list[Message] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            got.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        self.received += got
        return got

    async def wait_for(self, key: str) -> Message:
        """The next message carrying `key` after those already waited for (up to 10 s)."""
        with trio.fail_after(10):
            while True:
                self.drain()
                while self.seen < len(self.received):
                    message = self.received[self.seen]
                    self.seen += 1
                    if key in message:
                        return message
                await trio.sleep(0.01)

    def notifier(self, **kwargs: float) -> Notifier:
        """A notifier as `wacored run` would build it with NOTIFY_SOCKET (and `kwargs`) set."""
        env = {"NOTIFY_SOCKET": self.env_value, **{k: str(v) for k, v in kwargs.items()}}
        self.notifiers.append(Notifier.from_environ(env))
        return self.notifiers[-1]

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # A short directory of its own: a socket path is limited to 108 bytes, pytest's tmp_path can be longer.
    with (
        tempfile.TemporaryDirectory(prefix="wacored-sd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.setblocking(False)
        rx = Receiver(sock, path)
        yield rx
        rx.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"wacored-test/{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        rx = Receiver(sock, "@" + name)
        yield rx
        rx.close()


@pytest.mark.parametrize("which", ["receiver", "abstract_receiver"])
def test_lifecycle_messages_reach_a_path_or_abstract_socket(which: str, request: pytest.FixtureRequest) -> None:
    rx: Receiver = request.getfixturevalue(which)
    notifier = rx.notifier()
    assert notifier.ready("listening on http://127.0.0.1:1")
    assert notifier.reloading()
    assert notifier.ready()
    assert notifier.stopping()
    ready, reloading, ready_again, stopping = rx.drain()
    assert ready == {"READY": "1", "STATUS": "listening on http://127.0.0.1:1", "MAINPID": str(os.getpid())}
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert ready_again["READY"] == "1"
    assert stopping == {"STOPPING": "1", "STATUS": "stopping"}
    assert (notifier.sent, notifier.dropped) == (4, 0)
    notifier.close()


async def test_a_full_receiver_queue_drops_instead_of_blocking(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = receiver.notifier()

    def flood() -> None:
        for _ in range(1000):
            notifier.watchdog()  # systemd is not reading: its queue fills after a few datagrams

    # In a thread, so a send that did block fails this test instead of hanging it.
    with trio.fail_after(5):
        await trio.to_thread.run_sync(flood, abandon_on_cancel=True)
    assert notifier.sent >= 1
    assert notifier.dropped == 1000 - notifier.sent
    assert "sd_notify message dropped: queue full" in caplog.text
    assert len(caplog.records) <= 11  # the first drop and one in a hundred, not a thousand lines
    assert len(receiver.drain()) == notifier.sent
    assert notifier.ready()  # room again: nothing about the socket broke
    notifier.close()


def test_a_vanished_socket_is_a_dropped_message_not_an_error() -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/nonexistent/wacored/notify"})
    assert not notifier.ready()
    assert notifier.dropped == 1
    notifier.close()


# --- the watchdog -----------------------------------------------------------------------------


@dataclass
class Actors:
    """The part of a `Runtime` the watchdog reads."""

    actors: dict[str, ActorState]

    def beat(self, actor: str) -> None:
        self.actors.setdefault(actor, ActorState()).heartbeat = trio.current_time()


async def beat_every_second(rt: Actors, name: str, start: float, until: float) -> None:
    await trio.sleep_until(start)
    while trio.current_time() < until:
        rt.beat(name)
        await trio.sleep(1)


async def test_the_watchdog_pings_only_while_every_running_actor_is_fresh(
    autojump_clock: trio.testing.MockClock, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # WatchdogSec=4: a ping every 2 s. The writer beats every second for 0-19 s, wedges, and resumes
    # at 31 s. A stopped actor that never beat does not count.
    rt = Actors({"writer": ActorState(running=True), "forwarder.jobs": ActorState(running=False)})
    rt.beat("writer")
    notifier = receiver.notifier(WATCHDOG_USEC=4_000_000)
    assert notifier.watchdog_s == 4.0
    pings: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat_every_second, rt, "writer", 0, 20)
        nursery.start_soon(beat_every_second, rt, "writer", 31, 41)
        await nursery.start(partial(run_watchdog, rt, notifier, interval=notifier.watchdog_s, stale_after=5))
        for second in range(1, 41):
            await trio.sleep_until(second)
            pings += [second] * sum(m == {"WATCHDOG": "1"} for m in receiver.drain())
        nursery.cancel_scope.cancel()
    # Pings at 0, 2, ..., 24 (the last beat, at 19, is 5 s old at 24); none at 26-30; again from 32.
    assert len([p for p in pings if p <= 25]) == 13
    assert [p for p in pings if 26 <= p <= 31] == []
    assert len([p for p in pings if p >= 32]) >= 4
    assert any(getattr(r, "event", "") == "watchdog_stale" and "writer" in r.actors for r in caplog.records)


async def test_open_watchdog_runs_only_when_asked_and_stops_with_its_block(
    autojump_clock: trio.testing.MockClock, receiver: Receiver
) -> None:
    rt = Actors({})
    async with open_watchdog(rt, receiver.notifier()):
        await trio.sleep(60)
    assert receiver.drain() == []  # no $WATCHDOG_USEC: no pings
    async with open_watchdog(rt, receiver.notifier(WATCHDOG_USEC=10_000_000)):
        await trio.sleep(11)
    assert receiver.drain() == [{"WATCHDOG": "1"}] * 3  # at 0, 5 and 10 s; the block's end stops it
    await trio.sleep(60)
    assert receiver.drain() == []


async def test_run_beating_beats_while_its_function_runs(autojump_clock: trio.testing.MockClock) -> None:
    rt = Actors({})

    async def serve(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started("bound")
        await trio.sleep(10)

    async with trio.open_nursery() as nursery:
        assert await nursery.start(partial(run_beating, rt, "ingress", serve, period=3)) == "bound"
        await trio.sleep(9.5)
        assert rt.actors["ingress"].heartbeat == 9.0  # beats at 0, 3, 6, 9
    # `serve` returned at 10 s and the beat stopped with it, or this nursery would still be open.
    assert trio.current_time() == 10.0


# --- the real daemon --------------------------------------------------------------------------


@pytest.mark.single_worker(
    "under processes each worker's READY=1 goes to the supervisor, which tells systemd once (test_workers.py)"
)
async def test_ready_once_serving_then_stopping_on_stop(
    tmp_path: Path, services: Downstream, graph: Downstream, receiver: Receiver
) -> None:
    config = make_config(tmp_path, services, graph)
    async with open_daemon(config, notifier=receiver.notifier()) as daemon:
        ready = await receiver.wait_for("READY")
        assert ready["STATUS"] == f"listening on {daemon.url}"
        assert ready["MAINPID"] == str(os.getpid())
        # READY means serving: the URL it names answers at once.
        assert (await daemon.client.get(f"{daemon.url}/health")).status_code == 200
        assert not any("STOPPING" in m for m in receiver.received)
    stopping = await receiver.wait_for("STOPPING")
    assert stopping == {"STOPPING": "1", "STATUS": "draining"}


async def test_the_daemon_runs_the_watchdog_systemd_asked_for(
    tmp_path: Path, services: Downstream, graph: Downstream, receiver: Receiver
) -> None:
    config = make_config(tmp_path, services, graph)
    async with open_daemon(config, notifier=receiver.notifier(WATCHDOG_USEC=60_000_000)):
        assert await receiver.wait_for("WATCHDOG") == {"WATCHDOG": "1"}


async def test_sighup_reloads_between_reloading_and_ready(
    tmp_path: Path, services: Downstream, graph: Downstream, receiver: Receiver
) -> None:
    config = make_config(tmp_path, services, graph)
    loads: list[float] = []

    def load() -> Config:
        loads.append(time.monotonic())
        time.sleep(0.05)  # a reload takes a while; READY=1 must wait for it
        return config

    run = partial(serve_until_signalled, config, load, notifier=receiver.notifier())
    async with trio.open_nursery() as nursery:
        code: list[int] = []
        nursery.start_soon(lambda: _store(code, run))
        await receiver.wait_for("READY")  # the signal receiver is open from before READY=1
        os.kill(os.getpid(), signal.SIGHUP)
        assert (await receiver.wait_for("RELOADING"))["RELOADING"] == "1"
        assert (await receiver.wait_for("READY"))["STATUS"] == "serving (reloaded)"
        assert len(loads) == 1
        os.kill(os.getpid(), signal.SIGTERM)
    assert code == [0]
    assert (await receiver.wait_for("STOPPING"))["STOPPING"] == "1"


async def _store(into: list[int], fn: Callable[[], Awaitable[int]]) -> None:
    into.append(await fn())


# --- a real process under a fake systemd --------------------------------------------------------


@pytest.fixture
async def process_config(tmp_path: Path, services: Downstream, graph: Downstream) -> Path:
    data = config_mapping(tmp_path, services.url, graph.url)
    data["server"]["listen"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    return path


async def test_wacored_run_tells_systemd_ready_reloading_and_stopping(
    tmp_path: Path, process_config: Path, receiver: Receiver
) -> None:
    with (tmp_path / "daemon.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wacored", "run", "-c", str(process_config)],
            env=clean_env(NOTIFY_SOCKET=receiver.env_value),
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
    try:
        ready = await receiver.wait_for("READY")
        assert ready["MAINPID"] == str(process.pid)
        async with httpx.AsyncClient(trust_env=False) as client:
            url = ready["STATUS"].removeprefix("listening on ")
            assert (await client.get(f"{url}/health")).status_code == 200
        process.send_signal(signal.SIGHUP)
        assert (await receiver.wait_for("RELOADING"))["RELOADING"] == "1"
        assert (await receiver.wait_for("READY"))["STATUS"] == "serving (reloaded)"
        assert process.returncode is None  # SIGHUP no longer kills it
        process.send_signal(signal.SIGTERM)
        assert (await receiver.wait_for("STOPPING"))["STOPPING"] == "1"
        with trio.fail_after(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    logged = (tmp_path / "daemon.log").read_text()
    assert '"event": "reloaded"' in logged
    assert "sd_notify_dropped" not in logged

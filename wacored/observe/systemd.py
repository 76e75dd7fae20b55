"""systemd integration without libsystemd: the sd_notify datagram protocol and the watchdog.

systemd (``Type=notify``) passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path, or an
abstract name written ``@name``), and reads newline-separated ``KEY=VALUE`` messages from it:
``READY=1`` once the daemon serves, ``RELOADING=1`` then ``READY=1`` around a reload,
``STOPPING=1`` when it starts to stop, ``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1``
at least every ``$WATCHDOG_USEC`` microseconds when ``WatchdogSec=`` is set (``$WATCHDOG_PID``, if
set, names the process that must ping). Without ``$NOTIFY_SOCKET`` every message is a no-op.

The watchdog here pings only while every running actor has shown a recent heartbeat
(``Runtime.beat``): a wedged actor stops the pings, and systemd restarts the daemon. A blocked trio
loop stops them too, since the pinger is a trio task like any other.

Pure parts (parsing the environment, deciding freshness) are plain functions; `Notifier` is the only
thing that touches a socket.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NoReturn, Protocol

import trio

from .state import ActorState

log = logging.getLogger(__name__)

STALE_AFTER_S = 15.0
"""A running actor whose last heartbeat is older than this is wedged (actors beat every <= 5 s)."""
BEAT_PERIOD_S = 2.0
"""How often `run_beating` beats for an actor that has no loop of its own."""


class HasActors(Protocol):
    """What the watchdog reads: the actors table of a `Runtime`."""

    @property
    def actors(self) -> dict[str, ActorState]: ...

    def beat(self, actor: str) -> None: ...


# --- pure parts -------------------------------------------------------------------------------


def socket_address(value: str | None) -> str | None:
    """The `socket` address named by ``$NOTIFY_SOCKET``, or None when it is unset or empty.

    ``@name`` is Linux's abstract namespace (a leading NUL byte); anything else is a path.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd wants a ``WATCHDOG=1``, or None when the watchdog is off.

    Off when ``$WATCHDOG_USEC`` is unset, or ``$WATCHDOG_PID`` is set and names another process
    (we inherited the variables from a parent that is the one being watched).

    Error handling:
        Raises `ValueError` when either variable is set but not a positive integer.
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    watched = env.get("WATCHDOG_PID", "")
    if watched and _positive_int(watched, "WATCHDOG_PID") != pid:
        return None
    return _positive_int(usec, "WATCHDOG_USEC") / 1_000_000


def _positive_int(value: str, name: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"${name} must be a positive integer, got {value!r}")
    return int(value)


def stale_actors(actors: Mapping[str, ActorState], now: float, stale_after: float) -> dict[str, float]:
    """The running actors whose heartbeat is older than `stale_after`, with its age in seconds.

    Actors that are not running are the supervisor's business (it restarts or stops the daemon),
    not the watchdog's.
    """
    return {
        name: now - state.heartbeat
        for name, state in actors.items()
        if state.running and now - state.heartbeat > stale_after
    }


# --- the socket -------------------------------------------------------------------------------


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; every method is a no-op when it is unset.

    Sends never block: the socket is non-blocking, because a blocking send stalls the whole trio loop
    once systemd's receive queue is full. A datagram that cannot be sent is dropped, counted in
    `dropped` and logged. A lost ``WATCHDOG=1`` is followed by another half an interval later; a lost
    ``READY=1`` shows as a start timeout in ``systemctl status``: both beat a daemon frozen in a send.

    Error handling:
        No method raises for a send that fails (queue full, socket gone, permission denied).
    """

    def __init__(self, address: str | None, *, watchdog_s: float | None = None, pid: int | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address else None
        """Seconds within which systemd wants ``WATCHDOG=1``; None when the watchdog is off."""
        self.pid = pid if pid is not None else os.getpid()
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """The notifier the service manager asked for through `env` (usually `os.environ`).

        A malformed ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` is logged and leaves the watchdog off:
        notifications still work, and systemd will say why it restarted us if it expected pings.
        """
        pid = pid if pid is not None else os.getpid()
        try:
            interval = watchdog_interval(env, pid)
        except ValueError as exc:
            log.warning("watchdog off: %s", exc, extra={"event": "watchdog_misconfigured"})
            interval = None
        return cls(socket_address(env.get("NOTIFY_SOCKET")), watchdog_s=interval, pid=pid)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=VALUE`` lines; True when it was handed to the kernel."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            self._drop(exc)
            return False
        self.sent += 1
        return True

    def _drop(self, exc: OSError) -> None:
        self.dropped += 1
        # A full queue can last: log the first drop and then one in a hundred, not every ping.
        if self.dropped == 1 or self.dropped % 100 == 0:
            reason = "queue full" if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) else str(exc)
            log.warning(
                "sd_notify message dropped: %s", reason, extra={"event": "sd_notify_dropped", "dropped": self.dropped}
            )

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up (or a reload) is complete and the daemon serves."""
        return self.notify(READY=1, STATUS=status or "serving", MAINPID=self.pid)

    def reloading(self, status: str = "reloading configuration") -> bool:
        """``RELOADING=1``: a reload has begun; follow it with `ready` when it is done.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd 253+) requires; older ones ignore it.
        """
        return self.notify(RELOADING=1, STATUS=status, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str = "stopping") -> bool:
        """``STOPPING=1``: the daemon has begun to stop (draining)."""
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the watchdog -----------------------------------------------------------------------------


async def run_watchdog(
    rt: HasActors,
    notifier: Notifier,
    *,
    interval: float,
    stale_after: float = STALE_AFTER_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ping ``WATCHDOG=1`` every `interval`/2 while every running actor's heartbeat is fresh.

    When an actor's heartbeat is older than `stale_after` the ping is skipped and the actor named in
    a log line, so systemd's ``WatchdogSec=`` (= `interval`) restarts a daemon with a wedged actor.
    Pinging twice per interval is what sd_watchdog_enabled(3) recommends: one late wake-up is no
    restart.

    Cancellation:
        Runs until cancelled; holds nothing that needs cleaning up.
    """
    task_status.started()
    while True:
        stale = stale_actors(rt.actors, trio.current_time(), stale_after)
        if stale:
            log.warning(
                "watchdog ping skipped: stale heartbeat",
                extra={"event": "watchdog_stale", "actors": {name: round(age, 1) for name, age in stale.items()}},
            )
        else:
            notifier.watchdog()
        await trio.sleep(interval / 2)


@asynccontextmanager
async def open_watchdog(
    rt: HasActors, notifier: Notifier, *, stale_after: float = STALE_AFTER_S
) -> AsyncIterator[None]:
    """Run `run_watchdog` for the body of the block when systemd asked for a watchdog.

    Meant as the outermost block of the daemon: a forever task in the workers' nursery would keep it
    open until the drain deadline (docs/stack-notes.md, "Signals and systemd"), so it lives in a nursery of
    its own that is cancelled as soon as the body is done.
    """
    if notifier.watchdog_s is None:
        # No nursery at all: without a watchdog the body's exceptions reach the caller unwrapped.
        yield
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_watchdog, rt, notifier, interval=notifier.watchdog_s, stale_after=stale_after))
        yield
        nursery.cancel_scope.cancel(reason="daemon stopped")


async def run_beating(
    rt: HasActors,
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *,
    period: float = BEAT_PERIOD_S,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `fn(task_status=...)` and beat for actor `name` every `period` while it runs.

    For an actor with no loop of its own to beat from (ingress: hypercorn's loop). The beat stops
    the moment `fn` returns or raises, so it never outlives the actor or keeps its nursery open.

    Error handling:
        `fn`'s exception propagates in an `ExceptionGroup` (the beat itself never fails).
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_beat, rt, name, period)
        try:
            await fn(task_status=task_status)
        finally:
            nursery.cancel_scope.cancel(reason=f"{name} ended")


async def _beat(rt: HasActors, name: str, period: float) -> NoReturn:
    while True:
        rt.beat(name)
        await trio.sleep(period)

"""``[server] processes = N > 1``: a small supervisor in front of N worker processes sharing one port.

`run_supervisor` is what ``wacored run`` becomes. It binds the listen address once (a port in use
fails before any worker starts; ``listen = host:0`` is one port for all) and starts N workers, each
``python -m wacored worker ...`` (a new interpreter, never a fork of this trio process): today's
daemon with its index and its own node name (``host-pid``). The supervisor's socket is bound, not
listening (`listener.reserve`); each worker inherits it (``pass_fds``) to learn the address and
listens on a SO_REUSEPORT socket of its own there (`listener.share`), so the kernel spreads new
connections over the workers by their addresses' hash.

- A worker that dies is logged (exit status or signal), counted and started again after
  `core.respawn.respawn_delay`. One that dies before its first READY=1, on the first start, stops
  the whole daemon (exit 1): a worker that cannot start (store unwritable, certificate unreadable)
  would fail the same way forever.
- SIGHUP: the supervisor loads and validates the config itself first (the same `load` the workers
  use); a config it refuses is refused for all (logged, no worker signalled), else every worker gets
  SIGHUP. SIGTERM/SIGINT: forwarded to every worker, which drains as a single process does; the
  supervisor exits 0 once all have exited. A second one is forwarded too (workers stop at once) and
  the supervisor exits 1. A worker that exits while the daemon drains is not started again.
- systemd: the supervisor is the main PID and the only one that talks to ``$NOTIFY_SOCKET``. Each
  worker's ``NOTIFY_SOCKET`` is a datagram socket of the supervisor's (one per index, so the sender
  is known without credentials); READY=1 goes to systemd once every worker has said it, a reload's
  READY=1 once every worker has reloaded, and WATCHDOG=1 only while every ready worker has pinged
  within the watchdog interval (a worker gets ``WATCHDOG_USEC`` when the supervisor did).
- Orphans: each worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``; this
  is why workers are forked from the main thread, see `processes.spawn`), and also watches a pipe
  whose write end only the supervisor holds: its EOF means the supervisor is gone
  (`processes.parent_gone`), however it died, on any system.

Error handling:
    `ListenError` (the port), and `SchemaError`/`sqlite3.Error`/`psycopg.Error` from migrating the store, propagate
    before any worker starts; a worker's failure is the worker's
    (logged by it, then here with its exit status).

Cancellation:
    The supervisor never cancels a worker's wait: workers stop through signals, and every one has
    exited before `run_supervisor` returns.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from .config import Config, ConfigError
from .core.respawn import respawn_delay
from .daemon import StoreParts
from .http.listener import reserve, share
from .observe.systemd import Notifier
from .processes import exit_status, spawn, wait_exit
from .siblings import Place

log = logging.getLogger(__name__)

RELOAD_WAIT_S = 30.0
"""How long a reload waits for every worker's READY=1 before telling systemd it is done anyway."""
FORCED_WAIT_S = 10.0
"""After a second signal, how long workers get to stop at once before they are killed."""


@dataclass(eq=False)
class Slot:
    """One worker index and its current process. Owner: that index's `_run_slot` task (the notify
    receiver sets `ready`, `readied` and `last_ping`)."""

    index: int
    notify_path: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    """This process said READY=1 (cleared when it exits)."""
    readies: int = 0
    """READY=1 messages from this index, ever (a reload waits for the count to grow)."""
    readied: trio.Event = field(default_factory=trio.Event)
    """Set (and replaced) on every READY=1."""
    last_ping: float = 0.0
    """trio time of the last WATCHDOG=1 (or READY=1)."""


@dataclass
class Plan:
    """How to start worker `index`: the command and environment (built by `cli.cmd_run`)."""

    command: Callable[[int, int, int, int, str, int], list[str]]
    """(index, count, listen fd, parent fd, runtime dir, restarts) -> argv."""
    env: dict[str, str]


async def run_supervisor(
    config: Config,
    load: Callable[[], Config],
    plan: Plan,
    notifier: Notifier,
    *,
    runtime_dir: str | None = None,
) -> int:
    """Run ``config.server.workers`` workers until SIGTERM/SIGINT (exit 0; 1 after a second signal,
    or when a worker cannot start)."""
    count = config.server.workers
    async with shared_port(config, runtime_dir) as (listener, directory):
        parent_r, parent_w = os.pipe()
        try:
            supervisor = Supervisor(config, load, plan, notifier, count, listener, directory, parent_r)
            return await supervisor.run()
        finally:
            os.close(parent_w)
            os.close(parent_r)


@asynccontextmanager
async def shared_port(config: Config, runtime_dir: str | None = None) -> AsyncIterator[tuple[socket.socket, str]]:
    """What every worker shares, ready before the first one starts: the reserved port
    (`listener.reserve`) and the private directory of their sockets (mode 0700; `runtime_dir`, else
    a temporary one, removed on exit), with the store migrated once.

    `run_supervisor` uses it, and so does the test suite's two-worker mode (tests/conftest.py),
    which runs the workers as tasks of one trio run rather than as processes."""
    listener = reserve(config.server)  # before anything starts: a port in use stops us here
    own_dir = runtime_dir is None
    directory = tempfile.mkdtemp(prefix="wacored-") if runtime_dir is None else runtime_dir
    try:
        os.chmod(directory, 0o700)
        _clear(directory)  # what a supervisor killed before its cleanup left behind
        # Once, before any worker: N workers creating the schema at once deadlock in SQLite's lock
        # upgrade (seen: "database is locked" in one of two workers, several runs in ten), and an
        # unusable store stops us here, as a port in use does. Each worker's own `migrate` then
        # finds the schema current and only reads.
        await trio.to_thread.run_sync(StoreParts(config.store).migrate)
        yield listener, directory
    finally:
        listener.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            _clear(directory)


@dataclass(frozen=True)
class Seat:
    """Worker `place.index`'s own listening socket at the daemon's port, and its place: what
    `run_daemon` gets as `listener` and `place`."""

    listener: socket.socket
    place: Place


@contextmanager
def take_seat(reserved: socket.socket, place: Place) -> Iterator[Seat]:
    """Worker `place` on the port `reserved` holds: a SO_REUSEPORT listening socket of its own there
    (`listener.share`), closed on exit. `cli.cmd_worker` takes one per worker process; the test
    suite's two-worker mode one per worker task.

    Error handling:
        `ListenError` (an `OSError`) when the socket cannot listen there.
    """
    listener = share(reserved)
    try:
        yield Seat(listener, place)
    finally:
        listener.close()


def _clear(directory: str) -> None:
    """Remove our sockets from `directory` (systemd's runtime directory may hold other things)."""
    for name in os.listdir(directory):
        if name.startswith(("worker-", "notify-")) and name.endswith(".sock"):
            os.unlink(os.path.join(directory, name))


class Supervisor:
    """The running supervisor's state. Owner of `stopping`, `forced` and `failed`: the signal loop
    (and a slot whose worker cannot start sets `failed`)."""

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config],
        plan: Plan,
        notifier: Notifier,
        count: int,
        listener: socket.socket,
        directory: str,
        parent_fd: int,
    ) -> None:
        self.config = config
        self.load = load
        self.plan = plan
        self.notifier = notifier
        self.listener = listener
        self.directory = directory
        self.parent_fd = parent_fd
        self.slots = [Slot(i, os.path.join(directory, f"notify-{i}.sock")) for i in range(count)]
        self.stopping = trio.Event()
        self.forced = False
        self.failed = False
        self.reload_lock = trio.Lock()
        host, port = listener.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if config.server.tls else 'http'}://{host}:{port}"

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as outer:
                for slot in self.slots:
                    await outer.start(self._receive_notify, slot)
                outer.start_soon(self._watch_signals, signals)
                outer.start_soon(self._tell_ready)
                if self.notifier.watchdog_s is not None:
                    outer.start_soon(self._watchdog, self.notifier.watchdog_s)
                async with trio.open_nursery() as slots:
                    for slot in self.slots:
                        slots.start_soon(self._run_slot, slot)
                outer.cancel_scope.cancel(reason="every worker has exited")
        log.info("stopped", extra={"event": "stopped", "workers": len(self.slots)})
        return 1 if self.forced or self.failed else 0

    # --- the workers ----------------------------------------------------------------------------

    def _env(self, slot: Slot) -> dict[str, str]:
        env = dict(self.plan.env)
        env["NOTIFY_SOCKET"] = slot.notify_path
        env.pop("WATCHDOG_PID", None)
        env.pop("WATCHDOG_USEC", None)
        if self.notifier.watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(self.notifier.watchdog_s * 1_000_000))
        return env

    async def _run_slot(self, slot: Slot) -> None:
        delay = 0.0
        while not self.stopping.is_set():
            command = self.plan.command(
                slot.index, len(self.slots), self.listener.fileno(), self.parent_fd, self.directory, slot.restarts
            )
            process = spawn(command, self._env(slot), (self.listener.fileno(), self.parent_fd))
            slot.process, readies = process, slot.readies
            started = trio.current_time()
            log.info("worker started", extra={"event": "worker_started", "worker": slot.index, "pid": process.pid})
            code = await wait_exit(process)
            slot.ready = False
            slot.readied.set()  # whoever waits for this worker's READY=1 (a reload) stops waiting
            slot.readied = trio.Event()
            served = trio.current_time() - started
            log.log(
                logging.INFO if self.stopping.is_set() else logging.ERROR,
                "worker exited",
                extra={"event": "worker_exited", "worker": slot.index, "pid": process.pid, **exit_status(code)},
            )
            if self.stopping.is_set():
                return
            if slot.readies == readies and slot.restarts == 0:
                log.error(
                    "a worker could not start: stopping every worker",
                    extra={"event": "worker_start_failed", "worker": slot.index},
                )
                self.failed = True
                self._stop(signal.SIGTERM)
                return
            slot.restarts += 1
            delay = respawn_delay(delay, served)
            log.info(
                "restarting the worker",
                extra={"event": "worker_restarting", "worker": slot.index, "delay_s": delay, "restarts": slot.restarts},
            )
            with trio.move_on_after(delay):
                await self.stopping.wait()

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                try:
                    slot.process.send_signal(signum)
                except ProcessLookupError:
                    pass  # exited between the check and the signal: its slot sees it

    def _stop(self, signum: int) -> None:
        self.stopping.set()
        self.notifier.stopping("draining")
        self._signal_all(signum)

    # --- signals --------------------------------------------------------------------------------

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        """Stays subscribed for the whole drain: a second signal must reach us, not the default
        handler (docs/stack-notes.md, "Signals and systemd")."""
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    nursery.start_soon(self._reload)
                elif self.stopping.is_set():
                    log.warning("second signal: workers stop now", extra={"event": "forced_stop"})
                    self.forced = True
                    self._signal_all(signum)
                    nursery.start_soon(self._kill_after, FORCED_WAIT_S)
                else:
                    log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
                    self._stop(signum)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._signal_all(signal.SIGKILL)

    async def _reload(self) -> None:
        """All or none: the supervisor validates the config first; only then is every worker told."""
        async with self.reload_lock:
            if self.stopping.is_set():
                log.info("SIGHUP ignored", extra={"event": "reload_ignored", "stopping": True})
                return
            log.info("reloading the config", extra={"event": "reloading"})
            try:
                new = await trio.to_thread.run_sync(self.load)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error(
                        "config reload refused: no worker reloads",
                        extra={"event": "reload_failed", "problem": problem},
                    )
                return
            if new.server.processes != self.config.server.processes:
                log.warning(
                    "this change needs a restart; the old value stays until then",
                    extra={"event": "reload_needs_restart", "key": "server.processes"},
                )
            self.notifier.reloading()
            waiting = [(slot, slot.readies) for slot in self.slots if slot.process is not None and slot.ready]
            self._signal_all(signal.SIGHUP)
            with trio.move_on_after(RELOAD_WAIT_S):
                for slot, before in waiting:
                    while slot.readies == before and slot.ready:
                        await slot.readied.wait()
            if not self.stopping.is_set():
                self.notifier.ready("serving (reloaded)")

    # --- systemd --------------------------------------------------------------------------------

    async def _receive_notify(self, slot: Slot, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(slot.notify_path)
            task_status.started()
            while True:
                data = await sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n") if "=" in line)
                if fields.get("READY") == "1":
                    slot.ready, slot.last_ping = True, trio.current_time()
                    slot.readies += 1
                    slot.readied.set()
                    slot.readied = trio.Event()
                if fields.get("WATCHDOG") == "1":
                    slot.last_ping = trio.current_time()

    async def _tell_ready(self) -> None:
        """READY=1 to systemd once every worker has said it (once: a restarted worker is no new start)."""
        while not all(slot.ready for slot in self.slots):
            waiting = next(slot for slot in self.slots if not slot.ready)
            await waiting.readied.wait()
        log.info("listening", extra={"event": "listening", "urls": [self.url], "workers": len(self.slots)})
        self.notifier.ready(f"listening on {self.url}")

    async def _watchdog(self, interval: float) -> NoReturn:
        """WATCHDOG=1 every `interval`/2 while every ready worker has pinged within `interval`.

        A worker starting (or being restarted) is not waited for: systemd's own watchdog only runs
        once the service is up, and a worker that keeps failing to start is logged and counted, not
        a reason to kill the ones that serve.
        """
        while True:
            now = trio.current_time()
            late = {
                s.index: round(now - s.last_ping, 1) for s in self.slots if s.ready and now - s.last_ping > interval
            }
            if late:
                log.warning(
                    "watchdog ping skipped: a worker is late", extra={"event": "watchdog_stale", "workers": late}
                )
            else:
                self.notifier.watchdog()
            await trio.sleep(interval / 2)


def worker_command(
    argv0: Sequence[str], config_path: str, env_file: str, log_level: str | None
) -> Callable[[int, int, int, int, str, int], list[str]]:
    """The argv of ``wacored worker`` for `Plan.command`."""

    def command(index: int, count: int, listen_fd: int, parent_fd: int, directory: str, restarts: int) -> list[str]:
        argv = [*argv0, "worker", "-c", config_path, "--env-file", env_file]
        argv += ["--index", str(index), "--count", str(count), "--listen-fd", str(listen_fd)]
        argv += ["--parent-fd", str(parent_fd), "--parent-pid", str(os.getpid())]
        argv += ["--runtime-dir", directory, "--restarts", str(restarts)]
        return argv + (["--log-level", log_level] if log_level else [])

    return command


PYTHON = [sys.executable, "-m", "wacored"]

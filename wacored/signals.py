"""Running the daemon under signals: SIGHUP reloads, SIGTERM/SIGINT drain, a second one stops at once.

`serve_until_signalled` is what ``wacored run`` (and each worker of ``[server] processes``) runs. The
signal receiver stays open for the whole drain, so a second signal reaches this code and not the
default handler (docs/stack-notes.md, "Signals and systemd"): SIGHUP's default would kill the process.

Cancellation: a reload waiting when the daemon starts stopping is abandoned (the daemon is going
away); nothing accepted is lost either way, it is in the store.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Awaitable, Callable

import trio

from .config import Config
from .daemon import run_daemon
from .observe.systemd import Notifier
from .reloads import ReloadRequest
from .siblings import Place

log = logging.getLogger(__name__)


async def serve_until_signalled(
    config: Config,
    load: Callable[[], Config] | None = None,
    *,
    notifier: Notifier | None = None,
    process_start: float | None = None,
    listener: socket.socket | None = None,
    place: Place | None = None,
    parent_gone: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """`run_daemon` under signals. SIGHUP reloads the config through `load`, between RELOADING=1 and
    READY=1 to systemd, one reload at a time. SIGTERM/SIGINT: the first one stops gracefully (exit 0),
    a second one stops at once (exit 1); either way nothing accepted is lost: it is on disk.

    A worker (`workers.py`) passes its `listener` and `place`, and `parent_gone`, which returns once
    the supervisor is gone: that stops the worker as a first SIGTERM would (a no-op when one did)."""
    stop = trio.Event()
    notifier = notifier if notifier is not None else Notifier(None)
    forced = False
    reload_send, reload_receive = trio.open_memory_channel[ReloadRequest](1)
    # The receiver stays open for the whole drain: a second signal must reach us, not the default
    # handler (docs/stack-notes.md, "Signals and systemd"). SIGHUP's default handler would kill us.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal forced
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await _reload(reload_send, load, notifier, stop)
                    elif stop.is_set():
                        log.warning("second signal: stopping now", extra={"event": "forced_stop"})
                        forced = True
                        nursery.cancel_scope.cancel(reason="second signal")
                        return
                    else:
                        log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
                        stop.set()

            nursery.start_soon(watch)
            if parent_gone is not None:
                nursery.start_soon(_stop_when, parent_gone, stop)
            await run_daemon(
                config,
                stop=stop,
                reloads=reload_receive,
                notifier=notifier,
                process_start=process_start,
                listener=listener,
                place=place,
            )
            nursery.cancel_scope.cancel(reason="daemon stopped")
    return 1 if forced else 0


async def _stop_when(event: Callable[[], Awaitable[None]], stop: trio.Event) -> None:
    await event()
    if not stop.is_set():
        log.warning("the supervisor is gone: stopping", extra={"event": "stopping", "signal": "parent_gone"})
        stop.set()


async def _reload(
    send: trio.MemorySendChannel[ReloadRequest],
    load: Callable[[], Config] | None,
    notifier: Notifier,
    stop: trio.Event,
) -> None:
    """One SIGHUP: ask the daemon to reload and wait until it has (or is stopping)."""
    if stop.is_set() or load is None:
        log.info("SIGHUP ignored", extra={"event": "reload_ignored", "stopping": stop.is_set()})
        return
    log.info("reloading the config", extra={"event": "reloading"})
    notifier.reloading()
    request = ReloadRequest(load)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_when_set, stop, nursery.cancel_scope)
        await send.send(request)
        await request.done.wait()
        nursery.cancel_scope.cancel()
    if not stop.is_set():
        notifier.ready("serving (reloaded)")


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel(reason="daemon stopping")

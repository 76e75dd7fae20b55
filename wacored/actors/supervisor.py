"""One-for-one supervision: run an actor, restart it when it crashes, give up when it crashes too often.

A crash (any `Exception` once the actor has started) is logged with its traceback and the actor is
started again after an exponential backoff (``[supervisor] backoff_base_s`` doubling up to
``backoff_max_s``). More than ``max_restarts`` crashes within ``window_s`` raise `ActorGaveUp`, which
stops the daemon with a non-zero exit so systemd restarts the whole process. An actor that fails
before it has started (a port in use, an unreadable store) is not restarted: the error propagates as
it is. An actor that returns ends its supervision (the daemon is stopping).

Cancellation:
    Never swallowed: `trio.Cancelled` is a `BaseException` and passes straight through.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import SupervisorConfig
from ..runtime import Runtime

log = logging.getLogger(__name__)


class ActorGaveUp(Exception):
    """An actor crashed more often than the supervisor allows."""


class RestartPolicy:
    """When to restart a crashed actor (pure: time passed in)."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.crashes: deque[float] = deque()

    def crashed(self, now: float) -> float | None:
        """Record a crash at `now`; the delay before the restart, or None to give up."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] <= now - self.config.window_s:
            self.crashes.popleft()
        n = len(self.crashes)
        if n > self.config.max_restarts:
            return None
        return min(self.config.backoff_base_s * 2.0 ** (n - 1), self.config.backoff_max_s)


def describe(exc: BaseException) -> str:
    """``Type: message`` of what went wrong, looking through the nursery groups trio wraps errors in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class _Started:
    """Passes `started` on to the real task status, remembering that it was called."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


async def supervise(
    rt: Runtime,
    name: str,
    start: Callable[[trio.TaskStatus[Any]], Awaitable[None]],
    *,
    on_restart: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `start(task_status)` as actor `name`, restarting it on crashes; `on_restart` runs before each
    restart (to reset what the crashed run left behind). State goes to ``rt.actors[name]``."""
    state = rt.actor(name)
    policy = RestartPolicy(rt.config.supervisor)
    status = _Started(task_status)
    state.error = ""  # from here on: the last crash, kept across restarts for /health
    while True:
        state.running = True
        rt.beat(name)
        try:
            await start(status if not status.done else trio.TASK_STATUS_IGNORED)
            return
        except Exception as exc:
            state.error = describe(exc)
            log.exception("actor crashed", extra={"event": "actor_crashed", "actor": name})
            if not status.done:
                raise
            delay = policy.crashed(trio.current_time())
            if delay is None:
                log.critical(
                    "actor crashed too often: stopping the daemon",
                    extra={"event": "actor_gave_up", "actor": name, "crashes": len(policy.crashes)},
                )
                raise ActorGaveUp(
                    f"actor {name} crashed {len(policy.crashes)} times in {policy.config.window_s:g} s"
                ) from exc
        finally:
            state.running = False
        state.restarts += 1
        log.warning("restarting actor", extra={"event": "actor_restarting", "actor": name, "delay_s": delay})
        await trio.sleep(delay)
        if on_restart is not None:
            on_restart()

"""The daemon's view of paused services (`PauseBoard`), and the pause watcher actor that keeps it
equal to the ``service_pauses`` table.

The table is the truth (`pauses.py`): the CLI writes it on a connection of its own, the admin API
too. The watcher re-reads it every `POLL_S` (1 s: one indexed read of a table of a few rows), and at
once when the admin API asks (`PauseBoard.refreshed`), so an admin pause is in force when its answer
is sent and a CLI pause within a second. At start-up the daemon fills the board before any forwarder
starts, so messages recovered from disk for a paused service are not sent in the first second.

Owner: the watcher is the only writer of `PauseBoard.paused` (`apply`), always with a whole snapshot
read after every write it was asked to see, so a stale read can never undo a newer pause. Lanes, the
DLQ retrier, /health and /metrics only read it; a lane holding a paused service's next delivery
waits on `PauseBoard.hold`.

Error handling:
    A read the store refuses is logged and the board keeps what it had (a pause stays in force, a
    resume waits for the next good read); the watcher tries again at its next poll. An admin request
    waiting for a refresh gives up after its own deadline (the pause is stored all the same).

Cancellation:
    The read runs in a worker thread and is waited for; cancelling the watcher leaves the board as it
    was. `hold` returns when the daemon starts stopping, so a held lane never delays a drain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import trio

from ..ops.pauses import POLL_S, Pause, may_attempt
from ..store import interface
from ..store.interface import Reads

log = logging.getLogger(__name__)

ACTOR = "pause_watch"


class PauseBoard:
    """The paused services as last read from the store. Owner: the pause watcher (`apply`)."""

    def __init__(self) -> None:
        self.paused: Mapping[str, Pause] = {}
        """Service name -> its pause; replaced whole by `apply`, never changed in place."""
        self._changed = trio.Event()
        self._poke = trio.Event()
        self._asked = 0
        """Refreshes asked for (`refreshed`); `_served` says up to which one a read has answered."""
        self._served = 0
        self._applied = trio.Event()

    def may_attempt(self, name: str) -> bool:
        return may_attempt(name, self.paused)

    def apply(self, snapshot: Mapping[str, Pause], served: int) -> None:
        """Owner only: the table as read after refresh request `served` was made."""
        if dict(snapshot) != dict(self.paused):
            resumed = sorted(self.paused.keys() - snapshot.keys())
            paused = sorted(snapshot.keys() - self.paused.keys())
            self.paused = dict(snapshot)
            log.info("service pauses changed", extra={"event": "pauses_changed", "paused": paused, "resumed": resumed})
            self._changed.set()
            self._changed = trio.Event()
        self._served = max(self._served, served)
        self._applied.set()
        self._applied = trio.Event()

    async def refreshed(self) -> None:
        """Ask the watcher to read the table now, and wait until a read begun after this call has
        been applied (the caller bounds the wait)."""
        self._asked += 1
        wanted = self._asked
        self._poke.set()
        while self._served < wanted:
            await self._applied.wait()

    async def poked(self) -> None:
        """Owner only: wait for a refresh request (the caller bounds it by the poll)."""
        await self._poke.wait()

    def take_poke(self) -> int:
        """Owner only, right before a read: the last refresh request made, which that read answers."""
        self._poke = trio.Event()
        return self._asked

    async def hold(self, name: str, stopping: trio.Event) -> None:
        """Return once `name` may be attempted, or the daemon is stopping."""
        while not self.may_attempt(name) and not stopping.is_set():
            async with trio.open_nursery() as nursery:
                # Whichever comes first: the board changed (a resume?), or the drain began.
                nursery.start_soon(_cancel_after, self._changed, nursery.cancel_scope)
                nursery.start_soon(_cancel_after, stopping, nursery.cancel_scope)


async def _cancel_after(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def refresh(board: PauseBoard, reader: Reads, served: int) -> bool:
    """Read the table once into `board`; False (board unchanged) when the store refuses."""
    try:
        rows = await trio.to_thread.run_sync(reader.pauses)
    except interface.STORE_ERRORS as exc:
        log.warning("cannot read service pauses", extra={"event": "pauses_read_failed", "error": str(exc)})
        return False
    board.apply({service: Pause(at, reason) for service, at, reason in rows}, served)
    return True


async def run_pause_watch(
    board: PauseBoard,
    reader: Reads,
    *,
    beat: Callable[[], None] = lambda: None,
    interval_s: float = POLL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `board` equal to the table until cancelled: every `interval_s`, and at once when asked.
    Owns `reader`'s use (one thread at a time). `beat` is called after each read (the watchdog)."""
    await refresh(board, reader, board.take_poke())
    task_status.started()
    while True:
        with trio.move_on_after(interval_s):
            await board.poked()
        await refresh(board, reader, board.take_poke())
        beat()

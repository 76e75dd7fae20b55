"""Lanes on this node: which ones it holds, what wakes them, and the two actors that keep them so.

The store is the hand-off between ingress and delivery. A committed row names its target and lane
(`core.delivery.lane_of` of its sender); a lane is read, in id order, by the one worker holding its
lease (`core.leases`, `store_lanes`). Three things wake a lane held here:

- the writer, right after it commits rows of that lane (an ingest in this process);
- the relay (`run_relay`), which notices rows other processes committed: one ``MAX(id)`` read every
  `RELAY_S`, and for new ids the lanes they fall in (on PostgreSQL, right after another node's
  ingest commits: its NOTIFY wakes the relay, which otherwise reads every `LISTEN_S`);
- the lane itself, every heartbeat when idle, which also finds rows another process set back to
  ``queued`` (``wacored messages replay``).

A lane whose last read returned less than a page had every row then queued, so it reads again only
once woken; a committed outcome does not wake it (one the writer gives up does: its row is still
``queued``).

`LaneBoard` is this node's view: one `Lane` per (target, lane), and the singleton leases (DLQ
retrier, reaper). Owners: the lease keeper (`run_lease_keeper`) alone sets what is held and until
when; each lane task alone adds to its `handed` set, and the writer (through `recorded`) alone removes
from it; anyone may wake a lane.

Error handling:
    A lease tick the store refuses (`StoreUnavailable`) is logged and tried at the next tick: the node
    keeps what it held until the leases expire, and its lanes stop taking rows a margin before that
    (`Lane.held`), so another node's takeover never overlaps a delivery this one starts. A relay read
    that fails is logged and tried again at the next interval.

Cancellation:
    Both actors hold nothing between ticks: cancelling them loses no state. Leases are given back by
    `release` once the lanes have stopped (a clean stop); after a crash they expire, or are taken at
    once by a process of this host that finds their owner's pid gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

import trio

from ..core.delivery import lane_of
from ..core.leases import SINGLETONS, Held, lane_lease, next_tick_s
from ..store import NewRow, StoreUnavailable, interface
from ..store.interface import LaneReads, RowsListener
from ..store.lanes import this_host_dead
from ..store.writer import Write, WriteOp

T = TypeVar("T")

log = logging.getLogger(__name__)

RELAY_S = 0.05
LISTEN_S = 0.25
"""With a `RowsListener`: the longest the relay waits for a NOTIFY before it reads anyway (a lost
NOTIFY costs that much), and how long a cancelled relay may take to end (the wait is a worker
thread's, which trio waits for)."""
"""How often the relay looks for rows other processes committed: a row ingested by another worker
waits at most this long (plus its lane's current delivery) before its lane reads it."""
MARGIN = 0.1
"""A lane starts no delivery in the last tenth of its lease's life: the keeper renews it every third,
so only a keeper that missed two ticks in a row (a store outage) lets a lane pause here."""


class Lane:
    """One lane of one target on this node."""

    def __init__(self, target: str, index: int) -> None:
        self.target, self.index = target, index
        self.name = lane_lease(target, index)
        self.valid_until = 0.0
        """When this node's lease on the lane expires, on `trio.current_time()`'s clock (the store
        keeps wall-clock expiries, shared between nodes; a local deadline must not move when the wall
        clock is stepped); 0: not held. Owner: the lease keeper."""
        self.margin_s = 0.0
        self.giving_back = False
        """Held beyond this node's fair share: take no new row; released once idle. Owner: the keeper."""
        self.handed: set[int] = set()
        """Rows delivered here whose outcome the writer has not committed yet (they still read
        ``queued``: a page read skips them). Added by the lane task, removed by the writer."""
        self.busy = False
        """A delivery is in hand. Owner: the lane task."""
        self._wake = trio.Event()

    def held(self) -> bool:
        """Whether this node may start a delivery on the lane now."""
        return not self.giving_back and trio.current_time() < self.valid_until - self.margin_s

    @property
    def idle(self) -> bool:
        return not self.busy and not self.handed

    def wake(self) -> None:
        self._wake.set()

    def rearm(self) -> None:
        """Forget past wake-ups, just before reading the store: one that comes after is not missed."""
        if self._wake.is_set():
            self._wake = trio.Event()

    async def sleep(self, seconds: float) -> None:
        """Until woken, or `seconds` at most."""
        with trio.move_on_after(seconds):
            await self._wake.wait()


class LaneBoard:
    """This node's lanes by target, and the singleton leases it holds."""

    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s = ttl_s
        self.lanes: dict[str, list[Lane]] = {}
        self.singletons: dict[str, float] = {}
        """Singleton lease -> expiry (`trio.current_time()` clock, as `Lane.valid_until`), for those
        this node holds. Owner: the lease keeper."""
        self.last: Held | None = None
        """The last lease tick's result (/health, metrics). Owner: the lease keeper."""
        self.keeper_wake = trio.Event()
        self.taken = 0
        """Lane leases this node took (at start, from a dead or stopped node, or given back by
        another), counted since it started. Owner: the lease keeper."""
        self.lost = 0
        """Lane leases this node lost to another before giving them back (it stalled past their
        expiry). Owner: the lease keeper."""

    def ensure(self, target: str, count: int) -> list[Lane]:
        """`target`'s lanes, made if it has none yet (a lane count applies from the next start)."""
        if target in self.lanes:
            return self.lanes[target]
        lanes = self.lanes[target] = [Lane(target, i) for i in range(max(1, count))]
        for lane in lanes:
            lane.margin_s = self.ttl_s * MARGIN
        self.keeper_wake.set()  # claim them now, not at the next tick
        return lanes

    def remove(self, target: str) -> None:
        self.lanes.pop(target, None)

    def lane_of(self, target: str, sender: str) -> int:
        """The lane a row of `target` from `sender` goes to (lane 0 for a target with no lanes here:
        its rows wait, and are split again when a worker that serves it starts: `split_lanes`)."""
        lanes = self.lanes.get(target)
        return lane_of(sender, len(lanes)) if lanes else 0

    def wake(self, target: str, lane: int) -> None:
        lanes = self.lanes.get(target)
        if lanes is not None and 0 <= lane < len(lanes):
            lanes[lane].wake()

    def wake_all(self) -> None:
        for lanes in self.lanes.values():
            for lane in lanes:
                lane.wake()

    def committed(self, rows: Iterable[NewRow]) -> None:
        """The writer committed `rows` (only the inserted ones): wake their lanes."""
        for row in rows:
            if row.delivers:
                self.wake(row.target, row.lane)

    def recorded(self, target: str, message_id: int, *, again: bool = False) -> None:
        """The writer committed a delivery's outcome, or gave it up (`again`: its row may still be
        ``queued``, and is read again): either way the row is no longer in hand.

        A committed outcome does not wake the lane: the row is no longer queued, and the lane's
        next read skips it either way (the bench's lanes made an empty read per message for it)."""
        for lane in self.lanes.get(target, ()):
            if message_id in lane.handed:
                lane.handed.discard(message_id)
                if again:
                    lane.wake()
                if lane.giving_back and lane.idle:
                    self.keeper_wake.set()  # give it back now: the node that takes it waits until then
                return

    def holds(self, singleton: str) -> bool:
        """Whether this node runs `singleton` (the DLQ retrier, the reaper) now."""
        return trio.current_time() < self.singletons.get(singleton, 0.0) - self.ttl_s * MARGIN

    def names(self) -> list[str]:
        return [lane.name for lanes in self.lanes.values() for lane in lanes]

    def releasable(self) -> list[str]:
        return [lane.name for lanes in self.lanes.values() for lane in lanes if lane.giving_back and lane.idle]

    def held_lanes(self) -> list[str]:
        now = trio.current_time()
        return [lane.name for lanes in self.lanes.values() for lane in lanes if now < lane.valid_until]

    def apply(self, held: Held, released: Iterable[str], wall_now: float) -> None:
        """A lease tick's result, read at `wall_now`: what this node holds now, until when, and what it
        gives back."""
        self.last = held
        mono = trio.current_time()

        def local(expires_at: float) -> float:
            return mono + (expires_at - wall_now)

        back = set(released)
        for name in back:
            for lane in self._by_name(name):
                lane.giving_back = False
        give_back = set(held.plan.give_back)
        for lanes in self.lanes.values():
            for lane in lanes:
                before = lane.valid_until
                lane.valid_until = local(held.mine[lane.name]) if lane.name in held.mine else 0.0
                if lane.name in give_back:
                    lane.giving_back = True
                # Newly held, or given back and claimed again in the same tick (the fair share grew
                # meanwhile: tests/test_kills.py saw it after a worker was killed): the lane task went
                # to sleep when the lane stopped being its to deliver; without this wake its queued
                # rows waited a heartbeat.
                if lane.valid_until and (not before or lane.name in back):
                    lane.wake()
        self.singletons = {n: local(held.mine[n]) for n in SINGLETONS if n in held.mine}
        if self.releasable():
            # A lane to give back takes no new row from now on, and no other node may take it
            # while we hold it: release it at once (the keeper ticks again), not at the next tick
            # (`tick_s` later, 3.3 s by default). Found by the test suite's two-worker mode and by
            # the bench (a second worker starting under load: lanes stalled ~3.6 s); the node due
            # the lanes ticks every `CATCH_UP_TICK_S` meanwhile (`next_tick_s`).
            self.keeper_wake.set()

    def _by_name(self, name: str) -> list[Lane]:
        return [lane for lanes in self.lanes.values() for lane in lanes if lane.name == name]


async def _relay_read(reader: LaneReads, read: Callable[[], T]) -> T:
    """`read` on this thread when the store's reads are local, else in a worker thread."""
    return await trio.to_thread.run_sync(read) if reader.blocking_reads else read()


async def run_relay(
    board: LaneBoard,
    reader: LaneReads,
    *,
    beat: Callable[[], None] = lambda: None,
    interval_s: float = RELAY_S,
    listener: RowsListener | None = None,
    listen_s: float = LISTEN_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Wake the lanes of rows other processes commit. (Rows this process commits wake their lanes from
    the writer already; the relay wakes them again, which costs one page read a lane is about to make
    anyway.) Row ids are commit order (on SQLite the id is taken under the write lock; on PostgreSQL
    under the store's advisory lock, `store.postgres`), so a cursor on the newest id misses nothing.
    With a `listener` (PostgreSQL) it reads when another node's commit notifies it, and at least every
    `listen_s`; else every `interval_s`."""
    last = await _relay_read(reader, reader.newest_id)
    task_status.started()
    while True:
        if listener is None:
            await trio.sleep(interval_s)
        else:
            await trio.to_thread.run_sync(listener.wait, listen_s)
        beat()
        try:
            newest = await _relay_read(reader, reader.newest_id)
            if newest > last:
                for target, lane in await _relay_read(reader, partial(reader.queued_lanes_after, last)):
                    board.wake(target, lane)
                last = newest
        except interface.STORE_ERRORS as exc:
            log.warning("relay cannot read the store", extra={"event": "relay_failed", "error": str(exc)})


async def run_lease_keeper(
    board: LaneBoard,
    writes: trio.MemorySendChannel[WriteOp],
    *,
    me: str,
    started_at: float,
    wall_clock: Callable[[], float],
    beat: Callable[[], None] = lambda: None,
    dead: Callable[[str], bool] = this_host_dead,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Renew and claim leases every `next_tick_s` (a third of the TTL; a quarter second while this node
    waits for lanes another gives back), and at once when lanes are added or a lane to give back is
    idle, until cancelled.

    `task_status.started()` comes after the first tick, so the lanes of a node that starts alone are
    held before it says it is ready. Owns `writes` (closed on exit)."""
    async with writes:
        await _tick(board, writes, me, started_at, wall_clock(), dead)
        task_status.started()
        while True:
            with trio.move_on_after(next_tick_s(board.ttl_s, me, len(board.names()), board.last, wall_clock())):
                await board.keeper_wake.wait()
            board.keeper_wake = trio.Event()
            beat()
            await _tick(board, writes, me, started_at, wall_clock(), dead)


async def _tick(
    board: LaneBoard,
    writes: trio.MemorySendChannel[WriteOp],
    me: str,
    started_at: float,
    now: float,
    dead: Callable[[str], bool],
) -> None:
    release = board.releasable()
    lanes = board.names()
    op: Write[Held] = Write(
        lambda w: w.keep_leases(
            me=me,
            lanes=lanes,
            singletons=SINGLETONS,
            release=release,
            now=now,
            ttl_s=board.ttl_s,
            started_at=started_at,
            dead=dead,
        )
    )
    await writes.send(op)
    try:
        held = await op.reply.wait()
    except StoreUnavailable as exc:
        log.warning("cannot renew leases", extra={"event": "lease_tick_failed", "error": str(exc)})
        return
    before = set(board.held_lanes())
    board.apply(held, release, now)
    after = set(board.held_lanes())
    if gained := sorted(after - (before - set(release))):
        board.taken += len(gained)
        log.info("lanes taken", extra={"event": "lanes_taken", "node": me, "lanes": gained})
    if lost := sorted(before - after - set(release)):
        board.lost += len(lost)
        log.warning("lanes lost to another node", extra={"event": "lanes_lost", "node": me, "lanes": lost})
    if release:
        log.info("lanes given back", extra={"event": "lanes_given_back", "node": me, "lanes": release})


async def release(writes: trio.MemorySendChannel[WriteOp], me: str) -> None:
    """Give back every lease of `me` (a clean stop), best effort: a store that refuses leaves them to expire."""
    op: Write[int] = Write(lambda w: w.release_leases(me))
    try:
        await writes.send(op)
        released = await op.reply.wait()
    except (StoreUnavailable, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.warning("leases left to expire", extra={"event": "lease_release_failed", "error": str(exc)})
        return
    log.info("leases released", extra={"event": "leases_released", "node": me, "count": released})

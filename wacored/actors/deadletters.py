"""The dead-letter queue: when a dead letter is tried again (pure), and the retrier actor that does it.

A message the forwarder could not deliver is dead-lettered ``pending`` with its first retry due after
``[dlq] backoff_s[0]`` (or ``abandoned`` at once for a permanent refusal). The retrier wakes every
``interval_s``, or sooner when an entry falls due (new ones are found within `DUE_POLL_S`) or an
operator replays some, takes up to ``batch``
due entries, oldest due first, and tries each once, straight to its service (no re-ingest) with
``X-DLQ-Retry: true`` and the original ``Idempotency-Key`` and correlation id. Retry n that fails is
followed by retry n+1 ``backoff_s[n]`` after it (measured from the failure); after ``max_attempts``
failed retries the entry is ``abandoned``: kept, never retried automatically. A retry the service's
breaker blocks is not an attempt: it is rescheduled for when the breaker lets a probe through. A retry
made is logged in the attempts log (kind ``dlq_retry``) with its write. The dead letters of a paused
service (`pauses.py`) are not tried either: each is rescheduled ``interval_s`` later, uncounted, and
stays ``pending``.

Error handling:
    A retry never raises for a network or HTTP failure (`forwarder.attempt` classifies them). Anything
    else a retry raises costs that one entry: it is ``abandoned`` with the reason ``internal_error``
    (logged once with its traceback, counted), and the pass goes on. A store error reading due entries
    is logged and the retrier tries again at its next wake. A write the store refuses
    (`StoreUnavailable`: disk full, locked) is tried again with the writer's bounded backoff until it
    commits (`write_committed`), so the retrier waits out an outage instead of crashing in a loop, and
    a retry already made is recorded rather than made again.

Cancellation:
    A retry cut short records nothing: the entry stays ``pending`` and due, and is tried again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

import httpx
import trio

from ..capabilities import Beating, Retrying
from ..config import DlqConfig
from ..core.delivery import Verdict
from ..observe.counts import bump
from ..runtime import HEARTBEAT_S
from ..store import DeadLetter, Retried, StoreUnavailable, interface
from ..store.interface import Reads, WriteTx
from ..store.writer import Write, WriteOp, retry_delay_s
from .forwarder import INTERNAL_ERROR, guarded_attempt, internal_error, new_transport

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTOR = "dlq_retrier"
MIN_RESCHEDULE_S = 1.0
DUE_POLL_S = 1.0
"""How often a sleeping retrier looks for entries due sooner than it planned: a new dead letter's first
retry comes at most this late (the read is one ``MIN`` over an index, in a worker thread)."""


def after_retry(
    attempts: int,
    verdict: Verdict | None,
    at: float,
    dlq: DlqConfig,
    *,
    dead_letter_id: int,
    message_id: int,
    wait_s: float = 0.0,
    error: str = "",
    status_code: int | None = None,
    retry_after_s: float | None = None,
) -> Retried:
    """What one retry of a dead letter that had `attempts` retries before means for it.

    `verdict` None: the retry was not attempted (breaker open, service gone); try again in `wait_s`.
    `retry_after_s`: the service asked for at least that long before the next try (``Retry-After``).
    """

    def result(state: str, counted: bool, next_at: float | None) -> Retried:
        return Retried(dead_letter_id, message_id, state, counted, next_at, at, error, status_code)

    if verdict is None:
        return result("pending", False, at + max(wait_s, MIN_RESCHEDULE_S))
    if verdict is Verdict.DELIVERED:
        return result("delivered", True, None)
    if verdict is Verdict.PERMANENT or attempts + 1 >= dlq.max_attempts:
        return result("abandoned", True, None)
    return result("pending", True, at + max(dlq.delay_s(attempts + 2), retry_after_s or 0.0))


class _Transports(dict[str, httpx.AsyncBaseTransport]):
    """One transport per service, made on first use by `make(service name)`."""

    def __init__(self, make: Callable[[str], httpx.AsyncBaseTransport]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> httpx.AsyncBaseTransport:
        self[name] = transport = self.make(name)
        return transport


async def retry_one(rt: Retrying, dl: DeadLetter, transports: dict[str, httpx.AsyncBaseTransport]) -> Retried:
    """Try one dead letter once, through its service's breaker."""
    d = dl.delivery
    dlq = rt.config.dlq
    target = rt.targets.get(d.target)

    def outcome(verdict: Verdict | None, **kw: object) -> Retried:
        return after_retry(dl.attempts, verdict, rt.wall_clock(), dlq, dead_letter_id=dl.id, message_id=d.id, **kw)  # type: ignore[arg-type]

    if target is None:
        log.warning(
            "dead letter for a service no longer configured",
            extra={"event": "dlq_orphaned", "service": d.target, "message_id": d.key},
        )
        return outcome(None, wait_s=dlq.interval_s, error=f"service {d.target!r} is not configured")
    if not rt.pauses.may_attempt(target.name):
        # An operator's decision, not a failure: no attempt, no breaker, the error left as it was.
        log.debug(
            "dead letter of a paused service rescheduled",
            extra={"event": "dlq_paused", "service": target.name, "message_id": d.key},
        )
        return outcome(None, wait_s=dlq.interval_s)
    result = await guarded_attempt(rt, target, transports[target.name], d, dlq_retry=True)
    if result is None:
        bump(rt.retry_counts.dlq_retries, (target.name, "breaker_open"))
        return outcome(None, wait_s=rt.breakers[target.name].retry_in(trio.current_time()))
    retried = outcome(
        result.verdict, error=result.error, status_code=result.status_code, retry_after_s=result.retry_after_s
    )
    # Logged with the retry's write (the writer's group commit), numbered as the entry's retries are.
    retried = dataclasses.replace(retried, attempt=result.row(d, target.name, dl.attempts + 1, "dlq_retry", rt.node))
    label = {"delivered": "delivered", "abandoned": "abandoned"}.get(retried.state, "failed")
    bump(rt.retry_counts.dlq_retries, (target.name, label))
    log.log(
        logging.INFO if label == "delivered" else logging.WARNING,
        "dead letter retried",
        extra={
            "event": f"dlq_retry_{label}",
            "service": target.name,
            "message_id": d.key,
            "correlation_id": d.correlation_id,
            "attempts": dl.attempts + int(retried.counted),
            "error": result.error,
        },
    )
    return retried


async def write(writes: trio.MemorySendChannel[WriteOp], apply: Callable[[WriteTx], T]) -> T:
    """Run `apply(connection)` in the writer's next transaction and wait for it to commit."""
    op: Write[T] = Write(apply)
    await writes.send(op)
    return await op.reply.wait()


async def write_committed(
    rt: Beating, actor: str, writes: trio.MemorySendChannel[WriteOp], apply: Callable[[WriteTx], T]
) -> T:
    """`write`, tried again while the store refuses it, `retry_delay_s` apart (beating for `actor`),
    until it commits. `apply` must be safe to run again: a refused transaction changed nothing."""
    failures = 0
    while True:
        try:
            return await write(writes, apply)
        except StoreUnavailable as exc:
            failures += 1
            log.warning(
                "store write refused: trying again",
                extra={"event": "store_write_retry", "actor": actor, "error": str(exc), "failures": failures},
            )
        await trio.sleep(retry_delay_s(failures))  # at most RETRY_MAX_S, below the heartbeat
        rt.beat(actor)


async def sleep_until(rt: Beating, actor: str, deadline: float, wake: trio.Event | None = None) -> None:
    """Sleep until wall-clock `deadline` (or `wake` is set), beating for `actor` meanwhile."""
    while (left := deadline - rt.wall_clock()) > 0 and not (wake is not None and wake.is_set()):
        with trio.move_on_after(min(left, HEARTBEAT_S)):
            if wake is None:
                await trio.sleep_forever()
            await wake.wait()
        rt.beat(actor)


async def run_dlq_retrier(
    rt: Retrying,
    reader: Reads,
    writes: trio.MemorySendChannel[WriteOp],
    *,
    transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
    due_poll_s: float = DUE_POLL_S,
    may_run: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Retry due dead letters until cancelled, or until the daemon stops.

    Owns: `reader` (reads due entries), `writes` (closed on exit), one HTTP transport per service
    (made by `transport`, else trusting the service's `ca_file`). While asleep it looks for entries
    due sooner every `due_poll_s`. It retries only while `may_run()`: this node holds the retrier's
    lease (`lanes.LaneBoard.holds`), so one retrier runs among all the workers; the others look again
    every `due_poll_s`.
    """

    def make(name: str) -> httpx.AsyncBaseTransport:
        return transport() if transport is not None else new_transport(rt.targets[name].ca_file)

    transports = _Transports(make)
    task_status.started()
    try:
        async with writes:
            while not rt.stopping.is_set():
                rt.beat(ACTOR)
                if not may_run():
                    await trio.sleep(due_poll_s)
                    continue
                if rt.dlq_due.is_set():
                    rt.dlq_due = trio.Event()
                started = rt.wall_clock()
                retried = await _one_pass(rt, reader, writes, transports)
                wake = await _next_wake(rt, reader)
                state = rt.actor(ACTOR)
                state.last_run, state.next_run = started, wake
                await write_committed(
                    rt,
                    ACTOR,
                    writes,
                    _ran(started, wake, f"{retried} retried"),
                )
                await _wait_for_due(rt, reader, wake, due_poll_s)
    finally:
        with trio.CancelScope(shield=True):
            for made in transports.values():
                await made.aclose()


def _ran(started: float, wake: float, result: str) -> Callable[[WriteTx], None]:
    return lambda w: w.record_run(ACTOR, started, wake, result)


def _retried(r: Retried) -> Callable[[WriteTx], None]:
    return lambda w: w.retried(r)


async def _one_pass(
    rt: Retrying,
    reader: Reads,
    writes: trio.MemorySendChannel[WriteOp],
    transports: dict[str, httpx.AsyncBaseTransport],
) -> int:
    """Retry what is due now, up to a batch; how many were tried."""
    try:
        due = await trio.to_thread.run_sync(reader.due_dead_letters, rt.wall_clock(), rt.config.dlq.batch)
    except interface.STORE_ERRORS as exc:
        log.error("cannot read due dead letters", extra={"event": "dlq_read_failed", "error": str(exc)})
        return 0
    for n, dl in enumerate(due):
        if rt.stopping.is_set():
            return n
        retried = await _retry_contained(rt, dl, transports)
        await write_committed(rt, ACTOR, writes, _retried(retried))
        rt.beat(ACTOR)
    return len(due)


async def _retry_contained(rt: Retrying, dl: DeadLetter, transports: dict[str, httpx.AsyncBaseTransport]) -> Retried:
    """`retry_one`, with anything unexpected it raises abandoning that entry alone."""
    try:
        return await retry_one(rt, dl, transports)
    except Exception as exc:
        d = dl.delivery
        log.exception(
            "dead letter retry raised: the entry is abandoned",
            extra={
                "event": "dlq_retry_internal_error",
                "service": d.target,
                "message_id": d.key,
                "error": internal_error(exc),
            },
        )
        bump(rt.retry_counts.internal_errors, d.target)
        retried = after_retry(
            dl.attempts,
            Verdict.PERMANENT,
            rt.wall_clock(),
            rt.config.dlq,
            dead_letter_id=dl.id,
            message_id=d.id,
            error=internal_error(exc),
        )
        return dataclasses.replace(retried, reason=INTERNAL_ERROR)


async def _next_wake(rt: Retrying, reader: Reads) -> float:
    """The next interval tick, or sooner when a pending entry falls due before it."""
    tick = rt.wall_clock() + rt.config.dlq.interval_s
    due = await _next_due(reader)
    return tick if due is None else min(tick, due)


async def _next_due(reader: Reads) -> float | None:
    try:
        return await trio.to_thread.run_sync(reader.next_due)
    except interface.STORE_ERRORS:
        return None


async def _wait_for_due(rt: Retrying, reader: Reads, wake: float, poll_s: float) -> None:
    """Sleep until `wake`, or sooner: when an operator's replay in this process sets `rt.dlq_due`, or
    when a pending entry falls due before `wake`. An entry written since the pass (a new dead letter,
    a replay from the CLI or from another process) is found within `DUE_POLL_S`, by one indexed
    ``MIN`` read, so its first retry comes on time instead of at the next ``interval_s`` tick."""
    while rt.wall_clock() < wake and not rt.dlq_due.is_set():
        await sleep_until(rt, ACTOR, min(wake, rt.wall_clock() + poll_s), rt.dlq_due)
        due = await _next_due(reader)
        if due is not None and due < wake:
            wake = rt.actor(ACTOR).next_run = due

"""wacored.actors.deadletters: the retry schedule (pure), and the retrier on a real SQLite file over a mock clock."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from wacored.actors.deadletters import after_retry, run_dlq_retrier, write
from wacored.config import DlqConfig
from wacored.core.delivery import Verdict
from wacored.runtime import Runtime
from wacored.store import Outcome, Reader, WriteConnection
from wacored.store.writer import NoLanes, Record, WriteOp, run_writer

from .conftest import bare_runtime
from .support import ingest_op

DLQ = DlqConfig(interval_s=300, batch=50, backoff_s=(120.0, 240.0, 480.0), max_attempts=3)


def retried(attempts: int, verdict: Verdict | None, at: float = 1000.0, **kw: object) -> tuple[object, ...]:
    r = after_retry(attempts, verdict, at, DLQ, dead_letter_id=1, message_id=2, **kw)  # type: ignore[arg-type]
    return r.state, r.counted, r.next_attempt_at


def test_a_failed_retry_waits_the_next_backoff_step_from_the_failure() -> None:
    assert retried(0, Verdict.TRANSIENT) == ("pending", True, 1240.0)
    assert retried(1, Verdict.TRANSIENT) == ("pending", True, 1480.0)


def test_the_last_allowed_retry_failing_abandons_the_entry() -> None:
    assert retried(2, Verdict.TRANSIENT) == ("abandoned", True, None)


def test_a_permanent_refusal_abandons_at_once() -> None:
    assert retried(0, Verdict.PERMANENT) == ("abandoned", True, None)


def test_a_delivered_retry_is_final() -> None:
    assert retried(0, Verdict.DELIVERED) == ("delivered", True, None)


def test_a_retry_the_breaker_blocked_is_not_counted() -> None:
    assert retried(2, None, wait_s=17.0) == ("pending", False, 1017.0)
    assert retried(2, None, wait_s=0.0) == ("pending", False, 1001.0)


# -- the retrier actor --------------------------------------------------------------------------------


class Service:
    """A scripted downstream: answers `status` and records when each request came."""

    def __init__(self, status: int = 503) -> None:
        self.status = status
        self.requests: list[tuple[float, httpx.Request]] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((trio.current_time(), request))
        return httpx.Response(self.status, text="down" if self.status >= 300 else "ok")

    def transport(self) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)


async def dead_letter(writes: trio.MemorySendChannel[WriteOp], key: str, at: float, retry_at: float) -> int:
    op = ingest_op(key, sender="2507", at=at, correlation_id="corr-" + key)
    await writes.send(op)
    (message_id,) = (await op.reply.wait()).ids
    assert message_id is not None
    await writes.send(
        Record(Outcome(message_id, False, 3, at, "HTTP 503: down", target="rides", key=key, retry_at=retry_at))
    )
    await write(writes, lambda conn: None)  # the record is committed once this is
    return message_id


def replay_now(path: Path, now: float) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE dead_letters SET next_attempt_at = ?", (now,))


def dead_letters(tmp_path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "bare.db") as db:
        return db.execute(
            "SELECT d.key, d.state, d.attempts, d.next_attempt_at, m.state FROM dead_letters AS d"
            " JOIN messages AS m ON m.id = d.message_id ORDER BY d.id"
        ).fetchall()


async def start_retrier(
    nursery: trio.Nursery, tmp_path: Path, service: Service, breaker: dict[str, object] | None = None
) -> tuple[Runtime, trio.MemorySendChannel[WriteOp]]:
    send, receive = trio.open_memory_channel[WriteOp](100)
    rt = bare_runtime(tmp_path, writes=send, forwarding=breaker or {})
    path = tmp_path / "bare.db"
    await nursery.start(partial(run_writer, WriteConnection(path), receive, NoLanes()))
    return rt, send


async def run_for(nursery: trio.Nursery, rt: Runtime, tmp_path: Path, service: Service, seconds: float) -> None:
    async with trio.open_nursery() as inner:
        # The entries are in the store before the retrier starts: no need to look for new ones every
        # second of these minutes-long schedules (each look is a real thread hop under the mock clock).
        await inner.start(
            partial(
                run_dlq_retrier,
                rt,
                Reader(tmp_path / "bare.db"),
                rt.writes.clone(),
                transport=service.transport,
                due_poll_s=60.0,
            )
        )
        await trio.sleep(seconds)
        inner.cancel_scope.cancel()


def times(service: Service) -> list[float]:
    return [t for t, _ in service.requests]


async def test_retries_at_2_4_8_minutes_then_abandons(tmp_path: Path, store_clock: trio.abc.Clock) -> None:
    service = Service(503)
    async with trio.open_nursery() as nursery:
        rt, writes = await start_retrier(nursery, tmp_path, service)
        await dead_letter(writes, "wamid.A", at=0.0, retry_at=120.0)
        await run_for(nursery, rt, tmp_path, service, 900)
        nursery.cancel_scope.cancel()
    # 2, 4 and 8 minutes apart, each measured from the previous failure .
    assert times(service) == [pytest.approx(t, abs=3) for t in (120, 360, 840)]
    assert dead_letters(tmp_path) == [("wamid.A", "abandoned", 3, None, "dead_lettered")]
    request = service.requests[0][1]
    assert request.headers["X-DLQ-Retry"] == "true"
    assert request.headers["Idempotency-Key"] == "wamid.A"
    assert request.headers["X-Correlation-ID"] == "corr-wamid.A"
    assert rt.retry_counts.dlq_retries == {("rides", "failed"): 2, ("rides", "abandoned"): 1}


async def test_a_service_that_is_back_gets_its_dead_letters(tmp_path: Path, store_clock: trio.abc.Clock) -> None:
    service = Service(200)
    async with trio.open_nursery() as nursery:
        rt, writes = await start_retrier(nursery, tmp_path, service)
        await dead_letter(writes, "wamid.A", at=0.0, retry_at=120.0)
        await dead_letter(writes, "wamid.B", at=10.0, retry_at=130.0)
        await run_for(nursery, rt, tmp_path, service, 200)
        nursery.cancel_scope.cancel()
    assert [r.headers["Idempotency-Key"] for _, r in service.requests] == ["wamid.A", "wamid.B"]
    assert dead_letters(tmp_path) == [
        ("wamid.A", "delivered", 1, None, "delivered"),
        ("wamid.B", "delivered", 1, None, "delivered"),
    ]


async def test_an_open_breaker_reschedules_without_counting(tmp_path: Path, store_clock: trio.abc.Clock) -> None:
    service = Service(503)
    async with trio.open_nursery() as nursery:
        rt, writes = await start_retrier(nursery, tmp_path, service)
        await dead_letter(writes, "wamid.A", at=0.0, retry_at=120.0)
        breaker = rt.breakers["rides"]
        for _ in range(breaker.failures):
            breaker.failure(trio.current_time())  # open from 0 to 30 s... then kept open below
        breaker.reconfigure(breaker.failures, 1000.0)
        await run_for(nursery, rt, tmp_path, service, 130)
        nursery.cancel_scope.cancel()
    assert service.requests == []
    ((key, state, attempts, next_at, _),) = dead_letters(tmp_path)
    assert (key, state, attempts) == ("wamid.A", "pending", 0)
    assert breaker.opened_at is not None
    assert next_at == pytest.approx(breaker.opened_at + 1000.0)  # when the breaker lets a probe through
    assert rt.retry_counts.dlq_retries[("rides", "breaker_open")] >= 1


async def test_a_replayed_entry_is_retried_when_the_retrier_is_woken(
    tmp_path: Path, store_clock: trio.abc.Clock
) -> None:
    service = Service(200)
    async with trio.open_nursery() as nursery:
        rt, writes = await start_retrier(nursery, tmp_path, service)
        await dead_letter(writes, "wamid.A", at=0.0, retry_at=10_000.0)
        async with trio.open_nursery() as inner:
            await inner.start(
                partial(run_dlq_retrier, rt, Reader(tmp_path / "bare.db"), writes.clone(), transport=service.transport)
            )
            await trio.sleep(50)
            # An operator's replay from another process (in a thread: the daemon's loop must go on).
            await trio.to_thread.run_sync(replay_now, tmp_path / "bare.db", trio.current_time())
            woken_at = trio.current_time()
            rt.wake_retrier()
            await trio.sleep(2)
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert times(service) == [pytest.approx(woken_at, abs=1)]

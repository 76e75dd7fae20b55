"""A downstream's Retry-After is honoured (first deliveries and dead-letter retries, capped, never
counted against the breaker), and the DLQ retrier wakes on time for a new dead letter. The policy is
tested pure; the behaviour with a real daemon, real HTTP and a real store."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
import trio

from wacored.config import Config
from wacored.core.retry_after import retry_after_s
from wacored.ops import operations as ops

from .conftest import Downstream, config_mapping, open_daemon, rows
from .support import RawDownstream, http_answer, wait_until

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("status", "value", "expected"),
    [
        (429, "7", 7.0),
        (503, " 12 ", 12.0),
        (503, "0", 0.0),
        (429, "100000", 300.0),  # capped
        (503, email.utils.formatdate(NOW + 42, usegmt=True), 42.0),  # an HTTP date
        (503, email.utils.formatdate(NOW - 42, usegmt=True), 0.0),  # a date in the past: now
        (500, "7", None),  # only 429 and 503
        (429, None, None),
        (429, "", None),
        (429, "-1", None),
        (429, "1.5", None),
        (429, "soon", None),
        (429, "Wed, 21 Oct 2026 07:28:00", None),  # no zone: not an HTTP date
        (429, "٣", None),  # a digit, but not ASCII
        (429, "9" * 100, None),
    ],
)
def test_retry_after_values(status: int, value: str | None, expected: float | None) -> None:
    got = retry_after_s(status, value, NOW, 300.0)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def config(tmp_path: Path, services_url: str, graph: Downstream, **sections: object) -> Config:
    data = config_mapping(tmp_path, services_url, graph.url, **sections)  # type: ignore[arg-type]
    return Config.from_mapping(data, {})


async def test_the_gap_between_two_attempts_is_at_least_the_retry_after(
    tmp_path: Path, graph: Downstream, nursery: trio.Nursery
) -> None:
    seen: list[float] = []

    def answer(_: bytes) -> bytes:
        seen.append(trio.current_time())
        if len(seen) == 1:
            return http_answer(503, [(b"Retry-After", b"1")], b"maintenance")
        return http_answer(200, [], b"{}")

    service = await RawDownstream(answer).start(nursery)
    fast = {"retry_base_ms": 5, "timeout_ms": 2000, "retries": 2, "breaker_failures": 1, "breaker_open_s": 30}
    async with open_daemon(config(tmp_path, service.url, graph, forwarding=fast)) as daemon:
        assert (await daemon.send_text("rides")).status_code == 200
        await wait_until(lambda: len(seen) == 2)
        await wait_until(lambda: rows(tmp_path / "wacored.db", "SELECT state FROM messages") == [("delivered",)])
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
    assert seen[1] - seen[0] >= 1.0
    # One transient answer with breaker_failures = 1 would have opened it; a Retry-After does not.
    assert health["services"]["rides"]["breaker"] == "closed"


async def test_a_dead_letter_waits_at_least_the_retry_after(
    tmp_path: Path, graph: Downstream, nursery: trio.Nursery
) -> None:
    service = await RawDownstream(lambda _: http_answer(429, [(b"Retry-After", b"30")], b"slow down")).start(nursery)
    fast = {"retry_base_ms": 5, "timeout_ms": 2000, "retries": 0, "retry_after_max_s": 20}
    db = tmp_path / "wacored.db"
    dlq = {"interval_s": 300, "backoff_s": [0.2], "max_attempts": 3}
    async with open_daemon(config(tmp_path, service.url, graph, forwarding=fast, dlq=dlq)) as daemon:
        assert (await daemon.send_text("rides")).status_code == 200
        await wait_until(lambda: rows(db, "SELECT COUNT(*) FROM dead_letters") == [(1,)])
        [(due, at)] = rows(db, "SELECT next_attempt_at, created_at FROM dead_letters")
    assert due - at == pytest.approx(20.0, abs=0.5)  # the service's 30 s, capped by retry_after_max_s


async def test_a_new_dead_letter_is_retried_on_time_not_at_the_next_interval(
    tmp_path: Path, graph: Downstream, nursery: trio.Nursery
) -> None:
    seen: list[float] = []

    def answer(_: bytes) -> bytes:
        seen.append(trio.current_time())
        return http_answer(503 if len(seen) == 1 else 200, [], b"{}")

    service = await RawDownstream(answer).start(nursery)
    fast = {"retry_base_ms": 5, "timeout_ms": 2000, "retries": 0}
    dlq = {"interval_s": 300, "backoff_s": [2], "max_attempts": 3}
    db = tmp_path / "wacored.db"
    async with open_daemon(config(tmp_path, service.url, graph, forwarding=fast, dlq=dlq)) as daemon:
        # Let the retrier make its first pass and go to sleep for its 300 s interval first.
        await wait_until(lambda: rows(db, "SELECT COUNT(*) FROM runs WHERE actor = 'dlq_retrier'") == [(1,)])
        assert (await daemon.send_text("rides")).status_code == 200
        await wait_until(lambda: rows(db, "SELECT state FROM dead_letters") == [("delivered",)])
    gap = seen[1] - seen[0]
    assert 2.0 <= gap < 3.5, gap
    # `dlq list` counts every attempt made: the first delivery's one and the retry.
    conn = ops.open_store(db)
    try:
        [entry] = ops.list_dead_letters(conn)
    finally:
        conn.close()
    assert (entry.to_json()["attempts"], entry.to_json()["retries"]) == (2, 1)

"""wacored.core.breaker: the state machine, with explicit time."""

from __future__ import annotations

from wacored.core.breaker import Breaker, BreakerState


def tripped(at: float = 100.0) -> Breaker:
    b = Breaker(failures=3, open_s=30.0)
    for _ in range(3):
        assert b.allow(at)
        b.failure(at)
    return b


def test_closed_lets_everything_through_below_the_threshold() -> None:
    b = Breaker(failures=3, open_s=30.0)
    for _ in range(2):
        assert b.allow(0.0)
        b.failure(0.0)
    assert b.state(0.0) is BreakerState.CLOSED
    assert b.allow(0.0)


def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    b = tripped()
    assert b.state(100.0) is BreakerState.OPEN
    assert not b.allow(100.0)
    assert not b.allow(129.9)
    assert b.trips == 1


def test_a_success_resets_the_consecutive_count() -> None:
    b = Breaker(failures=3, open_s=30.0)
    b.failure(0.0)
    b.failure(0.0)
    b.success()
    b.failure(0.0)
    b.failure(0.0)
    assert b.state(0.0) is BreakerState.CLOSED


def test_half_open_grants_exactly_one_probe() -> None:
    b = tripped()
    assert b.state(130.0) is BreakerState.HALF_OPEN
    assert b.allow(130.0)
    assert not b.allow(130.0)
    assert not b.allow(500.0)
    assert b.state(500.0) is BreakerState.HALF_OPEN


def test_probe_success_closes() -> None:
    b = tripped()
    assert b.allow(130.0)
    b.success()
    assert b.state(130.0) is BreakerState.CLOSED
    assert b.allow(130.0)
    assert b.allow(130.0)


def test_probe_failure_reopens_for_another_period() -> None:
    b = tripped()
    assert b.allow(130.0)
    b.failure(131.0)
    assert b.state(131.0) is BreakerState.OPEN
    assert not b.allow(160.9)
    assert b.allow(161.0)
    assert b.trips == 2


def test_released_probe_can_be_granted_again() -> None:
    b = tripped()
    assert b.allow(130.0)
    b.release()
    assert b.allow(130.0)


def test_retry_in_counts_down_to_the_probe() -> None:
    b = tripped()
    assert b.retry_in(110.0) == 20.0
    assert b.retry_in(140.0) == 0.0
    assert Breaker(3, 30.0).retry_in(0.0) == 0.0


def test_reconfigure_keeps_the_state() -> None:
    b = tripped()
    b.reconfigure(failures=10, open_s=5.0)
    assert b.state(104.0) is BreakerState.OPEN
    assert b.allow(105.0)


def test_gauge_values() -> None:
    assert [s.gauge for s in BreakerState] == [0, 1, 2]

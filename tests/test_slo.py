"""wacored.observe.slo: the p95 window and its crossings, the cold start judgement (pure, no servers, no clocks)."""

from __future__ import annotations

import logging
import time

import pytest

from wacored.observe.slo import (
    WINDOW,
    AckWindow,
    Crossing,
    P95Monitor,
    SloState,
    cold_start_breached,
    process_started_at,
)


def test_empty_window_p95_is_zero() -> None:
    assert AckWindow().p95() == 0.0


def test_p95_is_the_nearest_rank() -> None:
    window = AckWindow()
    for ms in range(1, 101):  # 1..100 ms, shuffled order does not matter
        window.add((101 - ms) / 1000)
    assert window.p95() == pytest.approx(0.095)
    window = AckWindow()
    for v in (0.1, 0.2, 0.3):
        window.add(v)
    assert window.p95() == 0.3  # ceil(0.95 * 3) = 3rd


def test_window_keeps_only_the_last_size_latencies() -> None:
    window = AckWindow(size=WINDOW)
    for _ in range(WINDOW):
        window.add(5.0)
    assert window.p95() == 5.0
    for _ in range(WINDOW):
        window.add(0.01)
    assert len(window) == WINDOW
    assert window.p95() == 0.01


def test_one_slow_request_in_120_does_not_move_the_p95() -> None:
    window = AckWindow()
    window.add(9.0)
    for _ in range(WINDOW - 1):
        window.add(0.02)
    assert window.p95() == 0.02


def test_monitor_reports_crossings_only() -> None:
    monitor = P95Monitor(size=20)
    assert [monitor.observe(0.01, 1.2) for _ in range(20)] == [None] * 20
    # 5% of 20 is one sample: the p95 only crosses once two samples are slow.
    assert monitor.observe(2.0, 1.2) is None
    assert monitor.observe(2.0, 1.2) is Crossing.BREACHED
    assert [monitor.observe(2.0, 1.2) for _ in range(5)] == [None] * 5
    results = [monitor.observe(0.01, 1.2) for _ in range(20)]
    assert results.count(Crossing.RECOVERED) == 1
    assert results.count(Crossing.BREACHED) == 0


def test_monitor_reads_the_target_each_time() -> None:
    monitor = P95Monitor(size=10)
    assert monitor.observe(0.5, 1.0) is None
    assert monitor.observe(0.5, 0.4) is Crossing.BREACHED  # a reload lowered the target


def test_state_logs_and_counts_a_p95_breach_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wacored.observe.slo")
    state = SloState()
    for _ in range(10):
        state.observe_ack(1.5, 1200)
    for _ in range(WINDOW):
        state.observe_ack(0.01, 1200)
    breaches = [r for r in caplog.records if getattr(r, "event", None) == "slo_breach"]
    assert len(breaches) == 1
    assert vars(breaches[0])["slo"] == "p95"
    assert vars(breaches[0])["target_ms"] == 1200
    assert state.breaches == {"p95": 1, "cold_start": 0}
    assert [getattr(r, "event", None) for r in caplog.records].count("slo_recovered") == 1


@pytest.mark.parametrize(("seconds", "breached"), [(1.75, False), (1.7501, True), (0.2, False)])
def test_cold_start_breach_is_strictly_above_the_target(seconds: float, breached: bool) -> None:
    assert cold_start_breached(seconds, 1750) is breached


def test_cold_start_is_logged_with_its_ms_and_breach(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wacored.observe.slo")
    state = SloState()
    state.record_cold_start(0.4321, 1750)
    state.record_cold_start(2.0, 1750)
    events = [(r.event, vars(r).get("ms"), vars(r).get("slo")) for r in caplog.records]  # type: ignore[attr-defined]
    assert events == [("cold_start", 432.1, None), ("cold_start", 2000.0, None), ("slo_breach", 2000.0, "cold_start")]
    assert state.breaches["cold_start"] == 1
    assert state.cold_start_s == 2.0


def test_process_start_is_in_the_past_of_the_monotonic_clock() -> None:
    started = process_started_at()
    assert started <= time.monotonic()
    # This test process has been running for less than a day (a bad read would give nonsense).
    assert time.monotonic() - started < 86400

"""wacored.core.ratelimit: a sliding window per sender; a POST is admitted or refused whole.

The arithmetic is pure: these tests keep each sender's hits in a dict, as the store keeps them in
``rate_hits`` (`tests/test_sessions_store.py` runs the same rules over real SQLite writers)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from wacored.core.ratelimit import RateLimit

A, B = "250788000001", "250788000002"


class Windows:
    """The hits the store would hold: every admitted POST per sender, as (time, messages)."""

    def __init__(self, limit: int = 30, window_s: float = 60.0) -> None:
        self.rate = RateLimit(limit, window_s)
        self.hits: dict[str, list[tuple[float, int]]] = {}

    def admit(self, counts: Mapping[str, int], now: float) -> int | None:
        wait = self.rate.admit(self.hits, counts, now)
        if wait is None:
            for sender, n in counts.items():
                self.hits.setdefault(sender, []).append((now, n))
        return wait

    def retry_after(self, sender: str, count: int, now: float) -> int | None:
        return self.rate.retry_after(self.hits.get(sender, []), count, now)


def limiter() -> Windows:
    return Windows(limit=30, window_s=60.0)


def fill(rl: Windows, sender: str, at: list[float]) -> None:
    for now in at:
        assert rl.admit({sender: 1}, now) is None


def test_thirty_allowed_then_the_31st_refused_with_retry_after() -> None:
    rl = limiter()
    fill(rl, A, [100.0 + i for i in range(30)])
    assert rl.admit({A: 1}, 129.5) == 31  # the hit at 100.0 leaves the window at 160.0


def test_window_slides_instead_of_resetting_on_a_clock_boundary() -> None:
    rl = limiter()
    assert rl.admit({A: 30}, 59.0) is None
    assert rl.admit({A: 1}, 61.0) == 58  # an aligned [60, 120) bucket would have admitted this
    assert rl.admit({A: 1}, 118.9) == 1
    assert rl.admit({A: 1}, 119.0) is None  # exactly one window after the hits


@pytest.mark.parametrize(("count", "wait"), [(1, 30), (10, 30), (11, 40), (20, 40), (21, 50), (30, 50)])
def test_retry_after_is_when_enough_old_hits_have_expired(count: int, wait: int) -> None:
    rl = limiter()
    for at in (0.0, 10.0, 20.0):
        assert rl.admit({A: 10}, at) is None
    assert rl.admit({A: count}, 30.0) == wait


def test_expired_hits_make_room() -> None:
    rl = limiter()
    for at in (0.0, 10.0, 20.0):
        assert rl.admit({A: 10}, at) is None
    assert rl.admit({A: 11}, 60.0) == 10
    assert rl.admit({A: 10}, 60.0) is None


def test_a_refused_post_records_nothing() -> None:
    rl = limiter()
    assert rl.admit({A: 30}, 0.0) is None
    for now in (30.0, 31.0, 32.0):
        assert rl.admit({A: 5}, now) is not None
    assert rl.admit({A: 30}, 60.0) is None  # the refusals at 30-32 would block this if counted


def test_one_sender_over_refuses_the_whole_post_and_records_nothing_for_anyone() -> None:
    rl = limiter()
    assert rl.admit({A: 30}, 0.0) is None
    assert rl.admit({A: 1, B: 1}, 10.0) == 50
    assert list(rl.hits) == [A]
    assert rl.retry_after(B, 30, 10.0) is None
    assert rl.admit({A: 30}, 60.0) is None


def test_refusal_waits_for_the_slowest_sender() -> None:
    rl = limiter()
    assert rl.admit({A: 30}, 0.0) is None
    assert rl.admit({B: 30}, 30.0) is None
    assert rl.admit({A: 1, B: 1}, 40.0) == 50


def test_more_than_the_limit_in_one_post_waits_for_an_empty_window() -> None:
    # Meta redelivers a refused batch unchanged: one that can never fit would be lost after 7 days.
    rl = limiter()
    assert rl.admit({A: 1}, 0.0) is None
    assert rl.admit({A: 31}, 10.0) == 50
    assert rl.admit({A: 31}, 60.0) is None
    assert rl.admit({A: 1}, 61.0) == 59


def test_exactly_the_limit_in_one_post_is_admitted() -> None:
    rl = limiter()
    assert rl.admit({A: 30, B: 30}, 0.0) is None
    assert rl.admit({A: 1}, 1.0) == 59


def test_hits_out_of_the_window_count_for_nothing() -> None:
    rl = limiter()
    rl.hits[A] = [(0.0, 30), (10.0, 0)]
    assert rl.retry_after(A, 30, 60.0) is None  # the hit at 0.0 left the window at exactly 60.0
    assert rl.retry_after(A, 1, 59.9) == 1


def test_the_window_length_is_the_limits_own() -> None:
    rl = Windows(limit=2, window_s=3600.0)
    assert rl.admit({A: 2}, 0.0) is None
    assert rl.admit({A: 1}, 600.0) == 3000
    assert rl.rate.horizon(600.0) == -3000.0

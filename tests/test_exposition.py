"""Merging several workers' metrics (`core/exposition.py`), the respawn backoff (`core/respawn.py`),
the /health aggregation (`api.with_siblings`) and ``[server] processes`` in the config: pure parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from wacored.config import Config, ConfigError
from wacored.core.exposition import GAUGES, Family, How, how, merge
from wacored.core.respawn import FIRST_S, MAX_S, STEADY_S, respawn_delay
from wacored.http.api import with_siblings
from wacored.siblings import families, merged_exposition

from .conftest import World
from .support import parse, value


def family(name: str, kind: str, *samples: tuple[str, dict[str, str], float]) -> Family:
    return Family(name, kind, "", {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples})


def only(merged: list[Family], name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    [found] = [f for f in merged if f.name == name]
    return found.samples


def test_counters_and_histograms_are_summed_per_label_set() -> None:
    a = [
        family("wacored_webhook_requests", "counter", ("wacored_webhook_requests_total", {"outcome": "accepted"}, 3)),
        family(
            "wacored_ack_latency_seconds",
            "histogram",
            ("wacored_ack_latency_seconds_bucket", {"le": "0.1"}, 2),
            ("wacored_ack_latency_seconds_count", {}, 3),
        ),
    ]
    b = [
        family(
            "wacored_webhook_requests",
            "counter",
            ("wacored_webhook_requests_total", {"outcome": "accepted"}, 4),
            ("wacored_webhook_requests_total", {"outcome": "duplicate"}, 1),
        ),
        family(
            "wacored_ack_latency_seconds",
            "histogram",
            ("wacored_ack_latency_seconds_bucket", {"le": "0.1"}, 5),
            ("wacored_ack_latency_seconds_count", {}, 6),
        ),
    ]
    merged = merge([a, b])
    assert only(merged, "wacored_webhook_requests") == {
        ("wacored_webhook_requests_total", (("outcome", "accepted"),)): 7,
        ("wacored_webhook_requests_total", (("outcome", "duplicate"),)): 1,
    }
    assert only(merged, "wacored_ack_latency_seconds") == {
        ("wacored_ack_latency_seconds_bucket", (("le", "0.1"),)): 7,
        ("wacored_ack_latency_seconds_count", ()): 9,
    }


def test_gauges_merge_as_their_meaning_says() -> None:
    def gauges(queued: float, in_memory: float, breaker: float, up: float) -> list[Family]:
        return [
            family("wacored_queue_depth", "gauge", ("wacored_queue_depth", {"service": "rides"}, queued)),
            family("wacored_lanes_held", "gauge", ("wacored_lanes_held", {"service": "rides"}, in_memory)),
            family("wacored_breaker_state", "gauge", ("wacored_breaker_state", {"service": "rides"}, breaker)),
            family("wacored_actor_up", "gauge", ("wacored_actor_up", {"actor": "writer"}, up)),
            family("wacored_something_new", "gauge", ("wacored_something_new", {}, in_memory)),
        ]

    merged = merge([gauges(10, 1, 0, 1), gauges(12, 2, 2, 0), gauges(11, 3, 1, 1)])
    rides = (("service", "rides"),)
    assert only(merged, "wacored_queue_depth") == {("wacored_queue_depth", rides): 10}  # the store's, once
    assert only(merged, "wacored_lanes_held") == {("wacored_lanes_held", rides): 6}
    assert only(merged, "wacored_breaker_state") == {("wacored_breaker_state", rides): 2}  # the worst
    assert only(merged, "wacored_actor_up") == {("wacored_actor_up", (("actor", "writer"),)): 0}
    assert only(merged, "wacored_something_new") == {("wacored_something_new", ()): 3}  # unlisted: max


def test_a_series_only_one_worker_has_is_kept_and_order_is_first_seen() -> None:
    a = [family("x", "counter", ("x_total", {"service": "a"}, 1))]
    b = [
        family("y", "gauge", ("y", {}, 5)),
        family("x", "counter", ("x_total", {"service": "b"}, 2), ("x_total", {"service": "a"}, 1)),
    ]
    merged = merge([a, b])
    assert [f.name for f in merged] == ["x", "y"]
    assert list(only(merged, "x").values()) == [2, 2]
    assert merge([a]) == a  # one worker: unchanged


def test_how_every_family_merges_is_decided_by_type_then_name() -> None:
    assert how("anything", "counter") is How.SUM
    assert how("anything", "histogram") is How.SUM
    assert how("wacored_dead_letters", "gauge") is How.ONCE
    assert how("wacored_workers", "gauge") is How.SUM
    assert how("python_info", "info") is How.ONCE


async def test_every_gauge_the_daemon_exports_has_a_deliberate_rule(world: World) -> None:
    """A new gauge must be classified: the default (max) is a net, not a decision."""
    text = (await world.daemon.client.get(f"{world.daemon.url}/metrics")).text
    gauges = {f.name for f in families(text) if f.type == "gauge"}
    assert sorted(gauges - set(GAUGES)) == []


@pytest.mark.single_worker("merges one process's exposition with itself: with two workers /metrics is both merged")
async def test_a_daemons_exposition_merged_with_itself_doubles_counters_not_store_figures(world: World) -> None:
    await world.daemon.send_text("menu")
    text = (await world.daemon.client.get(f"{world.daemon.url}/metrics")).text
    body, content_type = merged_exposition(text, [text], "")
    assert content_type.startswith("text/plain")
    one, two = parse(text), parse(body.decode())
    accepted = value(one, "wacored_webhook_requests_total", outcome="accepted")
    assert accepted >= 1
    assert value(two, "wacored_webhook_requests_total", outcome="accepted") == 2 * accepted
    assert value(two, "wacored_workers") == 2
    assert value(two, "wacored_store_size_bytes") == value(one, "wacored_store_size_bytes")
    assert value(two, "wacored_build_info", version=one["wacored_build_info"][0].labels["version"]) == 1
    ack = "wacored_ack_latency_seconds_count"
    assert value(two, ack) == 2 * value(one, ack)


def section(index: int, status: str) -> dict[str, object]:
    return {"index": index, "pid": 100 + index, "status": status, "ready": True, "leases": ["later field"]}


def test_health_lists_every_worker_whole_and_takes_the_worst_status() -> None:
    body = {"status": "healthy", "checks": {}, "workers": [section(0, "healthy")]}
    merged = with_siblings(body, {2: {"workers": [section(2, "unhealthy")]}, 1: {"workers": [section(1, "degraded")]}})
    assert merged["status"] == "unhealthy"
    assert merged["workers"] == [section(0, "healthy"), section(1, "degraded"), section(2, "unhealthy")]
    assert with_siblings(body, {1: {"workers": [section(1, "healthy")]}})["status"] == "healthy"
    assert body["status"] == "healthy"  # not changed in place


def test_a_worker_that_does_not_answer_is_down_and_the_daemon_degraded() -> None:
    body = {"status": "healthy", "workers": [section(0, "healthy")]}
    merged = with_siblings(body, {1: None, 2: {"not": "a health body"}})
    assert merged["status"] == "degraded"
    assert merged["workers"][1:] == [
        {"index": 1, "ready": False, "status": "down"},
        {"index": 2, "ready": False, "status": "down"},
    ]
    unhealthy = {"status": "unhealthy", "workers": [section(0, "unhealthy")]}
    assert with_siblings(unhealthy, {1: None})["status"] == "unhealthy"


def test_respawn_backs_off_from_a_tenth_of_a_second_to_ten_and_resets_after_a_minute() -> None:
    delays, delay = [], 0.0
    for _ in range(10):
        delay = respawn_delay(delay, served_s=1.0)
        delays.append(delay)
    assert delays[:3] == [FIRST_S, 2 * FIRST_S, 4 * FIRST_S]
    assert delays[-1] == MAX_S
    assert respawn_delay(MAX_S, served_s=STEADY_S) == FIRST_S


@pytest.mark.parametrize(("processes", "workers"), [(1, 1), (3, 3)])
def test_processes_is_read_from_server(processes: int, workers: int, tmp_path: Path) -> None:
    config = Config.from_mapping(_mapping(processes), {})
    assert config.server.processes == processes
    assert config.server.workers == workers


def test_processes_0_is_one_per_cpu_and_negative_is_refused() -> None:
    assert Config.from_mapping(_mapping(0), {}).server.workers >= 1
    with pytest.raises(ConfigError) as refused:
        Config.from_mapping(_mapping(-2), {})
    assert any(p.startswith("server.processes: must be 0") for p in refused.value.problems)


def _mapping(processes: int) -> dict[str, object]:
    return {
        "server": {"processes": processes},
        "whatsapp": {"app_secret": "s"},
        "services": {"rides": {"url": "http://127.0.0.1:9/rides", "keys": ["rides"]}},
    }


def test_health_sums_the_ingress_counts_and_takes_each_breakers_worst() -> None:
    def body(index: int, accepted: int, probes: int, breaker: str) -> dict[str, object]:
        return {
            "status": "healthy",
            "checks": {
                "requests": {"accepted": accepted},
                "routed": {"rides:keyword": accepted},
                "probes": probes,
                "statuses": {},
                "sessions": {"active": 40, "cached": 10 + index, "store_reads": index, "cache_clears": 1},
            },
            "services": {"rides": {"breaker": breaker, "lanes_held": index}},
            "workers": [section(index, "healthy")],
        }

    merged = with_siblings(body(0, 2, 1, "closed"), {1: body(1, 3, 0, "open"), 2: None})
    checks = merged["checks"]
    assert (checks["requests"], checks["routed"], checks["probes"]) == ({"accepted": 5}, {"rides:keyword": 5}, 1)
    # Every worker has a cache of its own: their figures are summed; the active sessions are the store's.
    assert checks["sessions"] == {"active": 40, "cached": 21, "store_reads": 1, "cache_clears": 2}
    assert merged["services"]["rides"] == {"breaker": "open", "lanes_held": 0}
    assert with_siblings(body(0, 2, 1, "half_open"), {1: body(1, 0, 0, "closed")})["services"]["rides"]["breaker"] == (
        "half_open"
    )
    # What is not a count in a sibling's answer is skipped, not summed.
    odd = {"checks": {"requests": {"accepted": "many"}, "probes": True}, "services": {"rides": {"breaker": 3}}}
    merged = with_siblings(body(0, 2, 1, "closed"), {1: odd})
    assert (merged["checks"]["requests"], merged["checks"]["probes"]) == ({"accepted": 2}, 1)
    assert merged["services"]["rides"]["breaker"] == "closed"


def test_health_shows_the_worst_workers_commits_and_every_workers_held_outcomes() -> None:
    """Each worker has a writer of its own: one whose commits fail makes the daemon's store_writes
    failing, whichever worker answers, and the outcomes held are summed."""

    def body(index: int, writes: str, held: int) -> dict[str, object]:
        return {
            "status": "healthy" if writes == "ok" else "degraded",
            "checks": {"store_writes": {"status": writes, "last_error": None if writes == "ok" else "disk full",
                                        "outcomes_held": held}},
            "workers": [section(index, "healthy" if writes == "ok" else "degraded")],
        }  # fmt: skip

    merged = with_siblings(body(0, "ok", 0), {1: body(1, "failing", 3), 2: None})
    assert merged["checks"]["store_writes"] == {"status": "failing", "last_error": "disk full", "outcomes_held": 3}
    assert merged["status"] == "degraded"
    merged = with_siblings(body(0, "failing", 2), {1: body(1, "down", 1)})
    assert merged["checks"]["store_writes"]["status"] == "down"
    assert merged["checks"]["store_writes"]["outcomes_held"] == 3
    # All recovered: the latest error is kept, whichever worker had it.
    recovered = {
        "status": "healthy",
        "checks": {
            "store_writes": {"status": "ok", "last_error": "disk full", "last_error_at": "2026-11-29T16:00:00Z"}
        },
    }
    merged = with_siblings(body(0, "ok", 0), {1: recovered})
    assert merged["checks"]["store_writes"]["last_error"] == "disk full"
    # A sibling's answer without the section changes nothing.
    assert with_siblings(body(0, "ok", 4), {1: {"checks": {}}})["checks"]["store_writes"]["outcomes_held"] == 4

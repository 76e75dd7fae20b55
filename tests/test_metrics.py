"""wacored.observe.metrics: the catalogue a real daemon exports on /metrics, and the collector over cached state."""

from __future__ import annotations

from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import SERVICES, World, config_mapping
from tests.support import parse, value
from wacored.actors.lanes import LaneBoard
from wacored.config import Config
from wacored.core.breaker import Breaker
from wacored.observe.counts import bump
from wacored.observe.state import ActorState
from wacored.runtime import Runtime
from wacored.store import Reader, migrate
from wacored.store.writer import WriteOp

TARGETS = (*SERVICES, "whatsapp")
CATALOGUE = {
    "wacored_build_info": "gauge",
    "wacored_webhook_requests": "counter",
    "wacored_handshakes": "counter",
    "wacored_messages_routed": "counter",
    "wacored_probes": "counter",
    "wacored_status_updates": "counter",
    "wacored_ack_latency_seconds": "histogram",
    "wacored_forward_attempts": "counter",
    "wacored_forward_latency_seconds": "histogram",
    "wacored_queue_depth": "gauge",
    "wacored_queue_oldest_age_seconds": "gauge",
    "wacored_lanes_held": "gauge",
    "wacored_breaker_state": "gauge",
    "wacored_breaker_trips": "counter",
    "wacored_service_paused": "gauge",
    "wacored_service_paused_seconds": "gauge",
    "wacored_dead_letters": "gauge",
    "wacored_dead_letter_oldest_pending_age_seconds": "gauge",
    "wacored_dlq_retries": "counter",
    "wacored_sessions_active": "gauge",
    "wacored_actor_up": "gauge",
    "wacored_actor_restarts": "counter",
    "wacored_config_reloads": "counter",
    "wacored_config_last_reload_successful": "gauge",
    "wacored_store_size_bytes": "gauge",
    "wacored_config_last_reload_success_timestamp_seconds": "gauge",
    "wacored_internal_errors": "counter",
    "wacored_webhook_previous_secret": "counter",
    "wacored_reaped": "counter",
    "wacored_store_commit_failures": "counter",
    "wacored_store_commit_failing_seconds": "gauge",
    "wacored_store_outcomes_held": "gauge",
    "wacored_slo_cold_start_seconds": "gauge",
    "wacored_slo_ack_p95_seconds": "gauge",
    "wacored_slo_ack_p95_target_seconds": "gauge",
    "wacored_slo_cold_start_target_seconds": "gauge",
    "wacored_slo_breaches": "counter",
    "process_resident_memory_bytes": "gauge",
}


async def scrape(world: World) -> dict[str, list[Sample]]:
    r = await world.daemon.client.get(f"{world.daemon.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def test_the_whole_catalogue_is_exported_from_the_start(world: World) -> None:
    r = await world.daemon.client.get(f"{world.daemon.url}/metrics")
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert {name: types.get(name) for name in CATALOGUE} == CATALOGUE
    samples = parse(r.text)
    assert value(samples, "wacored_build_info", version="0.1.0") == 1
    for outcome in (
        "accepted",
        "duplicate",
        "bad_signature",
        "bad_request",
        "too_large",
        "rate_limited",
        "unavailable",
        "client_gone",
    ):
        assert value(samples, "wacored_webhook_requests_total", outcome=outcome) == 0
    for status in ("sent", "delivered", "read", "failed"):
        assert value(samples, "wacored_status_updates_total", status=status) == 0
    for service in TARGETS:
        for outcome in ("delivered", "transient", "permanent", "breaker_open"):
            assert value(samples, "wacored_forward_attempts_total", service=service, outcome=outcome) == 0
        for outcome in ("delivered", "failed", "abandoned", "breaker_open"):
            assert value(samples, "wacored_dlq_retries_total", service=service, outcome=outcome) == 0
        for gauge in (
            "wacored_queue_depth",
            "wacored_queue_oldest_age_seconds",
            "wacored_breaker_state",
            "wacored_breaker_trips_total",
            "wacored_service_paused",
            "wacored_service_paused_seconds",
        ):
            assert value(samples, gauge, service=service) == 0
        assert value(samples, "wacored_forward_latency_seconds_count", service=service) == 0
    for state in ("pending", "abandoned", "delivered", "replayed"):
        for service in SERVICES:
            assert value(samples, "wacored_dead_letters", service=service, state=state) == 0
    assert value(samples, "wacored_store_size_bytes") > 0
    assert value(samples, "wacored_config_last_reload_successful") == 1
    for result in ("ok", "failed"):
        assert value(samples, "wacored_config_reloads_total", result=result) == 0
    for kind in ("sessions", "rate_hits", "dead_letters_delivered", "dead_letters_abandoned", "messages"):
        assert value(samples, "wacored_reaped_total", kind=kind) == 0
    for slo in ("p95", "cold_start"):
        assert value(samples, "wacored_slo_breaches_total", slo=slo) == 0
    assert value(samples, "wacored_messages_routed_total", service="rides", reason="keyword") == 0
    assert value(samples, "wacored_messages_routed_total", service="wacored", reason="home_menu") == 0
    assert value(samples, "wacored_actor_up", actor="writer") == 1
    assert value(samples, "wacored_actor_up", actor="forwarder.rides") == 1
    assert value(samples, "wacored_slo_ack_p95_target_seconds") == 1.2
    assert value(samples, "wacored_slo_cold_start_target_seconds") == 1.75
    assert 0 < value(samples, "wacored_slo_cold_start_seconds") < 10


async def test_requests_routes_statuses_and_handshakes_are_counted(world: World) -> None:
    daemon = world.daemon
    assert (await daemon.send_text("rides", sender="250788000011")).status_code == 200
    assert (await daemon.send_text("pickup", sender="250788000011")).status_code == 200
    assert (await daemon.send_text("menu", sender="250788000012")).status_code == 200
    assert (await daemon.post(b"{}", signed=False)).status_code == 401
    assert (await daemon.post(b"not json")).status_code == 400
    status = (Path(__file__).parent / "fixtures" / "whatsapp" / "status_delivered.json").read_bytes()
    assert (await daemon.post(status)).status_code == 200
    params = {"hub.mode": "subscribe", "hub.verify_token": "test-verify-token", "hub.challenge": "c"}
    assert (await daemon.client.get(f"{daemon.url}/webhook", params=params)).status_code == 200
    params["hub.verify_token"] = "wrong"
    assert (await daemon.client.get(f"{daemon.url}/webhook", params=params)).status_code == 403
    samples = await scrape(world)
    assert value(samples, "wacored_webhook_requests_total", outcome="accepted") == 4
    assert value(samples, "wacored_webhook_requests_total", outcome="bad_signature") == 1
    assert value(samples, "wacored_webhook_requests_total", outcome="bad_request") == 1
    assert value(samples, "wacored_messages_routed_total", service="rides", reason="keyword") == 1
    assert value(samples, "wacored_messages_routed_total", service="rides", reason="state") == 1
    assert value(samples, "wacored_messages_routed_total", service="wacored", reason="home_menu") == 1
    assert value(samples, "wacored_status_updates_total", status="delivered") == 1
    assert value(samples, "wacored_handshakes_total", result="ok") == 1
    assert value(samples, "wacored_handshakes_total", result="refused") == 1
    # Every answered POST is observed, refusals included.
    assert value(samples, "wacored_ack_latency_seconds_count") == 6
    # Counted in the store by the stats actor (every few seconds), never at scrape time.
    with trio.fail_after(15):
        while value(samples, "wacored_sessions_active") != 1:
            await trio.sleep(0.1)
            samples = await scrape(world)
    assert 0 < value(samples, "wacored_slo_ack_p95_seconds") < 1.2


async def test_no_label_holds_a_phone_number_or_message_id(world: World) -> None:
    r = await world.daemon.send_text("rides", sender="250788000099")
    wamid = r.json()["routes"][0]["message_id"]
    text = (await world.daemon.client.get(f"{world.daemon.url}/metrics")).text
    assert "250788000099" not in text
    assert wamid not in text


def runtime(tmp_path: Path, send: trio.MemorySendChannel[WriteOp], **sections: dict[str, object]) -> Runtime:
    config = Config.from_mapping(config_mapping(tmp_path, "http://svc.test", "http://graph.test", **sections), {})
    migrate(config.store.path)
    return Runtime.build(config, send, LaneBoard(), Reader(config.store.path), wall_clock=lambda: 10_000.0)


async def test_the_collector_reads_the_cached_state(tmp_path: Path) -> None:
    send, _receive = trio.open_memory_channel[WriteOp](1)
    rt = runtime(tmp_path, send)
    bump(rt.attempt_counts.forwards, ("rides", "delivered"), 3)
    bump(rt.attempt_counts.forwards, ("rides", "breaker_open"))
    bump(rt.retry_counts.dlq_retries, ("jobs", "abandoned"), 2)
    bump(rt.reload_counts.results, "failed")
    bump(rt.reap_counts.reaped, "sessions", 5)
    bump(rt.ingress_counts.statuses, "deleted")
    rt.stats.queued = {"rides": 12}
    rt.stats.oldest_queued_at = {"rides": 9_940.0}
    rt.stats.dead_letters_by_service = {("rides", "pending"): 3, ("jobs", "pending"): 1, ("rides", "abandoned"): 1}
    rt.stats.oldest_pending_at = 9_000.0
    breaker = rt.breakers["rides"] = Breaker(failures=1, open_s=30.0)
    breaker.failure(trio.current_time())
    rt.actors["dlq"] = ActorState(running=False, restarts=2)
    samples = parse(rt.metrics.render("")[0].decode())
    assert value(samples, "wacored_forward_attempts_total", service="rides", outcome="delivered") == 3
    assert value(samples, "wacored_forward_attempts_total", service="rides", outcome="breaker_open") == 1
    assert value(samples, "wacored_dlq_retries_total", service="jobs", outcome="abandoned") == 2
    assert value(samples, "wacored_config_reloads_total", result="failed") == 1
    assert value(samples, "wacored_reaped_total", kind="sessions") == 5
    assert value(samples, "wacored_status_updates_total", status="other") == 1
    assert value(samples, "wacored_queue_depth", service="rides") == 12
    assert value(samples, "wacored_queue_oldest_age_seconds", service="rides") == 60
    assert value(samples, "wacored_queue_oldest_age_seconds", service="jobs") == 0
    assert value(samples, "wacored_dead_letters", service="rides", state="pending") == 3
    assert value(samples, "wacored_dead_letters", service="jobs", state="pending") == 1
    assert value(samples, "wacored_dead_letters", service="rides", state="delivered") == 0
    assert value(samples, "wacored_dead_letter_oldest_pending_age_seconds") == 1000
    assert value(samples, "wacored_breaker_state", service="rides") == 2
    assert value(samples, "wacored_breaker_trips_total", service="rides") == 1
    assert value(samples, "wacored_breaker_state", service="jobs") == 0
    assert value(samples, "wacored_actor_up", actor="dlq") == 0
    assert value(samples, "wacored_actor_restarts_total", actor="dlq") == 2
    rt.reader.close()


async def test_services_follow_a_reloaded_config(tmp_path: Path) -> None:
    send, _receive = trio.open_memory_channel[WriteOp](1)
    rt = runtime(tmp_path, send)
    data = config_mapping(tmp_path, "http://svc.test", "http://graph.test")
    data["services"]["tickets"] = {"url": "http://svc.test/tickets", "keys": ["tickets"]}
    rt.config = Config.from_mapping(data, {})
    samples = parse(rt.metrics.render("")[0].decode())
    assert value(samples, "wacored_queue_depth", service="tickets") == 0
    assert value(samples, "wacored_forward_latency_seconds_count", service="tickets") == 0
    assert value(samples, "wacored_messages_routed_total", service="tickets", reason="keyword") == 0
    rt.reader.close()


async def test_openmetrics_is_served_when_asked_for(world: World) -> None:
    r = await world.daemon.client.get(
        f"{world.daemon.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


async def test_the_last_reload_gauge_stays_down_until_a_reload_works(tmp_path: Path, world: World) -> None:
    from wacored.config import ConfigError
    from wacored.daemon import run_daemon  # noqa: F401
    from wacored.reloads import ReloadRequest  # noqa: F401

    from .conftest import open_daemon

    send, receive = trio.open_memory_channel[ReloadRequest](1)
    data = config_mapping(tmp_path, world.services.url, world.graph.url)
    data["store"]["path"] = str(tmp_path / "gauge.db")

    def refuse() -> Config:
        raise ConfigError(["services.rides.url: must be an http:// or https:// URL"])

    async with open_daemon(Config.from_mapping(data, {}), reloads=receive) as daemon:

        async def gauge() -> float:
            text = (await daemon.client.get(f"{daemon.url}/metrics")).text
            assert "_created" not in text  # no *_created series
            return value(parse(text), "wacored_config_last_reload_successful")

        assert await gauge() == 1
        for load, expected in ((refuse, 0), (refuse, 0), (lambda: Config.from_mapping(data, {}), 1)):
            request = ReloadRequest(load)
            await send.send(request)
            await request.done.wait()
            assert await gauge() == expected


async def test_every_series_the_rules_and_dashboard_name_is_exported(world: World) -> None:
    """No alert expression or dashboard panel selects a series the daemon never exports: a renamed
    metric would otherwise leave an alert that can never fire, silently."""
    import re

    root = Path(__file__).parent.parent
    exported = set(parse((await world.daemon.client.get(f"{world.daemon.url}/metrics")).text))
    for source in (root / "deploy" / "prometheus" / "wacored.rules.yml", root / "dashboards" / "wacored.json"):
        named = set(re.findall(r"\bwacored_[a-z0-9_]+", source.read_text()))
        assert named, source
        assert named <= exported, (source.name, sorted(named - exported))

"""Bounded reads over real HTTP: the body deadline, the connection cap and the unverified-bytes budget
(`wacored.http.admission`). Raw sockets to 127.0.0.1, since a body that stalls or trickles is the point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from wacored.config import Config, ConfigError

from .conftest import Daemon, Downstream, config_mapping, make_config, open_daemon
from .support import RawConnection, connect, health, open_stalled, post_head, wait_for_health

READ_TIMEOUT_S = 0.5
SLACK_S = 0.4
"""How late after the deadline a 408 may arrive on a shared 2-core machine."""


async def assert_serves_signed_post(daemon: Daemon) -> None:
    r = await daemon.send_text("rides")
    assert r.status_code == 200, r.text


def bounded(tmp_path: Path, services: Downstream, graph: Downstream, **server: Any) -> Config:
    return make_config(tmp_path, services, graph, server={"read_timeout_s": READ_TIMEOUT_S, **server})


async def test_a_stalled_body_gets_408_at_the_read_deadline(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(bounded(tmp_path, services, graph)) as daemon:
        started = trio.current_time()
        conn = await open_stalled(daemon, 1000, b'{"object":')
        with trio.fail_after(READ_TIMEOUT_S + SLACK_S):
            answer = await conn.response()
        assert trio.current_time() - started >= READ_TIMEOUT_S
        assert answer.status == 408
        assert answer.json() == {"error": "request_timeout"}
        assert answer.headers["content-type"] == "application/json"
        assert answer.closed
        await conn.aclose()
        assert (await health(daemon))["checks"]["requests"]["read_timeout"] == 1
        metrics = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert 'wacored_webhook_requests_total{outcome="read_timeout"} 1.0' in metrics
        await assert_serves_signed_post(daemon)


async def test_a_trickled_body_gets_408_at_the_deadline_not_later(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(bounded(tmp_path, services, graph)) as daemon:
        conn = await connect(daemon)
        started = trio.current_time()
        await conn.send(post_head(1000))

        async def trickle() -> None:
            for _ in range(1000):
                try:
                    await conn.send(b" ")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the daemon answered and closed
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with trio.fail_after(READ_TIMEOUT_S + SLACK_S):
                answer = await conn.response()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - started >= READ_TIMEOUT_S
        assert answer.status == 408
        assert answer.closed
        await conn.aclose()
        await assert_serves_signed_post(daemon)


@pytest.mark.single_worker(
    "the connection cap is per worker: the test fills one worker's and needs /health to read that one's checks.ingress"
)
async def test_at_the_connection_cap_signed_posts_and_health_are_served(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    cap = 8
    # A long deadline: what frees room here must be the cap's shedding, not the read timeout.
    config = bounded(tmp_path, services, graph, max_connections=cap, read_timeout_s=60)
    async with open_daemon(config) as daemon:
        held: list[RawConnection] = []
        with trio.fail_after(10):
            for _ in range(cap - 1):
                held.append(await open_stalled(daemon, 1000, b'{"object":'))
            # Below the cap, /health sees them without shedding any.
            await wait_for_health(daemon, lambda h: h["checks"]["ingress"]["unverified_reads"] == cap - 1)
            held.append(await open_stalled(daemon, 1000, b'{"object":'))
            await assert_serves_signed_post(daemon)
            r = await daemon.client.get(f"{daemon.url}/health")
            assert r.status_code == 200
            # Room was made by shedding the oldest stalled read, which was told so and closed.
            oldest = await held[0].response()
        assert oldest.status == 503
        assert oldest.json() == {"error": "overloaded"}
        assert oldest.headers["retry-after"] == "1"
        assert oldest.closed
        assert r.json()["checks"]["ingress"]["in_flight"] <= cap
        for conn in held:
            await conn.aclose()
        await assert_serves_signed_post(daemon)


@pytest.mark.single_worker(
    "the unverified-bytes budget is per worker: the test fills one worker's and reads its checks.ingress in /health"
)
async def test_with_the_unverified_bytes_budget_full_a_signed_post_is_served(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    body_limit = 100_000
    config = bounded(
        tmp_path, services, graph, max_body_bytes=body_limit, max_unverified_bytes=2 * body_limit, read_timeout_s=60
    )
    partial = body_limit - 10
    async with open_daemon(config) as daemon:
        with trio.fail_after(10):
            first = await open_stalled(daemon, body_limit, b" " * partial)
            await wait_for_health(daemon, lambda h: h["checks"]["ingress"]["unverified_bytes"] == partial)
            second = await open_stalled(daemon, body_limit, b" " * partial)
            await wait_for_health(daemon, lambda h: h["checks"]["ingress"]["unverified_bytes"] == 2 * partial)
            # 20 bytes short of the budget: the signed POST's body does not fit beside both.
            await assert_serves_signed_post(daemon)
            oldest = await first.response()
            after = await health(daemon)
        assert oldest.status == 503
        assert oldest.json() == {"error": "overloaded"}
        # In flight: the second stalled read and this /health itself.
        assert after["checks"]["ingress"] == {"in_flight": 2, "unverified_reads": 1, "unverified_bytes": partial}
        assert after["checks"]["requests"]["shed"] == 1
        await first.aclose()
        await second.aclose()
        await assert_serves_signed_post(daemon)


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ({"read_timeout_s": 0}, "server.read_timeout_s"),
        ({"read_timeout_s": float("inf")}, "server.read_timeout_s"),
        ({"max_connections": 0}, "server.max_connections"),
        ({"max_body_bytes": 1000, "max_unverified_bytes": 999}, "server.max_unverified_bytes: must be at least"),
    ],
)
def test_bad_bounds_are_refused(tmp_path: Path, server: dict[str, Any], problem: str) -> None:
    data = config_mapping(tmp_path, "http://services.test", "http://graph.test", server=server)
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping(data, {})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_the_bounds_default_to_the_documented_values(tmp_path: Path) -> None:
    server = Config.from_mapping(config_mapping(tmp_path, "http://s.test", "http://g.test"), {}).server
    assert (server.read_timeout_s, server.max_connections, server.max_unverified_bytes) == (10.0, 1000, 64 << 20)

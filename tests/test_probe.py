"""wacored.core.probe: the mark (pure), and a probe through a real daemon: answered with its route, stored,
never forwarded nor dead-lettered, counted apart, reaped like any finished row, never replayed."""

from __future__ import annotations

import sqlite3
import time
import uuid
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from wacored.actors.reaper import reap
from wacored.config import SessionsConfig
from wacored.core.probe import PREFIX, is_probe
from wacored.core.schedule import DAY_S
from wacored.core.whatsapp import sign, text_webhook
from wacored.ops.messages import plan_matching, plan_replay, selection
from wacored.store import WriteConnection

from .conftest import SECRET, World, rows
from .support import health


def probe_id() -> str:
    return f"{PREFIX}{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("wamid", "probe"),
    [
        ("wamid.WACORED_PROBE.0123abcd", True),
        ("wamid.WACORED_PROBE.", False),  # the mark alone: not a unique id
        ("wamid.HBgLMjUwNzg4MDAwMDAxFQIAEhggQTU=", False),  # Meta's: base64, never a "."
        ("wamid.wacored_probe.0123", False),
        ("WACORED_PROBE.0123", False),
        ("wamid.XWACORED_PROBE.0123", False),
    ],
)
def test_a_probe_is_marked_by_its_wamid(wamid: str, probe: bool) -> None:
    assert is_probe(wamid) is probe


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics answer by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def post_text(
    world: World, text: str, sender: str, wamid: str, *, secret: str | None = SECRET
) -> tuple[int, dict[str, Any], str | None]:
    """POST one text message signed with `secret` (None: unsigned): the status, the JSON answer and
    ``X-Routed-Service``."""
    body = text_webhook(text=text, sender=sender, wamid=wamid, timestamp=int(time.time()))
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Hub-Signature-256"] = sign(secret, body)
    r = await world.daemon.client.post(f"{world.daemon.url}/webhook", content=body, headers=headers)
    return r.status_code, r.json(), r.headers.get("X-Routed-Service")


async def test_a_probe_is_routed_stored_and_never_forwarded(world: World) -> None:
    db = world.tmp_path / "wacored.db"
    rides_probe, menu_probe = probe_id(), probe_id()
    assert await post_text(world, "rides", "250788000901", rides_probe) == (
        200,
        {
            "accepted": 1,
            "duplicates": 0,
            "statuses": 0,
            "routes": [{"message_id": rides_probe, "service": "rides", "reason": "keyword", "probe": True}],
        },
        "rides",
    )
    status, body, routed = await post_text(world, "menu", "250788000902", menu_probe)
    assert (status, body["routes"], routed) == (
        200,
        [{"message_id": menu_probe, "service": "wacored", "reason": "home_menu", "probe": True}],
        "wacored",
    )
    # The same senders' real messages, after the probes. One sender's messages reach a target in the
    # order they were committed, so had a probe been handed to a forwarder it would have come first.
    assert (await post_text(world, "rides", "250788000901", "wamid.REAL1"))[0] == 200
    assert (await post_text(world, "menu", "250788000902", "wamid.REAL2"))[0] == 200
    [ride] = await world.services.wait_for(1, "/rides")
    [menu] = await world.graph.wait_for(1)
    assert ride.message["id"] == "wamid.REAL1"
    assert menu.json()["to"] == "250788000902"
    assert [r.path for r in world.services.received] == ["/rides"]
    assert len(world.graph.received) == 1
    # Stored in its final state, with its route; no attempt, no dead letter, no session started.
    assert rows(
        db,
        "SELECT key, service, reason, target, state, attempts FROM messages WHERE key LIKE ? ORDER BY id",
        f"{PREFIX}%",
    ) == [
        (rides_probe, "rides", "keyword", "rides", "probe", 0),
        (menu_probe, "wacored", "home_menu", "whatsapp", "probe", 0),
    ]
    assert rows(
        db, "SELECT COUNT(*) FROM attempts AS a JOIN messages AS m ON m.id = a.message_id WHERE m.state = 'probe'"
    ) == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM dead_letters") == [(0,)]
    assert rows(db, "SELECT sender, service FROM sessions") == [("250788000901", "rides")]  # the real message's


async def test_a_probe_session_is_left_as_it_was(world: World) -> None:
    """A probe from an operator's own number neither ends nor moves the conversation it is in."""
    db = world.tmp_path / "wacored.db"
    assert (await post_text(world, "jobs", "250788000903", "wamid.JOBS1"))[0] == 200
    _, body, _ = await post_text(world, "menu", "250788000903", probe_id())
    assert body["routes"][0]["reason"] == "home_menu"
    _, body, _ = await post_text(world, "wallet", "250788000903", probe_id())
    assert body["routes"][0]["service"] == "wallet"
    assert rows(db, "SELECT service FROM sessions WHERE sender = '250788000903'") == [("jobs",)]
    _, body, _ = await post_text(world, "where is it?", "250788000903", probe_id())
    assert body["routes"][0]["reason"] == "state"  # it reads the session


async def test_probes_are_counted_apart_from_routed_messages(world: World) -> None:
    before = samples((await world.daemon.client.get(f"{world.daemon.url}/metrics")).text)
    assert before[("wacored_probes_total", ())] == 0  # exported from the start
    for _ in range(2):
        assert (await post_text(world, "rides", "250788000904", probe_id()))[0] == 200
    after = samples((await world.daemon.client.get(f"{world.daemon.url}/metrics")).text)
    assert after[("wacored_probes_total", ())] == 2
    routed = {k: v for k, v in after.items() if k[0] == "wacored_messages_routed_total"}
    assert routed == {k: v for k, v in before.items() if k[0] == "wacored_messages_routed_total"}
    assert set(routed.values()) == {0}
    # The POSTs are webhooks like any: accepted.
    assert after[("wacored_webhook_requests_total", (("outcome", "accepted"),))] == 2
    checks = (await health(world.daemon))["checks"]
    assert (checks["probes"], checks["routed"]) == (2, {})


@pytest.mark.parametrize("secret", [None, "not-the-app-secret"])
async def test_an_unsigned_probe_is_refused_like_any_unsigned_post(world: World, secret: str | None) -> None:
    wamid = probe_id()
    status, body, _ = await post_text(world, "rides", "250788000905", wamid, secret=secret)
    assert (status, body) == (401, {"error": "unauthorized"})
    assert rows(world.tmp_path / "wacored.db", "SELECT COUNT(*) FROM messages") == [(0,)]
    assert (await health(world.daemon))["checks"]["probes"] == 0


async def test_a_probe_is_never_replayed_and_is_reaped_like_any_finished_row(world: World) -> None:
    db = world.tmp_path / "wacored.db"
    wamid = probe_id()
    assert (await post_text(world, "rides", "250788000906", wamid))[0] == 200
    conn = sqlite3.connect(db)
    try:
        named = plan_replay(conn, [wamid])
        matching = plan_matching(conn, selection(time.time(), since="1h", service="rides"))
    finally:
        conn.close()
    assert (named.ids, named.unknown) == ([], [wamid])
    assert matching.ids == []
    sessions = SessionsConfig(ttl_hours=24, dlq_retention_days=7, abandoned_retention_days=30, seen_retention_days=8)
    counts = await trio.to_thread.run_sync(
        partial(reap, WriteConnection(db), sessions, time.time() + 9 * DAY_S, rate_window_s=60.0)
    )
    assert counts["messages"] == 1
    assert rows(db, "SELECT COUNT(*) FROM messages") == [(0,)]

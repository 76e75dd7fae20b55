"""What a 200 promises: every accepted update is on disk, delivered after restarts, or dead-lettered."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio

from wacored.core.whatsapp import parse_webhook

from .conftest import FIXTURES, Downstream, Received, make_config, open_daemon, rows, serve_downstream
from .support import until_settled


async def test_restart_delivers_what_was_accepted_and_not_delivered(
    tmp_path: Path, nursery: trio.Nursery, services: Downstream, graph: Downstream
) -> None:
    async def hang(_: Received) -> int:
        await trio.sleep_forever()
        raise AssertionError

    stuck = await serve_downstream(nursery, Downstream(respond=hang))
    senders = [f"2507880001{i:02d}" for i in range(10)]
    async with open_daemon(make_config(tmp_path, stuck, graph)) as daemon:
        for sender in senders:
            assert (await daemon.send_text("rides", sender=sender)).status_code == 200
    db = tmp_path / "wacored.db"
    assert rows(db, "SELECT COUNT(*) FROM messages WHERE state = 'queued'") == [(10,)]

    async with open_daemon(make_config(tmp_path, services, graph)):
        got = await services.wait_for(10, "/rides")
        await until_settled(tmp_path / "wacored.db")
    assert sorted(g.message["from"] for g in services.received) == senders
    assert len(services.received) == 10
    assert rows(db, "SELECT COUNT(*) FROM messages WHERE state = 'delivered'") == [(10,)]
    assert len({g.headers["idempotency-key"] for g in got}) == 10


async def test_a_locked_store_answers_503_and_loses_nothing(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    config = make_config(tmp_path, services, graph, store={"busy_timeout_ms": 50})
    async with open_daemon(config) as daemon:
        body = b""
        lock = sqlite3.connect(tmp_path / "wacored.db", isolation_level=None, check_same_thread=False)
        # An operator's shell holding the database; taken in a thread, as waiting for it on the event
        # loop would stop the daemon's writer from finishing a transaction it holds.
        await trio.to_thread.run_sync(lock.execute, "BEGIN EXCLUSIVE")
        try:
            from wacored.core.whatsapp import text_webhook

            body = text_webhook(text="rides", sender="250788000070", wamid="wamid.LOCKED", timestamp=1)
            r = await daemon.post(body)
            assert r.status_code == 503
            assert r.json() == {"error": "unavailable"}
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        retried = await daemon.post(body)  # Meta redelivers
        assert retried.status_code == 200
        assert retried.json()["accepted"] == 1
        await services.wait_for(1, "/rides")


@pytest.mark.parametrize(
    ("status", "state", "reason", "attempts"),
    [
        (503, "pending", "transient", 3),
        (404, "abandoned", "permanent", 1),
    ],
)
async def test_undeliverable_messages_are_dead_lettered(
    tmp_path: Path, services: Downstream, graph: Downstream, status: int, state: str, reason: str, attempts: int
) -> None:
    tries: list[Received] = []

    async def refuse(request: Received) -> int:
        tries.append(request)
        return status

    services.respond = refuse
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        await daemon.send_text("rides")
        with trio.fail_after(10):
            # The file is the only place the outcome shows: poll it from another connection.
            while not rows(tmp_path / "wacored.db", "SELECT 1 FROM dead_letters"):  # noqa: ASYNC110
                await trio.sleep(0.02)
    [dead] = rows(
        tmp_path / "wacored.db", "SELECT service, state, reason, error, next_attempt_at IS NULL FROM dead_letters"
    )
    assert dead[:3] == ("rides", state, reason)
    assert f"HTTP {status}" in str(dead[3])
    assert dead[4] == (state == "abandoned")
    assert len(tries) == attempts
    assert rows(tmp_path / "wacored.db", "SELECT state, attempts FROM messages") == [("dead_lettered", attempts)]


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.json")), ids=lambda n: n[:-5])
async def test_every_real_payload_is_accepted(
    tmp_path: Path, services: Downstream, graph: Downstream, fixture: str
) -> None:
    raw = (FIXTURES / fixture).read_bytes()
    batch = parse_webhook(raw)
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        r = await daemon.post(raw)
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == len({m.wamid for m in batch.messages})
    assert body["accepted"] + body["duplicates"] == len(batch.messages)
    assert body["statuses"] == len(batch.statuses)


async def test_status_updates_go_to_the_configured_service_once(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    config = make_config(tmp_path, services, graph, routing={"statuses": "wallet"})
    raw = (FIXTURES / "status_failed_130472.json").read_bytes()
    async with open_daemon(config) as daemon:
        assert (await daemon.post(raw)).json()["statuses"] == 1
        await daemon.post(raw)
        [got] = await services.wait_for(1, "/wallet")
        await until_settled(tmp_path / "wacored.db")
    value = got.json()["entry"][0]["changes"][0]["value"]
    assert value["statuses"][0]["status"] == "failed"
    assert "messages" not in value
    assert len(services.on("/wallet")) == 1


async def test_home_menu_goes_to_the_bsuid_when_there_is_no_phone(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    doc = json.loads((FIXTURES / "msg_text_v25_bsuid_username.json").read_bytes())
    message = doc["entry"][0]["changes"][0]["value"]["messages"][0]
    del message["from"]
    message["text"]["body"] = "menu"
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        r = await daemon.post(json.dumps(doc).encode())
        assert r.json()["routes"][0]["service"] == "wacored"
        [sent] = await graph.wait_for(1)
    assert sent.json()["recipient"] == "US.13491208655302741918"
    assert "to" not in sent.json()


async def test_duplicates_are_recognised_after_a_restart(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    from wacored.core.whatsapp import text_webhook

    body = text_webhook(text="rides", sender="250788000085", wamid="wamid.ONCE", timestamp=1)
    config = make_config(tmp_path, services, graph)
    async with open_daemon(config) as daemon:
        assert (await daemon.post(body)).json()["accepted"] == 1
        await services.wait_for(1, "/rides")
    async with open_daemon(config) as daemon:
        again = await daemon.post(body)
        await until_settled(tmp_path / "wacored.db")
    assert again.json()["duplicates"] == 1
    assert len(services.on("/rides")) == 1


async def test_sessions_survive_a_restart(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    config = make_config(tmp_path, services, graph)
    async with open_daemon(config) as daemon:
        await daemon.send_text("property", sender="250788000080")
    async with open_daemon(config) as daemon:
        r = await daemon.send_text("a flat in Kigali", sender="250788000080")
    assert r.json()["routes"][0]["service"] == "property"
    assert r.json()["routes"][0]["reason"] == "state"


async def test_an_idle_session_is_ignored(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    now = [1_700_000_000.0]
    config = make_config(tmp_path, services, graph, sessions={"ttl_hours": 1})
    async with open_daemon(config, wall_clock=lambda: now[0]) as daemon:
        await daemon.send_text("jobs", sender="250788000081")
        now[0] += 3599
        assert (await daemon.send_text("still here", sender="250788000081")).json()["routes"][0]["service"] == "jobs"
        now[0] += 3601
        r = await daemon.send_text("back again", sender="250788000081")
    assert r.json()["routes"][0] == {**r.json()["routes"][0], "service": "wacored", "reason": "fallback"}


async def test_a_backlog_is_delivered_from_the_store_once_each_in_order(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async def slow(_: Received) -> int:
        await trio.sleep(0.005)
        return 200

    services.respond = slow
    senders = [f"2507880002{i:02d}" for i in range(12)]
    config = make_config(tmp_path, services, graph, forwarding={"concurrency": 2})
    async with open_daemon(config) as daemon:

        async def talk(sender: str) -> None:
            for text in ["rides"] + [f"m{i}" for i in range(14)]:
                assert (await daemon.send_text(text, sender=sender)).status_code == 200

        async with trio.open_nursery() as senders_nursery:
            for sender in senders:
                senders_nursery.start_soon(talk, sender)
        got = await services.wait_for(12 * 15, "/rides")
        await until_settled(tmp_path / "wacored.db")
    assert len(services.on("/rides")) == 12 * 15
    assert len({g.headers["idempotency-key"] for g in got}) == 12 * 15
    for sender in senders:
        texts = [g.message["text"]["body"] for g in got if g.message["from"] == sender]
        assert texts == ["rides"] + [f"m{i}" for i in range(14)]

"""A store that refuses commits for a while (a full disk) against a real daemon, real HTTP and the real
SQLite file: no delivery outcome is lost, nothing stays queued undelivered, /health tells.

The full disk is fault injection (`support.DiskFull`: the writer's COMMIT fails with SQLITE_FULL,
"database or disk is full", and is rolled back), not a tiny tmpfs: filling a tmpfs makes only the
writes that grow a file fail, and SQLite's WAL reuses its space after a checkpoint, so which commit
fails would depend on the WAL's history; and ``PRAGMA max_page_count`` fails only commits that grow
the database, not an outcome's in-place UPDATE. The injected error is the one SQLite raises.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from wacored import daemon as daemon_module

from .conftest import Daemon, Downstream, Received, make_config, open_daemon, rows
from .support import DiskFull, wait_until


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> DiskFull:
    """The daemon's writer connections, switchable to a full disk."""
    disk = DiskFull()
    monkeypatch.setattr(daemon_module, "WriteConnection", disk.connection)
    return disk


async def health_when(daemon: Daemon, check: Callable[[int, dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until `check(status code, body)` holds; the body then."""
    with trio.fail_after(15):
        while True:
            response = await daemon.client.get(f"{daemon.url}/health")
            body: dict[str, Any] = response.json()
            if check(response.status_code, body):
                return body
            await trio.sleep(0.05)


async def still_serving(daemon: Daemon, services: Downstream, sender: str) -> None:
    """A signed POST is accepted and delivered: the daemon is alive at the end of the test."""
    before = len(services.on("/rides"))
    response = await daemon.send_text("rides", sender=sender)
    assert response.status_code == 200, response.text
    await services.wait_for(before + 1, "/rides")


async def test_outcomes_of_a_disk_full_period_are_recorded_once_the_disk_is_back(
    tmp_path: Path, services: Downstream, graph: Downstream, disk: DiskFull
) -> None:
    release = trio.Event()

    async def respond(request: Received) -> int:
        await release.wait()
        return 404 if request.path == "/jobs" else 200  # jobs refuses: dead-lettered at once

    services.respond = respond
    db = tmp_path / "wacored.db"
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        assert (await daemon.send_text("rides", sender="250788000301")).status_code == 200
        assert (await daemon.send_text("jobs", sender="250788000302")).status_code == 200
        disk.full = True
        release.set()  # both deliveries end while no commit can succeed
        body = await health_when(daemon, lambda _, b: b["checks"]["store_writes"]["outcomes_held"] == 2)
        assert body["status"] == "degraded"
        assert rows(db, "SELECT target, state FROM messages ORDER BY id") == [("rides", "queued"), ("jobs", "queued")]
        assert rows(db, "SELECT COUNT(*) FROM attempts") == [(0,)]  # held with their outcomes

        disk.full = False  # no restart: the held outcomes are committed by the running daemon
        await wait_until(
            lambda: (
                rows(db, "SELECT target, state FROM messages ORDER BY id")
                == [("rides", "delivered"), ("jobs", "dead_lettered")]
            )
        )
        assert rows(db, "SELECT service, state, reason FROM dead_letters") == [("jobs", "abandoned", "permanent")]
        # Each attempt logged once, committed with the outcome it belongs to.
        assert rows(db, "SELECT service, number, kind, status_code FROM attempts ORDER BY message_id") == [
            ("rides", 1, "delivery", 200),
            ("jobs", 1, "delivery", 404),
        ]
        # /health answers 200 while degraded too. With two workers, the one that held nothing recovers
        # at its own next commit (its lease tick, 3.3 s at most), so wait for healthy, not for 200.
        body = await health_when(daemon, lambda status, b: status == 200 and b["status"] == "healthy")
        assert body["checks"]["store_writes"]["outcomes_held"] == 0
        await still_serving(daemon, services, "250788000303")
    assert len(services.on("/rides")) == 2  # the first message once, the last once: no duplicate
    assert len({r.headers["idempotency-key"] for r in services.on("/rides")}) == 2


async def test_health_is_degraded_then_unhealthy_while_commits_fail_and_healthy_after(
    tmp_path: Path, services: Downstream, graph: Downstream, disk: DiskFull
) -> None:
    config = make_config(tmp_path, services, graph, store={"unhealthy_after_s": 1})
    async with open_daemon(config) as daemon:
        disk.full = True
        failed_at = time.time()
        assert (await daemon.send_text("rides", sender="250788000311")).status_code == 503
        body = await health_when(daemon, lambda status, _: status == 200)
        writes = body["checks"]["store_writes"]
        assert (body["status"], writes["status"]) == ("degraded", "failing")
        assert writes["last_error"] == "database or disk is full"
        assert writes["consecutive_failures"] >= 1
        assert writes["failing_since"] is not None

        body = await health_when(daemon, lambda status, _: status == 503)
        assert (body["status"], body["checks"]["store_writes"]["status"]) == ("unhealthy", "down")
        assert time.time() - failed_at >= 1
        metrics = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert "wacored_store_commit_failures_total" in metrics
        assert "wacored_store_commit_failing_seconds 0.0" not in metrics

        disk.full = False
        await still_serving(daemon, services, "250788000312")  # a commit that writes: recovered
        # (With two workers, the other recovers at its own next commit: its lease tick, 3.3 s at most.)
        body = await health_when(daemon, lambda _, body: body["status"] == "healthy")
        writes = body["checks"]["store_writes"]
        assert (body["status"], writes["status"], writes["failing_since"]) == ("healthy", "ok", None)
        assert writes["last_error"] == "database or disk is full"  # kept for the operator
        metrics = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert "wacored_store_commit_failing_seconds 0.0" in metrics


async def test_a_row_left_queued_is_delivered_again_without_a_restart(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    db = tmp_path / "wacored.db"
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        await still_serving(daemon, services, "250788000321")
        # A committed message nobody is delivering, as a lost outcome, a lost queue offer or a crashed
        # forwarder's lane leave one (written here by another connection, as only it can).
        with trio.fail_after(5):
            await trio.to_thread.run_sync(_insert_queued, db, "wamid.LOST")
        await wait_until(
            lambda: rows(db, "SELECT state FROM messages WHERE key = 'wamid.LOST'") == [("delivered",)], timeout_s=20
        )
        assert [r.headers["idempotency-key"] for r in services.on("/rides")].count("wamid.LOST") == 1
        await still_serving(daemon, services, "250788000322")
    keys = [r.headers["idempotency-key"] for r in services.on("/rides")]
    assert len(keys) == len(set(keys)) == 3  # nothing delivered twice


def _insert_queued(db: Path, key: str) -> None:
    import sqlite3

    with sqlite3.connect(db, timeout=5) as conn:
        conn.execute(
            "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at)"
            " VALUES (?, 'message', '250788000329', 'rides', 'keyword', 'rides', ?, ?)",
            (key, b'{"lost": true}', time.time()),
        )


def _status_body(status_id: str) -> bytes:
    status = {"id": status_id, "status": "delivered", "timestamp": "1", "recipient_id": "250788000001"}
    value = {"messaging_product": "whatsapp", "statuses": [status]}
    change = {"field": "messages", "value": value}
    doc = {"object": "whatsapp_business_account", "entry": [{"id": "W", "changes": [change]}]}
    return json.dumps(doc).encode()


async def test_dropped_statuses_are_answered_without_a_commit_even_while_commits_fail(
    tmp_path: Path, services: Downstream, graph: Downstream, disk: DiskFull
) -> None:
    """Status updates that ``[routing] statuses = ""`` drops store nothing: no transaction is asked
    for, so a store refusing every commit does not refuse them."""
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        disk.full = True
        assert (await daemon.post(_status_body("wamid.ST2"))).status_code == 200
        assert (await daemon.send_text("rides", sender="250788000331")).status_code == 503  # the disk is full
        disk.full = False
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
    assert health["checks"]["statuses"] == {"delivered": 1}


async def test_statuses_are_counted_once_committed(
    tmp_path: Path, services: Downstream, graph: Downstream, disk: DiskFull
) -> None:
    """A POST answered 503 counts nothing: Meta's redelivery of it is counted once, not twice."""
    body = _status_body("wamid.ST1")
    config = make_config(tmp_path, services, graph, routing={"statuses": "wallet"})
    async with open_daemon(config) as daemon:
        disk.full = True
        assert (await daemon.post(body)).status_code == 503
        disk.full = False
        assert (await daemon.post(body)).status_code == 200
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
    assert health["checks"]["statuses"] == {"delivered": 1}

"""The attempts log and replay: ``wacored messages show|list|replay`` and ``/admin/messages`` against a
real running daemon, real downstream HTTP servers and a real store: each test runs on a SQLite file
and on a PostgreSQL schema of its own (the `store` fixture)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .conftest import Daemon, Downstream, Received, StoreUnderTest, config_mapping, open_daemon
from .support import add_message, operator, operator_config, store_execute, store_rows, wait_until

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = 1_800_000_000.0


def mapping(tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest) -> dict[str, Any]:
    return config_mapping(tmp_path, services.url, graph.url, admin={"token": TOKEN}, store=store.section())


@pytest.fixture
async def daemon(
    tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest
) -> AsyncIterator[Daemon]:
    from wacored.config import Config

    config = Config.from_mapping(mapping(tmp_path, services, graph, store), {})
    async with open_daemon(config, node="test-node") as d:
        yield d


@pytest.fixture
def cli(tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest) -> Path:
    """The daemon's config as a file, for the operator's commands."""
    return operator_config(tmp_path, mapping(tmp_path, services, graph, store))


async def run(config: Path, *args: str) -> int:
    """The CLI in a worker thread: it waits on the store's lock, never on the daemon's event loop."""
    return await trio.to_thread.run_sync(partial(operator, config, *args))


async def admin(daemon: Daemon, method: str, path: str, body: Any = None) -> httpx.Response:
    return await daemon.client.request(method, f"{daemon.url}{path}", json=body, headers=AUTH)


def state_of(daemon: Daemon, key: str) -> str:
    [(state,)] = store_rows(daemon.config.store, "SELECT state FROM messages WHERE key = ?", key)
    return str(state)


async def send(daemon: Daemon, text: str = "rides", sender: str = "250788000001") -> str:
    response = await daemon.send_text(text, sender=sender)
    assert response.status_code == 200, response.text
    return str(response.json()["routes"][0]["message_id"])


async def test_show_lists_every_attempt_of_a_delivery(
    daemon: Daemon, services: Downstream, cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter([503, 503])

    async def flaky(_: Received) -> int:
        return next(answers, 200)

    services.respond = flaky
    key = await send(daemon)
    await wait_until(lambda: state_of(daemon, key) == "delivered")
    assert await run(cli, "messages", "show", key, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["message_id"], report["service"], report["reason"], report["kind"], report["state"]) == (
        key,
        "rides",
        "keyword",
        "message",
        "delivered",
    )
    attempts = report["attempts"]
    assert [(a["number"], a["kind"], a["status_code"]) for a in attempts] == [
        (1, "delivery", 503),
        (2, "delivery", 503),
        (3, "delivery", 200),
    ]
    # The node holding the lane: "test-node", or with two workers "test-node-w0" or "test-node-w1".
    assert {a["node"] for a in attempts} <= set(daemon.nodes)
    assert [a["error"][:8] for a in attempts] == ["HTTP 503", "HTTP 503", ""]
    assert all(a["duration_ms"] >= 0 and a["started_at"].endswith("Z") for a in attempts)
    assert attempts[0]["started_at"] <= attempts[1]["started_at"] <= attempts[2]["started_at"]
    assert report["dead_letter"] is None
    # The admin API answers the same JSON.
    response = await admin(daemon, "GET", f"/admin/messages/{key}")
    assert (response.status_code, response.json()) == (200, report)
    assert await run(cli, "messages", "show", key) == 0
    text = capsys.readouterr().out
    assert "route       rides (keyword), target rides" in text
    assert "#3 delivery" in text


async def test_a_dead_letter_retry_is_logged_as_one(
    daemon: Daemon, services: Downstream, cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = True

    async def respond(_: Received) -> int:
        return 503 if down else 200

    services.respond = respond
    key = await send(daemon)
    await wait_until(lambda: state_of(daemon, key) == "dead_lettered")
    down = False
    assert (await admin(daemon, "POST", "/admin/dlq/replay", {"ids": [key]})).json()["replayed"] == 1
    await wait_until(lambda: state_of(daemon, key) == "delivered")
    assert await run(cli, "messages", "show", key, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [(a["number"], a["kind"], a["status_code"]) for a in report["attempts"]] == [
        (1, "delivery", 503),
        (2, "delivery", 503),
        (3, "delivery", 503),
        (1, "dlq_retry", 200),
    ]
    assert report["dead_letter"]["state"] == "delivered"


async def test_replaying_a_delivered_message_delivers_it_again_with_the_same_key(
    daemon: Daemon, services: Downstream, cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = await send(daemon, sender="250788000101")
    await services.wait_for(1, "/rides")
    newer = await send(daemon, sender="250788000102")  # the replayed row is older than a delivered one
    await services.wait_for(2, "/rides")
    await wait_until(lambda: state_of(daemon, newer) == "delivered")

    assert (
        await run(cli, "messages", "replay", key, "--yes") == 0
    )  # another process: its lane reads it at its next idle heartbeat
    assert "replayed 1 message(s)" in capsys.readouterr().out
    got = await services.wait_for(3, "/rides")
    assert got[2].headers["idempotency-key"] == got[0].headers["idempotency-key"] == key
    await wait_until(lambda: state_of(daemon, key) == "delivered")

    response = await admin(daemon, "POST", "/admin/messages/replay", {"ids": [key, "wamid.NOPE"]})
    assert response.json() == {"replayed": 1, "unknown": ["wamid.NOPE"], "queued": []}
    got = await services.wait_for(4, "/rides")
    assert got[3].headers["idempotency-key"] == key
    await wait_until(lambda: state_of(daemon, key) == "delivered")
    report = (await admin(daemon, "GET", f"/admin/messages/{key}")).json()
    assert [(a["number"], a["kind"], a["status_code"]) for a in report["attempts"]] == [(1, "delivery", 200)] * 3


async def test_replaying_a_dead_letter_takes_it_from_the_retrier_until_the_delivery_ends(
    daemon: Daemon, services: Downstream
) -> None:
    answer = 503

    async def respond(_: Received) -> int:
        return answer

    services.respond = respond
    key = await send(daemon)
    await wait_until(lambda: state_of(daemon, key) == "dead_lettered")
    db = daemon.config.store
    store_execute(db, "UPDATE dead_letters SET attempts = 2")  # retried twice already
    # Refused this time (a 404 also closes the breaker the 503s counted towards): the entry is final
    # again, with a fresh count.
    answer = 404
    body = {"service": "rides", "since": "1h", "state": "pending"}
    assert (await admin(daemon, "POST", "/admin/messages/replay", body)).json() == {"replayed": 1}
    await wait_until(
        lambda: store_rows(db, "SELECT state, attempts, reason FROM dead_letters") == [("abandoned", 0, "permanent")]
    )
    # Delivered: so is the entry.
    answer = 200
    assert (await admin(daemon, "POST", "/admin/messages/replay", {"ids": [key]})).json()["replayed"] == 1
    await services.wait_for(1, "/rides")
    await wait_until(lambda: store_rows(db, "SELECT state FROM dead_letters") == [("delivered",)])
    assert state_of(daemon, key) == "delivered"
    statuses = store_rows(
        db,
        "SELECT status_code FROM attempts WHERE message_id = (SELECT id FROM messages WHERE key = ?) ORDER BY id",
        key,
    )
    assert [s for (s,) in statuses] == [503, 503, 503, 404, 200]


async def test_replay_by_service_and_time(
    daemon: Daemon, services: Downstream, cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rides = await send(daemon, "rides", sender="250788000201")
    jobs = await send(daemon, "jobs", sender="250788000202")
    await wait_until(lambda: state_of(daemon, rides) == state_of(daemon, jobs) == "delivered")
    assert (
        await run(cli, "messages", "replay", "--service", "rides", "--since", "1h", "--state", "delivered", "--yes")
        == 0
    )
    assert "replayed 1 message(s)" in capsys.readouterr().out
    await services.wait_for(2, "/rides")
    await wait_until(lambda: state_of(daemon, rides) == "delivered")
    assert len(services.on("/jobs")) == 1
    assert await run(cli, "messages", "replay", "--service", "rides", "--since", "1h", "--until", "30m", "--yes") == 0
    assert capsys.readouterr().out == "no messages to replay\n"


@pytest.fixture
def store_cli(tmp_path: Path, store: StoreUnderTest) -> Path:
    """A config for the operator's commands on a store no daemon runs on."""
    mapping = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", store=store.section())
    return operator_config(tmp_path, mapping)


@pytest.fixture
def seeded(store: StoreUnderTest) -> Iterator[dict[str, int]]:
    from wacored.config import StoreConfig
    from wacored.ops.connection import open_ops

    store.migrate()
    conn = open_ops(StoreConfig(path=store.path, url=store.url))
    try:
        yield {
            "old": add_message(conn, "wamid.OLD", state="delivered", received_at=NOW - 3 * 86400),
            "jobs": add_message(conn, "wamid.JOBS", target="jobs", state="dead_lettered", received_at=NOW - 3600),
            "status": add_message(
                conn, "status:wamid.OLD:read", kind="status", state="delivered", received_at=NOW - 60
            ),
            "queued": add_message(conn, "wamid.Q", received_at=NOW - 30),
        }
    finally:
        conn.close()


def listed(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert operator(config, "messages", "list", "--json", *args) == 0
    return [m["message_id"] for m in json.loads(capsys.readouterr().out)]


def test_list_is_newest_first_and_filters(
    seeded: dict[str, int], store_cli: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.time", lambda: NOW)
    assert listed(store_cli, capsys) == ["wamid.Q", "status:wamid.OLD:read", "wamid.JOBS", "wamid.OLD"]
    assert listed(store_cli, capsys, "--limit", "2") == ["wamid.Q", "status:wamid.OLD:read"]
    assert listed(store_cli, capsys, "--since", "2h") == ["wamid.Q", "status:wamid.OLD:read", "wamid.JOBS"]
    assert listed(store_cli, capsys, "--until", "2m") == ["wamid.JOBS", "wamid.OLD"]
    assert listed(store_cli, capsys, "--since", "2027-01-01T00:00:00Z", "--until", "2027-01-13T00:00:00+00:00") == [
        "wamid.OLD"
    ]
    assert listed(store_cli, capsys, "--service", "jobs") == ["wamid.JOBS"]
    assert listed(store_cli, capsys, "--state", "delivered") == ["status:wamid.OLD:read", "wamid.OLD"]
    assert listed(store_cli, capsys, "--kind", "status") == ["status:wamid.OLD:read"]
    assert operator(store_cli, "messages", "list") == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "MESSAGE_ID", "KIND", "SERVICE", "REASON", "STATE", "RECEIVED_AT", "ATTEMPTS"]
    assert lines[0].split()[:2] == [str(seeded["queued"]), "wamid.Q"]
    for bad in (["--since", "yesterday"], ["--limit", "0"], ["--since", "1h", "--until", "2h"]):
        assert operator(store_cli, "messages", "list", *bad) == 2
        assert capsys.readouterr().err.startswith("wacored: ")
    assert operator(store_cli, "messages", "show", "wamid.NOPE") == 1
    assert capsys.readouterr().err == "wacored: no message 'wamid.NOPE'\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_replay_asks_first_and_refuses_without_a_terminal(
    seeded: dict[str, int],
    store_cli: Path,
    store: StoreUnderTest,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def states() -> list[str]:
        return [s for (s,) in store.rows("SELECT state FROM messages ORDER BY id")]

    before = states()
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # piped: no terminal, so no question
    assert operator(store_cli, "messages", "replay", "wamid.OLD", "wamid.JOBS") == 1
    err = capsys.readouterr().err
    assert "would replay 2 message(s)" in err
    assert "pass --yes" in err
    assert states() == before

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert operator(store_cli, "messages", "replay", "wamid.OLD") == 1
    assert capsys.readouterr().out.endswith("not replayed\n")
    assert states() == before

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert operator(store_cli, "messages", "replay", "wamid.OLD", "wamid.Q", "wamid.NOPE") == 1  # some not replayed
    captured = capsys.readouterr()
    assert "replay 1 message(s) to their services again? [y/N]" in captured.out
    assert "replayed 1 message(s)" in captured.out
    assert "unknown message: wamid.NOPE" in captured.err
    assert "already queued, not replayed: wamid.Q" in captured.err
    assert store.rows("SELECT state, done_at FROM messages WHERE key = 'wamid.OLD'") == [("queued", None)]

    with pytest.raises(SystemExit):
        operator(store_cli, "messages", "replay", "--service", "rides")  # --since is required with --service
    with pytest.raises(SystemExit):
        operator(store_cli, "messages", "replay", "wamid.OLD", "--service", "rides", "--since", "1h")


async def test_admin_messages_list_and_its_bad_requests(daemon: Daemon) -> None:
    key = await send(daemon)
    await wait_until(lambda: state_of(daemon, key) == "delivered")
    response = await admin(daemon, "GET", "/admin/messages?since=1h&service=rides&kind=message&limit=5")
    assert response.status_code == 200
    [entry] = response.json()
    assert (entry["message_id"], entry["state"], entry["attempts"]) == (key, "delivered", 1)
    assert (await admin(daemon, "GET", "/admin/messages?service=jobs")).json() == []
    for query in (
        "since=yesterday",
        "until=soon",
        "limit=0",
        "limit=1001",
        "limit=x",
        "state=lost",
        "kind=video",
        "colour=red",
        "since=1h&until=2h",
    ):
        response = await admin(daemon, "GET", f"/admin/messages?{query}")
        assert response.status_code == 400, query
        assert response.json()["error"] == "bad_request"
    response = await admin(daemon, "GET", "/admin/messages/wamid.NOPE")
    assert (response.status_code, response.json()) == (404, {"error": "not_found"})
    for body in (
        {},
        {"ids": []},
        {"ids": [1]},
        {"ids": ["x"], "service": "rides"},
        {"service": "rides"},
        {"service": "rides", "since": "1h", "state": "queued"},
        {"service": "rides", "since": "never"},
        {"service": 1, "since": "1h"},
        {"colour": "red"},
        ["wamid.x"],
    ):
        response = await admin(daemon, "POST", "/admin/messages/replay", body)
        assert response.status_code == 400, body
    assert state_of(daemon, key) == "delivered"
    unauthorized = await daemon.client.get(f"{daemon.url}/admin/messages")
    assert unauthorized.status_code == 401

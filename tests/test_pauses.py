"""Pausing and resuming a service: the pure checks, the store's table, and a real daemon with real
downstream services, driven by the admin API and by the CLI in a process of its own.

That a paused service received nothing is shown after a signal that would have shown a delivery:
another service received a message accepted after the paused one's, and the store still holds the
paused one's rows ``queued`` with no dead letter. The table, the CLI, the admin API and a pause
reaching a running daemon run on both stores (the `store` fixture: a SQLite file, a PostgreSQL schema).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from wacored.actors.pausewatch import PauseBoard
from wacored.cli import main
from wacored.config import Config, StoreConfig
from wacored.ops import pauses
from wacored.ops.connection import open_ops
from wacored.ops.pauses import Pause
from wacored.reloads import ReloadRequest
from wacored.siblings import LOCAL_HEADER

from .conftest import SERVICES, Daemon, Downstream, Received, StoreUnderTest, config_mapping, open_daemon, rows
from .support import health, run_cli, store_rows, toml_text, wait_for_health, wait_until

TOKEN = "test-admin-token-pauses"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {
    "forwarding": {"retry_base_ms": 5, "timeout_ms": 1000, "concurrency": 4, "retries": 0},
    "dlq": {"interval_s": 0.2, "backoff_s": [60.0], "max_attempts": 3},
    "admin": {"token": TOKEN},
    "server": {"drain_timeout_s": 30},
}


def mapping(
    tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest | None = None
) -> dict[str, Any]:
    if store is None:
        return config_mapping(tmp_path, services.url, graph.url, **FAST)
    return config_mapping(tmp_path, services.url, graph.url, **FAST, store=store.section())


async def admin(
    daemon: Daemon,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    return await daemon.client.request(
        method,
        f"{daemon.url}/admin{path}",
        headers=AUTH if headers is None else headers,
        content=json.dumps(body).encode() if body is not None else content,
    )


async def conversation(daemon: Daemon, sender: str, texts: list[str]) -> None:
    """`texts` from `sender`, in order: the first a service's key, the rest follow its session."""
    for text in texts:
        assert (await daemon.send_text(text, sender=sender)).status_code == 200


def texts_by_sender(received: list[Received]) -> dict[str, list[str]]:
    by_sender: dict[str, list[str]] = {}
    for r in received:
        by_sender.setdefault(r.message["from"], []).append(r.message["text"]["body"])
    return by_sender


def query(db: Path | StoreConfig, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """`sql` on the SQLite file `db`, or on the store a `StoreConfig` names."""
    return rows(db, sql, *args) if isinstance(db, Path) else store_rows(db, sql, *args)


def states(db: Path | StoreConfig, target: str) -> list[str]:
    return [state for (state,) in query(db, "SELECT state FROM messages WHERE target = ? ORDER BY id", target)]


# --- pure --------------------------------------------------------------------------------------------


def test_only_a_configured_service_with_a_short_printable_reason_may_be_paused() -> None:
    pauses.check_pause("rides", SERVICES, "")
    pauses.check_pause("rides", SERVICES, "x" * pauses.MAX_REASON)
    with pytest.raises(pauses.BadPause, match="Graph API sender"):
        pauses.check_pause("whatsapp", SERVICES, "")
    with pytest.raises(pauses.UnknownService):
        pauses.check_pause("taxis", SERVICES, "")
    for reason, problem in (
        (3, "a string"),
        ("x" * 201, "at most 200"),
        ("a\nb", "printable"),
        ("\x1b[31m", "printable"),
    ):
        with pytest.raises(pauses.BadPause, match=problem):
            pauses.check_pause("rides", SERVICES, reason)


def test_a_paused_target_may_not_be_attempted_and_its_pause_has_a_length() -> None:
    paused = {"rides": Pause(100.0, "deploy")}
    assert not pauses.may_attempt("rides", paused)
    assert pauses.may_attempt("jobs", paused)
    assert pauses.paused_seconds(paused["rides"], 160.0) == 60.0
    assert pauses.paused_seconds(paused["rides"], 90.0) == 0.0  # the clock stepped back
    assert pauses.paused_seconds(None, 160.0) == 0.0


async def test_a_refresh_waits_for_a_read_begun_after_it_was_asked() -> None:
    """A read that began before the admin's write cannot answer it (it could undo the pause)."""
    board = PauseBoard()
    done = trio.Event()

    async def ask() -> None:
        await board.refreshed()
        done.set()

    async with trio.open_nursery() as nursery:
        stale = board.take_poke()  # a read that began before the request
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        board.apply({}, stale)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        board.apply({"rides": Pause(1.0)}, board.take_poke())
        await done.wait()
    assert not board.may_attempt("rides")


def test_the_table_keeps_the_first_start_of_a_pause_and_resumes_only_what_it_knows(store: StoreUnderTest) -> None:
    store.migrate()
    conn = open_ops(StoreConfig(path=store.path, url=store.url))
    try:
        assert pauses.pause(conn, "rides", services=SERVICES, reason="deploy", now=100.0)
        assert not pauses.pause(conn, "rides", services=SERVICES, reason="again", now=200.0)
        assert pauses.read_pauses(conn) == {"rides": Pause(100.0, "deploy")}
        # A pause left by a service since removed from the config can still be resumed.
        assert pauses.resume(conn, "rides", services=["jobs"])
        assert not pauses.resume(conn, "rides", services=SERVICES)
        with pytest.raises(pauses.UnknownService):
            pauses.resume(conn, "taxis", services=SERVICES)
        assert pauses.read_pauses(conn) == {}
    finally:
        conn.close()


def test_the_cli_pauses_lists_and_resumes(
    tmp_path: Path, store: StoreUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "wacored.toml"
    data = config_mapping(tmp_path, "http://services.test", "http://graph.test", store=store.section())
    config.write_text(toml_text(data))
    store.migrate()
    common = ["-c", str(config), "--env-file", "/nonexistent"]
    assert main(["services", "pause", "rides", "--reason", "deploy 42", *common]) == 0
    assert "rides paused since " in capsys.readouterr().out
    assert main(["services", "pause", "rides", *common]) == 0
    assert "rides was already paused since" in capsys.readouterr().out
    assert main(["services", "list", "--json", *common]) == 0
    listed = {e["service"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(SERVICES)
    assert (listed["rides"]["paused"], listed["rides"]["pause_reason"]) == (True, "deploy 42")
    assert listed["rides"]["paused_since"].endswith("Z")
    assert (listed["jobs"]["paused"], listed["jobs"]["paused_since"]) == (False, None)
    assert main(["services", "list", *common]) == 0
    table = capsys.readouterr().out
    [line] = [line for line in table.splitlines() if line.startswith("rides ")]
    assert line.split()[:2] == ["rides", "paused"]
    assert line.endswith("deploy 42")
    for refused in (
        ["pause", "whatsapp"],
        ["pause", "taxis"],
        ["pause", "jobs", "--reason", "x" * 201],
        ["resume", "taxis"],
    ):
        assert main(["services", *refused, *common]) == 1, refused
        assert capsys.readouterr().err.startswith("wacored: ")
    assert main(["services", "resume", "rides", *common]) == 0
    assert "rides resumed" in capsys.readouterr().out
    assert main(["services", "resume", "rides", *common]) == 0
    assert "rides was not paused" in capsys.readouterr().out


# --- a running daemon --------------------------------------------------------------------------------


async def test_a_paused_service_gets_nothing_then_everything_in_order_on_resume(
    tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest
) -> None:
    config = Config.from_mapping(mapping(tmp_path, services, graph, store), {})
    db = config.store
    conversations = {
        "250788000101": ["rides", "a1", "a2", "a3", "a4"],
        "250788000102": ["rides", "b1", "b2", "b3", "b4"],
    }
    async with open_daemon(config) as daemon:
        r = await admin(daemon, "POST", "/services/rides/pause", {"reason": "rides deploy"})
        assert r.status_code == 200, r.text
        assert r.json() | {"paused_since": None} == {
            "service": "rides",
            "paused": True,
            "paused_since": None,
            "pause_reason": "rides deploy",
            "changed": True,
        }
        for sender, texts in conversations.items():
            await conversation(daemon, sender, texts)
        # The signal: a later message to another service was delivered.
        await conversation(daemon, "250788000103", ["insurance"])
        await services.wait_for(1, "/insurance")
        assert services.on("/rides") == []
        assert states(db, "rides") == ["queued"] * 10
        assert query(db, "SELECT COUNT(*) FROM dead_letters") == [(0,)]
        body = await health(daemon)
        assert body["status"] == "healthy"  # an operator's decision, not a fault
        rides = body["services"]["rides"]
        assert (rides["paused"], rides["pause_reason"], rides["breaker"]) == (True, "rides deploy", "closed")
        assert rides["paused_since"].endswith("Z")
        assert body["services"]["jobs"] | {"queued": 0} == body["services"]["jobs"]
        assert (body["services"]["jobs"]["paused"], body["services"]["jobs"]["paused_since"]) == (False, None)

        r = await admin(daemon, "POST", "/services/rides/resume")
        assert r.status_code == 200, r.text
        assert (r.json()["paused"], r.json()["changed"]) == (False, True)
        got = await services.wait_for(10, "/rides")
        await wait_until(lambda: states(db, "rides") == ["delivered"] * 10)
    assert texts_by_sender(got) == conversations
    assert query(db, "SELECT COUNT(*) FROM dead_letters") == [(0,)]


async def test_a_cli_pause_holds_the_running_daemon_and_survives_a_restart(
    tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest
) -> None:
    data = mapping(tmp_path, services, graph, store)
    config_file = tmp_path / "wacored.toml"
    config_file.write_text(toml_text(data))
    config = Config.from_mapping(data, {})
    db = config.store
    cli = ["-c", str(config_file), "--env-file", "/nonexistent"]
    texts = ["rides", "r1", "r2"]
    async with open_daemon(config) as daemon:
        done = await run_cli("services", "pause", "rides", "--reason", "from the cli", *cli)
        assert done.returncode == 0, done.stderr
        with trio.fail_after(10):
            await wait_for_health(daemon, lambda b: b["services"]["rides"]["paused"])
        await conversation(daemon, "250788000201", texts)
        await conversation(daemon, "250788000202", ["insurance"])
        await services.wait_for(1, "/insurance")
        assert services.on("/rides") == []
        assert states(db, "rides") == ["queued"] * 3
        stopping = trio.current_time()
    # A lane holding a paused delivery does not keep the drain (30 s here) waiting.
    assert trio.current_time() - stopping < 10

    async with open_daemon(config) as daemon:
        # Paused from the first moment: the rows recovered from disk are not sent either.
        body = await health(daemon)
        assert (body["services"]["rides"]["paused"], body["services"]["rides"]["pause_reason"]) == (
            True,
            "from the cli",
        )
        await conversation(daemon, "250788000203", ["insurance"])
        await services.wait_for(2, "/insurance")
        assert services.on("/rides") == []
        assert states(db, "rides") == ["queued"] * 3
        listed = await run_cli("services", "list", "--json", *cli)
        [rides] = [e for e in json.loads(listed.stdout) if e["service"] == "rides"]
        assert (rides["paused"], rides["queued"]) == (True, 3)

        done = await run_cli("services", "resume", "rides", *cli)
        assert done.returncode == 0, done.stderr
        got = await services.wait_for(3, "/rides")
        await wait_until(lambda: states(db, "rides") == ["delivered"] * 3)
    assert texts_by_sender(got) == {"250788000201": texts}


async def test_a_paused_services_dead_letters_are_rescheduled_uncounted_then_retried_on_resume(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    db = tmp_path / "wacored.db"
    calls = 0
    up = False

    async def flaky(_: Received) -> int:
        nonlocal calls
        calls += 1
        return 200 if up else 503

    services.respond = flaky
    async with open_daemon(Config.from_mapping(mapping(tmp_path, services, graph), {})) as daemon:
        await conversation(daemon, "250788000301", ["rides"])
        await wait_until(lambda: rows(db, "SELECT state, attempts FROM dead_letters") == [("pending", 0)])
        assert (await admin(daemon, "POST", "/services/rides/pause")).status_code == 200
        before = calls
        # Due now (the retrier is woken): it finds a paused service and reschedules, twice over.
        r = await admin(daemon, "POST", "/dlq/replay", {"all": True, "state": "pending"})
        assert r.json() == {"replayed": 1}
        [(replayed_at,)] = rows(db, "SELECT updated_at FROM dead_letters")
        await wait_until(lambda: rows(db, "SELECT updated_at FROM dead_letters")[0][0] > replayed_at)
        [(first,)] = rows(db, "SELECT updated_at FROM dead_letters")
        await wait_until(lambda: rows(db, "SELECT updated_at FROM dead_letters")[0][0] > first)
        [(state, attempts, next_at, updated, error)] = rows(
            db, "SELECT state, attempts, next_attempt_at, updated_at, error FROM dead_letters"
        )
        assert (state, attempts, calls) == ("pending", 0, before)
        assert next_at > updated  # rescheduled, not given up
        assert error.startswith("HTTP 503")  # the last real failure, not the pause
        up = True
        assert (await admin(daemon, "POST", "/services/rides/resume")).status_code == 200
        await wait_until(lambda: rows(db, "SELECT state, attempts FROM dead_letters") == [("delivered", 1)])
    [retry] = services.on("/rides")
    assert retry.headers["x-dlq-retry"] == "true"


async def test_the_admin_api_pauses_resumes_and_lists_services(
    tmp_path: Path, services: Downstream, graph: Downstream, store: StoreUnderTest
) -> None:
    send, receive = trio.open_memory_channel[ReloadRequest](1)
    data = mapping(tmp_path, services, graph, store)
    async with open_daemon(Config.from_mapping(data, {}), reloads=receive) as daemon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            for method, path in (
                ("GET", "/services"),
                ("POST", "/services/rides/pause"),
                ("POST", "/services/rides/resume"),
            ):
                r = await admin(daemon, method, path, headers=headers)
                assert (r.status_code, r.json()) == (401, {"error": "unauthorized"}), (headers, path)
        r = await admin(daemon, "GET", "/services")
        assert r.status_code == 200
        assert [(e["service"], e["paused"], e["queued"]) for e in r.json()] == [(s, False, 0) for s in sorted(SERVICES)]

        for body, content in (
            ({"reason": 3}, None),
            ({"reason": "x" * 201}, None),
            ({"reason": "a\nb"}, None),
            ({"why": "x"}, None),
            (["x"], None),
            (None, b"not json"),
        ):
            r = await admin(daemon, "POST", "/services/rides/pause", body, content=content)
            assert (r.status_code, r.json()["error"]) == (400, "bad_request"), (body, content, r.text)
        r = await admin(daemon, "POST", "/services/whatsapp/pause")
        assert r.status_code == 400
        assert "Graph API sender" in r.json()["detail"]
        for path in ("/services/taxis/pause", "/services/taxis/resume", "/services/wacored/pause"):
            r = await admin(daemon, "POST", path)
            assert (r.status_code, r.json()["error"]) == (404, "not_found"), path
        assert (await health(daemon))["services"]["rides"]["paused"] is False  # nothing refused was stored

        r = await admin(daemon, "POST", "/services/rides/pause", {"reason": "x" * 200})
        assert (r.status_code, r.json()["changed"]) == (200, True)
        since = r.json()["paused_since"]
        r = await admin(daemon, "POST", "/services/rides/pause", {"reason": "again"})
        assert (r.json()["changed"], r.json()["paused_since"], r.json()["pause_reason"]) == (False, since, "x" * 200)

        # A reload keeps the pause: it lives in the store, not the config.
        data["services"]["rides"]["keys"].append("taxi")
        request = ReloadRequest(lambda: Config.from_mapping(data, {}))
        await send.send(request)
        assert await request.done.wait()
        assert (await health(daemon))["services"]["rides"]["paused"] is True
        r = await admin(daemon, "GET", "/services")
        [rides] = [e for e in r.json() if e["service"] == "rides"]
        assert (rides["paused"], rides["paused_since"]) == (True, since)

        r = await admin(daemon, "POST", "/services/rides/resume")
        assert (r.status_code, r.json()["paused"], r.json()["changed"]) == (200, False, True)
        r = await admin(daemon, "POST", "/services/rides/resume")
        assert (r.status_code, r.json()["changed"]) == (200, False)


async def test_without_a_token_the_pause_endpoints_do_not_exist(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    data = mapping(tmp_path, services, graph)
    data["admin"] = {"token": ""}
    async with open_daemon(Config.from_mapping(data, {})) as daemon:
        for method, path in (("GET", "/services"), ("POST", "/services/rides/pause")):
            r = await admin(daemon, method, path)
            assert (r.status_code, r.json()) == (404, {"error": "not_found"})


async def test_the_pause_is_exported_as_metrics(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    now = [1_750_000_000.0]
    async with open_daemon(
        Config.from_mapping(mapping(tmp_path, services, graph), {}), wall_clock=lambda: now[0]
    ) as daemon:
        assert (await admin(daemon, "POST", "/services/rides/pause")).status_code == 200
        now[0] += 4000
        r = await daemon.client.get(f"{daemon.url}/metrics")
    samples = {
        (s.name, s.labels.get("service")): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name.startswith("wacored_service_paused")
    }
    assert samples[("wacored_service_paused", "rides")] == 1
    assert samples[("wacored_service_paused_seconds", "rides")] == 4000
    for service in (*SERVICES, "whatsapp"):
        if service != "rides":
            assert samples[("wacored_service_paused", service)] == 0
            assert samples[("wacored_service_paused_seconds", service)] == 0


async def test_an_admin_pause_is_in_force_on_every_worker_when_answered(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Two workers whatever WACORED_TEST_WORKERS says: the pause goes to worker 1 alone, and worker 0
    (which its own pause watcher would tell only at its next poll, a second later) has it at once."""
    config = Config.from_mapping(mapping(tmp_path, services, graph), {})
    local = {LOCAL_HEADER: "1"}

    async def paused_on_worker_0() -> bool:
        body = (await daemon.on_worker(0, "GET", "/health", headers=local)).json()
        return bool(body["services"]["rides"]["paused"])

    async with open_daemon(config, workers=2) as daemon:
        r = await daemon.on_worker(1, "POST", "/admin/services/rides/pause", json={"reason": "deploy"}, headers=AUTH)
        assert (r.status_code, r.json()["paused"]) == (200, True)
        assert await paused_on_worker_0()
        r = await daemon.on_worker(1, "POST", "/admin/services/rides/resume", headers=AUTH)
        assert (r.status_code, r.json()["paused"]) == (200, False)
        assert not await paused_on_worker_0()

"""The admin API against a real running daemon, its effects checked in its store: the SQLite file, and
for the endpoints' work (`BOTH_STORES`) a PostgreSQL schema of the test's own too."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from wacored.config import StoreConfig
from wacored.ops import operations as ops
from wacored.ops.connection import open_ops, store_where

from .conftest import Daemon, Downstream, Received, StoreUnderTest, World, fresh_store, make_config, open_daemon
from .support import add_dead_letter, store_rows

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_AGO = 1_700_000_000.0
NOW = 1_750_000_000.0
"""The daemon's wall clock in these tests: replays are due at exactly this time."""


@pytest.fixture
async def gate(services: Downstream) -> AsyncIterator[trio.Event]:
    """Deliveries to the services wait until the test is over, then fail: a retrier woken by a
    replay cannot change a row before the test has looked at it."""
    opened = trio.Event()

    async def held(_: Received) -> int:
        await opened.wait()
        return 503

    services.respond = held
    yield opened
    opened.set()


BOTH_STORES = pytest.mark.parametrize("admin_store", ["sqlite", "postgres"], indirect=True)
"""A test that runs on both stores; the others (the API's own checks, SQLite's failures) on SQLite."""


@pytest.fixture
def admin_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    yield from fresh_store(request, tmp_path, getattr(request, "param", "sqlite"))


@pytest.fixture
def seeded(admin_store: StoreUnderTest) -> Iterator[dict[str, int]]:
    """Dead letters in the store before the daemon starts; none of them due."""
    admin_store.migrate()
    conn = open_ops(StoreConfig(path=admin_store.path, url=admin_store.url))
    try:
        yield {
            "old": add_dead_letter(conn, "wamid.OLD", state="delivered", created_at=LONG_AGO - 30 * 86400),
            "ab": add_dead_letter(conn, "wamid.AB", created_at=LONG_AGO - 100),
            "jobs": add_dead_letter(conn, "wamid.JOBS", service="jobs", created_at=LONG_AGO - 50),
            "p": add_dead_letter(
                conn, "wamid.P", state="pending", created_at=LONG_AGO, next_attempt_at=LONG_AGO + 10 * 365 * 86400
            ),
        }
    finally:
        conn.close()


@pytest.fixture
async def daemon(
    tmp_path: Path,
    services: Downstream,
    graph: Downstream,
    admin_store: StoreUnderTest,
    seeded: dict[str, int],
    gate: trio.Event,
) -> AsyncIterator[Daemon]:
    # The gate holds deliveries until the test is over: a short drain lets the daemon stop without
    # waiting for them (they stay queued), instead of the default 10 s.
    config = make_config(
        tmp_path,
        services,
        graph,
        admin={"token": TOKEN},
        store={**admin_store.section(), "busy_timeout_ms": 20},
        forwarding={"timeout_ms": 60000},
        server={"drain_timeout_s": 0.1},
    )
    async with open_daemon(config, wall_clock=lambda: NOW) as d:
        yield d


def rows(daemon: Daemon) -> dict[str, tuple[str, int, float | None]]:
    return {
        key: (state, attempts, next_at)
        for key, state, attempts, next_at in store_rows(
            daemon.config.store, "SELECT key, state, attempts, next_attempt_at FROM dead_letters"
        )
    }


async def call(
    daemon: Daemon, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await daemon.client.request(
        method, f"{daemon.url}{path}", json=body, headers=AUTH if headers is None else headers
    )


ADMIN_CALLS = [
    ("GET", "/admin/dlq"),
    ("GET", "/admin/status"),
    ("POST", "/admin/dlq/replay"),
    ("POST", "/admin/dlq/purge"),
    ("GET", "/admin/"),
    ("DELETE", "/admin/nothing/here"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_without_a_token_configured_the_admin_api_does_not_exist(world: World, method: str, path: str) -> None:
    for headers in ({}, AUTH, {"Authorization": "Bearer x"}):
        response = await call(world.daemon, method, path, {"all": True}, headers)
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_a_missing_or_wrong_token_is_401_and_logged_without_it(
    daemon: Daemon, caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    before = rows(daemon)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        with caplog.at_level(logging.WARNING, logger="wacored.http.admin"):
            response = await call(daemon, method, path, {"all": True}, headers)
        assert response.status_code == 401
        assert response.json() == {"error": "unauthorized"}
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "admin_unauthorized"]
    assert len(refusals) == 5
    assert all(TOKEN not in str(vars(r)) and "wrong-token" not in str(vars(r)) for r in refusals)
    assert rows(daemon) == before


async def test_an_unknown_admin_path_is_404_once_authorized(daemon: Daemon) -> None:
    response = await call(daemon, "GET", "/admin/nothing")
    assert (response.status_code, response.json()) == (404, {"error": "not_found"})


@BOTH_STORES
async def test_list(daemon: Daemon, seeded: dict[str, int]) -> None:
    response = await call(daemon, "GET", "/admin/dlq")
    assert response.status_code == 200
    entries = response.json()
    assert [e["message_id"] for e in entries] == ["wamid.OLD", "wamid.AB", "wamid.JOBS", "wamid.P"]
    conn = open_ops(daemon.config.store)
    try:
        assert entries == [e.to_json() for e in ops.list_dead_letters(conn)]
    finally:
        conn.close()
    filtered = await call(daemon, "GET", "/admin/dlq?state=abandoned&service=jobs")
    assert [e["id"] for e in filtered.json()] == [seeded["jobs"]]
    bad = await call(daemon, "GET", "/admin/dlq?state=queued")
    assert bad.status_code == 400
    assert bad.json()["error"] == "bad_request"


@BOTH_STORES
async def test_replay_by_ids(daemon: Daemon, seeded: dict[str, int]) -> None:
    response = await call(
        daemon, "POST", "/admin/dlq/replay", {"ids": [seeded["ab"], "wamid.JOBS", "wamid.OLD", 4242, "wamid.NOPE"]}
    )
    assert response.status_code == 200
    assert response.json() == {
        "replayed": 2,
        "unknown": ["4242", "wamid.NOPE"],
        "delivered": ["wamid.OLD"],
        "queued": [],
    }
    after = rows(daemon)
    assert after["wamid.AB"] == after["wamid.JOBS"] == ("pending", 0, NOW)
    assert after["wamid.OLD"][:2] == ("delivered", 3)
    assert after["wamid.P"][2] == LONG_AGO + 10 * 365 * 86400


@BOTH_STORES
async def test_replay_all(daemon: Daemon) -> None:
    response = await call(daemon, "POST", "/admin/dlq/replay", {"all": True, "service": "jobs"})
    assert response.json() == {"replayed": 1}
    assert rows(daemon)["wamid.AB"][0] == "abandoned"
    response = await call(daemon, "POST", "/admin/dlq/replay", {"all": True})
    assert response.json() == {"replayed": 1}
    assert rows(daemon)["wamid.AB"] == ("pending", 0, NOW)
    response = await call(daemon, "POST", "/admin/dlq/replay", {"all": True, "state": "pending"})
    assert response.json() == {"replayed": 3}
    assert rows(daemon)["wamid.P"] == ("pending", 0, NOW)
    assert rows(daemon)["wamid.OLD"][0] == "delivered"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "ids",
        {},
        {"ids": []},
        {"ids": "wamid.AB"},
        {"ids": [True]},
        {"ids": [""]},
        {"ids": [1.5]},
        {"ids": [1], "all": True},
        {"all": False},
        {"all": "yes"},
        {"all": True, "state": "delivered"},
        {"all": True, "service": 3},
        {"ids": [1], "service": "rides"},
        {"all": True, "force": True},
    ],
)
async def test_replay_rejects_bad_input(daemon: Daemon, body: Any) -> None:
    before = rows(daemon)
    response = await call(daemon, "POST", "/admin/dlq/replay", body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert isinstance(response.json()["detail"], str)
    assert rows(daemon) == before


async def test_replay_of_a_body_that_is_not_json_is_400(daemon: Daemon) -> None:
    response = await daemon.client.post(f"{daemon.url}/admin/dlq/replay", content=b"{nope", headers=AUTH)
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")


@BOTH_STORES
async def test_purge(daemon: Daemon) -> None:
    response = await call(daemon, "POST", "/admin/dlq/purge", {"state": "delivered", "older_than": "7d"})
    assert response.json() == {"purged": 1}
    assert set(rows(daemon)) == {"wamid.AB", "wamid.JOBS", "wamid.P"}
    response = await call(daemon, "POST", "/admin/dlq/purge", {"state": "abandoned", "older_than": "90s"})
    assert response.json() == {"purged": 2}
    assert set(rows(daemon)) == {"wamid.P"}


@pytest.mark.parametrize(
    "body",
    [
        {"state": "pending", "older_than": "7d"},
        {"state": "delivered"},
        {"state": "delivered", "older_than": "7w"},
        {"state": "delivered", "older_than": 7},
        {"older_than": "7d"},
        {"state": "delivered", "older_than": "1d", "x": 1},
    ],
)
async def test_purge_rejects_bad_input(daemon: Daemon, body: Any) -> None:
    before = rows(daemon)
    response = await call(daemon, "POST", "/admin/dlq/purge", body)
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")
    assert rows(daemon) == before


@BOTH_STORES
async def test_status(daemon: Daemon, seeded: dict[str, int]) -> None:
    response = await call(daemon, "GET", "/admin/status")
    assert response.status_code == 200
    report = response.json()
    assert set(report) == {"timestamp", "database", "dead_letters", "sessions", "queued", "runs"}
    assert report["timestamp"] == ops.iso(NOW)
    assert report["database"] == {"path": store_where(daemon.config.store)}
    assert {k: report["dead_letters"][k] for k in ops.STATES} == {
        "pending": 1,
        "abandoned": 2,
        "delivered": 1,
        "replayed": 0,
    }
    assert report["dead_letters"]["oldest_pending"]["id"] == seeded["p"]
    assert set(report["runs"]) >= {"dlq_retrier", "reaper"}


async def test_a_locked_store_is_503_for_writes_and_reads_go_on(daemon: Daemon) -> None:
    before = rows(daemon)
    other = sqlite3.connect(daemon.config.store.path, isolation_level=None, check_same_thread=False)
    try:
        # Held past the 20 ms busy timeout of this config. Taken in a thread: waiting for the lock on
        # the event loop would stop the daemon's writer from finishing a transaction it holds.
        await trio.to_thread.run_sync(other.execute, "BEGIN IMMEDIATE")
        response = await call(daemon, "POST", "/admin/dlq/replay", {"all": True})
        assert response.status_code == 503
        assert response.json() == {"error": "store_unavailable", "detail": "database is locked"}
        assert (await call(daemon, "GET", "/admin/dlq")).status_code == 200
        assert (await call(daemon, "GET", "/admin/status")).status_code == 200
    finally:
        other.close()
    assert rows(daemon) == before


async def test_a_replay_wakes_the_retrier_at_once(
    tmp_path: Path, services: Downstream, graph: Downstream, seeded: dict[str, int]
) -> None:
    # The daemon's clock stands still and the retrier's interval is an hour: only the wake-up a
    # replay gives can make it deliver now.
    config = make_config(tmp_path, services, graph, admin={"token": TOKEN}, dlq={"interval_s": 3600})
    async with open_daemon(config, wall_clock=lambda: NOW) as daemon:
        response = await call(daemon, "POST", "/admin/dlq/replay", {"ids": ["wamid.AB"]})
        assert response.json()["replayed"] == 1
        [retry] = await services.wait_for(1, "/rides")
    assert retry.headers["idempotency-key"] == "wamid.AB"


async def _still_accepting(daemon: Daemon) -> None:
    response = await daemon.send_text("rides", sender="250788000099")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [2**70]},
        {"ids": [-(2**70)]},
        {"ids": [2**63]},
        {"ids": ["99999999999999999999999"]},
        {"ids": [1, "1" + "0" * 30]},
        {"ids": ["²"]},
    ],
)
async def test_replay_ids_outside_sqlite_integers_are_400(daemon: Daemon, body: Any) -> None:
    before = rows(daemon)
    response = await call(daemon, "POST", "/admin/dlq/replay", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert rows(daemon) == before
    await _still_accepting(daemon)


async def test_the_largest_sqlite_integer_is_a_valid_id(daemon: Daemon) -> None:
    response = await call(daemon, "POST", "/admin/dlq/replay", {"ids": [2**63 - 1, str(2**63 - 1)]})
    assert response.status_code == 200
    assert response.json()["unknown"] == [str(2**63 - 1)] * 2


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/admin/dlq/replay", b"[" * 100_000 + b"]" * 100_000),
        ("/admin/dlq/purge", b'{"state": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("/admin/dlq/replay", b'{"ids": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}"),
    ],
)
async def test_deeply_nested_json_is_400(daemon: Daemon, path: str, raw: bytes) -> None:
    response = await daemon.client.post(
        f"{daemon.url}{path}", content=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    await _still_accepting(daemon)


async def test_brackets_inside_strings_are_not_nesting(daemon: Daemon) -> None:
    response = await call(daemon, "POST", "/admin/dlq/replay", {"ids": ["[" * 100 + '\\"{' * 50]})
    assert response.status_code == 200
    assert response.json()["replayed"] == 0


# The daemon answers before reading the rest of the body, so httpx drops its unfinished upload stream.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_body_over_the_limit_is_413(daemon: Daemon) -> None:
    ids = list(range(200_000))  # ~1.3 MB
    response = await call(daemon, "POST", "/admin/dlq/replay", {"ids": ids})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"

    async def chunks() -> Any:  # no Content-Length: the limit holds while reading
        for _ in range(2048):
            yield b" " * 1024

    response = await daemon.client.post(f"{daemon.url}/admin/dlq/replay", content=chunks(), headers=AUTH)
    assert response.status_code == 413
    await _still_accepting(daemon)


@pytest.mark.parametrize(
    ("path", "edit"),
    [
        ("/admin/dlq", "UPDATE dead_letters SET created_at = 'yesterday' WHERE key = 'wamid.AB'"),
        ("/admin/status", "INSERT OR REPLACE INTO runs VALUES ('reaper', 'last night', NULL, 'hand-edited')"),
    ],
)
async def test_a_value_of_the_wrong_type_in_the_store_is_503(daemon: Daemon, path: str, edit: str) -> None:
    def hand_edit() -> None:
        with sqlite3.connect(daemon.config.store.path) as conn:
            conn.execute(edit)

    # In a thread: waiting for the writer's lock on the event loop would stop the writer releasing it.
    await trio.to_thread.run_sync(hand_edit)
    response = await call(daemon, "GET", path)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "store_unavailable"
    await _still_accepting(daemon)


@pytest.mark.parametrize("damage", ["missing", "directory", "not_a_database", "no_tables"])
async def test_a_store_that_cannot_be_read_is_503(daemon: Daemon, damage: str) -> None:
    path = daemon.config.store.path
    kept = path.with_name("kept.db")
    path.rename(kept)  # the daemon's own connections keep the file open; the admin API opens the path
    try:
        if damage == "directory":
            path.mkdir()
        elif damage == "not_a_database":
            path.write_bytes(b"\x00garbage" * 1024)
        elif damage == "no_tables":
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA user_version = 2")
                conn.execute("CREATE TABLE unrelated (x)")
        for method, url, body in (
            ("GET", "/admin/dlq", None),
            ("GET", "/admin/status", None),
            ("POST", "/admin/dlq/replay", {"all": True}),
            ("POST", "/admin/dlq/purge", {"state": "delivered", "older_than": "1d"}),
        ):
            response = await call(daemon, method, url, body)
            assert response.status_code == 503, (method, url, response.text)
            assert response.json()["error"] == "store_unavailable"
    finally:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        kept.rename(path)
    await _still_accepting(daemon)


async def test_a_replay_on_one_worker_wakes_the_retrier_another_runs(
    tmp_path: Path, services: Downstream, graph: Downstream, seeded: dict[str, int]
) -> None:
    """Two workers whatever WACORED_TEST_WORKERS says: the replay goes to the worker that does not
    run the DLQ retrier, which only a word from that worker can wake within the hour."""
    config = make_config(tmp_path, services, graph, admin={"token": TOKEN}, dlq={"interval_s": 3600})
    async with open_daemon(config, workers=2, wall_clock=lambda: NOW) as daemon:
        health = (await daemon.on_worker(0, "GET", "/health")).json()
        [runner] = [w["index"] for w in health["workers"] if "dlq_retrier" in w["singletons"]]
        other = 1 - runner
        response = await daemon.on_worker(other, "POST", "/admin/dlq/replay", json={"ids": ["wamid.AB"]}, headers=AUTH)
        assert response.json()["replayed"] == 1
        [retry] = await services.wait_for(1, "/rides")
    assert retry.headers["idempotency-key"] == "wamid.AB"


async def test_the_sibling_routes_do_not_exist_for_an_operator(daemon: Daemon) -> None:
    for what in ("pauses", "retrier", "lanes", "other"):
        response = await call(daemon, "GET", f"/admin/local/{what}")
        assert (response.status_code, response.json()) == (404, {"error": "not_found"})

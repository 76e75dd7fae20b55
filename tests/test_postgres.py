"""The PostgreSQL store (`wacored.store.postgres`) in the whole daemon: ``[store] url``, its checks, a
daemon acknowledging and delivering from PostgreSQL, and two daemons sharing one database's lanes.

Each test has a schema of its own in the run's database (`own_schema`). What holds for every store
(the writer, leases, ingest) runs on both in test_writer, test_lanes, test_ingest and test_store.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from wacored.actors.lanes import LaneBoard, run_relay
from wacored.config import Config
from wacored.core.leases import lane_lease
from wacored.core.whatsapp import text_webhook
from wacored.daemon import run_daemon
from wacored.store import SCHEMA_VERSION, Outcome, SchemaError, StoreUnavailable
from wacored.store.postgres import (
    ROWS_CHANNEL,
    PgLaneReader,
    PgRowsListener,
    PgWriteConnection,
    pg_migrate,
    qmark,
)
from wacored.store.writer import NoLanes, Record, StoreWrites, WriteOp, run_writer

from .conftest import Daemon, Downstream, Received, config_mapping, make_config, open_daemon
from .postgres import PrivateServer, own_schema
from .support import POLL_S, clean_env, health, held_lanes, ingest_op, operator_config, run_cli, wait_until


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    """The URL of a fresh schema of this test's own in the run's PostgreSQL database."""
    with own_schema(pg_url) as url:
        yield url


def pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(qmark(sql), args or None).fetchall()  # type: ignore[call-overload]  # a test's literal


async def until_settled_pg(url: str, timeout_s: float = 15.0) -> None:
    """Until no message is queued in the database at `url` (nothing more will be forwarded)."""
    await wait_until(lambda: pg_rows(url, "SELECT COUNT(*) FROM messages WHERE state = 'queued'") == [(0,)], timeout_s)


async def health_until(daemon: Daemon, status: str) -> dict[str, Any]:
    """Poll /health (200 or 503) until its status is `status`; its body (the caller bounds the wait)."""
    while (body := (await daemon.client.get(f"{daemon.url}/health")).json())["status"] != status:  # noqa: ASYNC110 -- state seen over HTTP
        await trio.sleep(POLL_S)
    return body  # type: ignore[no-any-return]


# --- the config -------------------------------------------------------------------------------------


def test_the_store_url_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    mapping = config_mapping(tmp_path, "http://s.test", "http://g.test")
    assert Config.from_mapping(mapping, {}).store.url == ""
    url = "postgresql://wacored@db.internal:5432/wacored"
    assert Config.from_mapping(mapping, {"DATABASE_URL": url}).store.url == url
    both = {"WACORED_STORE_URL": url, "DATABASE_URL": "postgresql://other@elsewhere/x"}
    assert Config.from_mapping(mapping, both).store.url == url


@pytest.mark.parametrize(
    "url", ["mysql://root@db/wacored", "postgresql://db:notaport/wacored", "db.internal:5432", "postgresql:///x"]
)
def test_a_malformed_store_url_is_one_problem_naming_its_key(tmp_path: Path, url: str) -> None:
    mapping = config_mapping(tmp_path, "http://s.test", "http://g.test", store={"url": url})
    with pytest.raises(Exception, match=r"store\.url: must be a PostgreSQL URL") as caught:
        Config.from_mapping(mapping, {})
    problems = getattr(caught.value, "problems", [])
    assert [p for p in problems if p.startswith("store.")] == [
        "store.url: must be a PostgreSQL URL, postgresql://user@host:port/database (or empty for SQLite)"
    ]


async def test_check_config_says_in_one_line_when_the_database_does_not_answer(tmp_path: Path) -> None:
    with trio.socket.socket() as held:  # a port where nothing listens
        await held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        mapping = config_mapping(
            tmp_path, "http://s.test", "http://g.test", store={"url": f"postgresql://postgres@127.0.0.1:{port}/x"}
        )
        result = await run_cli("check-config", "-c", str(operator_config(tmp_path, mapping)), "--env-file", "/none")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    [line] = [line for line in out.splitlines() if "store.url" in line]
    assert line.startswith("warning: store.url: the database does not answer: ")
    assert line.endswith("(`run` will refuse to start)")


async def test_check_config_and_run_refuse_a_database_from_a_newer_wacored(tmp_path: Path, pg: str) -> None:
    pg_migrate(pg)
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    mapping = config_mapping(tmp_path, "http://s.test", "http://g.test", store={"url": pg})
    result = await run_cli(
        "check-config", "-c", str(operator_config(tmp_path, mapping)), "--env-file", "/none", env=clean_env()
    )
    assert f"warning: store.url: the database has schema version {SCHEMA_VERSION + 1}, newer" in result.stdout.decode()
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_daemon, Config.from_mapping(mapping, {}))
    assert caught.group_contains(SchemaError, match="newer than this wacored", depth=None)


# --- the daemon on PostgreSQL -----------------------------------------------------------------------


async def test_a_daemon_on_postgresql_acknowledges_delivers_dead_letters_and_refuses_duplicates(
    tmp_path: Path, pg: str, services: Downstream, graph: Downstream
) -> None:
    async def refuse_jobs(request: Received) -> int:
        return 400 if request.path == "/jobs" else 200  # a permanent refusal: dead-lettered, abandoned

    services.respond = refuse_jobs
    config = make_config(tmp_path, services, graph, store={"url": pg})
    async with open_daemon(config) as daemon:
        body = text_webhook(text="rides", sender="250788000070", wamid="wamid.PG1", timestamp=1)
        first = await daemon.post(body)
        assert first.status_code == 200
        assert first.json()["accepted"] == 1
        again = await daemon.post(body)
        assert again.json() == {"accepted": 0, "duplicates": 1, "statuses": 0, "routes": []}
        # The session is in PostgreSQL: the sender's next message follows it.
        follow = await daemon.send_text("where is my driver?", sender="250788000070")
        assert follow.json()["routes"][0]["service"] == "rides"
        jobs = await daemon.send_text("jobs", sender="250788000071")
        assert jobs.status_code == 200
        await services.wait_for(2, "/rides")
        await until_settled_pg(pg)
        report = await health(daemon)
    assert [g.message["id"] for g in services.on("/rides")] == ["wamid.PG1", follow.json()["routes"][0]["message_id"]]
    assert pg_rows(pg, "SELECT service, state, reason, status_code FROM dead_letters") == [
        ("jobs", "abandoned", "permanent", 400)
    ]
    assert pg_rows(pg, "SELECT key, state FROM messages WHERE target = 'rides' ORDER BY id") == [
        ("wamid.PG1", "delivered"),
        (follow.json()["routes"][0]["message_id"], "delivered"),
    ]
    database = report["checks"]["database"]
    assert (database["status"], database["schema_version"]) == ("ok", SCHEMA_VERSION)
    assert database["path"].startswith("postgresql://")
    assert "@" not in database["path"]
    assert not (tmp_path / "wacored.db").exists()  # nothing went to SQLite
    # The daemon stopped cleanly: it gave its leases back.
    assert pg_rows(pg, "SELECT COUNT(*) FROM leases") == [(0,)]


@pytest.mark.single_worker("runs two daemons as two nodes itself and counts one node's leases and lane metrics")
async def test_two_daemons_on_one_postgresql_database_deliver_every_message_once_in_each_senders_order(
    tmp_path: Path, pg: str, services: Downstream, graph: Downstream
) -> None:
    """As test_lanes' two daemons on one SQLite file, on one PostgreSQL database: POSTs alternate
    between them, each lane is delivered by the one holding it (rows the other ingested reach it
    through the relay), and one killed without giving its leases back has its lanes taken over."""
    config = make_config(
        tmp_path, services, graph, forwarding={"concurrency": 4}, cluster={"lease_ttl_s": 1.5}, store={"url": pg}
    )
    senders = [f"25078801{i:04d}" for i in range(8)]
    sent: dict[str, list[str]] = {s: [] for s in senders}
    async with open_daemon(config, node="b") as b:
        async with trio.open_nursery() as killed:

            async def run_a(task_status: trio.TaskStatus[object]) -> None:
                async with open_daemon(config, node="a") as a:
                    task_status.started(a)
                    await trio.sleep_forever()

            a = await killed.start(run_a)
            await _shared_out(pg)
            for round_ in range(6):
                for sender in senders:
                    daemon = a if (round_ + senders.index(sender)) % 2 else b
                    sent[sender].append(await _send(daemon, sender))
            before_kill = {key for keys in sent.values() for key in keys}
            killed.cancel_scope.cancel()  # killed: its leases stay until they expire
        for _ in range(3):
            for sender in senders:
                sent[sender].append(await _send(b, sender))
        await until_settled_pg(pg)
        report = await health(b)
    got = services.on("/rides")
    firsts: list[Received] = []
    for g in got:
        if all(f.headers["idempotency-key"] != g.headers["idempotency-key"] for f in firsts):
            firsts.append(g)
    assert len(firsts) == 8 * 9
    # Sent again (same key, so the service dedupes) only what a had delivered or was delivering when
    # it was killed without its outcomes committed: on PostgreSQL a commit is round trips, so more
    # than one per lane may be in that window (SQLite's test sees at most one per lane).
    seen: set[str] = set()
    again = [k for k in (g.headers["idempotency-key"] for g in got) if k in seen or seen.add(k)]
    assert len(again) == len(got) - len(firsts)
    assert set(again) <= before_kill
    for sender in senders:
        assert [g.message["id"] for g in firsts if g.message["from"] == sender] == sent[sender]
    assert {lane_lease("rides", i) for i in range(4)} <= set(report["checks"]["leases"]["lanes_held"])
    assert pg_rows(pg, "SELECT COUNT(*) FROM leases") == [(0,)]


async def _send(daemon: Daemon, sender: str) -> str:
    r = await daemon.send_text("rides", sender=sender)
    assert r.status_code == 200
    return str(r.json()["routes"][0]["message_id"])


async def _shared_out(url: str) -> None:
    """Until nodes a and b hold the same number of lanes (b started alone and gave half back)."""
    with trio.fail_after(15):
        while True:
            held = dict(pg_rows(url, "SELECT owner, COUNT(*) FROM leases WHERE name LIKE 'lane:%' GROUP BY owner"))
            if held.get("a", 0) and held.get("a") == held.get("b"):
                return
            await trio.sleep(0.05)


async def test_a_database_that_stops_gets_503s_and_unhealthy_and_everything_resumes_when_it_is_back(
    tmp_path: Path, private_pg: PrivateServer, services: Downstream, graph: Downstream
) -> None:
    """The daemon outlives its database: while it is down nothing is acknowledged (Meta redelivers)
    and /health says so; once it is back the same process takes POSTs and delivers again, and every
    message it acknowledged ends delivered (an outcome that could not be committed meanwhile was held)."""
    config = make_config(tmp_path, services, graph, store={"url": private_pg.url, "unhealthy_after_s": 0.5})
    async with open_daemon(config) as daemon:
        before = await daemon.send_text("rides", sender="250788000090")
        assert before.status_code == 200
        await services.wait_for(1, "/rides")
        await trio.to_thread.run_sync(private_pg.stop)
        down = await daemon.send_text("rides", sender="250788000091")
        assert down.status_code == 503
        with trio.fail_after(15):
            report = await health_until(daemon, "unhealthy")
        assert report["checks"]["database"]["status"] == "error"
        await trio.to_thread.run_sync(private_pg.start)
        with trio.fail_after(30):
            # Meta's redelivery, as seen over HTTP: the first POST after the restart may still find
            # the writer backing off.
            while (after := await daemon.send_text("rides", sender="250788000092")).status_code != 200:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await services.wait_for(2, "/rides")
        await until_settled_pg(private_pg.url)
        with trio.fail_after(15):
            await health_until(daemon, "healthy")
    delivered = pg_rows(private_pg.url, "SELECT key FROM messages WHERE state = 'delivered' ORDER BY id")
    assert delivered == [(before.json()["routes"][0]["message_id"],), (after.json()["routes"][0]["message_id"],)]


# --- the relay on LISTEN/NOTIFY ---------------------------------------------------------------------


async def test_the_relay_wakes_a_lane_as_soon_as_another_node_commits_its_row(pg: str) -> None:
    """Another node's ingest NOTIFYs at its COMMIT: the relay reads at once, not at its next poll
    (here a minute away, so only the NOTIFY can wake the lane within the test's bound)."""
    pg_migrate(pg)
    board = LaneBoard()
    (lane,) = held_lanes(board, "rides")
    lane.rearm()
    reader, listener = PgLaneReader(pg), PgRowsListener(pg)
    send, receive = trio.open_memory_channel[WriteOp](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_relay, board, reader, listener=listener, listen_s=60.0))
        await nursery.start(run_writer, PgWriteConnection(pg), receive, NoLanes())  # the other node's
        op = ingest_op("wamid.N1")
        await send.send(op)
        assert (await op.reply.wait()).ids[0] is not None
        with trio.fail_after(10):
            await lane._wake.wait()
        nursery.cancel_scope.cancel()
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f"NOTIFY {ROWS_CHANNEL}")  # ends the relay's wait: it is cancelled at once
    await trio.to_thread.run_sync(reader.close)
    await trio.to_thread.run_sync(listener.close)


async def test_outcomes_the_database_could_not_take_are_held_in_order_and_committed_when_it_is_back(
    private_pg: PrivateServer,
) -> None:
    """The writer's held outcomes (writer.py) on PostgreSQL: a lost connection is the store failing
    (`STORE_DOWN_ERRORS`), never the outcome's fault, so nothing is given up."""
    url = private_pg.url
    pg_migrate(url)
    board, state = LaneBoard(), StoreWrites()
    (lane,) = held_lanes(board, "rides")
    send, receive = trio.open_memory_channel[WriteOp](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_writer, PgWriteConnection(url), receive, board, state=state))
        op = ingest_op("a", "b")
        await send.send(op)
        ids = [i for i in (await op.reply.wait()).ids if i is not None]
        lane.handed.update(ids)
        await trio.to_thread.run_sync(private_pg.stop)
        await send.send(Record(Outcome(ids[0], False, 1, 2000.0, "HTTP 503", target="rides", key="a", retry_at=2100.0)))
        await send.send(Record(Outcome(ids[0], True, 1, 2001.0, target="rides", key="a")))  # redelivered
        await send.send(Record(Outcome(ids[1], True, 1, 2002.0, target="rides", key="b")))
        refused = ingest_op("c")
        await send.send(refused)
        with trio.fail_after(10), pytest.raises(StoreUnavailable):
            await refused.reply.wait()
        assert len(state.held) == 3
        assert state.failing_since is not None
        assert lane.handed == set(ids)  # in hand until their outcomes commit
        await trio.to_thread.run_sync(private_pg.start)
        await wait_until(lambda: not state.held, timeout_s=20)
        assert state.failing_since is None
        assert lane.handed == set()
        await send.aclose()
    assert pg_rows(url, "SELECT key, state FROM messages ORDER BY id") == [("a", "delivered"), ("b", "delivered")]
    assert pg_rows(url, "SELECT state FROM dead_letters") == [("pending",)]

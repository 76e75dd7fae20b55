"""Shared test harness: real hypercorn servers on 127.0.0.1 port 0, a real daemon, real SQLite files."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import psycopg
import pytest
import trio
import trio.testing

from wacored.actors.lanes import LaneBoard
from wacored.actors.targets import Target
from wacored.config import Config
from wacored.core.breaker import Breaker
from wacored.core.whatsapp import sign, text_webhook
from wacored.daemon import run_daemon
from wacored.runtime import Runtime
from wacored.store import LaneReader, Reader, WriteConnection, migrate
from wacored.store.interface import LaneReads, Reads, WriteTx
from wacored.store.postgres import PgLaneReader, PgReader, PgWriteConnection, pg_migrate, qmark
from wacored.store.writer import WriteOp

from .inprocess_workers import run_workers, worker_nodes
from .postgres import ENV, PgUnavailable, PrivateServer, find_server, fresh_database, own_schema

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
SECRET = "test-app-secret"
SIGNING_SECRET = "whsec_" + "dGVzdC1zZXJ2aWNlLXNpZ25pbmcta2V5LTMyYnl0ZXM="
"""Every test service's own Standard Webhooks secret (32 key bytes); never the app secret."""
VERIFY_TOKEN = "test-verify-token"
SERVICES = ("rides", "insurance", "jobs", "property", "wallet", "marketplace", "ai_agents")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> dict[str, Any]:
        return self.json()["entry"][0]["changes"][0]["value"]["messages"][0]  # type: ignore[no-any-return]


Responder = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 200


@dataclass
class Downstream:
    """A real HTTP server recording every request; `respond` decides each answer's status."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    respond: Responder = ok
    _changed: trio.Event = field(default_factory=trio.Event)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, count: int, path: str | None = None) -> list[Received]:
        with trio.fail_after(10):
            while True:
                got = self.received if path is None else self.on(path)
                if len(got) >= count:
                    return got
                await self._changed.wait()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        client = scope.get("client")
        request = Received(scope["path"], headers, body, tuple(client) if client else None)
        status = await self.respond(request)
        if 200 <= status < 300:
            self.received.append(request)
        self._changed.set()
        self._changed = trio.Event()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": b'{"ok": true}' if status < 300 else b'{"error": "no"}'})


async def serve_downstream(nursery: trio.Nursery, downstream: Downstream) -> Downstream:
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.5
    urls = await nursery.start(partial(hypercorn.trio.serve, downstream.app, hc))
    downstream.url = urls[0]
    return downstream


def config_mapping(tmp_path: Path, downstream: str, graph: str, **sections: dict[str, Any]) -> dict[str, Any]:
    keys = {name: [name, str(i + 1)] for i, name in enumerate(SERVICES)}
    keys["rides"] += ["mobility", "rides_agent"]
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0"},
        "whatsapp": {
            "verify_token": VERIFY_TOKEN,
            "app_secret": SECRET,
            "access_token": "test-token",
            "phone_number_id": "1234567890",
            "graph_api_url": f"{graph}/v21.0",
        },
        "store": {"path": str(tmp_path / "wacored.db")},
        "forwarding": {"retry_base_ms": 10, "timeout_ms": 2000, "concurrency": 4},
        "home_menu": {"items": [{"key": name, "title": name.title()} for name in SERVICES]},
        "services": {
            name: {"url": f"{downstream}/{name}", "keys": keys[name], "signing_secrets": [SIGNING_SECRET]}
            for name in SERVICES
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


WORKERS_ENV = "WACORED_TEST_WORKERS"


def workers_from_env() -> int:
    """How many workers `open_daemon` runs: ``WACORED_TEST_WORKERS`` (1 or 2; default 1)."""
    value = os.environ.get(WORKERS_ENV, "1")
    if value not in ("1", "2"):
        raise pytest.UsageError(f"{WORKERS_ENV}={value!r}: 1 or 2")
    return int(value)


WORKERS = workers_from_env()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "single_worker(reason): the test cannot hold with two workers (it inspects one process's state, "
        "needs one lane holder...): skipped, with `reason`, when WACORED_TEST_WORKERS=2",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("single_worker")
        if marker is None:
            continue
        reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
        if not reason:
            raise pytest.UsageError(f"{item.nodeid}: single_worker needs a reason")
        if WORKERS > 1:
            item.add_marker(pytest.mark.skip(reason=f"single worker only: {reason}"))


@dataclass
class Daemon:
    url: str
    config: Config
    stop: trio.Event
    client: httpx.AsyncClient
    workers: int = 1
    """How many workers serve `url` (`WACORED_TEST_WORKERS`)."""
    sockets: list[str] = field(default_factory=list)
    """Each worker's private unix socket, by index (none for one worker)."""
    nodes: list[str] = field(default_factory=list)
    """Each worker's node name (as the leases and attempts name it), when the test named it or there
    are several workers."""

    async def on_worker(self, index: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to worker `index` alone, on its private socket (what its siblings use)."""
        transport = httpx.AsyncHTTPTransport(uds=self.sockets[index])
        async with httpx.AsyncClient(transport=transport, timeout=10, trust_env=False) as http:
            return await http.request(method, f"http://worker-{index}{path}", **kwargs)

    def wamid(self) -> str:
        return f"wamid.TEST{uuid.uuid4().hex}"

    async def post(self, body: bytes, headers: dict[str, str] | None = None, *, signed: bool = True) -> httpx.Response:
        all_headers = {"Content-Type": "application/json"}
        if signed:
            all_headers["X-Hub-Signature-256"] = sign(SECRET, body)
        all_headers.update(headers or {})
        return await self.client.post(f"{self.url}/webhook", content=body, headers=all_headers)

    async def send_text(
        self, text: str, sender: str = "250788000001", *, kind: str = "text", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        body = text_webhook(text=text, sender=sender, wamid=self.wamid(), timestamp=1700000000, kind=kind)
        return await self.post(body, headers)


@asynccontextmanager
async def open_daemon(config: Config, *, workers: int | None = None, **kwargs: Any) -> AsyncIterator[Daemon]:
    """`run_daemon(config, **kwargs)` until the block ends; with `workers` (default
    ``WACORED_TEST_WORKERS``) 2, two workers sharing its port and store (`inprocess_workers`)."""
    count = WORKERS if workers is None else workers
    stop = trio.Event()
    # With several workers the client opens a connection per request: the kernel picks a worker per
    # connection (SO_REUSEPORT), so one kept-alive connection would send a whole test to one worker.
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20 if count == 1 else 0)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=10, trust_env=False, limits=limits) as client:
        if count == 1:
            urls = await nursery.start(partial(run_daemon, config, stop=stop, **kwargs))
            yield Daemon(urls[0], config, stop, client, nodes=[kwargs["node"]] if kwargs.get("node") else [])
        else:
            url, *sockets = await nursery.start(partial(run_workers, config, count, stop=stop, **kwargs))
            yield Daemon(url, config, stop, client, count, sockets, worker_nodes(config, kwargs.get("node"), count))
        stop.set()


@dataclass
class World:
    """A running daemon with real downstream services and a fake Graph API."""

    daemon: Daemon
    services: Downstream
    graph: Downstream
    tmp_path: Path


@pytest.fixture
def store_clock() -> trio.testing.MockClock:
    """A mock clock for actors that wait on SQLite worker threads. The plain autojump clock jumps to the
    next deadline whenever trio waits, a worker thread included, so it races ahead while a commit runs;
    this one jumps only after 20 ms of real idleness (a commit here takes a few)."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture
async def services(nursery: trio.Nursery) -> Downstream:
    return await serve_downstream(nursery, Downstream())


@pytest.fixture
async def graph(nursery: trio.Nursery) -> Downstream:
    return await serve_downstream(nursery, Downstream())


def make_config(tmp_path: Path, services: Downstream, graph: Downstream, **sections: dict[str, Any]) -> Config:
    return Config.from_mapping(config_mapping(tmp_path, services.url, graph.url, **sections), {})


@pytest.fixture
async def world(tmp_path: Path, services: Downstream, graph: Downstream) -> AsyncIterator[World]:
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        yield World(daemon, services, graph, tmp_path)


def bare_runtime(
    tmp_path: Path,
    *targets: Target,
    wall_clock: Callable[[], float] = trio.current_time,
    writes: trio.MemorySendChannel[WriteOp] | None = None,
    **sections: dict[str, Any],
) -> Runtime:
    """A daemon's shared state without the daemon, for testing one actor: `targets` replace the
    config's of the same name (each with a fresh breaker)."""
    path = tmp_path / "bare.db"
    migrate(path)
    config = Config.from_mapping(config_mapping(tmp_path, "http://services.test", "http://graph.test", **sections), {})
    if writes is None:
        writes, _ = trio.open_memory_channel[WriteOp](0)
    rt = Runtime.build(config, writes, LaneBoard(), Reader(path), wall_clock)
    for t in targets:
        rt.targets[t.name] = t
        rt.breakers[t.name] = Breaker(t.forwarding.breaker_failures, t.forwarding.breaker_open_s)
    return rt


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What `sql` (with `args`) reads from the SQLite file at `path`, on a connection of its own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A libpq URL of this run's own fresh, empty database (tests/postgres.py says on which server),
    dropped at the end of the session. No PostgreSQL fails the test with what was tried; never a skip."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(find_server(os.environ.get(ENV)))
        except PgUnavailable as exc:
            failure = str(exc)  # failed outside the `except`, so the message is not printed twice
        else:
            yield stack.enter_context(fresh_database(server.url))
            return
    pytest.fail(failure, pytrace=False)


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    """A running private PostgreSQL for one test, which it may `stop()` and `start()` again (same `url`);
    stopped and removed afterwards."""
    with ExitStack() as stack:
        try:
            server = PrivateServer.create()
            stack.callback(server.remove)
            server.start()
        except PgUnavailable as exc:
            failure = f"no private PostgreSQL for this test: {exc}"
        else:
            yield server
            return
    pytest.fail(failure, pytrace=False)


@dataclass
class StoreUnderTest:
    """One store behind the `wacored.store.interface` Protocols, for the tests that hold for every
    implementation: a SQLite file (`path`), or a PostgreSQL schema of the test's own (`url`)."""

    kind: str
    path: Path
    url: str = ""

    def migrate(self) -> int:
        return pg_migrate(self.url) if self.url else migrate(self.path)

    def writer(self, busy_timeout_ms: int = 5000) -> WriteTx:
        if self.url:
            return PgWriteConnection(self.url, busy_timeout_ms)
        return WriteConnection(self.path, busy_timeout_ms)

    def reader(self) -> Reads:
        return PgReader(self.url) if self.url else Reader(self.path)

    def lane_reader(self) -> LaneReads:
        return PgLaneReader(self.url) if self.url else LaneReader(self.path)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """What `sql` (``?`` placeholders) reads, on a connection of its own."""
        if not self.url:
            return rows(self.path, sql, *args)
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(qmark(sql), args or None).fetchall()  # type: ignore[call-overload]  # a test's literal

    def execute(self, sql: str, *args: Any) -> None:
        """One write (``?`` placeholders), committed, on a connection of its own."""
        if not self.url:
            with closing(sqlite3.connect(self.path)) as db, db:
                db.execute(sql, args)
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(qmark(sql), args or None)  # type: ignore[call-overload]  # a test's literal

    def section(self) -> dict[str, Any]:
        """The config's ``[store]`` for this store."""
        return {"path": str(self.path), "url": self.url}


def fresh_store(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Iterator[StoreUnderTest]:
    """A fresh store of `kind` (``sqlite``: a file in `tmp_path`; ``postgres``: a schema of its own in
    this run's database, `pg_url`, never skipped), for a fixture to ``yield from``."""
    if kind == "sqlite":
        yield StoreUnderTest("sqlite", tmp_path / "wacored.db")
        return
    with own_schema(request.getfixturevalue("pg_url")) as url:
        yield StoreUnderTest("postgres", tmp_path / "wacored.db", url)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    """Each store implementation in turn."""
    yield from fresh_store(request, tmp_path, request.param)

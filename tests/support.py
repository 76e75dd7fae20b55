"""Helpers shared by several test modules (test modules never import each other): raw HTTP/1.1 over
trio sockets for what httpx will not do (a body that stalls or trickles, a connection held open on
purpose, a downstream that breaks the rules), waiting on /health, and subprocess configs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from wacored.actors.lanes import Lane, LaneBoard
from wacored.config import Config, StoreConfig
from wacored.core.ingest import PlannedRow
from wacored.core.numbers import Numbers
from wacored.core.ratelimit import RateLimit
from wacored.core.whatsapp import Batch, parse_webhook, text_webhook
from wacored.ops.connection import open_ops
from wacored.siblings import LOCAL_HEADER
from wacored.store import Delivery, WriteConnection
from wacored.store.ingest import IngestContext, IngestPolicy
from wacored.store.postgres import qmark
from wacored.store.writer import Ingest

from .conftest import Daemon, Downstream, config_mapping, rows

POLL_S = 0.01


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool
    """The server closed the connection after the answer."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawConnection:
    """One HTTP/1.1 connection to the daemon, driven by hand."""

    stream: trio.SocketStream
    buffered: bytearray = field(default_factory=bytearray)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(65536))
        except trio.BrokenResourceError:  # reset by the server after it answered and closed
            return b""

    async def response(self) -> RawResponse:
        """Read one whole answer (bodies have a Content-Length here), and whether the server closed."""
        while b"\r\n\r\n" not in self.buffered:
            chunk = await self._more()
            if not chunk:
                raise AssertionError(f"connection closed before an answer: {bytes(self.buffered)!r}")
            self.buffered += chunk
        head, _, rest = bytes(self.buffered).partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        length = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            chunk = await self._more()
            if not chunk:
                break
            body += chunk
        self.buffered = bytearray(body[length:])
        closed = headers.get("connection", "").lower() == "close" and await self._more() == b""
        return RawResponse(int(status_line.split()[1]), headers, bytes(body[:length]), closed)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect(daemon: Daemon) -> RawConnection:
    url = urlsplit(daemon.url)
    assert url.hostname == "127.0.0.1"
    assert url.port is not None
    return RawConnection(await trio.open_tcp_stream(url.hostname, url.port))


def post_head(content_length: int, headers: dict[str, str] | None = None, path: str = "/webhook") -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {content_length}",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_stalled(daemon: Daemon, content_length: int, sent: bytes) -> RawConnection:
    """A webhook POST declaring `content_length` bytes that sends only `sent`, then nothing."""
    conn = await connect(daemon)
    await conn.send(post_head(content_length) + sent)
    return conn


async def health(daemon: Daemon) -> dict[str, Any]:
    r = await daemon.client.get(f"{daemon.url}/health")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def wait_for_health(daemon: Daemon, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health until `ready(body)` (the caller bounds the wait with `trio.fail_after`). With
    several workers, until every worker's own /health says so (each reads the store on its own
    clock: a CLI pause, say, reaches each one within its watcher's second); worker 0's body."""
    if not daemon.sockets:
        while not ready(body := await health(daemon)):  # noqa: ASYNC110 -- state seen over HTTP, as a caller sees it
            await trio.sleep(POLL_S)
        return body
    bodies = []
    for index in range(len(daemon.sockets)):
        while not ready(body := (await daemon.on_worker(index, "GET", "/health", headers={LOCAL_HEADER: "1"})).json()):  # noqa: ASYNC110
            await trio.sleep(POLL_S)
        bodies.append(body)
    return bodies[0]


@dataclass
class RawDownstream:
    """A downstream that breaks the rules: a TCP server on 127.0.0.1 port 0 answering each HTTP/1.1
    request with whatever bytes `answer` returns, then closing the connection.

    `requests` holds each request's raw bytes (head and body) as read.
    """

    answer: Callable[[bytes], bytes]
    url: str = ""
    requests: list[bytes] = field(default_factory=list)

    async def start(self, nursery: trio.Nursery) -> RawDownstream:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = await _read_request(stream)
            if request is None:
                return
            self.requests.append(request)
            try:
                await stream.send_all(self.answer(request))
            except trio.BrokenResourceError:
                pass


async def _read_request(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


def http_answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, length: bool = True) -> bytes:
    """An HTTP/1.1 answer, as bytes, with any headers (a ``Content-Length`` added unless `length` is False)."""
    lines = [b"HTTP/1.1 %d X" % status, *(k + b": " + v for k, v in headers)]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, b"", b""]) + body


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WACORED_", "WA_", "WHATSAPP_"))}
    env.update(extra)
    return env


def toml_text(data: dict[str, object]) -> str:
    """Just enough TOML for the test configs (tables of scalars, lists and one array of tables)."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, object]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and k != "items"}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for item in values.get("items", []) if prefix == "home_menu" else []:  # type: ignore[union-attr]
            lines.append("[[home_menu.items]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in item.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for name, section in data.items():
        table(name, section)  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract.md"


def readme_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The documented verification recipe for a downstream (docs/contract.md, "Forwarding"), run
    exactly as it is printed there."""
    blocks = re.findall(r"```python\n(.*?)```", CONTRACT.read_text(), re.S)
    [recipe] = [b for b in blocks if "def verify(" in b]
    namespace: dict[str, object] = {}
    exec(recipe, namespace)  # noqa: S102 -- the documented code, which is what is under test
    verify = namespace["verify"]
    assert callable(verify)
    return verify  # type: ignore[return-value]


async def wait_until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll `check` until it holds (it reads state: the store, a downstream), failing after `timeout_s`."""
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 -- a file or a server, which signal nothing
            await trio.sleep(POLL_S)


class DiskFull:
    """A switch for `FullDiskConnection`s: while `full`, every COMMIT fails as SQLite's does on a
    full disk (SQLITE_FULL), and the transaction is rolled back; `commits_refused` counts them."""

    def __init__(self) -> None:
        self.full = False
        self.commits_refused = 0

    def connection(self, path: Path, busy_timeout_ms: int = 5000) -> WriteConnection:
        return FullDiskConnection(self, path, busy_timeout_ms)


class FullDiskConnection(WriteConnection):
    def __init__(self, disk: DiskFull, path: Path, busy_timeout_ms: int) -> None:
        super().__init__(path, busy_timeout_ms)
        self.disk = disk

    def commit(self) -> None:
        if self.disk.full:
            self.disk.commits_refused += 1
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[misc]
            raise error
        super().commit()


def numbers_webhook(*changes: tuple[str | None, str, str, str]) -> bytes:
    """One webhook POST holding one change per (phone_number_id, sender, text, wamid), in order, as
    Meta batches the messages of several business numbers of one app (None: a change without one)."""
    entries = []
    for number, sender, text, wamid in changes:
        metadata = {"display_phone_number": "15550000000"}
        if number is not None:
            metadata["phone_number_id"] = number
        value = {
            "messaging_product": "whatsapp",
            "metadata": metadata,
            "contacts": [{"profile": {"name": "User"}, "wa_id": sender}],
            "messages": [
                {"from": sender, "id": wamid, "timestamp": "1700000000", "type": "text", "text": {"body": text}}
            ],
        }
        entries.append({"id": "WABA_ID", "changes": [{"value": value, "field": "messages"}]})
    return json.dumps({"object": "whatsapp_business_account", "entry": entries}).encode()


def add_message(
    conn: Any,
    key: str,
    *,
    target: str = "rides",
    state: str = "queued",
    received_at: float = 1_800_000_000.0 - 60,
    kind: str = "message",
) -> int:
    """A ``messages`` row written as the daemon writes one; its row id. `conn`: a `sqlite3.Connection`
    or an `ops.connection.OpsConnection` of either store."""
    cur = conn.execute(
        "INSERT INTO messages (key, kind, sender, service, reason, target, body, request_id, correlation_id,"
        " traceparent, received_at, state) VALUES (?, ?, '250788000001', ?, 'keyword', ?, ?,"
        " 'req-1', 'corr-1', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', ?, ?) RETURNING id",
        (key, kind, target, target, b"{}", received_at, state),
    )
    return int(cur.fetchall()[0][0])  # fetchall: the statement ends, a commit may follow


def add_dead_letter(
    conn: Any,
    key: str,
    *,
    state: str = "abandoned",
    service: str = "rides",
    created_at: float = 1_800_000_000.0 - 86400.0,
    updated_at: float | None = None,
    attempts: int = 3,
    next_attempt_at: float | None = None,
) -> int:
    """A dead letter and its message, as the daemon writes them; the dead letter's row id."""
    message = add_message(conn, key, target=service, state="dead_lettered", received_at=created_at)
    cur = conn.execute(
        "INSERT INTO dead_letters (message_id, key, service, state, reason, error, status_code, attempts,"
        " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, 'transient', 'HTTP 503', 503, ?, ?, ?, ?)"
        " RETURNING id",
        (
            message,
            key,
            service,
            state,
            attempts,
            next_attempt_at,
            created_at,
            created_at if updated_at is None else updated_at,
        ),
    )
    return int(cur.fetchall()[0][0])  # fetchall: the statement ends, a commit may follow


def operator_config(tmp_path: Path, mapping: dict[str, Any]) -> Path:
    """`mapping` (a test config) as a TOML file the operator's commands read, without the app secret."""
    data = json.loads(json.dumps(mapping))
    data["whatsapp"].pop("app_secret", None)
    path = tmp_path / "operator.toml"
    path.write_text(toml_text(data))
    return path


def operator(config: Path, *args: str) -> int:
    """``wacored ARGS -c CONFIG`` in this process (its output goes to the test's capture)."""
    from wacored.cli import main

    return main([*args, "-c", str(config), "--env-file", str(config.parent / "none.env")])


async def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """`python -m wacored ARGS` in a process of its own (as an operator runs it beside the daemon),
    awaited without blocking the test's event loop; its output captured, never checked here."""
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "wacored", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env() if env is None else env,
        )


@asynccontextmanager
async def daemon_process(
    tmp_path: Path,
    services: Downstream,
    graph: Downstream,
    *,
    wrapper: Sequence[str] = (),
    edit: Callable[[dict[str, Any]], None] = lambda _: None,
) -> AsyncIterator[str]:
    """A `wacored run` process on a free port; yields its URL once /health answers. `edit` changes
    the test config (`config_mapping`) first."""
    data = config_mapping(tmp_path, services.url, graph.url)
    edit(data)
    port = free_port()
    data["server"]["listen"] = f"127.0.0.1:{port}"
    (tmp_path / "wacored.toml").write_text(toml_text(data))
    command = [sys.executable, *wrapper, "-m", "wacored", "run", "-c", str(tmp_path / "wacored.toml")]
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "daemon.log").open("wb") as log:
        process = await trio.lowlevel.open_process(command, env=clean_env(), cwd=tmp_path, stdout=log, stderr=log)
    try:
        await wait_until_answering(f"{url}/health", process)
        yield url
    finally:
        await stop_process(process)


async def stop_process(process: trio.Process, how: signal.Signals = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """`how` to `process` (SIGTERM: a daemon drains; nginx stops gracefully on SIGQUIT), then SIGKILL
    it if it has not exited within `grace_s`."""
    if process.returncode is None:
        process.send_signal(how)
        with trio.move_on_after(grace_s):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def wait_until_answering(url: str, process: trio.Process, **client: object) -> None:
    async with httpx.AsyncClient(trust_env=False, **client) as http:  # type: ignore[arg-type]
        with trio.fail_after(20):
            while True:
                assert process.returncode is None, f"{process.args!r} exited with {process.returncode}"
                try:
                    await http.get(url)
                    return
                except httpx.TransportError:
                    await trio.sleep(0.05)


async def until_settled(db: Path, timeout_s: float = 10.0) -> None:
    """Wait until no message in the store at `db` is queued: from then on nothing is forwarded, so a
    test can count what arrived without sleeping to prove that nothing more will."""
    await wait_until(lambda: rows(db, "SELECT COUNT(*) FROM messages WHERE state = 'queued'") == [(0,)], timeout_s)


def pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What `sql` (``?`` placeholders) reads from the PostgreSQL database at `url`, on a connection of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(qmark(sql), args or None).fetchall()  # type: ignore[call-overload]  # a test's literal


async def until_settled_pg(url: str, timeout_s: float = 20.0) -> None:
    """`until_settled` for the PostgreSQL database at `url`."""
    await wait_until(lambda: pg_rows(url, "SELECT COUNT(*) FROM messages WHERE state = 'queued'") == [(0,)], timeout_s)


async def until_retrier_passes(db: Path, passes: int, timeout_s: float = 10.0) -> None:
    """Wait until the DLQ retrier has recorded `passes` more runs than it had at the call."""

    def last_run() -> list[tuple[Any, ...]]:
        return rows(db, "SELECT last_run FROM runs WHERE actor = 'dlq_retrier'")

    for _ in range(passes):
        seen = last_run()
        await wait_until(lambda seen=seen: last_run() != seen, timeout_s)


def parse(text: str) -> dict[str, list[Sample]]:
    """A `/metrics` exposition as samples by sample name (``wacored_webhook_requests_total``, ...)."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels are exactly `labels`."""
    [match] = [s for s in samples[name] if s.labels == labels]
    return match.value


STORED_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def make_delivery(**overrides: Any) -> Delivery:
    """A committed message on its way to service ``rides``; `overrides` replace any field."""
    fields: dict[str, Any] = {
        "key": "wamid.T",
        "kind": "message",
        "sender": "250788000001",
        "service": "rides",
        "reason": "keyword",
        "target": "rides",
        "body": b"{}",
        "request_id": "r",
        "correlation_id": "c",
        "traceparent": STORED_TRACEPARENT,
        "received_at": 0.0,
        "id": 1,
    }
    fields.update(overrides)
    return Delivery(**fields)


def held_lanes(board: LaneBoard, target: str, count: int = 1) -> list[Lane]:
    """`target`'s lanes on `board`, held for good: as if this node's lease keeper had claimed them (to
    test a forwarder alone)."""
    lanes = board.ensure(target, count)
    for lane in lanes:
        lane.valid_until = math.inf
    return lanes


def text_batch(*messages: tuple[str, str, str]) -> Batch:
    """One parsed POST holding a text message per (wamid, sender, text), in order."""
    docs = [json.loads(text_webhook(text=t, sender=s, wamid=w, timestamp=1)) for w, s, t in messages]
    first = docs[0]
    for doc in docs[1:]:
        first["entry"] += doc["entry"]
    return parse_webhook(json.dumps(first).encode())


def ingest_policy(*, per_sender: int = 1_000_000, window_s: float = 60.0, ttl_s: float = 3600.0) -> IngestPolicy:
    """The test config's numbers (`config_mapping`: "rides" routes to rides) with this limit and TTL."""
    config = Config.from_mapping(config_mapping(Path("unused"), "http://services.test", "http://graph.test"), {})
    return IngestPolicy(Numbers.from_config(config), ttl_s, RateLimit(per_sender, window_s))


def ingest_op(
    *keys: str,
    sender: str = "s1",
    text: str = "rides",
    at: float = 1000.0,
    policy: IngestPolicy | None = None,
    correlation_id: str = "cid",
) -> Ingest:
    """A writer `Ingest` of one POST: a text message per wamid in `keys`, from `sender`, received at `at`."""

    def traceparent(_: PlannedRow) -> str:
        return "tp"

    batch = text_batch(*((key, sender, text) for key in keys))
    return Ingest(batch, policy or ingest_policy(), IngestContext("rid", correlation_id, at, traceparent))


class DictSessions:
    """A `core.sessions.SessionLookup` over a dict, (number, sender) -> (service, at): stored sessions
    for the pure tests (the daemon's reads the store, `ingest.StoreSessions`)."""

    def __init__(self, rows: dict[tuple[str, str], tuple[str, float]] | None = None) -> None:
        self.rows = dict(rows or {})
        self.reads: list[tuple[str, str]] = []

    def get(self, number: str, sender: str) -> tuple[str, float] | None:
        self.reads.append((number, sender))
        return self.rows.get((number, sender))


@dataclass
class Workers:
    """A `wacored run` with ``[server] processes`` set: its supervisor process and where it serves."""

    url: str
    process: trio.Process
    config: Path
    runtime_dir: str
    log: Path

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False) as http:
            return dict((await http.get(f"{self.url}/health")).json())

    async def local(self, index: int, path: str) -> httpx.Response:
        """`path` from worker `index` alone, over its private unix socket (as its siblings ask)."""
        transport = httpx.AsyncHTTPTransport(uds=os.path.join(self.runtime_dir, f"worker-{index}.sock"))
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as http:
            return await http.get(f"http://worker{path}", headers={"X-Wacored-Local": "1"})

    def logged(self, event: str) -> int:
        """How many log lines of `event` the supervisor and its workers have written so far."""
        return self.log.read_text().count(f'"event": "{event}"')


@asynccontextmanager
async def workers_process(
    tmp_path: Path,
    services: Downstream,
    graph: Downstream,
    *,
    processes: int = 2,
    env: dict[str, str] | None = None,
    edit: Callable[[dict[str, Any]], None] = lambda _: None,
) -> AsyncIterator[Workers]:
    """`wacored run` with ``[server] processes = N`` on a free port, its runtime directory one of
    the test's (``$RUNTIME_DIRECTORY``, short: a socket path has at most 108 bytes); yields once
    /health answers with every worker ready. Stopped with SIGTERM (then SIGKILL) unless the test has ended it."""
    data = config_mapping(tmp_path, services.url, graph.url)
    data["server"]["processes"] = processes
    edit(data)
    port = free_port()
    data["server"]["listen"] = f"127.0.0.1:{port}"
    config = tmp_path / "wacored.toml"
    config.write_text(toml_text(data))
    runtime_dir = tempfile.mkdtemp(prefix="wacored-rt-")
    command = [sys.executable, "-m", "wacored", "run", "-c", str(config)]
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            command, env=clean_env(RUNTIME_DIRECTORY=runtime_dir, **(env or {})), cwd=tmp_path, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_until_answering(f"{url}/health", process)
        workers = Workers(url, process, config, runtime_dir, log_path)
        try:
            with trio.fail_after(20):  # the port answers once the first worker serves: wait for them all
                while not all(w["ready"] for w in (await workers.health())["workers"]):  # noqa: ASYNC110 -- other processes
                    await trio.sleep(0.05)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            # Say what the supervisor and its workers logged: a start that fails is otherwise silent.
            raise AssertionError(f"workers not ready ({exc!r}); their log:\n{log_path.read_text()[-4000:]}") from exc
        yield workers
    finally:
        await stop_process(process)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def store_rows(store: StoreConfig, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What `sql` (``?`` placeholders) reads from the store `store` names (SQLite or PostgreSQL), on a
    connection of its own."""
    conn = open_ops(store)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def store_execute(store: StoreConfig, sql: str, *args: Any) -> None:
    """One write (``?`` placeholders), committed, on the store `store` names."""
    conn = open_ops(store)
    try:
        with conn.write():
            conn.execute(sql, args)
    finally:
        conn.close()

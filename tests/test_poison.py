"""One poison input costs one message, never the daemon: ids that cannot leave wacored, rows an older
version stored, hostile downstream answers, amplifying batches, odd signature headers, a status-shaped
wamid, and a broken env file on SIGHUP. Real daemon, real HTTP, real SQLite file; at the end of each
test the daemon still serves a signed POST."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from wacored.core.untrusted import EXCERPT
from wacored.core.whatsapp import sign
from wacored.store import migrate

from .conftest import SECRET, Daemon, Downstream, config_mapping, make_config, open_daemon, rows
from .support import RawDownstream, clean_env, free_port, http_answer, parse, toml_text, value, wait_until

FAST = {
    "forwarding": {"retry_base_ms": 5, "timeout_ms": 1000, "concurrency": 2, "retries": 0},
    "dlq": {"interval_s": 0.2, "backoff_s": [0.2], "max_attempts": 2},
    "supervisor": {"backoff_base_s": 0.05},
}


async def still_serving(daemon: Daemon) -> None:
    assert (await daemon.send_text("rides")).status_code == 200
    health = (await daemon.client.get(f"{daemon.url}/health")).json()
    assert all(a["status"] == "running" for a in health["checks"]["actors"].values()), health["checks"]["actors"]


def batch(
    messages: list[dict[str, Any]] | None = None, statuses: list[dict[str, Any]] | None = None, **value: Any
) -> bytes:
    inner: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "1234567890"},
        **value,
    }
    if messages is not None:
        inner["messages"] = messages
    if statuses is not None:
        inner["statuses"] = statuses
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"value": inner, "field": "messages"}]}],
    }
    return json.dumps(doc, ensure_ascii=False).encode()


def text(wamid: str, body: str = "rides", sender: str = "250788000001") -> dict[str, Any]:
    return {"from": sender, "id": wamid, "timestamp": "1700000000", "type": "text", "text": {"body": body}}


def status(status_id: str, value: str = "delivered") -> dict[str, Any]:
    return {"id": status_id, "status": value, "timestamp": "1700000000", "recipient_id": "250788000001"}


# --- ids that cannot leave wacored ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (batch([text("wamid.café")]), "messages[0].id"),
        (batch([text("wamid.\x00nul")]), "messages[0].id"),
        (batch([text("wamid.\r\nX-Injected: 1")]), "messages[0].id"),
        (batch([text("wamid with space")]), "messages[0].id"),
        (batch([text("w" * 257)]), "messages[0].id"),
        (batch(statuses=[status("wamid.ü")]), "statuses[0].id"),
        (batch(statuses=[status("wamid.OK", "read\x07")]), "statuses[0].status"),
    ],
    ids=["non_ascii", "nul", "crlf", "space", "too_long", "status_id", "status_value"],
)
async def test_an_id_that_cannot_leave_wacored_is_a_400_and_stores_nothing(
    tmp_path: Path, services: Downstream, graph: Downstream, body: bytes, field: str
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, routing={"statuses": "wallet"})) as daemon:
        answer = await daemon.post(body)
        assert answer.status_code == 400
        assert answer.json()["error"] == "bad_request"
        assert field in answer.json()["detail"]
        assert rows(tmp_path / "wacored.db", "SELECT COUNT(*) FROM messages") == [(0,)]
        await still_serving(daemon)


# --- rows an older version stored -----------------------------------------------------------------


def store_row(path: Path, key: str, sender: str = "250788000009", **columns: Any) -> int:
    """A queued row as an earlier wacored, which did not check ids, could have stored it."""
    values = {
        "key": key,
        "kind": "message",
        "sender": sender,
        "service": "rides",
        "reason": "keyword",
        "target": "rides",
        "body": b"{}",
        "request_id": "r",
        "correlation_id": "c",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "received_at": 1.0,
        **columns,
    }
    db = sqlite3.connect(path)
    try:
        with db:
            cur = db.execute(
                f"INSERT INTO messages ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid
    finally:
        db.close()


@pytest.mark.parametrize("key", ["wamid.café", "wamid.\x00", "wamid.\r\nX: y"])
async def test_a_poison_row_costs_one_message_and_the_lane_goes_on(
    tmp_path: Path, services: Downstream, graph: Downstream, key: str
) -> None:
    db = tmp_path / "wacored.db"
    migrate(db)
    poison = store_row(db, key)
    after = store_row(db, "wamid.after")  # the same sender: the same lane, behind the poison row
    async with open_daemon(make_config(tmp_path, services, graph, **FAST)) as daemon:
        await wait_until(lambda: rows(db, f"SELECT state FROM messages WHERE id = {after}") == [("delivered",)])
        dead = rows(db, f"SELECT state, reason, error FROM dead_letters WHERE message_id = {poison}")
        [(state, reason, error)] = dead
        assert (state, reason) == ("abandoned", "internal_error")
        assert error.startswith("internal_error: ")
        assert error.isprintable()
        assert len(error) <= EXCERPT
        exported = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert value(parse(exported), "wacored_internal_errors_total", service="rides", stage="delivery") == 1
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
        assert health["checks"]["actors"]["forwarder.rides"]["restarts"] == 0
        await still_serving(daemon)
    assert [r.headers["idempotency-key"] for r in services.on("/rides")][0] == "wamid.after"


async def test_a_poison_dead_letter_is_abandoned_by_the_retrier_alone(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    db = tmp_path / "wacored.db"
    migrate(db)
    poison = store_row(db, "wamid.ça", state="dead_lettered")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO dead_letters (message_id, key, service, state, reason, error, attempts,"
            " next_attempt_at, created_at) VALUES (?, 'wamid.ça', 'rides', 'pending', 'transient', 'x',"
            " 0, 0.0, 1.0)",
            (poison,),
        )
    conn.close()
    async with open_daemon(make_config(tmp_path, services, graph, **FAST)) as daemon:
        await wait_until(lambda: rows(db, "SELECT state FROM dead_letters") == [("abandoned",)])
        assert rows(db, "SELECT reason FROM dead_letters") == [("internal_error",)]
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
        assert health["checks"]["actors"]["dlq_retrier"]["restarts"] == 0
        exported = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert value(parse(exported), "wacored_internal_errors_total", service="rides", stage="dlq_retry") == 1
        await still_serving(daemon)


# --- hostile downstream answers -------------------------------------------------------------------

CHARSETS = [
    "base64",
    "hex",
    "rot13",
    "zlib",
    "bz2",
    "uu",
    "quopri",  # bytes-to-bytes codecs: LookupError
    "utf-16",
    "utf-32",
    "idna",
    "punycode",
    "utf-7",  # text codecs that raise UnicodeError
    "no-such-charset",
    '"utf-8"',
    "utf-8; x",
]


@pytest.mark.parametrize("charset", CHARSETS)
async def test_a_hostile_charset_costs_nothing_but_a_readable_error(
    tmp_path: Path, services: Downstream, graph: Downstream, nursery: trio.Nursery, charset: str
) -> None:
    said = "refused for 250788123456: \xff\xfe\x00 odd bytes ".encode("latin-1") * 20
    hostile = await RawDownstream(
        lambda _: http_answer(400, [(b"Content-Type", b"text/plain; charset=" + charset.encode())], said)
    ).start(nursery)
    data = config_mapping(tmp_path, services.url, graph.url, **FAST)
    data["services"]["rides"]["url"] = f"{hostile.url}/rides"
    from wacored.config import Config

    db = tmp_path / "wacored.db"
    async with open_daemon(Config.from_mapping(data, {})) as daemon:
        for n in range(2):
            assert (await daemon.send_text("rides", sender=f"25078800000{n}")).status_code == 200
        await wait_until(lambda: rows(db, "SELECT COUNT(*) FROM dead_letters") == [(2,)])
        for (error,) in rows(db, "SELECT error FROM dead_letters"):
            assert error.startswith("HTTP 400: refused for 2507****456")
            assert error.isprintable()
            assert len(error) <= len("HTTP 400: ") + EXCERPT
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
        assert health["checks"]["actors"]["forwarder.rides"]["restarts"] == 0
        assert (await daemon.send_text("jobs")).status_code == 200
        await services.wait_for(1, "/jobs")


# --- amplification --------------------------------------------------------------------------------


async def test_a_batch_that_repeats_shared_parts_is_refused_before_it_is_stored(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    config = make_config(tmp_path, services, graph, ratelimit={"per_sender": 1_000_000})
    async with open_daemon(config) as daemon:
        wide = batch([text(f"wamid.A{i}") for i in range(500)], metadata={"pad": "x" * 50_000})
        answer = await daemon.post(wide)
        assert answer.status_code == 400
        assert "envelopes" in answer.json()["detail"]
        # Messages x contacts: each envelope carries its sender's contact only, once.
        contacts = [{"profile": {"name": "N" * 50}, "wa_id": "250788000001"} for _ in range(1000)]
        many = batch([text(f"wamid.B{i}") for i in range(1000)], contacts=contacts)
        assert (await daemon.post(many)).status_code == 200
        [(stored,)] = rows(tmp_path / "wacored.db", "SELECT SUM(LENGTH(body)) FROM messages")
        assert stored < 4 * len(many)
        [(body,)] = rows(tmp_path / "wacored.db", "SELECT body FROM messages LIMIT 1")
        assert len(json.loads(body)["entry"][0]["changes"][0]["value"]["contacts"]) == 1
        await still_serving(daemon)


# --- small edges ----------------------------------------------------------------------------------


async def test_a_non_ascii_signature_header_is_a_counted_401(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        body = batch([text("wamid.SIG")])
        header = sign(SECRET, body)[:-1] + "é"
        raw = [(b"content-type", b"application/json"), (b"x-hub-signature-256", header.encode("latin-1"))]
        answer = await daemon.client.post(f"{daemon.url}/webhook", content=body, headers=raw)
        assert answer.status_code == 401
        exported = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert value(parse(exported), "wacored_webhook_requests_total", outcome="bad_signature") == 1
        await still_serving(daemon)


async def test_a_status_shaped_wamid_does_not_dedupe_a_status(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, routing={"statuses": "wallet"})) as daemon:
        first = await daemon.post(batch([text("status:wamid.S:read", "rides")]))
        assert first.json()["accepted"] == 1
        second = await daemon.post(batch(statuses=[status("wamid.S", "read")]))
        assert second.json()["statuses"] == 1
        await services.wait_for(1, "/wallet")
        kinds = rows(tmp_path / "wacored.db", "SELECT kind, key FROM messages ORDER BY id")
        assert kinds == [("message", "status:wamid.S:read"), ("status", "status:wamid.S:read")]
        await still_serving(daemon)


async def test_sighup_with_a_broken_env_file_keeps_the_old_config(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    from .conftest import SERVICES

    data = config_mapping(tmp_path, services.url, graph.url)
    del data["whatsapp"]["app_secret"]  # from the env file
    port = free_port()
    data["server"]["listen"] = f"127.0.0.1:{port}"
    config = tmp_path / "wacored.toml"
    config.write_text(toml_text(data))
    env_file = tmp_path / "wacored.env"
    env_file.write_text(f"WACORED_APP_SECRET={SECRET}\n")
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wacored", "run", "-c", str(config), "--env-file", str(env_file)],
            env=clean_env(),
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            await _until_up(client, url)
            for broken in (b"WACORED_APP_SECRET=\xff\xfe\n", None):
                if broken is None:
                    env_file.unlink()
                    env_file.mkdir()  # exists, cannot be read as a file
                else:
                    env_file.write_bytes(broken)
                reloads = log_path.read_text().count('"reload_failed"')
                process.send_signal(signal.SIGHUP)
                await wait_until(lambda n=reloads: log_path.read_text().count('"reload_failed"') > n)  # type: ignore[misc]
                assert process.returncode is None
                body = batch([text(f"wamid.H{len(SERVICES)}{reloads}")])
                answer = await client.post(
                    f"{url}/webhook",
                    content=body,
                    headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)},
                )
                assert answer.status_code == 200  # the old config, with its secret, still serves
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await process.wait()
    assert "Traceback" not in log_path.read_text()


async def _until_up(client: httpx.AsyncClient, url: str) -> None:
    with trio.fail_after(15):
        while True:
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def test_rows_of_the_wrong_type_are_read_without_crashing_anything(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Times written by hand as text (an operator's repair, an old import): /health, /metrics, the
    stats actor, the retrier and the reaper go on."""
    db = tmp_path / "wacored.db"
    migrate(db)
    message = store_row(db, "wamid.TEXT", state="dead_lettered", received_at="yesterday")
    store_row(db, "wamid.QUEUED", received_at="last week", target="nowhere")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO dead_letters (message_id, key, service, state, reason, error, attempts,"
            " next_attempt_at, created_at) VALUES (?, 'wamid.TEXT', 'rides', 'pending', 'transient', 'x',"
            " 0, 'tomorrow', 'yesterday')",
            (message,),
        )
        conn.execute("INSERT INTO runs (actor, last_run, next_run, result) VALUES ('reaper', 'never', 'x', '')")
        conn.execute("INSERT INTO runs (actor, last_run, next_run, result) VALUES ('dlq_retrier', 'x', 'y', '')")
    conn.close()
    async with open_daemon(make_config(tmp_path, services, graph, **FAST)) as daemon:
        await still_serving(daemon)
        for path in ("/health", "/metrics", "/health"):
            assert (await daemon.client.get(f"{daemon.url}{path}")).status_code == 200, path
        health = (await daemon.client.get(f"{daemon.url}/health")).json()
        assert {name: a["restarts"] for name, a in health["checks"]["actors"].items() if a["restarts"]} == {}

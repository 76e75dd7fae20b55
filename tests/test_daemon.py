"""The whole daemon over real HTTP: the integration tests of the system wacored replaced, ported, and the contract.

Each test starts the real daemon (hypercorn on 127.0.0.1 port 0, a real SQLite file) with real local
downstream services and a fake Graph API, and sends signed WhatsApp webhooks.
"""

from __future__ import annotations

import base64
import json
import re
import uuid

import trio

from wacored.core.whatsapp import text_webhook
from wacored.http.ingress import new_id

from .conftest import SECRET, SIGNING_SECRET, VERIFY_TOKEN, World
from .support import readme_verify, until_settled

# --- the 11 integration tests of the system wacored replaced ---------------------------------------------------


async def test_health_reports_its_fields(world: World) -> None:
    r = await world.daemon.client.get(f"{world.daemon.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"
    assert body["service"] == "wacored"
    assert body["version"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", body["timestamp"])
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["actors"]["writer"]["status"] == "running"
    assert body["checks"]["actors"]["forwarder.rides"]["status"] == "running"
    assert set(body["services"]) >= {"rides", "insurance", "whatsapp"}
    assert uuid.UUID(r.headers["X-Request-ID"]).version == 4


async def test_rides_routes_to_rides(world: World) -> None:
    r = await world.daemon.send_text("rides")
    assert r.status_code == 200
    assert r.headers["X-Routed-Service"] == "rides"
    assert r.json()["routes"][0]["service"] == "rides"
    [got] = await world.services.wait_for(1, "/rides")
    assert got.message["text"]["body"] == "rides"


async def test_insurance_routes_to_insurance(world: World) -> None:
    r = await world.daemon.send_text("insurance")
    assert r.headers["X-Routed-Service"] == "insurance"
    await world.services.wait_for(1, "/insurance")


async def test_menu_sends_the_home_menu_list_to_the_sender(world: World) -> None:
    r = await world.daemon.send_text("menu", sender="250788000042")
    assert r.status_code == 200
    assert r.headers["X-Routed-Service"] == "wacored"
    assert r.json()["routes"][0]["reason"] == "home_menu"
    [sent] = await world.graph.wait_for(1)
    assert sent.path == "/v21.0/1234567890/messages"
    assert sent.headers["authorization"] == "Bearer test-token"
    message = sent.json()
    assert message["to"] == "250788000042"
    assert message["type"] == "interactive"
    assert message["interactive"]["type"] == "list"
    rows = message["interactive"]["action"]["sections"][0]["rows"]
    assert [row["id"] for row in rows][:2] == ["rides", "insurance"]
    assert world.services.received == []


async def test_home_from_a_sender_in_a_session_clears_it(world: World) -> None:
    sender = "250788000043"
    await world.daemon.send_text("jobs", sender=sender)
    r = await world.daemon.send_text("home", sender=sender)
    assert r.headers["X-Routed-Service"] == "wacored"
    after = await world.daemon.send_text("I want to apply", sender=sender)
    assert after.json()["routes"][0] == {
        "message_id": after.json()["routes"][0]["message_id"],
        "service": "wacored",
        "reason": "fallback",
    }


async def test_a_sender_in_jobs_stays_in_jobs(world: World) -> None:
    sender = "250788000044"
    await world.daemon.send_text("jobs", sender=sender)
    r = await world.daemon.send_text("I want to apply", sender=sender)
    assert r.headers["X-Routed-Service"] == "jobs"
    assert r.json()["routes"][0]["reason"] == "state"
    got = await world.services.wait_for(2, "/jobs")
    assert got[1].headers["x-route-reason"] == "state"


async def test_unknown_text_falls_back_to_the_menu(world: World) -> None:
    r = await world.daemon.send_text("what is this?", sender="250788000045")
    assert r.headers["X-Routed-Service"] == "wacored"
    assert r.json()["routes"][0]["reason"] == "fallback"
    await world.graph.wait_for(1)


async def test_31st_message_in_a_window_is_rate_limited(world: World) -> None:
    sender = "250788000046"
    for _ in range(30):
        assert (await world.daemon.send_text("hello", sender=sender)).status_code == 200
    r = await world.daemon.send_text("hello", sender=sender)
    assert r.status_code == 429
    assert r.json()["error"] == "rate_limit_exceeded"
    assert r.json()["retryAfter"] >= 1
    assert r.headers["Retry-After"] == str(r.json()["retryAfter"])
    other = await world.daemon.send_text("hello", sender="250788000047")
    assert other.status_code == 200


async def test_correlation_id_is_echoed_and_forwarded(world: World) -> None:
    r = await world.daemon.send_text("rides", headers={"X-Correlation-ID": "corr-123"})
    assert r.headers["X-Correlation-ID"] == "corr-123"
    [got] = await world.services.wait_for(1, "/rides")
    assert got.headers["x-correlation-id"] == "corr-123"


async def test_latency_header_is_in_milliseconds(world: World) -> None:
    r = await world.daemon.send_text("rides")
    assert re.match(r"^\d+ms$", r.headers["X-WA-Core-Latency"])


async def test_generated_request_id_is_a_uuid4(world: World) -> None:
    r = await world.daemon.send_text("rides")
    assert uuid.UUID(r.headers["X-Request-ID"]).version == 4
    assert uuid.UUID(r.headers["X-Correlation-ID"]).version == 4


def test_new_ids_are_canonical_random_uuid4s() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, value)
    # Every variant digit (8, 9, a, b) and every other hex digit turns up: the bits are random.
    assert {value[19] for value in ids} == set("89ab")
    assert {value[20] for value in ids} == set("0123456789abcdef")


# --- the external contract ------------------------------------------------------------------------


async def test_handshake_echoes_the_challenge(world: World) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    r = await world.daemon.client.get(f"{world.daemon.url}/webhook", params=params)
    assert r.status_code == 200
    assert r.text == "1158201444"
    assert r.headers["content-type"].startswith("text/plain")


async def test_handshake_with_a_wrong_token_is_forbidden(world: World) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"}
    r = await world.daemon.client.get(f"{world.daemon.url}/webhook", params=params)
    assert r.status_code == 403
    assert r.json() == {"error": "forbidden"}


async def test_missing_and_wrong_signatures_are_refused(world: World) -> None:
    body = text_webhook(text="rides", sender="250788000001", wamid="wamid.SIG", timestamp=1)
    missing = await world.daemon.post(body, signed=False)
    wrong = await world.daemon.post(body, {"X-Hub-Signature-256": "sha256=" + "0" * 64})
    other_body = await world.daemon.post(body + b" ", {"X-Hub-Signature-256": signature_of(body)})
    for r in (missing, wrong, other_body):
        assert r.status_code == 401
        assert r.json() == {"error": "unauthorized"}
        assert re.match(r"^\d+ms$", r.headers["X-WA-Core-Latency"])
    # Nothing was stored: the same message, correctly signed, is new.
    assert (await world.daemon.post(body)).json()["accepted"] == 1


def signature_of(body: bytes) -> str:
    from wacored.core.whatsapp import sign

    return sign(SECRET, body)


async def test_non_json_and_non_whatsapp_bodies_are_bad_requests(world: World) -> None:
    for body in (b"not json", b"[]", json.dumps({"object": "page", "entry": []}).encode()):
        r = await world.daemon.post(body)
        assert r.status_code == 400
        assert r.json()["error"] == "bad_request"
        assert r.json()["detail"]


async def raw_request(url: str, head: bytes, chunks: list[bytes] = ()) -> bytes:
    """Send raw HTTP/1.1 bytes and read the answer's head (the client never sends more than given)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head)
        for chunk in chunks:
            try:
                await stream.send_all(chunk)
            except trio.BrokenResourceError:
                break  # the server answered and closed early: that is the point
        answer = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in answer:
                data = await stream.receive_some()
                if not data:
                    break
                answer += data
    return answer


async def test_oversize_body_is_refused_before_reading(world: World) -> None:
    limit = world.daemon.config.server.max_body_bytes
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\nX-Hub-Signature-256: sha256=00\r\n\r\n"
    ).encode()
    answer = await raw_request(world.daemon.url, head)  # not one byte of the body is sent
    assert answer.startswith(b"HTTP/1.1 413")


async def test_oversize_chunked_body_is_cut_off(world: World) -> None:
    limit = world.daemon.config.server.max_body_bytes
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
    answer = await raw_request(world.daemon.url, head, [chunk] * (limit // 0x10000 + 2))
    assert answer.startswith(b"HTTP/1.1 413")


async def test_a_redelivered_message_is_a_duplicate_and_forwarded_once(world: World) -> None:
    body = text_webhook(text="rides", sender="250788000050", wamid="wamid.DUP", timestamp=1)
    first = await world.daemon.post(body)
    again = await world.daemon.post(body)
    assert first.json()["accepted"] == 1
    assert again.status_code == 200
    assert again.json() == {"accepted": 0, "duplicates": 1, "statuses": 0, "routes": []}
    assert "X-Routed-Service" not in again.headers
    await world.services.wait_for(1, "/rides")
    await until_settled(world.tmp_path / "wacored.db")
    assert len(world.services.on("/rides")) == 1


async def test_forwarded_request_follows_the_contract(world: World) -> None:
    r = await world.daemon.send_text("rides", headers={"X-Request-ID": "req-1", "X-Evil": "copied?"})
    [got] = await world.services.wait_for(1, "/rides")
    h = got.headers
    assert h["content-type"] == "application/json"
    assert h["x-request-id"] == "req-1"
    assert h["idempotency-key"] == r.json()["routes"][0]["message_id"]
    assert h["x-routed-from"] == "wacored"
    assert h["x-routed-service"] == "rides"
    assert h["x-route-reason"] == "keyword"
    assert re.match(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$", h["traceparent"])
    assert readme_verify()(SIGNING_SECRET, h, got.body)
    assert h["webhook-id"] == h["idempotency-key"]
    # Meta's app secret never leaves wacored: nothing forwarded verifies with it.
    assert "x-hub-signature-256" not in h
    assert not readme_verify()("whsec_" + base64.b64encode(SECRET.encode()).decode(), h, got.body)
    assert "x-evil" not in h
    doc = got.json()
    assert doc["object"] == "whatsapp_business_account"
    assert len(doc["entry"][0]["changes"][0]["value"]["messages"]) == 1


async def test_statuses_are_counted_and_dropped_by_default(world: World) -> None:
    from .conftest import FIXTURES

    body = (FIXTURES / "status_read.json").read_bytes()
    r = await world.daemon.post(body)
    assert r.status_code == 200
    assert r.json() == {"accepted": 0, "duplicates": 0, "statuses": 1, "routes": []}
    health = (await world.daemon.client.get(f"{world.daemon.url}/health")).json()
    assert health["checks"]["requests"]["accepted"] == 1


async def test_one_senders_messages_arrive_in_order(world: World) -> None:
    sender = "250788000060"
    await world.daemon.send_text("rides", sender=sender)
    for i in range(20):
        await world.daemon.send_text(f"stop {i}", sender=sender)
    got = await world.services.wait_for(21, "/rides")
    assert [g.message["text"]["body"] for g in got] == ["rides"] + [f"stop {i}" for i in range(20)]


def batch(*messages: dict[str, object], sender: str = "250788000090") -> bytes:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "1234567890"},
        "contacts": [{"profile": {"name": "A"}, "wa_id": sender}],
        "messages": [{"from": sender, "timestamp": "1700000000", **m} for m in messages],
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(doc).encode()


async def test_the_messages_of_one_batch_are_routed_in_order(world: World) -> None:
    body = batch(
        {"id": "wamid.B1", "type": "text", "text": {"body": "rides"}},
        {"id": "wamid.B2", "type": "location", "location": {"latitude": 1.0, "longitude": 2.0}},
        {"id": "wamid.B3", "type": "hologram", "hologram": {"depth": 3}},
        {"id": "wamid.B4", "type": "text", "text": {"body": "EXIT "}},
        {"id": "wamid.B5", "type": "text", "text": {"body": "anything"}},
    )
    r = await world.daemon.post(body)
    assert [(x["service"], x["reason"]) for x in r.json()["routes"]] == [
        ("rides", "keyword"),
        ("rides", "state"),
        ("rides", "state"),
        ("wacored", "home_menu"),
        ("wacored", "fallback"),
    ]
    got = await world.services.wait_for(3, "/rides")
    assert [g.message["id"] for g in got] == ["wamid.B1", "wamid.B2", "wamid.B3"]


async def test_non_ascii_bodies_are_verified_on_their_raw_bytes(world: World) -> None:
    # Meta escapes non-ASCII as \uXXXX; the signature covers those exact bytes, not a re-encoding.
    body = batch({"id": "wamid.NA", "type": "text", "text": {"body": "rides"}}).replace(
        b'"name": "A"', b'"name": "Ren\\u00e9e \\ud83d\\ude95"'
    )
    assert b"\\u00e9" in body
    r = await world.daemon.post(body)
    assert r.status_code == 200
    [got] = await world.services.wait_for(1, "/rides")
    assert got.json()["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"] == "Renée 🚕"
    assert readme_verify()(SIGNING_SECRET, got.headers, got.body)


async def test_one_lane_reuses_its_connection(world: World) -> None:
    # A forward that left its response body unread would cost a new TCP connection every time.
    sender = "250788000095"
    for text in ("rides", "a", "b", "c", "d"):
        await world.daemon.send_text(text, sender=sender)
    got = await world.services.wait_for(5, "/rides")
    assert len({g.client for g in got}) == 1


async def test_a_caller_that_leaves_mid_body_changes_nothing(world: World) -> None:
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\nX-Hub-Signature-256: sha256=00\r\n\r\n{"
    host, port = world.daemon.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(head)
    await stream.aclose()
    with trio.fail_after(5):
        while True:
            health = (await world.daemon.client.get(f"{world.daemon.url}/health")).json()
            if health["checks"]["requests"].get("client_gone"):
                break
            await trio.sleep(0.02)
    assert health["status"] == "healthy"
    assert (await world.daemon.send_text("rides")).status_code == 200

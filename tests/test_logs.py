"""wacored.observe.logs: one JSON object per line, masked phone numbers, no secrets; ids on ingress lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.conftest import World
from wacored.cli import parser
from wacored.observe import logs


def line(msg: str = "hello", *args: object, **extra: Any) -> dict[str, Any]:
    record = logging.makeLogRecord(
        {"name": "wacored.test", "levelno": logging.WARNING, "levelname": "WARNING", "msg": msg, "args": args, **extra}
    )
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    return json.loads(text)  # type: ignore[no-any-return]


def test_a_line_has_timestamp_level_event_and_the_ids_passed() -> None:
    doc = line(event="delivered", service="rides", message_id="wamid.X", request_id="r-1", correlation_id="c-1")
    assert doc["timestamp"].endswith("+00:00")
    assert doc["level"] == "warning"
    assert doc["event"] == "delivered"
    assert {k: doc[k] for k in ("service", "message_id", "request_id", "correlation_id")} == {
        "service": "rides",
        "message_id": "wamid.X",
        "request_id": "r-1",
        "correlation_id": "c-1",
    }


@pytest.mark.parametrize("field", ["sender", "phone", "to", "recipient", "recipient_id", "wa_id"])
def test_phone_fields_are_masked(field: str) -> None:
    assert line(**{field: "250788000001"})[field] == "2507****001"


def test_short_values_are_masked_whole() -> None:
    assert line(sender="12345")["sender"] == "****"


def test_digit_runs_in_the_message_and_errors_are_masked() -> None:
    doc = line("no session for %s (order 1234567)", "250788000001", error="HTTP 400: 250788999999 unknown")
    assert doc["msg"] == "no session for 2507****001 (order 1234567)"
    assert doc["error"] == "HTTP 400: 2507****999 unknown"


@pytest.mark.parametrize("field", ["text", "body", "access_token", "app_secret", "authorization", "verify_token"])
def test_text_and_secrets_are_never_written(field: str) -> None:
    doc = line(**{field: "EAAG-very-secret 250788000001"})
    assert doc[field] == logs.REDACTED


def test_bound_ids_apply_inside_the_block_only() -> None:
    with logs.bound(request_id="r-9", correlation_id="c-9"):
        inside = line()
    outside = line()
    assert (inside["request_id"], inside["correlation_id"]) == ("r-9", "c-9")
    assert "request_id" not in outside


def test_run_log_level_defaults_to_the_config() -> None:
    assert parser().parse_args(["run"]).log_level is None
    assert parser().parse_args(["run", "--log-level", "debug"]).log_level == "debug"


class JsonLines(logging.Handler):
    """What the ``wacored`` loggers write, formatted the way `logs.setup` does: in the emitting task."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self._changed.set()
        self._changed = trio.Event()

    def text(self) -> str:
        return "\n".join(self.lines)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [doc for doc in map(json.loads, self.lines) if doc["event"] == event]

    async def wait_for(self, event: str) -> list[dict[str, Any]]:
        with trio.fail_after(10):
            while not (found := self.events(event)):
                await self._changed.wait()
        return found


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("wacored")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_ingress_lines_carry_the_request_and_correlation_ids(world: World, json_lines: JsonLines) -> None:
    body = b'{"object": "whatsapp_business_account", "entry": []}'
    headers = {"X-Request-ID": "req-42", "X-Correlation-ID": "corr-42", "X-Hub-Signature-256": "sha256=00"}
    assert (await world.daemon.post(body, headers, signed=False)).status_code == 401
    [refused] = json_lines.events("webhook_bad_signature")
    assert (refused["request_id"], refused["correlation_id"]) == ("req-42", "corr-42")
    assert refused["status"] == 401


async def test_no_log_line_of_a_routed_message_holds_its_text_or_number(world: World, json_lines: JsonLines) -> None:
    await world.daemon.send_text("rides secret words", sender="250788123456")
    await world.daemon.send_text("rides", sender="250788123456")
    await world.services.wait_for(1, "/rides")
    await world.daemon.client.get(
        f"{world.daemon.url}/webhook", params={"hub.mode": "subscribe", "hub.verify_token": "wrong"}
    )
    text = json_lines.text()
    assert json_lines.events("handshake_refused")
    assert "secret words" not in text
    assert "250788123456" not in text
    assert "test-app-secret" not in text
    assert "test-verify-token" not in text


async def test_forwarder_lines_carry_the_message_ids(world: World, json_lines: JsonLines) -> None:
    async def refuse(_: object) -> int:
        return 400

    world.services.respond = refuse
    r = await world.daemon.send_text("rides", headers={"X-Request-ID": "req-7", "X-Correlation-ID": "corr-7"})
    [line] = await json_lines.wait_for("dead_lettered")
    assert {k: line[k] for k in ("service", "message_id", "request_id", "correlation_id")} == {
        "service": "rides",
        "message_id": r.json()["routes"][0]["message_id"],
        "request_id": "req-7",
        "correlation_id": "corr-7",
    }


def test_journald_lines_carry_their_priority() -> None:
    import logging

    from wacored.observe.logs import JournaldFormatter

    for level, prefix in (
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ):
        record = logging.LogRecord("wacored.x", level, __file__, 1, "said", None, None)
        line = JournaldFormatter().format(record)
        assert line.startswith(prefix + "{")
        assert json.loads(line[len(prefix) :])["msg"] == "said"

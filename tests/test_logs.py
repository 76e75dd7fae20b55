"""wacored.logs: one JSON object per line, masked phone numbers, no secrets; ids on ingress lines."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from wacored import logs
from wacored.cli import parser


def line(msg: str = "hello", *args: object, **extra: Any) -> dict[str, Any]:
    record = logging.makeLogRecord({"name": "wacored.test", "levelno": logging.WARNING, "levelname": "WARNING",
                                    "msg": msg, "args": args, **extra})
    text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    return json.loads(text)  # type: ignore[no-any-return]


def test_a_line_has_timestamp_level_event_and_the_ids_passed() -> None:
    doc = line(event="delivered", service="rides", message_id="wamid.X", request_id="r-1", correlation_id="c-1")
    assert doc["timestamp"].endswith("+00:00")
    assert doc["level"] == "warning"
    assert doc["event"] == "delivered"
    assert {k: doc[k] for k in ("service", "message_id", "request_id", "correlation_id")} == {
        "service": "rides", "message_id": "wamid.X", "request_id": "r-1", "correlation_id": "c-1"}


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

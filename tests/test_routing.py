"""wacored.core.routing: menu words, keywords, interactive replies, live sessions, fallback, in that order."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from wacored.config import Config
from wacored.core.routing import Decision, Reason, RoutingTable, SessionAction, decide
from wacored.core.whatsapp import InboundMessage

SHIPPED = Path(__file__).resolve().parent.parent / "wacored.toml"

HOME = Decision("wacored", Reason.HOME_MENU, SessionAction.END)
FALLBACK = Decision("wacored", Reason.FALLBACK, SessionAction.KEEP)


def shipped_data() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text(encoding="utf-8"))


def table_of(data: dict[str, Any]) -> RoutingTable:
    return RoutingTable.from_config(Config.from_mapping(data, {}))


@pytest.fixture
def table() -> RoutingTable:
    return table_of(shipped_data())


def inbound(text: str | None = None, *, reply_id: str | None = None, kind: str = "text") -> InboundMessage:
    return InboundMessage(
        wamid="wamid.T",
        sender="250788000001",
        phone="250788000001",
        bsuid=None,
        type=kind,
        text=text,
        reply_id=reply_id,
        body=b"{}",
    )


def reply(reply_id: str, kind: str = "interactive") -> InboundMessage:
    return inbound(None, reply_id=reply_id, kind=kind)


def test_reason_values_are_the_contract_header_values() -> None:
    assert [r.value for r in Reason] == ["home_menu", "keyword", "interactive", "state", "fallback"]


@pytest.mark.parametrize("word", ["menu", "MENU", "  Home ", "exit\n", "Exit"])
@pytest.mark.parametrize("session", [None, "rides"])
def test_menu_word_ends_the_session_and_sends_the_home_menu(
    table: RoutingTable, word: str, session: str | None
) -> None:
    decision = decide(table, inbound(word), session)
    assert decision == HOME
    assert decision.sends_home_menu


def test_menu_word_as_reply_id(table: RoutingTable) -> None:
    assert decide(table, reply("Menu"), "jobs") == HOME


@pytest.mark.parametrize(
    ("text", "service"),
    [
        ("rides", "rides"),
        ("RIDES", "rides"),
        ("  Mobility  ", "rides"),
        ("rides_agent", "rides"),
        ("help", "ai_agents"),
        ("1", "rides"),
        (" 2 ", "insurance"),
        ("3", "jobs"),
        ("4", "property"),
        ("5", "wallet"),
        ("6", "marketplace"),
        ("7", "ai_agents"),
    ],
)
@pytest.mark.parametrize("session", [None, "jobs"])
def test_keyword_starts_a_session(table: RoutingTable, text: str, service: str, session: str | None) -> None:
    assert decide(table, inbound(text), session) == Decision(service, Reason.KEYWORD, SessionAction.START)


@pytest.mark.parametrize(
    ("message", "service"),
    [
        (reply("jobs"), "jobs"),
        (reply(" Wallet "), "wallet"),
        (reply("3"), "jobs"),
        (reply("rides", kind="button"), "rides"),
    ],
)
@pytest.mark.parametrize("session", [None, "insurance"])
def test_interactive_reply_id_starts_a_session(
    table: RoutingTable, message: InboundMessage, service: str, session: str | None
) -> None:
    assert decide(table, message, session) == Decision(service, Reason.INTERACTIVE, SessionAction.START)


@pytest.mark.parametrize("text", ["rides please", "I need rides", "ride", "1.", "11", "menu please", ""])
def test_partial_text_is_not_a_keyword(table: RoutingTable, text: str) -> None:
    assert decide(table, inbound(text), None) == FALLBACK
    assert decide(table, inbound(text), "jobs") == Decision("jobs", Reason.STATE, SessionAction.TOUCH)


@pytest.mark.parametrize("kind", ["image", "location", "audio", "sticker", "hologram"])
def test_live_session_routes_any_type(table: RoutingTable, kind: str) -> None:
    message = inbound(None, kind=kind)
    assert decide(table, message, "property") == Decision("property", Reason.STATE, SessionAction.TOUCH)


def test_unknown_reply_id_follows_the_session(table: RoutingTable) -> None:
    decision = decide(table, reply("callback_data"), "wallet")
    assert decision == Decision("wallet", Reason.STATE, SessionAction.TOUCH)


@pytest.mark.parametrize("message", [inbound("hello"), inbound(None, kind="image"), reply("callback_data")])
def test_no_session_falls_back_to_the_home_menu(table: RoutingTable, message: InboundMessage) -> None:
    decision = decide(table, message, None)
    assert decision == FALLBACK
    assert decision.sends_home_menu


def test_fallback_to_a_service() -> None:
    data = shipped_data()
    data["routing"]["fallback"] = "ai_agents"
    decision = decide(table_of(data), inbound("hello"), None)
    assert decision == Decision("ai_agents", Reason.FALLBACK, SessionAction.KEEP)
    assert not decision.sends_home_menu


def test_configured_menu_words_replace_the_defaults() -> None:
    data = shipped_data()
    data["routing"]["menu_words"] = ["Inicio", " START "]
    table = table_of(data)
    assert decide(table, inbound("inicio"), "rides") == HOME
    assert decide(table, inbound("start"), "rides") == HOME
    assert decide(table, inbound("menu"), "rides") == Decision("rides", Reason.STATE, SessionAction.TOUCH)

"""wacored.core.whatsapp: signatures, webhook parsing over real Meta payloads, and outbound messages."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from wacored.config import HomeMenuConfig, MenuItem
from wacored.core.whatsapp import (
    InboundMessage,
    PayloadError,
    encode,
    home_menu_message,
    parse_webhook,
    sign,
    signature_valid,
    text_webhook,
    truncate,
)

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))
SECRET = "app-secret"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def only_message(raw: bytes) -> InboundMessage:
    [message] = parse_webhook(raw).messages
    return message


def updates(doc: dict[str, Any], kind: str) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(entry, change, update) for every update of `kind` ("messages"/"statuses") in `doc`, in order."""
    return [
        (entry, change, update)
        for entry in doc["entry"]
        for change in entry["changes"]
        for update in change["value"].get(kind, [])
    ]


def value_errors(doc: dict[str, Any]) -> int:
    return sum(len(chg["value"].get("errors", [])) for entry in doc["entry"] for chg in entry["changes"])


# -- synthetic payloads ----------------------------------------------------------------------------


def text_msg(wamid: str, sender: str, text: str = "hi") -> dict[str, Any]:
    return {"from": sender, "id": wamid, "timestamp": "1700000000", "type": "text", "text": {"body": text}}


def contact(sender: str) -> dict[str, Any]:
    return {"profile": {"name": f"user {sender}"}, "wa_id": sender}


def status(status_id: str, state: str, recipient: str = "250788000001") -> dict[str, Any]:
    return {"id": status_id, "status": state, "timestamp": "1700000000", "recipient_id": recipient}


def change(messages: Sequence[Any] = (), statuses: Sequence[Any] = (), contacts: Sequence[Any] = ()) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": "PNID"},
    }
    if contacts:
        value["contacts"] = list(contacts)
    if messages:
        value["messages"] = list(messages)
    if statuses:
        value["statuses"] = list(statuses)
    return {"value": value, "field": "messages"}


def webhook(*entries: tuple[str, list[dict[str, Any]]]) -> bytes:
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": entry_id, "changes": changes} for entry_id, changes in entries],
    }
    return json.dumps(doc).encode()


def one_message_webhook(message: dict[str, Any], contacts: Sequence[Any] = ()) -> bytes:
    return webhook(("WABA", [change([message], contacts=contacts)]))


# -- signatures ------------------------------------------------------------------------------------


def test_sign_is_meta_header_format() -> None:
    # RFC-style known vector: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
    expected = "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert sign("key", b"The quick brown fox jumps over the lazy dog") == expected


def test_right_signature_is_valid() -> None:
    body = fixture("msg_text.json")
    assert signature_valid(SECRET, body, sign(SECRET, body))


@pytest.mark.parametrize(
    ("secret", "header"),
    [
        pytest.param(SECRET, sign("other-secret", b"{}"), id="wrong-secret"),
        pytest.param(SECRET, sign(SECRET, b"{} "), id="other-body"),
        pytest.param(SECRET, None, id="missing"),
        pytest.param(SECRET, "", id="empty-header"),
        pytest.param(SECRET, sign(SECRET, b"{}").replace("sha256=", "sha1="), id="wrong-prefix"),
        pytest.param(SECRET, sign(SECRET, b"{}").removeprefix("sha256="), id="no-prefix"),
        pytest.param("", sign("", b"{}"), id="empty-secret"),
    ],
)
def test_bad_signature_is_invalid(secret: str, header: str | None) -> None:
    assert not signature_valid(secret, b"{}", header)


META_ESCAPED = (
    b'{"object":"whatsapp_business_account","entry":[{"id":"WABA","changes":[{"value":'
    b'{"messaging_product":"whatsapp","messages":[{"from":"250788000001","id":"wamid.E",'
    b'"timestamp":"1700000000","type":"text","text":{"body":"caf\\u00e9 cr\\u00e8me"}}]},'
    b'"field":"messages"}]}]}'
)


def test_signature_covers_the_raw_escaped_bytes_not_a_reserialisation() -> None:
    header = sign(SECRET, META_ESCAPED)
    assert signature_valid(SECRET, META_ESCAPED, header)
    reserialised = json.dumps(json.loads(META_ESCAPED), separators=(",", ":"), ensure_ascii=False).encode()
    assert reserialised != META_ESCAPED
    assert not signature_valid(SECRET, reserialised, header)
    assert only_message(META_ESCAPED).text == "café crème"


def test_signature_over_raw_utf8_fixture() -> None:
    body = fixture("msg_reaction.json")
    assert "😮".encode() in body
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body) == expected
    assert signature_valid(SECRET, body, expected)


# -- every fixture ---------------------------------------------------------------------------------


def test_fixtures_are_present() -> None:
    assert len(FIXTURE_FILES) >= 30


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_counts_match_the_file(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    batch = parse_webhook(path.read_bytes())
    assert len(batch.messages) == len(updates(doc, "messages"))
    assert len(batch.statuses) == len(updates(doc, "statuses"))
    assert batch.errors == value_errors(doc)


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("msg_text.json", (1, 0, 0)),
        ("batch_two_changes_text.json", (2, 0, 0)),
        ("msg_interactive_with_value_errors.json", (1, 0, 1)),
        ("value_errors_130429_rate_limit_meta_docs.json", (0, 0, 1)),
        ("status_failed_130472.json", (0, 1, 0)),
        ("msg_unsupported_131051.json", (1, 0, 0)),
    ],
)
def test_known_fixture_counts(name: str, counts: tuple[int, int, int]) -> None:
    batch = parse_webhook(fixture(name))
    assert (len(batch.messages), len(batch.statuses), batch.errors) == counts


def assert_single_update(body: bytes, entry: dict[str, Any], chg: dict[str, Any], kind: str, update: Any) -> None:
    """`body` is a WhatsApp webhook holding only `update`, under its entry id, field and metadata."""
    forwarded = json.loads(body)
    assert forwarded["object"] == "whatsapp_business_account"
    [fwd_entry] = forwarded["entry"]
    assert fwd_entry["id"] == entry["id"]
    [fwd_change] = fwd_entry["changes"]
    assert fwd_change["field"] == chg["field"]
    value = fwd_change["value"]
    assert value["messaging_product"] == "whatsapp"
    assert value.get("metadata") == chg["value"].get("metadata")
    assert value[kind] == [update]
    other = {"messages", "statuses"} - {kind}
    assert not other & value.keys()
    assert "errors" not in value


def sender_contacts(value: dict[str, Any], message: dict[str, Any]) -> list[Any]:
    return [
        c
        for c in value.get("contacts", [])
        if ("from" in message and c.get("wa_id") == message["from"])
        or ("from_user_id" in message and c.get("user_id") == message["from_user_id"])
    ]


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_each_fixture_message_is_forwarded_alone(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    batch = parse_webhook(path.read_bytes())
    for message, (entry, chg, original) in zip(batch.messages, updates(doc, "messages"), strict=True):
        assert message.wamid == original["id"]
        assert_single_update(message.body, entry, chg, "messages", original)
        forwarded_value = json.loads(message.body)["entry"][0]["changes"][0]["value"]
        assert forwarded_value.get("contacts", []) == sender_contacts(chg["value"], original)
        assert parse_webhook(message.body).messages == (message,)


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_each_fixture_status_is_forwarded_alone(path: Path) -> None:
    doc = json.loads(path.read_bytes())
    batch = parse_webhook(path.read_bytes())
    for update, (entry, chg, original) in zip(batch.statuses, updates(doc, "statuses"), strict=True):
        assert (update.status_id, update.status) == (original["id"], original["status"])
        assert_single_update(update.body, entry, chg, "statuses", original)


@pytest.mark.parametrize(
    ("name", "status_id", "state", "recipient"),
    [
        ("status_sent.json", "wamid.xyzxyz", "sent", "972987654321"),
        ("status_delivered.json", "wamid.xyzxyz", "delivered", "972987654321"),
        ("status_read_group.json", "<WHATSAPP_MESSAGE_ID>", "read", "fowefinoewcnw"),
        (
            "status_failed_131049_meta_docs.json",
            "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBI0QUQ2MjA4NEYyRkExNjMyREUA",
            "failed",
            "16505551234",
        ),
    ],
)
def test_status_fields(name: str, status_id: str, state: str, recipient: str) -> None:
    [update] = parse_webhook(fixture(name)).statuses
    assert (update.status_id, update.status, update.recipient) == (status_id, state, recipient)
    assert update.key == f"{status_id}:{state}"


# -- what routing reads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "text", "reply_id"),
    [
        ("msg_text.json", "text", "Body Text", None),
        ("msg_text_reply_context.json", "text", "replied text", None),
        ("msg_text_with_ad_referral.json", "text", "BODY", None),
        ("msg_interactive_button_reply.json", "interactive", None, "callback_data"),
        ("msg_interactive_list_reply.json", "interactive", None, "callback_data"),
        ("msg_button_template_quick_reply.json", "button", None, "callback_data"),
        ("msg_interactive_with_value_errors.json", "interactive", None, None),
        ("msg_image.json", "image", None, None),
        ("msg_location_named.json", "location", None, None),
        ("msg_reaction.json", "reaction", None, None),
        ("msg_system_user_changed_number.json", "system", None, None),
        ("msg_unsupported_type_edit_meta_docs.json", "unsupported", None, None),
    ],
)
def test_text_and_reply_id(name: str, kind: str, text: str | None, reply_id: str | None) -> None:
    message = only_message(fixture(name))
    assert (message.type, message.text, message.reply_id) == (kind, text, reply_id)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            {
                "type": "interactive",
                "interactive": {"type": "button_reply", "button_reply": {"id": "rides", "title": "Rides"}},
            },
            id="button_reply",
        ),
        pytest.param(
            {
                "type": "interactive",
                "interactive": {
                    "type": "list_reply",
                    "list_reply": {"id": "rides", "title": "Rides", "description": "d"},
                },
            },
            id="list_reply",
        ),
        pytest.param({"type": "button", "button": {"payload": "rides", "text": "Rides"}}, id="quick_reply"),
    ],
)
def test_reply_id_kinds(message: dict[str, Any]) -> None:
    raw = one_message_webhook({"from": "250788000001", "id": "wamid.R", **message})
    assert only_message(raw).reply_id == "rides"


def test_sender_is_the_phone_number() -> None:
    message = only_message(fixture("msg_text.json"))
    assert (message.sender, message.phone, message.bsuid) == ("972987654321", "972987654321", None)


def test_bsuid_fixture_keeps_phone_as_sender() -> None:
    message = only_message(fixture("msg_text_v25_bsuid_username.json"))
    assert (message.sender, message.phone) == ("16315551181", "16315551181")
    assert message.bsuid == "US.13491208655302741918"
    assert message.text == "this is a text message"


def test_bsuid_only_sender() -> None:
    msg = {"from_user_id": "US.42", "id": "wamid.B", "timestamp": "1", "type": "text", "text": {"body": "hi"}}
    contacts = [{"profile": {"name": "b"}, "user_id": "US.42"}, contact("250788000009")]
    message = only_message(one_message_webhook(msg, contacts))
    assert (message.sender, message.phone, message.bsuid) == ("US.42", None, "US.42")
    forwarded = json.loads(message.body)["entry"][0]["changes"][0]["value"]
    assert forwarded["contacts"] == [contacts[0]]


def test_batch_with_two_changes_keeps_both_even_with_the_same_wamid() -> None:
    messages = parse_webhook(fixture("batch_two_changes_text.json")).messages
    assert [(m.wamid, m.text) for m in messages] == [
        ("wamid.ID", "MESSAGE_BODY"),
        ("wamid.ID", "MESSAGE_BODY2"),
    ]
    assert messages[0].body != messages[1].body


def test_several_messages_in_one_change_in_order_each_with_its_contact() -> None:
    senders = ["250788000001", "250788000002", "250788000003"]
    msgs = [text_msg(f"wamid.{i}", s) for i, s in enumerate(senders)]
    batch = parse_webhook(webhook(("WABA", [change(msgs, contacts=[contact(s) for s in senders])])))
    assert [m.wamid for m in batch.messages] == ["wamid.0", "wamid.1", "wamid.2"]
    for message in batch.messages:
        forwarded = json.loads(message.body)["entry"][0]["changes"][0]["value"]
        assert forwarded["contacts"] == [contact(message.sender)]


def test_several_changes_and_entries_in_order_each_under_its_entry() -> None:
    raw = webhook(
        ("E1", [change([text_msg("wamid.1", "a")]), change([text_msg("wamid.2", "b")])]),
        ("E2", [change([text_msg("wamid.3", "c"), text_msg("wamid.4", "a")])]),
    )
    messages = parse_webhook(raw).messages
    assert [m.wamid for m in messages] == ["wamid.1", "wamid.2", "wamid.3", "wamid.4"]
    entry_ids = [json.loads(m.body)["entry"][0]["id"] for m in messages]
    assert entry_ids == ["E1", "E1", "E2", "E2"]


def test_messages_mixed_with_statuses() -> None:
    raw = webhook(
        ("E1", [change([text_msg("wamid.1", "a")], [status("wamid.S1", "sent")])]),
        ("E2", [change(statuses=[status("wamid.S1", "delivered")]), change([text_msg("wamid.2", "b")])]),
    )
    batch = parse_webhook(raw)
    assert [m.wamid for m in batch.messages] == ["wamid.1", "wamid.2"]
    assert [s.key for s in batch.statuses] == ["wamid.S1:sent", "wamid.S1:delivered"]
    assert batch.errors == 0


def test_dropped_status_updates_are_checked_and_counted_but_get_no_envelope() -> None:
    other = change(statuses=[status("wamid.S2", "read")])
    other["value"]["metadata"]["phone_number_id"] = "KEPT"
    raw = webhook(("E1", [change([text_msg("wamid.1", "a")], [status("wamid.S1", "sent")]), other]))
    asked: list[str | None] = []

    def keeps(number: str | None) -> bool:
        asked.append(number)
        return number == "KEPT"

    batch = parse_webhook(raw, keeps)
    assert asked == ["PNID", "KEPT"]  # once a change, not once an update
    assert [(s.key, s.number, s.body) for s in batch.statuses][0] == ("wamid.S1:sent", "PNID", b"")
    assert batch.statuses[1].body == parse_webhook(raw).statuses[1].body != b""
    assert batch.messages == parse_webhook(raw).messages  # messages are never dropped here
    bad = webhook(("E1", [change(statuses=[status("wamid bad id", "sent")])]))
    with pytest.raises(PayloadError, match=r"statuses\[0\]\.id is not printable ASCII"):
        parse_webhook(bad, lambda number: False)  # a dropped update's ids are checked all the same


def test_unknown_message_type_parses() -> None:
    hologram = {"from": "250788000001", "id": "wamid.H", "timestamp": "1", "type": "hologram", "hologram": {"depth": 3}}
    message = only_message(one_message_webhook(hologram))
    assert (message.type, message.text, message.reply_id) == ("hologram", None, None)
    assert json.loads(message.body)["entry"][0]["changes"][0]["value"]["messages"] == [hologram]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="json-array"),
        pytest.param(b'{"object":"page","entry":[]}', id="wrong-object"),
        pytest.param(b'{"object":"whatsapp_business_account","entry":{}}', id="entry-not-a-list"),
        pytest.param(b'{"object":"whatsapp_business_account","entry":[5]}', id="entry-item-not-an-object"),
        pytest.param(b'{"object":"whatsapp_business_account","entry":[],"x":"\xff\xfe"}', id="invalid-utf8"),
        pytest.param(
            one_message_webhook({"from": "1", "type": "text", "text": {"body": "SECRET"}}), id="message-without-id"
        ),
        pytest.param(
            one_message_webhook({"id": "wamid.X", "type": "text", "text": {"body": "SECRET"}}),
            id="message-without-sender",
        ),
        pytest.param(webhook(("E", [change(statuses=[{"status": "sent"}])])), id="status-without-id"),
    ],
)
def test_bad_payload_raises_payload_error(raw: bytes) -> None:
    with pytest.raises(PayloadError) as info:
        parse_webhook(raw)
    assert isinstance(info.value, ValueError)
    assert "SECRET" not in str(info.value)


# -- outbound: the home menu -----------------------------------------------------------------------

MENU = HomeMenuConfig(
    header="Services",
    body="What would you like to do?",
    button="View Services",
    items=(
        MenuItem(key="rides", title="Rides & Transport", description="Request a ride"),
        MenuItem(key="jobs", title="Jobs"),
    ),
)


def test_home_menu_is_an_interactive_list_to_the_phone() -> None:
    assert home_menu_message(MENU, "250788000001", "US.42") == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "250788000001",
        "type": "interactive",
        "interactive": {
            "type": "list",
            "header": {"type": "text", "text": "Services"},
            "body": {"text": "What would you like to do?"},
            "action": {
                "button": "View Services",
                "sections": [
                    {
                        "title": "Services",
                        "rows": [
                            {"id": "rides", "title": "Rides & Transport", "description": "Request a ride"},
                            {"id": "jobs", "title": "Jobs"},
                        ],
                    }
                ],
            },
        },
    }


def test_home_menu_goes_to_the_bsuid_recipient_without_a_phone() -> None:
    message = home_menu_message(MENU, None, "US.42")
    assert message["recipient"] == "US.42"
    assert "to" not in message


def interactive(menu: HomeMenuConfig) -> Any:
    return home_menu_message(menu, "250788000001", None)["interactive"]


LONG = "abcdefghij" * 120


@pytest.mark.parametrize(
    ("menu", "where", "limit"),
    [
        pytest.param(HomeMenuConfig(header=LONG), ("header", "text"), 60, id="header"),
        pytest.param(HomeMenuConfig(body=LONG), ("body", "text"), 1024, id="body"),
        pytest.param(HomeMenuConfig(button=LONG), ("action", "button"), 20, id="button"),
        pytest.param(
            HomeMenuConfig(items=(MenuItem("rides", LONG),)),
            ("action", "sections", 0, "rows", 0, "title"),
            24,
            id="row-title",
        ),
        pytest.param(
            HomeMenuConfig(items=(MenuItem("rides", "Rides", LONG),)),
            ("action", "sections", 0, "rows", 0, "description"),
            72,
            id="row-description",
        ),
    ],
)
def test_home_menu_truncates_to_whatsapp_limits(menu: HomeMenuConfig, where: tuple[Any, ...], limit: int) -> None:
    node: Any = interactive(menu)
    for step in where:
        node = node[step]
    assert len(node) == limit
    assert node == LONG[: limit - 1] + "…"


def test_home_menu_section_title_fits_whatsapp_limit() -> None:
    section = interactive(HomeMenuConfig(header=LONG))["action"]["sections"][0]
    assert len(section["title"]) <= 24


@pytest.mark.parametrize(("text", "limit", "expected"), [("abc", 3, "abc"), ("abcd", 3, "ab…"), ("", 5, "")])
def test_truncate(text: str, limit: int, expected: str) -> None:
    assert truncate(text, limit) == expected


def test_encode_is_utf8_json() -> None:
    message = home_menu_message(HomeMenuConfig(header="Café " * 20), "250788000001", None)
    raw = encode(message)
    assert json.loads(raw) == message
    assert "…".encode() in raw


# -- text_webhook (simulate) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text", "reply_id"),
    [
        ("text", "rides", None),
        ("interactive", None, "rides"),
        ("location", None, None),
        ("image", None, None),
    ],
)
def test_text_webhook_parses_back(kind: str, text: str | None, reply_id: str | None) -> None:
    raw = text_webhook(text="rides", sender="250788000001", wamid="wamid.SIM", timestamp=1, kind=kind)
    message = only_message(raw)
    assert (message.wamid, message.sender, message.type) == ("wamid.SIM", "250788000001", kind)
    assert (message.text, message.reply_id) == (text, reply_id)
    value = json.loads(message.body)["entry"][0]["changes"][0]["value"]
    assert value["metadata"]["phone_number_id"] == "PHONE_NUMBER_ID"
    assert [c["wa_id"] for c in value["contacts"]] == ["250788000001"]


def test_text_webhook_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="hologram"):
        text_webhook(text="x", sender="1", wamid="w", timestamp=1, kind="hologram")

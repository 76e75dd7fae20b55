"""The WhatsApp Cloud API protocol, without I/O: signatures, webhook parsing, outbound messages.

A webhook POST body is a batch: ``entry[] x changes[] x value.{messages, statuses, errors}``.
`parse_webhook` walks all of it and returns a `Batch` whose messages and statuses each carry the
body that is forwarded downstream: a WhatsApp-format webhook holding exactly that one update, with its
entry id, the change's field and metadata and only the sender's contacts entry, so an existing
WhatsApp handler accepts it unchanged.

Every id that leaves wacored (a wamid, a status id, a status value, the business number's
``metadata.phone_number_id``) is checked here, at parse time
(`untrusted.id_problem`): one that could not go out as a header is a 400 now, never a stored row that
crashes its delivery later.

The work is linear in the body's size: contacts are indexed once per change, each envelope carries only
its sender's contact, and the bytes of all envelopes together are bounded (`MAX_EXPANSION`), so a
signed batch that multiplies messages by shared parts is refused instead of stored many times over.

Error handling:
    `PayloadError` (a `ValueError`) for a body that is not JSON or not a WhatsApp payload; its message
    is safe to return to the caller (it never quotes message text).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..config import MENU_LIMITS, HomeMenuConfig
from .untrusted import id_problem

SIGNATURE_HEADER = "x-hub-signature-256"
_PREFIX = "sha256="
MAX_EXPANSION = 8
EXPANSION_ALLOWANCE = 64 * 1024
"""The envelopes of one batch together may hold at most ``MAX_EXPANSION`` x the body + this many bytes.
Measured: real shapes take 1.8x (status updates) to 3x (short texts, one shared contact) of their body,
since each envelope repeats ~300 bytes of wrapping, metadata and its sender's contact. A crafted batch
that repeats large shared parts in every envelope is refused: before this bound a 199 KB body stored
98 MB, and 2000 messages x 2000 contacts (0.39 MB) parsed for 3.0 s into 229 MB."""


class PayloadError(ValueError):
    """The body is not a WhatsApp webhook payload."""


def sign(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends for `body`."""
    return _PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """True when `header` is the HMAC-SHA256 of the raw `body` under `secret` (constant time)."""
    if not secret or not header or not header.startswith(_PREFIX) or not header.isascii():
        # compare_digest raises TypeError on a non-ASCII str: such a header is simply wrong.
        return False
    return hmac.compare_digest(sign(secret, body), header.strip())


@dataclass(frozen=True)
class InboundMessage:
    """One user message, with what routing needs and the single-message body to forward."""

    wamid: str
    sender: str
    """The sender's phone number (``from``), or its BSUID (``from_user_id``) when there is none."""
    phone: str | None
    bsuid: str | None
    type: str
    text: str | None
    """The text body of a ``text`` message; None for every other type."""
    reply_id: str | None
    """An interactive button/list reply id, or a template quick reply's payload."""
    body: bytes
    number: str | None = None
    """The business number written to: the change's ``value.metadata.phone_number_id`` (None: absent)."""


@dataclass(frozen=True)
class StatusUpdate:
    """A delivery status of a message the business sent (sent, delivered, read, failed, ...)."""

    status_id: str
    status: str
    recipient: str
    body: bytes
    """The envelope to forward; ``b""`` when its number drops status updates (`parse_webhook`'s
    `keeps_statuses`): such an update is counted, never stored nor forwarded."""
    number: str | None = None
    """The business number that sent the message: the change's ``metadata.phone_number_id``."""

    @property
    def key(self) -> str:
        """The dedupe key: Meta sends one update per id and status."""
        return f"{self.status_id}:{self.status}"


@dataclass(frozen=True)
class Batch:
    messages: tuple[InboundMessage, ...]
    statuses: tuple[StatusUpdate, ...]
    errors: int
    """Value-level ``errors`` objects (Meta reporting a problem with the webhook itself)."""
    number: str | None = None
    """The first change's business number (``metadata.phone_number_id``), None when it names none."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""One encoder for every envelope: ``json.dumps`` with these options builds a new one per call, which
took 3.4 of the 13.4 us of dumping one status update's envelope (measured, Python 3.11)."""


def _dump(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{what} must be a non-empty string")
    return value


def _id(value: Any, what: str) -> str:
    """A non-empty string fit to leave wacored as a header (`untrusted.id_problem`)."""
    text = _str(value, what)
    if problem := id_problem(text):
        raise PayloadError(f"{what} is {problem}")
    return text


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{what} must be an array")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be an object")
    return value


def _reply_id(message: dict[str, Any]) -> str | None:
    interactive = message.get("interactive")
    if isinstance(interactive, dict):
        for kind in ("button_reply", "list_reply"):
            reply = interactive.get(kind)
            if isinstance(reply, dict) and isinstance(reply.get("id"), str):
                return str(reply["id"])
    button = message.get("button")
    if isinstance(button, dict) and isinstance(button.get("payload"), str):
        return str(button["payload"])
    return None


def _text(message: dict[str, Any]) -> str | None:
    text = message.get("text")
    if message.get("type") == "text" and isinstance(text, dict) and isinstance(text.get("body"), str):
        return str(text["body"])
    return None


class _Contacts:
    """One change's ``contacts``, indexed once by ``wa_id`` and ``user_id`` (the first of each wins)."""

    def __init__(self, raw: list[Any]) -> None:
        self.by_phone: dict[str, Any] = {}
        self.by_bsuid: dict[str, Any] = {}
        for contact in raw:
            if isinstance(contact, dict):
                if isinstance(wa_id := contact.get("wa_id"), str):
                    self.by_phone.setdefault(wa_id, contact)
                if isinstance(user_id := contact.get("user_id"), str):
                    self.by_bsuid.setdefault(user_id, contact)

    def of(self, phone: Any, bsuid: Any) -> Any | None:
        """The sender's contact: by phone number, else by BSUID."""
        found = self.by_phone.get(phone) if isinstance(phone, str) else None
        if found is None and isinstance(bsuid, str):
            found = self.by_bsuid.get(bsuid)
        return found


@dataclass(frozen=True)
class _Change:
    """What every envelope of one change repeats: its entry id, field, value and contacts."""

    entry_id: Any
    field: Any
    value: dict[str, Any]
    contacts: _Contacts
    number: str | None
    """``value.metadata.phone_number_id`` (checked like every id that leaves wacored), None when absent."""

    def envelope(self, update: dict[str, Any], kind: str) -> bytes:
        inner: dict[str, Any] = {"messaging_product": self.value.get("messaging_product", "whatsapp")}
        if "metadata" in self.value:
            inner["metadata"] = self.value["metadata"]
        if kind == "messages" and (contact := self.contacts.of(update.get("from"), update.get("from_user_id"))):
            inner["contacts"] = [contact]
        inner[kind] = [update]
        change = {"value": inner, "field": self.field}
        return _dump({"object": "whatsapp_business_account", "entry": [{"id": self.entry_id, "changes": [change]}]})


def _message(change: _Change, raw: Any, where: str) -> InboundMessage:
    message = _dict(raw, where)
    wamid = _id(message.get("id"), f"{where}.id")
    phone = message.get("from") if isinstance(message.get("from"), str) and message.get("from") else None
    bsuid = message.get("from_user_id")
    bsuid = bsuid if isinstance(bsuid, str) and bsuid else None
    sender = phone or bsuid
    if sender is None:
        raise PayloadError(f"{where} has neither 'from' nor 'from_user_id'")
    kind = message.get("type")
    return InboundMessage(
        wamid=wamid,
        sender=sender,
        phone=phone,
        bsuid=bsuid,
        type=kind if isinstance(kind, str) else "unknown",
        text=_text(message),
        reply_id=_reply_id(message),
        body=change.envelope(message, "messages"),
        number=change.number,
    )


def _status(change: _Change, raw: Any, where: str, kept: bool) -> StatusUpdate:
    status = _dict(raw, where)
    recipient = status.get("recipient_id") or status.get("recipient_user_id") or ""
    return StatusUpdate(
        status_id=_id(status.get("id"), f"{where}.id"),
        status=_id(status.get("status"), f"{where}.status"),
        recipient=recipient if isinstance(recipient, str) else "",
        body=change.envelope(status, "statuses") if kept else b"",
        number=change.number,
    )


def _keep_all(number: str | None) -> bool:
    return True


def _number(value: dict[str, Any], where: str) -> str | None:
    """The change's ``metadata.phone_number_id``: it leaves wacored (``X-WA-Phone-Number-Id``, the
    Graph API path), so it is checked here like every id; None when the change names none."""
    metadata = value.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("phone_number_id") in (None, ""):
        return None
    return _id(metadata["phone_number_id"], f"{where}.metadata.phone_number_id")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate; paired ones are fine, lone ones are not text."""


def _encodable(doc: Any) -> bool:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


U = TypeVar("U", InboundMessage, StatusUpdate)


class _Budget:
    """The bytes the envelopes of one batch may still take (`MAX_EXPANSION`)."""

    def __init__(self, left: int) -> None:
        self.left = left

    def spend(self, update: U) -> U:
        self.left -= len(update.body)
        if self.left < 0:
            raise PayloadError(
                f"the updates' envelopes would take over {MAX_EXPANSION}x the body (shared parts repeated)"
            )
        return update


def parse_webhook(raw: bytes, keeps_statuses: Callable[[str | None], bool] = _keep_all) -> Batch:
    """Parse a whole webhook POST body. The status updates of a change whose business number
    (``metadata.phone_number_id``, None when absent) `keeps_statuses` says False for are checked and
    counted like the others, but their envelope is not built (``body`` is ``b""``): they are dropped,
    and building it was ~30 % of parsing one (measured, bench/ingress.py's profile).

    Raises:
        PayloadError: not JSON, not a ``whatsapp_business_account`` payload, or a message/status
            without the fields every update has (an id; a sender).
    """
    try:
        # UTF-8 only (RFC 8259): json.loads would guess UTF-16/32 and let encoded surrogates through.
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError("body is not JSON") from exc
    except RecursionError as exc:
        raise PayloadError("body is nested too deeply") from exc
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(doc):
        # A lone "\ud800" escape decodes to a str that cannot be stored nor forwarded as UTF-8.
        raise PayloadError("body holds a lone UTF-16 surrogate escape")
    if not isinstance(doc, dict) or doc.get("object") != "whatsapp_business_account":
        raise PayloadError("object must be 'whatsapp_business_account'")
    messages: list[InboundMessage] = []
    statuses: list[StatusUpdate] = []
    errors = 0
    first: list[str | None] = []
    budget = _Budget(MAX_EXPANSION * len(raw) + EXPANSION_ALLOWANCE)
    entries = doc.get("entry")
    if not isinstance(entries, list):
        raise PayloadError("entry must be an array")
    for e, raw_entry in enumerate(entries):
        entry = _dict(raw_entry, f"entry[{e}]")
        for c, raw_change in enumerate(_list(entry.get("changes"), f"entry[{e}].changes")):
            where = f"entry[{e}].changes[{c}].value"
            change_doc = _dict(raw_change, f"entry[{e}].changes[{c}]")
            value = _dict(change_doc.get("value", {}), where)
            change = _Change(
                entry.get("id"),
                change_doc.get("field"),
                value,
                _Contacts(_list(value.get("contacts"), f"{where}.contacts")),
                _number(value, where),
            )
            if not first:
                first.append(change.number)
            for m, raw_message in enumerate(_list(value.get("messages"), f"{where}.messages")):
                messages.append(budget.spend(_message(change, raw_message, f"{where}.messages[{m}]")))
            raw_statuses = _list(value.get("statuses"), f"{where}.statuses")
            kept = bool(raw_statuses) and keeps_statuses(change.number)
            for s, raw_status in enumerate(raw_statuses):
                statuses.append(budget.spend(_status(change, raw_status, f"{where}.statuses[{s}]", kept)))
            errors += len(_list(value.get("errors"), f"{where}.errors"))
    return Batch(messages=tuple(messages), statuses=tuple(statuses), errors=errors, number=first[0] if first else None)


# --------------------------------------------------------------------------------------------------
# Outbound messages (Graph API ``POST /{phone_number_id}/messages``)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, ending in '…' when anything was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def home_menu_message(menu: HomeMenuConfig, phone: str | None, bsuid: str | None) -> dict[str, Any]:
    """The home menu as an interactive list to `phone`, or to the BSUID `recipient` without one."""
    rows = []
    for item in menu.items:
        row = {"id": item.key, "title": truncate(item.title, MENU_LIMITS["row_title"])}
        if item.description:
            row["description"] = truncate(item.description, MENU_LIMITS["row_description"])
        rows.append(row)
    message: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual"}
    if phone:
        message["to"] = phone
    else:
        message["recipient"] = bsuid
    message["type"] = "interactive"
    message["interactive"] = {
        "type": "list",
        "header": {"type": "text", "text": truncate(menu.header, MENU_LIMITS["header"])},
        "body": {"text": truncate(menu.body, MENU_LIMITS["body"])},
        "action": {
            "button": truncate(menu.button, MENU_LIMITS["button"]),
            "sections": [{"title": truncate(menu.header, MENU_LIMITS["section"]), "rows": rows}],
        },
    }
    return message


def encode(message: dict[str, Any]) -> bytes:
    """The bytes of an outbound message, as posted to the Graph API."""
    return _dump(message)


def text_webhook(
    *,
    text: str,
    sender: str,
    wamid: str,
    timestamp: int,
    phone_number_id: str = "PHONE_NUMBER_ID",
    kind: str = "text",
) -> bytes:
    """A realistic inbound webhook body (used by ``wacored simulate`` and the tests).

    `kind` is ``text``, ``interactive`` (a list reply whose id is `text`), ``location`` or ``image``.
    """
    message: dict[str, Any] = {"from": sender, "id": wamid, "timestamp": str(timestamp), "type": kind}
    if kind == "text":
        message["text"] = {"body": text}
    elif kind == "interactive":
        message["interactive"] = {"type": "list_reply", "list_reply": {"id": text, "title": text}}
    elif kind == "location":
        message["location"] = {"latitude": -1.9441, "longitude": 30.0619, "name": text}
    elif kind == "image":
        message["image"] = {"mime_type": "image/jpeg", "sha256": "0" * 64, "id": "1", "caption": text}
    else:
        raise ValueError(f"unknown simulated message type {kind!r}")
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
        "contacts": [{"profile": {"name": "Simulated User"}, "wa_id": sender}],
        "messages": [message],
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA_ID", "changes": [{"value": value, "field": "messages"}]}],
    }
    return _dump(doc)

"""Routing policy, without I/O: which service owns a message, and what happens to the sender's session.

Order (docs/contract.md, "Routing"): (1) a menu word ends the session and sends the home menu;
(2) an exact key match of the whole text or of an interactive reply id routes to that service and
starts a session there; (3) a live session routes to its service and refreshes it (media, location
and every other type included); (4) otherwise the fallback. Matching is case-insensitive on trimmed
text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from ..config import HOME_SERVICE, Config
from .whatsapp import InboundMessage


class Reason(StrEnum):
    HOME_MENU = "home_menu"
    KEYWORD = "keyword"
    INTERACTIVE = "interactive"
    STATE = "state"
    FALLBACK = "fallback"


class SessionAction(StrEnum):
    KEEP = "keep"
    START = "start"
    END = "end"
    TOUCH = "touch"


@dataclass(frozen=True)
class Decision:
    service: str
    """A configured service's name, or ``wacored`` when wacored answers with the home menu."""
    reason: Reason
    session: SessionAction

    @property
    def sends_home_menu(self) -> bool:
        return self.service == HOME_SERVICE


@dataclass(frozen=True)
class RoutingTable:
    """What `decide` needs from the config, with keys folded for matching."""

    keys: Mapping[str, str]
    menu_words: frozenset[str]
    fallback: str
    """A service name, or ``menu`` for the home menu."""

    @classmethod
    def from_config(cls, config: Config) -> RoutingTable:
        keys = {key: svc.name for svc in config.services.values() for key in svc.keys}
        return cls(keys=keys, menu_words=frozenset(config.routing.menu_words), fallback=config.routing.fallback)


def _fold(value: str | None) -> str | None:
    return value.strip().lower() if value is not None else None


def decide(table: RoutingTable, message: InboundMessage, session: str | None) -> Decision:
    """Route `message` from a sender whose live session is `session` (None when there is none)."""
    text, reply = _fold(message.text), _fold(message.reply_id)
    if text in table.menu_words or reply in table.menu_words:
        return Decision(HOME_SERVICE, Reason.HOME_MENU, SessionAction.END)
    if reply is not None and reply in table.keys:
        return Decision(table.keys[reply], Reason.INTERACTIVE, SessionAction.START)
    if text is not None and text in table.keys:
        return Decision(table.keys[text], Reason.KEYWORD, SessionAction.START)
    if session is not None:
        return Decision(session, Reason.STATE, SessionAction.TOUCH)
    if table.fallback == "menu":
        return Decision(HOME_SERVICE, Reason.FALLBACK, SessionAction.KEEP)
    return Decision(table.fallback, Reason.FALLBACK, SessionAction.KEEP)

"""The ingest plan (pure): what one parsed webhook batch becomes before anything is stored.

Each message is routed by the rules of the business number it was written to (`numbers.Numbers`),
in order, against the stored sessions (a `SessionLookup`) as the batch's earlier messages leave them
(`SessionOverlay`): one
row per message (to its service, or the home menu to the Graph API sender), the session changes to
commit with them, and one row per status update that has a target. A message to a number that
``numbers = "listed"`` does not know is kept (so a redelivery is a duplicate) and never routed; a
probe (`probe.py`) is routed but leaves the sender's session as it was.

The writer runs the plan inside its transaction, from the sessions the store holds then, so every
process sharing the store routes by the one committed state (`wacored.ingest`); it adds what is not
policy (the request's ids, the trace context). Nothing here reads a clock, a store or the network.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..config import GRAPH_SENDER, HOME_SERVICE
from .numbers import UNKNOWN_NUMBER, Numbers
from .probe import is_probe
from .routing import SessionAction, decide
from .sessions import SessionChange, SessionLookup, SessionOverlay
from .whatsapp import Batch, InboundMessage, encode, home_menu_message


@dataclass(frozen=True)
class PlannedRow:
    """One update as it will be stored and delivered."""

    key: str
    kind: str
    """``message`` or ``status``."""
    sender: str
    service: str
    reason: str
    target: str
    """Where it is delivered: a service, the Graph API sender, or ``""`` (never)."""
    body: bytes
    number: str
    probe: bool = False


@dataclass(frozen=True)
class IngestPlan:
    rows: tuple[PlannedRow, ...]
    changes: tuple[tuple[int, SessionChange], ...]
    """(index of the row in `rows`, the session change to commit only if that row is inserted)."""


def plan_ingest(batch: Batch, numbers: Numbers, sessions: SessionLookup, ttl_s: float, now: float) -> IngestPlan:
    """The rows and session changes of `batch` received at wall-clock `now`, sessions idle for `ttl_s`
    or longer being over."""
    view = SessionOverlay(sessions, ttl_s)
    rows: list[PlannedRow] = []
    changes: list[tuple[int, SessionChange]] = []
    for m in batch.messages:
        number = numbers.key_of(m.number)
        # The mark is in the signed body, checked before parsing: an unsigned caller cannot make one.
        probe = is_probe(m.wamid)
        if number is None:
            rows.append(
                PlannedRow(
                    m.wamid, "message", m.sender, HOME_SERVICE, UNKNOWN_NUMBER, "", m.body, m.number or "", probe
                )
            )
            continue
        plan = numbers.plan(number)
        session = view.service_of(m.sender, now, number)
        if session is not None and session not in plan.services:
            session = None  # its service was removed by a reload, or no longer routes here: route afresh
        decision = decide(plan.routing, m, session)
        # A probe reads the sender's session but leaves it as it was: it may come from an operator's
        # own number, whose conversation must not move because of a check.
        if decision.session is not SessionAction.KEEP and not probe:
            change = SessionChange(m.sender, decision.session, decision.service, now, number)
            view.apply(change)
            changes.append((len(rows), change))
        reason = decision.reason.value
        if decision.sends_home_menu:
            menu = encode(home_menu_message(plan.menu, m.phone, m.bsuid))
            rows.append(
                PlannedRow(m.wamid, "message", m.sender, decision.service, reason, GRAPH_SENDER, menu, number, probe)
            )
        else:
            rows.append(
                PlannedRow(
                    m.wamid, "message", m.sender, decision.service, reason, decision.service, m.body, number, probe
                )
            )
    for s in batch.statuses:
        number = numbers.key_of(s.number)
        if statuses_to := statuses_target(numbers, number):
            rows.append(
                PlannedRow(
                    f"status:{s.key}", "status", s.recipient, statuses_to, "status", statuses_to, s.body, number or ""
                )
            )
    return IngestPlan(tuple(rows), tuple(changes))


def statuses_target(numbers: Numbers, number: str | None) -> str:
    """Where the status updates of business number `number` (a key, None when unknown) go: a
    service, or ``""`` when they are dropped."""
    return numbers.plan(number).statuses if number is not None else ""


def keeps_statuses(numbers: Numbers) -> Callable[[str | None], bool]:
    """`parse_webhook`'s `keeps_statuses` under `numbers`: whether the status updates written to a
    ``phone_number_id`` go anywhere. Plan with the same `numbers`: a dropped update has no body."""
    return lambda phone_number_id: bool(statuses_target(numbers, numbers.key_of(phone_number_id)))


def stores_nothing(batch: Batch, numbers: Numbers) -> bool:
    """True when `batch` has no message and every status update in it is dropped: its plan is empty
    whatever the store holds, and its rate limit counts nothing, so there is nothing to commit."""
    keeps = keeps_statuses(numbers)
    return not batch.messages and not any(keeps(s.number) for s in batch.statuses)


def window_of(numbers: Numbers, m: InboundMessage) -> tuple[str, str]:
    """The rate-limit window of `m`: its (number key, sender); an unknown number's id stands for itself."""
    number = numbers.key_of(m.number)
    return (number if number is not None else m.number or "", m.sender)


def windows(batch: Batch, numbers: Numbers) -> Counter[tuple[str, str]]:
    """How many of the batch's messages each rate-limit window gets (`ratelimit.RateLimit.admit`)."""
    return Counter(window_of(numbers, m) for m in batch.messages)

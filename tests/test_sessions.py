"""wacored.core.sessions: TTL applied on read, START/TOUCH/END, and the per-batch overlay."""

from __future__ import annotations

from pathlib import Path

import pytest

from wacored.config import Config
from wacored.core.routing import Reason, RoutingTable, SessionAction, decide
from wacored.core.sessions import SessionChange, SessionOverlay, SessionTable
from wacored.core.whatsapp import parse_webhook, text_webhook

SHIPPED = Path(__file__).resolve().parent.parent / "wacored.toml"
TTL = 3600.0
A, B = "250788000001", "250788000002"


def change(action: SessionAction, service: str = "rides", at: float = 0.0, sender: str = A) -> SessionChange:
    return SessionChange(sender=sender, action=action, service=service, at=at)


def table_with(*rows: tuple[str, str, float]) -> SessionTable:
    return SessionTable(TTL, rows)


# -- SessionTable ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("idle", "service"), [(0.0, "rides"), (TTL - 0.001, "rides"), (TTL + 0.001, None)])
def test_ttl_is_applied_on_read(idle: float, service: str | None) -> None:
    table = table_with((A, "rides", 1000.0))
    assert table.service_of(A, 1000.0 + idle) == service


def test_session_idle_exactly_the_ttl_is_over() -> None:
    table = table_with((A, "rides", 1000.0))
    assert table.service_of(A, 1000.0 + TTL) is None


def test_unknown_sender_has_no_session() -> None:
    assert table_with((A, "rides", 0.0)).service_of(B, 0.0) is None


def test_active_counts_live_sessions_only() -> None:
    table = table_with((A, "rides", 0.0), (B, "jobs", 5000.0))
    assert table.active(5000.0) == 1
    assert table.active(100.0) == 2


def test_start_creates_a_session() -> None:
    table = table_with()
    table.apply(change(SessionAction.START, "jobs", at=10.0))
    assert table.service_of(A, 10.0) == "jobs"
    assert table.service_of(A, 10.0 + TTL + 1) is None


def test_start_moves_a_sender_to_another_service() -> None:
    table = table_with((A, "rides", 0.0))
    table.apply(change(SessionAction.START, "jobs", at=10.0))
    assert table.service_of(A, 10.0) == "jobs"


def test_touch_refreshes_the_idle_time() -> None:
    table = table_with((A, "rides", 0.0))
    table.apply(change(SessionAction.TOUCH, "rides", at=3000.0))
    assert table.service_of(A, 3000.0 + TTL - 1) == "rides"


def test_end_removes_the_session() -> None:
    table = table_with((A, "rides", 0.0), (B, "jobs", 0.0))
    table.apply(change(SessionAction.END, "wacored", at=1.0))
    assert table.service_of(A, 1.0) is None
    assert table.service_of(B, 1.0) == "jobs"
    assert len(table) == 1


def test_end_without_a_session_is_harmless() -> None:
    table = table_with()
    table.apply(change(SessionAction.END, "wacored"))
    assert len(table) == 0


def test_keep_changes_nothing() -> None:
    table = table_with((A, "rides", 0.0))
    table.apply(change(SessionAction.KEEP, "wacored", at=3000.0))
    assert table.service_of(A, TTL + 1) is None  # not refreshed
    assert table.service_of(A, 10.0) == "rides"


# -- SessionOverlay --------------------------------------------------------------------------------


def test_overlay_stages_changes_without_touching_the_base() -> None:
    base = table_with((A, "rides", 0.0))
    overlay = base.overlay()
    assert isinstance(overlay, SessionOverlay)
    overlay.apply(change(SessionAction.END, "wacored", sender=A))
    overlay.apply(change(SessionAction.START, "jobs", sender=B))
    assert (overlay.service_of(A, 1.0), overlay.service_of(B, 1.0)) == (None, "jobs")
    assert (base.service_of(A, 1.0), base.service_of(B, 1.0)) == ("rides", None)
    assert len(base) == 1


def test_overlay_reads_through_to_the_base_with_its_ttl() -> None:
    overlay = table_with((A, "rides", 0.0)).overlay()
    assert overlay.service_of(A, 10.0) == "rides"
    assert overlay.service_of(A, TTL + 1) is None


def test_overlay_keep_changes_nothing() -> None:
    overlay = table_with((A, "rides", 0.0)).overlay()
    overlay.apply(change(SessionAction.KEEP, "wacored"))
    assert overlay.service_of(A, 1.0) == "rides"


def test_overlay_routes_one_batch_in_order() -> None:
    routing = RoutingTable.from_config(Config.load(SHIPPED, {}))
    overlay = table_with((A, "jobs", 0.0)).overlay()
    reasons = []
    for i, (text, kind) in enumerate([("hi", "text"), ("menu", "text"), ("rides", "text"), ("", "image")]):
        raw = text_webhook(text=text, sender=A, wamid=f"wamid.{i}", timestamp=1, kind=kind)
        [message] = parse_webhook(raw).messages
        decision = decide(routing, message, overlay.service_of(A, 10.0))
        overlay.apply(SessionChange(A, decision.session, decision.service, 10.0))
        reasons.append((decision.service, decision.reason))
    assert reasons == [
        ("jobs", Reason.STATE),
        ("wacored", Reason.HOME_MENU),
        ("rides", Reason.KEYWORD),
        ("rides", Reason.STATE),
    ]

"""wacored.core.sessions: TTL applied on read, the per-batch overlay, and the bounded session cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from wacored.config import Config
from wacored.core.routing import Reason, RoutingTable, SessionAction, decide
from wacored.core.sessions import Miss, SessionCache, SessionChange, SessionOverlay, live_service
from wacored.core.whatsapp import parse_webhook, text_webhook

from .support import DictSessions

SHIPPED = Path(__file__).resolve().parent.parent / "wacored.toml"
TTL = 3600.0
A, B = "250788000001", "250788000002"


def change(action: SessionAction, service: str = "rides", at: float = 0.0, sender: str = A) -> SessionChange:
    return SessionChange(sender=sender, action=action, service=service, at=at)


def stored(*rows: tuple[str, str, float]) -> DictSessions:
    return DictSessions({("", sender): (service, at) for sender, service, at in rows})


# -- live_service: the TTL on read ------------------------------------------------------------------


@pytest.mark.parametrize(("idle", "service"), [(0.0, "rides"), (TTL - 0.001, "rides"), (TTL + 0.001, None)])
def test_ttl_is_applied_on_read(idle: float, service: str | None) -> None:
    assert live_service(("rides", 1000.0), 1000.0 + idle, TTL) == service


def test_session_idle_exactly_the_ttl_is_over() -> None:
    assert live_service(("rides", 1000.0), 1000.0 + TTL, TTL) is None


def test_unknown_sender_has_no_session() -> None:
    assert SessionOverlay(stored((A, "rides", 0.0)), TTL).service_of(B, 0.0) is None


# -- SessionOverlay --------------------------------------------------------------------------------


def test_overlay_stages_changes_without_touching_the_store() -> None:
    base = stored((A, "rides", 0.0))
    overlay = SessionOverlay(base, TTL)
    overlay.apply(change(SessionAction.END, "wacored", sender=A))
    overlay.apply(change(SessionAction.START, "jobs", sender=B))
    assert (overlay.service_of(A, 1.0), overlay.service_of(B, 1.0)) == (None, "jobs")
    assert base.rows == {("", A): ("rides", 0.0)}


def test_overlay_reads_through_to_the_store_with_its_ttl() -> None:
    overlay = SessionOverlay(stored((A, "rides", 0.0)), TTL)
    assert overlay.service_of(A, 10.0) == "rides"
    assert overlay.service_of(A, TTL + 1) is None


def test_overlay_keeps_numbers_apart() -> None:
    overlay = SessionOverlay(DictSessions({("n2", A): ("jobs", 0.0)}), TTL)
    assert (overlay.service_of(A, 1.0), overlay.service_of(A, 1.0, "n2")) == (None, "jobs")
    overlay.apply(SessionChange(A, SessionAction.START, "rides", 1.0, "n3"))
    assert (overlay.service_of(A, 1.0, "n2"), overlay.service_of(A, 1.0, "n3")) == ("jobs", "rides")


def test_overlay_keep_changes_nothing() -> None:
    overlay = SessionOverlay(stored((A, "rides", 0.0)), TTL)
    overlay.apply(change(SessionAction.KEEP, "wacored"))
    assert overlay.service_of(A, 1.0) == "rides"


def test_overlay_routes_one_batch_in_order() -> None:
    routing = RoutingTable.from_config(Config.load(SHIPPED, {}))
    overlay = SessionOverlay(stored((A, "jobs", 0.0)), TTL)
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


# -- SessionCache ----------------------------------------------------------------------------------


def test_the_cache_tells_a_miss_from_a_known_absence() -> None:
    cache = SessionCache(10)
    assert cache.get("", A) is Miss.MISS
    cache.put("", A, None)
    cache.put("", B, ("rides", 5.0))
    assert (cache.get("", A), cache.get("", B), cache.get("n2", B)) == (None, ("rides", 5.0), Miss.MISS)


def test_the_cache_holds_at_most_its_size_dropping_the_least_recently_used() -> None:
    cache = SessionCache(3)
    for i in range(3):
        cache.put("", f"s{i}", ("rides", float(i)))
    assert cache.get("", "s0") == ("rides", 0.0)  # s0 used: s1 is now the least recently used
    cache.put("", "s3", ("jobs", 3.0))
    assert len(cache) == 3
    assert cache.get("", "s1") is Miss.MISS
    assert [cache.get("", s) for s in ("s0", "s2", "s3")] == [("rides", 0.0), ("rides", 2.0), ("jobs", 3.0)]
    for i in range(100):
        cache.put("", f"t{i}", None)
    assert len(cache) == 3
    cache.clear()
    assert len(cache) == 0

"""The ingest plan, pure: a parsed batch in, rows and session changes out; no server, store or clock."""

from __future__ import annotations

import json
from pathlib import Path

from wacored.config import Config
from wacored.core.ingest import plan_ingest, stores_nothing
from wacored.core.numbers import Numbers
from wacored.core.routing import SessionAction
from wacored.core.whatsapp import parse_webhook, text_webhook

from .conftest import FIXTURES, config_mapping
from .support import DictSessions

NOW = 1_800_000_000.0


TTL = 3600.0


def setup(tmp_path: Path, **sections: dict[str, object]) -> tuple[Numbers, DictSessions]:
    config = Config.from_mapping(config_mapping(tmp_path, "http://s.test", "http://g.test", **sections), {})
    return Numbers.from_config(config), DictSessions()


def batch(*texts: tuple[str, str, str]) -> bytes:
    """One POST holding a text message per (wamid, sender, text)."""
    docs = [json.loads(text_webhook(text=t, sender=s, wamid=w, timestamp=1)) for w, s, t in texts]
    first = docs[0]
    for doc in docs[1:]:
        first["entry"] += doc["entry"]
    return json.dumps(first).encode()


def test_a_key_starts_a_session_that_routes_the_next_message_of_the_same_batch(tmp_path: Path) -> None:
    numbers, sessions = setup(tmp_path)
    plan = plan_ingest(
        parse_webhook(batch(("w1", "2507", "rides"), ("w2", "2507", "where is my car"))), numbers, sessions, TTL, NOW
    )
    assert [(r.key, r.service, r.reason, r.target) for r in plan.rows] == [
        ("w1", "rides", "keyword", "rides"),
        ("w2", "rides", "state", "rides"),
    ]
    assert [(i, c.action, c.service) for i, c in plan.changes] == [
        (0, SessionAction.START, "rides"),
        (1, SessionAction.TOUCH, "rides"),
    ]
    assert sessions.rows == {}  # the plan writes nothing: the writer applies `changes` with the rows


def test_the_home_menu_goes_to_the_graph_sender_and_ends_the_session(tmp_path: Path) -> None:
    numbers, sessions = setup(tmp_path)
    plan = plan_ingest(
        parse_webhook(batch(("w1", "2507", "rides"), ("w2", "2507", "menu"))), numbers, sessions, TTL, NOW
    )
    menu = plan.rows[1]
    assert (menu.service, menu.reason, menu.target) == ("wacored", "home_menu", "whatsapp")
    assert json.loads(menu.body)["to"] == "2507"
    assert plan.changes[1][1].action is SessionAction.END


def test_a_probe_is_routed_but_leaves_the_session_alone(tmp_path: Path) -> None:
    numbers, sessions = setup(tmp_path)
    plan = plan_ingest(parse_webhook(batch(("wamid.WACORED_PROBE.1", "2507", "rides"))), numbers, sessions, TTL, NOW)
    assert [(r.service, r.probe) for r in plan.rows] == [("rides", True)]
    assert plan.changes == ()


def test_status_updates_have_a_row_only_when_they_have_a_target(tmp_path: Path) -> None:
    raw = (FIXTURES / "status_read.json").read_bytes()
    dropped, _ = setup(tmp_path)
    assert plan_ingest(parse_webhook(raw), dropped, DictSessions(), TTL, NOW).rows == ()
    forwarded, _ = setup(tmp_path, routing={"statuses": "wallet"})
    [row] = plan_ingest(parse_webhook(raw), forwarded, DictSessions(), TTL, NOW).rows
    assert (row.kind, row.target, row.key.startswith("status:")) == ("status", "wallet", True)


def test_a_batch_stores_nothing_only_without_messages_and_with_every_status_dropped(tmp_path: Path) -> None:
    statuses = parse_webhook((FIXTURES / "status_read.json").read_bytes())
    dropped, _ = setup(tmp_path)
    forwarded, _ = setup(tmp_path, routing={"statuses": "wallet"})
    assert stores_nothing(statuses, dropped)
    assert not stores_nothing(statuses, forwarded)
    assert not stores_nothing(parse_webhook(batch(("w1", "2507", "hello"))), dropped)


def test_a_stored_session_routes_until_it_has_been_idle_for_the_ttl(tmp_path: Path) -> None:
    numbers, _ = setup(tmp_path)
    stored = DictSessions({("", "2507"): ("jobs", NOW - TTL + 1)})
    [live] = plan_ingest(parse_webhook(batch(("w1", "2507", "hello"))), numbers, stored, TTL, NOW).rows
    assert (live.service, live.reason) == ("jobs", "state")
    [over] = plan_ingest(parse_webhook(batch(("w2", "2507", "hello"))), numbers, stored, TTL, NOW + 1).rows
    assert over.reason == "fallback"
    assert stored.reads == [("", "2507"), ("", "2507")]  # one read per batch

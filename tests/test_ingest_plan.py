"""The ingest plan, pure: a parsed batch in, rows and session changes out; no server, store or clock."""

from __future__ import annotations

import json
from pathlib import Path

from wacored.config import Config
from wacored.core.ingest import plan_ingest
from wacored.core.numbers import Numbers
from wacored.core.routing import SessionAction
from wacored.core.sessions import SessionTable
from wacored.core.whatsapp import parse_webhook, text_webhook

from .conftest import config_mapping

NOW = 1_800_000_000.0


def setup(tmp_path: Path, **sections: dict[str, object]) -> tuple[Numbers, SessionTable]:
    config = Config.from_mapping(config_mapping(tmp_path, "http://s.test", "http://g.test", **sections), {})
    return Numbers.from_config(config), SessionTable(config.sessions.ttl_s)


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
        parse_webhook(batch(("w1", "2507", "rides"), ("w2", "2507", "where is my car"))), numbers, sessions, NOW
    )
    assert [(r.key, r.service, r.reason, r.target) for r in plan.rows] == [
        ("w1", "rides", "keyword", "rides"),
        ("w2", "rides", "state", "rides"),
    ]
    assert [(i, c.action, c.service) for i, c in plan.changes] == [
        (0, SessionAction.START, "rides"),
        (1, SessionAction.TOUCH, "rides"),
    ]
    assert len(sessions) == 0  # the table itself changes only once the batch is committed


def test_the_home_menu_goes_to_the_graph_sender_and_ends_the_session(tmp_path: Path) -> None:
    numbers, sessions = setup(tmp_path)
    plan = plan_ingest(parse_webhook(batch(("w1", "2507", "rides"), ("w2", "2507", "menu"))), numbers, sessions, NOW)
    menu = plan.rows[1]
    assert (menu.service, menu.reason, menu.target) == ("wacored", "home_menu", "whatsapp")
    assert json.loads(menu.body)["to"] == "2507"
    assert plan.changes[1][1].action is SessionAction.END


def test_a_probe_is_routed_but_leaves_the_session_alone(tmp_path: Path) -> None:
    numbers, sessions = setup(tmp_path)
    plan = plan_ingest(parse_webhook(batch(("wamid.WACORED_PROBE.1", "2507", "rides"))), numbers, sessions, NOW)
    assert [(r.service, r.probe) for r in plan.rows] == [("rides", True)]
    assert plan.changes == ()


def test_status_updates_have_a_row_only_when_they_have_a_target(tmp_path: Path) -> None:
    raw = (Path(__file__).parent / "fixtures" / "whatsapp" / "status_read.json").read_bytes()
    dropped, _ = setup(tmp_path)
    assert plan_ingest(parse_webhook(raw), dropped, SessionTable(3600), NOW).rows == ()
    forwarded, _ = setup(tmp_path, routing={"statuses": "wallet"})
    [row] = plan_ingest(parse_webhook(raw), forwarded, SessionTable(3600), NOW).rows
    assert (row.kind, row.target, row.key.startswith("status:")) == ("status", "wallet", True)

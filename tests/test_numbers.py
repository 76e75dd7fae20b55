"""Several business numbers on one wacored: config rules, the number policy, and the real daemon
replying from, routing by and keeping sessions per the number each message was written to."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
import trio

from wacored.cli import main
from wacored.config import Config, ConfigError
from wacored.core.numbers import DEFAULT, OTHER, Numbers
from wacored.core.whatsapp import PayloadError, parse_webhook, text_webhook
from wacored.store import MIGRATIONS, SCHEMA_VERSION, migrate

from .conftest import Downstream, config_mapping, make_config, open_daemon, rows
from .support import numbers_webhook, toml_text, wait_until

ONE, TWO = "111111111111111", "222222222222222"
"""Two business numbers with sections of their own; the default number is conftest's 1234567890."""
DEFAULT_ID = "1234567890"
ALICE, BOB = "250788000101", "250788000102"


def numbers_sections() -> dict[str, Any]:
    return {
        ONE: {
            "access_token": "token-one",
            "services": ["rides", "jobs"],
            "home_menu": {
                "header": "Rides and jobs",
                "items": [{"key": "rides", "title": "Rides"}, {"key": "jobs", "title": "Jobs"}],
            },
        },
        TWO: {
            "access_token": "token-two",
            "services": ["insurance", "wallet"],
            "home_menu": {
                "header": "Insurance",
                "items": [{"key": "insurance", "title": "Insurance"}, {"key": "wallet", "title": "Wallet"}],
            },
        },
    }


def wamid() -> str:
    return f"wamid.NUM{uuid.uuid4().hex}"


def load(tmp_path: Path, env: dict[str, str] | None = None, **sections: dict[str, Any]) -> Config:
    return Config.from_mapping(config_mapping(tmp_path, "http://s.test", "http://g.test", **sections), env or {})


# -- config ----------------------------------------------------------------------------------------


def test_number_sections_are_read_with_the_env_token(tmp_path: Path) -> None:
    config = load(tmp_path, {f"WACORED_ACCESS_TOKEN_{TWO}": "from-env"}, numbers=numbers_sections())
    assert config.numbers[ONE].services == ("rides", "jobs")
    assert config.numbers[ONE].access_token == "token-one"
    assert config.numbers[TWO].access_token == "from-env"
    assert config.numbers[ONE].home_menu is not None
    assert [i.key for i in config.numbers[ONE].home_menu.items] == ["rides", "jobs"]


@pytest.mark.parametrize(
    ("numbers", "whatsapp", "problem"),
    [
        ({"not-digits": {}}, {}, "numbers.not-digits: a phone number id is digits only"),
        ({ONE: {"services": ["rides", "taxis"]}}, {}, f"numbers.{ONE}.services: 'taxis' is not a configured service"),
        ({ONE: {"services": ["rides", "rides"]}}, {}, f"numbers.{ONE}.services: 'rides' is listed twice"),
        ({ONE: {"services": []}}, {}, f"numbers.{ONE}.services: must name at least one service"),
        ({ONE: {"services": ["rides"], "fallback": "jobs"}}, {}, f'numbers.{ONE}.fallback: must be "menu" or one'),
        ({ONE: {"statuses": "nope"}}, {}, f'numbers.{ONE}.statuses: must be "" or a service name'),
        (
            {ONE: {"services": ["rides"], "home_menu": {"items": [{"key": "jobs", "title": "Jobs"}]}}},
            {},
            f"numbers.{ONE}.home_menu.items[0].key: 'jobs' is not a key of any service",
        ),
        ({ONE: {"colour": "red"}}, {}, f"numbers.{ONE}.colour: unknown key"),
        ({}, {"numbers": "some"}, "whatsapp.numbers: must be one of any, listed"),
        ({}, {"numbers": "listed", "phone_number_id": ""}, 'whatsapp.numbers: "listed" knows no number'),
    ],
)
def test_check_config_refuses_bad_number_sections(
    tmp_path: Path, numbers: dict[str, Any], whatsapp: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, numbers=numbers, whatsapp=whatsapp)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_an_inherited_fallback_must_route_from_the_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, numbers={ONE: {"services": ["rides"]}}, routing={"fallback": "jobs"})
    assert any(p.startswith(f"numbers.{ONE}.fallback: the top-level fallback 'jobs'") for p in caught.value.problems)


def test_without_a_menu_of_its_own_a_number_shows_the_top_level_rows_of_its_services(tmp_path: Path) -> None:
    config = load(tmp_path, numbers={ONE: {"services": ["jobs", "rides"]}})
    menu = config.numbers[ONE].home_menu
    assert menu is not None
    assert [i.key for i in menu.items] == ["rides", "jobs"]  # the top-level order


def test_the_number_policy(tmp_path: Path) -> None:
    numbers = Numbers.from_config(load(tmp_path, numbers=numbers_sections()))
    assert numbers.key_of(None) == numbers.key_of(DEFAULT_ID) == numbers.key_of("PHONE_NUMBER_ID") == DEFAULT
    assert numbers.key_of(ONE) == ONE
    assert numbers.key_of("999") == "999"  # "any": an unknown number follows the top-level rules
    assert numbers.plan("999") is numbers.plan(DEFAULT)
    assert numbers.plan(ONE).services == {"rides", "jobs"}
    assert (numbers.label(DEFAULT), numbers.label(ONE), numbers.label("999"), numbers.label(None)) == (
        DEFAULT_ID,
        ONE,
        OTHER,
        OTHER,
    )
    listed = Numbers.from_config(load(tmp_path, numbers=numbers_sections(), whatsapp={"numbers": "listed"}))
    assert listed.key_of("999") is None
    assert listed.key_of("PHONE_NUMBER_ID") is None
    assert listed.key_of(None) == DEFAULT


def test_a_phone_number_id_that_cannot_leave_wacored_is_a_bad_request() -> None:
    body = text_webhook(text="hi", sender=ALICE, wamid="wamid.1", timestamp=1, phone_number_id="12 34")
    with pytest.raises(PayloadError, match="metadata.phone_number_id is not printable ASCII"):
        parse_webhook(body)


# -- the store -------------------------------------------------------------------------------------


def test_sessions_and_messages_from_before_belong_to_the_default_number(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path)
    db = sqlite_utils.Database(conn)
    for step in MIGRATIONS[:3]:
        step(db)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO sessions (sender, service, started_at, last_interaction) VALUES (?, 'jobs', 5, 5)", (ALICE,)
    )
    conn.execute(
        "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at, state)"
        " VALUES ('wamid.old', 'message', ?, 'jobs', 'keyword', 'jobs', x'7b7d', 5, 'queued')",
        (ALICE,),
    )
    conn.commit()
    conn.close()
    assert migrate(path) == SCHEMA_VERSION
    assert rows(path, "SELECT number, sender, service, last_interaction FROM sessions") == [("", ALICE, "jobs", 5.0)]
    assert rows(path, "SELECT key, number FROM messages") == [("wamid.old", "")]


# -- the daemon ------------------------------------------------------------------------------------


async def test_two_numbers_route_by_their_own_services(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, numbers=numbers_sections())) as daemon:
        with trio.fail_after(10):
            on_one = await daemon.post(numbers_webhook((ONE, ALICE, "insurance", wamid())))
            on_two = await daemon.post(numbers_webhook((TWO, ALICE, "insurance", wamid())))
            on_default = await daemon.post(numbers_webhook((DEFAULT_ID, ALICE, "insurance", wamid())))
        # insurance does not route from number one: its fallback, the menu of number one.
        assert [r["service"] for r in on_one.json()["routes"]] == ["wacored"]
        assert on_one.json()["routes"][0]["reason"] == "fallback"
        assert [r["service"] for r in on_two.json()["routes"]] == ["insurance"]
        assert [r["service"] for r in on_default.json()["routes"]] == ["insurance"]
        got = await services.wait_for(2, "/insurance")
        assert sorted(r.headers["x-wa-phone-number-id"] for r in got) == [DEFAULT_ID, TWO]
        [menu] = await graph.wait_for(1)
        assert menu.path == f"/v21.0/{ONE}/messages"


async def test_a_batch_of_both_numbers_routes_each_change_by_its_number(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, numbers=numbers_sections())) as daemon:
        body = numbers_webhook(
            (ONE, ALICE, "jobs", wamid()),
            (TWO, ALICE, "jobs", wamid()),
            (TWO, BOB, "wallet", wamid()),
            (ONE, BOB, "wallet", wamid()),
        )
        with trio.fail_after(10):
            r = await daemon.post(body)
        assert r.status_code == 200
        assert [(x["service"], x["reason"]) for x in r.json()["routes"]] == [
            ("jobs", "keyword"),
            ("wacored", "fallback"),
            ("wallet", "keyword"),
            ("wacored", "fallback"),
        ]
        [jobs] = await services.wait_for(1, "/jobs")
        [wallet] = await services.wait_for(1, "/wallet")
        assert jobs.headers["x-wa-phone-number-id"] == ONE
        assert wallet.headers["x-wa-phone-number-id"] == TWO
        menus = await graph.wait_for(2)
        assert sorted((m.path, m.json()["to"]) for m in menus) == [
            (f"/v21.0/{ONE}/messages", BOB),
            (f"/v21.0/{TWO}/messages", ALICE),
        ]
        assert rows(tmp_path / "wacored.db", "SELECT sender, number, service FROM messages ORDER BY id") == [
            (ALICE, ONE, "jobs"),
            (ALICE, TWO, "wacored"),
            (BOB, TWO, "wallet"),
            (BOB, ONE, "wacored"),
        ]


async def test_each_number_sends_its_own_menu_from_its_own_id_with_its_own_token(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, numbers=numbers_sections())) as daemon:
        with trio.fail_after(10):
            for number in (ONE, TWO, None):
                assert (await daemon.post(numbers_webhook((number, ALICE, "menu", wamid())))).status_code == 200
        sent = {m.path: m for m in await graph.wait_for(3)}
    one, two, default = (sent[f"/v21.0/{n}/messages"] for n in (ONE, TWO, DEFAULT_ID))
    assert one.headers["authorization"] == "Bearer token-one"
    assert two.headers["authorization"] == "Bearer token-two"
    assert default.headers["authorization"] == "Bearer test-token"  # no number named: [whatsapp]'s

    def rows(m: Any) -> list[str]:
        return [row["id"] for row in m.json()["interactive"]["action"]["sections"][0]["rows"]]

    assert (one.json()["interactive"]["header"]["text"], rows(one)) == ("Rides and jobs", ["rides", "jobs"])
    assert (two.json()["interactive"]["header"]["text"], rows(two)) == ("Insurance", ["insurance", "wallet"])
    assert rows(default)[:2] == ["rides", "insurance"]  # the top-level menu


async def test_sessions_are_kept_apart_per_number(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    sections = {ONE: {"services": ["rides", "jobs"]}, TWO: {"services": ["rides", "insurance"]}}
    async with open_daemon(make_config(tmp_path, services, graph, numbers=sections)) as daemon:

        async def say(number: str, text: str) -> tuple[str, str]:
            with trio.fail_after(10):
                r = await daemon.post(numbers_webhook((number, ALICE, text, wamid())))
            route = r.json()["routes"][0]
            return route["service"], route["reason"]

        assert await say(ONE, "rides") == ("rides", "keyword")
        assert await say(TWO, "insurance") == ("insurance", "keyword")
        assert await say(ONE, "a photo later") == ("rides", "state")
        assert await say(TWO, "where is my claim") == ("insurance", "state")
        assert await say(ONE, "menu") == ("wacored", "home_menu")  # ends number one's session only
        assert await say(TWO, "still here") == ("insurance", "state")
        assert await say(ONE, "still here") == ("wacored", "fallback")
    assert sorted(rows(tmp_path / "wacored.db", "SELECT number, sender, service FROM sessions")) == [
        (TWO, ALICE, "insurance")
    ]


async def test_a_number_the_config_does_not_list_is_stored_not_routed(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    config = make_config(tmp_path, services, graph, numbers=numbers_sections(), whatsapp={"numbers": "listed"})
    async with open_daemon(config) as daemon:
        unknown = wamid()
        with trio.fail_after(10):
            r = await daemon.post(numbers_webhook(("999999", ALICE, "rides", unknown), (ONE, ALICE, "rides", wamid())))
            again = await daemon.post(numbers_webhook(("999999", ALICE, "rides", unknown)))
            metrics = (await daemon.client.get(f"{daemon.url}/metrics")).text
        assert [(x["service"], x["reason"]) for x in r.json()["routes"]] == [
            ("wacored", "unknown_number"),
            ("rides", "keyword"),
        ]
        assert again.json()["duplicates"] == 1
        [rides] = await services.wait_for(1, "/rides")
        assert rides.headers["x-wa-phone-number-id"] == ONE
        await wait_until(
            lambda: (
                rows(tmp_path / "wacored.db", "SELECT state FROM messages WHERE service = 'rides'") == [("delivered",)]
            )
        )
    assert rows(tmp_path / "wacored.db", "SELECT number, target, state FROM messages WHERE key = ?", unknown) == [
        ("999999", "", "unrouted")
    ]
    assert graph.received == []
    assert len(services.received) == 1
    assert 'wacored_messages_routed_total{number="other",reason="unknown_number",service="wacored"} 1.0' in metrics
    assert f'wacored_messages_routed_total{{number="{ONE}",reason="keyword",service="rides"}} 1.0' in metrics
    assert 'wacored_webhook_requests_total{number="other",outcome="accepted"} 1.0' in metrics
    assert '999999"' not in metrics  # never a label value (digits may occur in sample values)


async def test_metrics_label_numbers_with_configured_ids_or_other(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with open_daemon(make_config(tmp_path, services, graph, numbers=numbers_sections())) as daemon:
        with trio.fail_after(10):
            await daemon.post(numbers_webhook((TWO, ALICE, "wallet", wamid()), (ONE, BOB, "jobs", wamid())))
            await daemon.post(numbers_webhook(("555", ALICE, "jobs", wamid())))
            await daemon.post(b"{}", signed=False)
            metrics = (await daemon.client.get(f"{daemon.url}/metrics")).text
    # A POST is labelled with its first change's number.
    assert f'wacored_webhook_requests_total{{number="{TWO}",outcome="accepted"}} 1.0' in metrics
    assert 'wacored_webhook_requests_total{number="other",outcome="accepted"} 1.0' in metrics
    assert 'wacored_webhook_requests_total{number="other",outcome="bad_signature"} 1.0' in metrics
    assert f'wacored_messages_routed_total{{number="{ONE}",reason="keyword",service="jobs"}} 1.0' in metrics
    assert 'wacored_messages_routed_total{number="other",reason="keyword",service="jobs"} 1.0' in metrics
    assert f'wacored_status_updates_total{{number="{DEFAULT_ID}",status="read"}} 0.0' in metrics
    assert '"555"' not in metrics


async def test_simulate_writes_to_the_number_given(
    tmp_path: Path, services: Downstream, graph: Downstream, capsys: pytest.CaptureFixture[str]
) -> None:
    sections = {ONE: {"services": ["rides", "jobs"]}}
    data = config_mapping(tmp_path, services.url, graph.url, numbers=sections)
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    async with open_daemon(make_config(tmp_path, services, graph, numbers=sections)) as daemon:
        args = [
            "simulate",
            "insurance",
            "--to",
            ONE,
            "-c",
            str(path),
            "--url",
            f"{daemon.url}/webhook",
            "--env-file",
            str(tmp_path / "none.env"),
        ]
        assert await trio.to_thread.run_sync(main, args) == 0
        assert "X-Routed-Service: wacored" in capsys.readouterr().out  # insurance does not route from ONE
        [menu] = await graph.wait_for(1)
    assert menu.path == f"/v21.0/{ONE}/messages"

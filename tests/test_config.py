"""wacored.config: the shipped file, environment overrides, and validation that reports every problem."""

from __future__ import annotations

import base64
import operator
from pathlib import Path
from typing import Any

import pytest

from wacored.config import Config, ConfigError, DlqConfig, ForwardingConfig, TelemetryConfig

SHIPPED = Path(__file__).resolve().parent.parent / "wacored.toml"
SIGNING = "whsec_" + "c2hpcHBlZC1jb25maWctdGVzdC1zaWduaW5nLWtleQ=="
SECRET_ENV = {
    "WACORED_APP_SECRET": "s3cret",
    **{
        f"WACORED_SIGNING_SECRETS_{name.upper()}": SIGNING
        for name in ("rides", "insurance", "jobs", "property", "wallet", "marketplace", "ai_agents")
    },
}


def minimal(**sections: Any) -> dict[str, Any]:
    """A valid config mapping with two services; keyword arguments replace whole sections."""
    data: dict[str, Any] = {
        "services": {
            "rides": {"url": "http://127.0.0.1:9001/rides", "keys": ["rides", "1"], "signing_secrets": [SIGNING]},
            "jobs": {"url": "http://127.0.0.1:9003/jobs", "keys": ["jobs", "3"], "signing_secrets": [SIGNING]},
        },
        "home_menu": {"items": [{"key": "rides", "title": "Rides"}, {"key": "jobs", "title": "Jobs"}]},
        "whatsapp": {"access_token": "EAAG-token", "phone_number_id": "106540352242922"},
    }
    data.update(sections)
    return data


def put(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set `dotted` (``a.b.0.c``: numbers index lists) in `data`, creating tables on the way."""
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return data


def problems_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data, env or {})
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def items(n: int) -> list[dict[str, str]]:
    return [{"key": "rides", "title": f"Item {i}"} for i in range(n)]


# -- the shipped wacored.toml ----------------------------------------------------------------------


def test_shipped_config_loads_with_secret_from_env() -> None:
    config = Config.load(SHIPPED, {**SECRET_ENV, "WA_TOKEN": "t", "WA_PHONE_ID": "1"})
    assert config.source == SHIPPED
    assert config.whatsapp.app_secret == "s3cret"
    assert config.secret_problems() == []
    assert config.warnings == ()


def test_without_graph_credentials_replies_are_warned_about() -> None:
    config = Config.load(SHIPPED, SECRET_ENV)
    assert config.warnings == (
        "whatsapp.access_token: empty; replies such as the home menu will be dead-lettered",
        "whatsapp.phone_number_id: empty; replies such as the home menu will be dead-lettered",
    )


def test_shipped_config_has_seven_services_and_a_seven_item_menu() -> None:
    config = Config.load(SHIPPED, SECRET_ENV)
    assert list(config.services) == [
        "rides",
        "insurance",
        "jobs",
        "property",
        "wallet",
        "marketplace",
        "ai_agents",
    ]
    assert len(config.home_menu.items) == 7
    all_keys = {key for svc in config.services.values() for key in svc.keys}
    assert {"1", "2", "3", "4", "5", "6", "7", "rides", "rides_agent"} <= all_keys


def test_shipped_numeric_shortcut_n_is_the_service_of_menu_row_n() -> None:
    config = Config.load(SHIPPED, SECRET_ENV)
    owner = {key: svc.name for svc in config.services.values() for key in svc.keys}
    for n, item in enumerate(config.home_menu.items, start=1):
        assert owner[str(n)] == owner[item.key]


def test_shipped_defaults() -> None:
    config = Config.load(SHIPPED, SECRET_ENV)
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.max_body_bytes == 3 * 1024 * 1024
    assert (config.ratelimit.per_sender, config.ratelimit.window_s) == (30, 60.0)
    assert config.routing.menu_words == ("menu", "home", "exit")
    assert config.routing.fallback == "menu"
    assert config.sessions.ttl_s == 24 * 3600
    assert config.forwarding == ForwardingConfig(
        timeout_ms=4000, retries=2, retry_base_ms=200, concurrency=16, breaker_failures=5, breaker_open_s=30.0
    )
    assert config.server.drain_timeout_s == 10.0
    assert config.dlq == DlqConfig(interval_s=300.0, batch=50, backoff_s=(120.0, 240.0, 480.0), max_attempts=3)
    assert (config.sessions.reap_at, config.sessions.reap_minute) == ("02:00", 120)
    assert (
        config.sessions.dlq_retention_days,
        config.sessions.abandoned_retention_days,
        config.sessions.seen_retention_days,
    ) == (7, 30, 8)
    assert config.admin.token == ""
    assert config.telemetry == TelemetryConfig()
    assert (config.slo.p95_ms, config.slo.cold_start_ms) == (1200, 1750)


def test_otlp_traces_need_an_endpoint() -> None:
    assert problems_of(minimal(telemetry={"traces": "otlp"})) == [
        'telemetry.otlp_endpoint: required when traces = "otlp"'
    ]


def test_dlq_delay_repeats_its_last_step() -> None:
    dlq = DlqConfig(backoff_s=(120.0, 240.0))
    assert [dlq.delay_s(n) for n in (1, 2, 3, 4)] == [120.0, 240.0, 240.0, 240.0]


# -- environment overrides -------------------------------------------------------------------------

FILE_VALUES = {
    "whatsapp": {
        "verify_token": "file",
        "app_secret": "file",
        "access_token": "file",
        "phone_number_id": "file",
    },
    "sessions": {"ttl_hours": 24},
    "forwarding": {"timeout_ms": 4000},
}


@pytest.mark.parametrize(
    ("name", "raw", "attribute", "expected"),
    [
        ("WACORED_APP_SECRET", "env-secret", "whatsapp.app_secret", "env-secret"),
        ("WHATSAPP_APP_SECRET", "env-secret", "whatsapp.app_secret", "env-secret"),
        ("WA_APP_SECRET", "env-secret", "whatsapp.app_secret", "env-secret"),
        ("WACORED_VERIFY_TOKEN", "env-verify", "whatsapp.verify_token", "env-verify"),
        ("WA_VERIFY_TOKEN", "env-verify", "whatsapp.verify_token", "env-verify"),
        ("WACORED_ACCESS_TOKEN", "env-token", "whatsapp.access_token", "env-token"),
        ("WA_TOKEN", "env-token", "whatsapp.access_token", "env-token"),
        ("WHATSAPP_ACCESS_TOKEN", "env-token", "whatsapp.access_token", "env-token"),
        ("WACORED_PHONE_NUMBER_ID", "106540352242922", "whatsapp.phone_number_id", "106540352242922"),
        ("WA_PHONE_ID", "106540352242922", "whatsapp.phone_number_id", "106540352242922"),
        ("WHATSAPP_PHONE_NUMBER_ID", "106540352242922", "whatsapp.phone_number_id", "106540352242922"),
        ("SESSION_TTL_HOURS", "2.5", "sessions.ttl_hours", 2.5),
        ("WA_ROUTER_TIMEOUT_MS", "1500", "forwarding.timeout_ms", 1500),
        ("WACORED_ADMIN_TOKEN", "adm1n", "admin.token", "adm1n"),
        ("WA_CORE_P95_SLO_MS", "900", "slo.p95_ms", 900),
        ("WA_CORE_COLD_START_SLO_MS", "2500", "slo.cold_start_ms", 2500),
        ("WACORED_NODE_ID", "eu-west.a", "cluster.node_id", "eu-west.a"),
    ],
)
def test_env_overrides_the_file(name: str, raw: str, attribute: str, expected: object) -> None:
    config = Config.from_mapping(minimal(**FILE_VALUES), {name: raw})
    assert operator.attrgetter(attribute)(config) == expected


def test_env_override_applies_to_the_loaded_file() -> None:
    config = Config.load(SHIPPED, {"WA_APP_SECRET": "x", "WA_PHONE_ID": "42", "SESSION_TTL_HOURS": "1"})
    assert (config.whatsapp.app_secret, config.whatsapp.phone_number_id) == ("x", "42")
    assert config.sessions.ttl_s == 3600.0


def test_primary_env_name_wins_over_its_aliases() -> None:
    env = {"WA_APP_SECRET": "alias", "WACORED_APP_SECRET": "primary", "WHATSAPP_APP_SECRET": "alias2"}
    assert Config.from_mapping(minimal(), env).whatsapp.app_secret == "primary"


def test_env_timeout_is_inherited_by_services_without_their_own() -> None:
    config = Config.from_mapping(minimal(), {"WA_ROUTER_TIMEOUT_MS": "1500"})
    assert {svc.forwarding.timeout_ms for svc in config.services.values()} == {1500}


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("SESSION_TTL_HOURS", "soon", "env SESSION_TTL_HOURS: must be a number, got 'soon'"),
        ("WA_ROUTER_TIMEOUT_MS", "4s", "env WA_ROUTER_TIMEOUT_MS: must be an integer, got '4s'"),
        ("WA_ROUTER_TIMEOUT_MS", "1.5", "env WA_ROUTER_TIMEOUT_MS: must be an integer, got '1.5'"),
        ("SESSION_TTL_HOURS", "0", "sessions.ttl_hours: must be greater than 0"),
        ("WA_ROUTER_TIMEOUT_MS", "-1", "forwarding.timeout_ms: must be greater than 0"),
        ("WA_CORE_P95_SLO_MS", "fast", "env WA_CORE_P95_SLO_MS: must be an integer, got 'fast'"),
    ],
)
def test_bad_numeric_env_value_is_a_problem(name: str, raw: str, problem: str) -> None:
    assert problems_of(minimal(), {name: raw}) == [problem]


# -- validation: every problem with its key path ---------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "bogus",
        "server.bogus",
        "whatsapp.bogus",
        "store.bogus",
        "ratelimit.bogus",
        "routing.bogus",
        "sessions.bogus",
        "forwarding.bogus",
        "dlq.bogus",
        "admin.bogus",
        "telemetry.bogus",
        "slo.bogus",
        "supervisor.bogus",
        "home_menu.bogus",
        "home_menu.items.0.bogus",
        "services.rides.bogus",
    ],
)
def test_unknown_key_is_a_problem_with_its_path(path: str) -> None:
    expected = path.replace("items.0", "items[0]")
    assert problems_of(put(minimal(), path, 1)) == [f"{expected}: unknown key"]


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("server.listen", 8080, "server.listen: must be a string, got an integer"),
        ("server.max_body_bytes", "3MB", "server.max_body_bytes: must be an integer, got a string"),
        ("whatsapp.verify_token", 123, "whatsapp.verify_token: must be a string, got an integer"),
        ("store.path", 5, "store.path: must be a string, got an integer"),
        ("ratelimit.per_sender", True, "ratelimit.per_sender: must be an integer, got true or false"),
        ("ratelimit.window_s", "60", "ratelimit.window_s: must be a number, got a string"),
        ("sessions.ttl_hours", "24", "sessions.ttl_hours: must be a number, got a string"),
        ("forwarding.retries", 1.5, "forwarding.retries: must be an integer, got a number"),
        ("routing.menu_words", "menu", "routing.menu_words: must be a list of strings"),
        ("routing.menu_words", ["menu", 1], "routing.menu_words: must be a list of strings"),
        ("routing.fallback", 1, "routing.fallback: must be a string, got an integer"),
        ("services.rides.keys", "rides", "services.rides.keys: must be a list of strings"),
        ("services.rides.retries", "3", "services.rides.retries: must be an integer, got a string"),
        ("home_menu.button", ["x"], "home_menu.button: must be a string, got list"),
        ("dlq.backoff_s", [120, "4m"], "dlq.backoff_s: must be a list of numbers"),
        ("dlq.backoff_s", 120, "dlq.backoff_s: must be a list of numbers"),
        ("dlq.max_attempts", 2.5, "dlq.max_attempts: must be an integer, got a number"),
        ("sessions.reap_at", 2, "sessions.reap_at: must be a string, got an integer"),
    ],
)
def test_wrong_type_is_a_problem(path: str, value: object, problem: str) -> None:
    assert problem in problems_of(put(minimal(), path, value))


@pytest.mark.parametrize("section", ["server", "whatsapp", "store", "ratelimit", "routing", "home_menu"])
def test_section_that_is_not_a_table_is_a_problem(section: str) -> None:
    assert f"{section}: must be a table" in problems_of(minimal(**{section: "oops"}))


def test_menu_items_that_are_not_an_array_is_a_problem() -> None:
    data = minimal(home_menu={"items": {"key": "rides", "title": "Rides"}})
    assert problems_of(data) == ["home_menu.items: must be an array of [[home_menu.items]] tables"]


@pytest.mark.parametrize("value", [5, True, 1.5])
def test_service_that_is_a_scalar_is_a_problem_not_a_crash(value: object) -> None:
    data = minimal()
    data["services"]["rides"] = value
    assert "services.rides: must be a table" in problems_of(data)


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("server.listen", "8080", "server.listen: must be host:port, e.g. 127.0.0.1:8080"),
        ("server.max_body_bytes", 0, "server.max_body_bytes: must be greater than 0"),
        ("whatsapp.graph_api_url", "graph", "whatsapp.graph_api_url: must be an http:// or https:// URL"),
        ("ratelimit.per_sender", 0, "ratelimit.per_sender: must be greater than 0"),
        ("ratelimit.window_s", -1, "ratelimit.window_s: must be greater than 0"),
        ("sessions.ttl_hours", 0, "sessions.ttl_hours: must be greater than 0"),
        ("forwarding.retries", -1, "forwarding.retries: must not be negative"),
        ("forwarding.concurrency", 0, "forwarding.concurrency: must be greater than 0"),
        ("services.rides.url", "ftp://x", "services.rides.url: must be an http:// or https:// URL"),
        ("store.path", "", "store.path: must not be empty"),
        ("server.drain_timeout_s", -1, "server.drain_timeout_s: must not be negative"),
        ("forwarding.breaker_failures", 0, "forwarding.breaker_failures: must be greater than 0"),
        ("services.rides.breaker_open_s", 0, "services.rides.breaker_open_s: must be greater than 0"),
        ("dlq.interval_s", 0, "dlq.interval_s: must be greater than 0"),
        ("dlq.backoff_s", [], "dlq.backoff_s: must be a non-empty list of positive numbers of seconds"),
        ("dlq.backoff_s", [120, 0], "dlq.backoff_s: must be a non-empty list of positive numbers of seconds"),
        ("dlq.max_attempts", -1, "dlq.max_attempts: must not be negative"),
        ("sessions.reap_at", "2am", 'sessions.reap_at: must be a time of day "HH:MM" (UTC)'),
        ("sessions.reap_at", "24:00", 'sessions.reap_at: must be a time of day "HH:MM" (UTC)'),
        (
            "sessions.seen_retention_days",
            7,
            "sessions.seen_retention_days: must exceed Meta's 7-day redelivery horizon, "
            "or a late redelivery is taken as new (got 7)",
        ),
        ("telemetry.traces", "jaeger", "telemetry.traces: must be one of none, console, otlp, got 'jaeger'"),
        ("telemetry.log_level", "loud", "telemetry.log_level: must be one of debug, info, warning, error, got 'loud'"),
        ("telemetry.otlp_endpoint", "collector:4318", "telemetry.otlp_endpoint: must be an http:// or https:// URL"),
        ("slo.p95_ms", 0, "slo.p95_ms: must be greater than 0"),
        ("supervisor.max_restarts", 0, "supervisor.max_restarts: must be greater than 0"),
        ("server.certfile", "/etc/wacored/cert.pem", "server.certfile: certfile and keyfile must be set together"),
        (
            "cluster.node_id",
            "web-12",
            "cluster.node_id: must not end in '-<digits>' (the shape of a default host-pid name)",
        ),
        (
            "cluster.node_id",
            "a b",
            "cluster.node_id: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ),
        (
            "cluster.node_id",
            "-a",
            "cluster.node_id: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ),
    ],
)
def test_out_of_range_value_is_a_problem(path: str, value: object, problem: str) -> None:
    assert problems_of(put(minimal(), path, value)) == [problem]


def test_service_without_url_is_a_problem() -> None:
    data = minimal()
    del data["services"]["rides"]["url"]
    assert problems_of(data) == ["services.rides.url: required"]


def test_no_services_is_a_problem() -> None:
    data = minimal(services={}, home_menu={})
    assert problems_of(data) == ["services: at least one [services.NAME] is required"]


@pytest.mark.parametrize("dup", ["rides", " RIDES "])
def test_key_of_two_services_is_a_problem(dup: str) -> None:
    data = put(minimal(), "services.jobs.keys", ["jobs", dup])
    assert problems_of(data) == ["services.jobs.keys: key 'rides' is also a key of services.rides"]


def test_menu_item_key_must_be_a_service_key() -> None:
    data = put(minimal(), "home_menu.items.1.key", "taxi")
    assert problems_of(data) == ["home_menu.items[1].key: 'taxi' is not a key of any service"]


def test_menu_item_key_matches_case_insensitively() -> None:
    config = Config.from_mapping(put(minimal(), "home_menu.items.0.key", " Rides "), {})
    assert config.home_menu.items[0].key == " Rides "


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("routing.fallback", "routing.fallback: must be \"menu\" or a service name, got 'taxi'"),
        ("routing.statuses", "routing.statuses: must be \"\" or a service name, got 'taxi'"),
    ],
)
def test_routing_must_name_known_services(path: str, problem: str) -> None:
    assert problems_of(put(minimal(), path, "taxi")) == [problem]


def test_routing_may_name_a_service() -> None:
    config = Config.from_mapping(minimal(routing={"fallback": "jobs", "statuses": "rides"}), {})
    assert (config.routing.fallback, config.routing.statuses) == ("jobs", "rides")


def test_menu_word_that_is_a_service_key_is_a_problem() -> None:
    data = minimal(routing={"menu_words": ["menu", "Rides"]})
    assert problems_of(data) == ["routing.menu_words: 'rides' is also a key of services.rides"]


@pytest.mark.parametrize("name", ["wacored", "whatsapp"])
def test_reserved_service_names(name: str) -> None:
    data = put(minimal(), f"services.{name}", {"url": "http://127.0.0.1:9/x", "keys": ["x"]})
    assert problems_of(data) == [f"services.{name}: the name {name!r} is reserved"]


def test_more_than_ten_menu_items_is_a_problem() -> None:
    assert problems_of(minimal(home_menu={"items": items(11)})) == [
        "home_menu.items: WhatsApp lists hold at most 10 rows, got 11"
    ]


def test_ten_menu_items_are_fine() -> None:
    assert len(Config.from_mapping(minimal(home_menu={"items": items(10)}), {}).home_menu.items) == 10


def test_every_problem_is_reported_at_once() -> None:
    data = minimal(routing={"fallback": "taxi"}, ratelimit={"per_sender": 0})
    put(data, "server.bogus", 1)
    put(data, "services.rides.bogus", 1)
    put(data, "services.jobs.keys", ["jobs", "rides"])
    put(data, "home_menu.items.1.key", "taxi")
    del data["services"]["rides"]["url"]
    assert sorted(problems_of(data, {"WA_ROUTER_TIMEOUT_MS": "soon"})) == sorted(
        [
            "env WA_ROUTER_TIMEOUT_MS: must be an integer, got 'soon'",
            "server.bogus: unknown key",
            "ratelimit.per_sender: must be greater than 0",
            "services.rides.url: required",
            "services.rides.bogus: unknown key",
            "services.jobs.keys: key 'rides' is also a key of services.rides",
            "routing.fallback: must be \"menu\" or a service name, got 'taxi'",
            "home_menu.items[1].key: 'taxi' is not a key of any service",
        ]
    )


# -- per-service forwarding ------------------------------------------------------------------------


def test_service_forwarding_overrides_inherit_the_defaults() -> None:
    data = minimal(forwarding={"timeout_ms": 1000, "retries": 5})
    put(data, "services.rides.timeout_ms", 250)
    put(data, "services.rides.concurrency", 2)
    config = Config.from_mapping(data, {})
    assert config.forwarding == ForwardingConfig(timeout_ms=1000, retries=5, retry_base_ms=200, concurrency=16)
    assert config.services["rides"].forwarding == ForwardingConfig(
        timeout_ms=250, retries=5, retry_base_ms=200, concurrency=2
    )
    assert config.services["jobs"].forwarding == config.forwarding


# -- secrets and warnings --------------------------------------------------------------------------


def test_missing_app_secret_is_a_secret_problem_not_a_config_error() -> None:
    config = Config.from_mapping(minimal(), {})
    [problem] = config.secret_problems()
    assert problem.startswith("whatsapp.app_secret: required")
    for name in ("WACORED_APP_SECRET", "WHATSAPP_APP_SECRET", "WA_APP_SECRET"):
        assert name in problem


def test_app_secret_is_not_in_the_repr() -> None:
    config = Config.from_mapping(minimal(), {"WACORED_APP_SECRET": "hunter2", "WA_TOKEN": "tok-123"})
    assert "hunter2" not in repr(config)
    assert "tok-123" not in repr(config)


@pytest.mark.parametrize(
    ("path", "limit", "name"),
    [
        ("home_menu.header", 60, "header"),
        ("home_menu.body", 1024, "body"),
        ("home_menu.button", 20, "button"),
        ("home_menu.items.0.title", 24, "items[0].title"),
        ("home_menu.items.0.description", 72, "items[0].description"),
    ],
)
def test_over_long_menu_text_is_a_warning_not_an_error(path: str, limit: int, name: str) -> None:
    config = Config.from_mapping(put(minimal(), path, "x" * (limit + 1)), {})
    assert config.warnings == (
        f"home_menu.{name}: {limit + 1} characters, WhatsApp allows {limit}; it will be cut with '…'",
    )
    at_limit = Config.from_mapping(put(minimal(), path, "x" * limit), {})
    assert at_limit.warnings == ()


# -- Config.load -----------------------------------------------------------------------------------

SMALL_TOML = """
[services.rides]
url = "http://127.0.0.1:9001/rides"
keys = ["rides", "1"]

[[home_menu.items]]
key = "rides"
title = "Rides"
"""


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "wacored.toml"
    path.write_text(SMALL_TOML, encoding="utf-8")
    config = Config.load(path, {"WA_APP_SECRET": "x"})
    assert config.source == path
    assert list(config.services) == ["rides"]
    assert config.services["rides"].keys == ("rides", "1")


def test_load_reports_problems_with_key_paths(tmp_path: Path) -> None:
    path = tmp_path / "wacored.toml"
    path.write_text(SMALL_TOML + "\n[server]\nbogus = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.load(path, {})
    assert info.value.problems == ["server.bogus: unknown key"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"[server\n", "not valid TOML", id="invalid-toml"),
        pytest.param(None, "cannot read", id="missing-file"),
        pytest.param(b'[server]\nlisten = "\xff"\n', "", id="not-utf8"),
    ],
)
def test_an_unreadable_file_is_one_problem_naming_it(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "wacored.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Config.load(path, {})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: {expected}")


# --- signing secrets ------------------------------------------------------------------------------


def test_signing_secrets_come_from_the_file_or_replace_it_from_the_environment() -> None:
    other = "whsec_" + base64.b64encode(b"n" * 32).decode()
    config = Config.from_mapping(minimal(), {"WACORED_SIGNING_SECRETS_RIDES": f" {other} ,{SIGNING}"})
    assert config.services["rides"].signing_secrets == (other, SIGNING)
    assert config.services["jobs"].signing_secrets == (SIGNING,)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("s3cret", "must start with 'whsec_'"),
        ("whsec_not base64!", "must be base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "must hold 24 to 64 key bytes, holds 5"),
    ],
)
def test_a_malformed_signing_secret_is_refused_without_quoting_it(secret: str, problem: str) -> None:
    problems = problems_of(put(minimal(), "services.rides.signing_secrets", [secret]))
    [only] = problems
    assert only.startswith("services.rides.signing_secrets: signing_secrets[0] ")
    assert problem in only
    assert secret not in only


def test_a_service_without_a_secret_is_warned_about_and_legacy_needs_one() -> None:
    data = minimal()
    del data["services"]["jobs"]["signing_secrets"]
    config = Config.from_mapping(data, {})
    assert [w for w in config.warnings if "signing_secrets" in w] == [
        "services.jobs.signing_secrets: none; the service cannot verify that a forward came from wacored"
        " (set WACORED_SIGNING_SECRETS_JOBS or signing_secrets; `wacored secrets new` makes one)"
    ]
    assert problems_of(put(data, "services.jobs.legacy_signature", True)) == [
        "services.jobs.legacy_signature: needs a signing secret to sign with (never the app secret)"
    ]


def test_the_previous_app_secret_comes_from_the_environment() -> None:
    config = Config.from_mapping(minimal(), {"WACORED_APP_SECRET_PREVIOUS": "old"})
    assert config.whatsapp.app_secret_previous == "old"
    assert "old" not in repr(config.whatsapp)


def test_a_relative_store_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "wacored.toml").write_text(SHIPPED.read_text())
    config = Config.load(folder / "wacored.toml", SECRET_ENV)
    assert config.store.path == folder / "var" / "wacored.db"
    absolute = SHIPPED.read_text().replace('path = "var/wacored.db"', f'path = "{tmp_path / "x.db"}"')
    (folder / "wacored.toml").write_text(absolute)
    assert Config.load(folder / "wacored.toml", SECRET_ENV).store.path == tmp_path / "x.db"

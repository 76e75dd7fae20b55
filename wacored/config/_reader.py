"""Reading and validating the configuration's TOML mapping, without I/O.

Each section reader pops the keys it knows from its table, so what is left is unknown and reported;
every problem is collected (with its key path) rather than raised, so one run reports them all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..core.signing import secret_problem
from ._sections import (
    ENV_ALIASES,
    LOG_LEVELS,
    MAX_MENU_ROWS,
    MENU_LIMITS,
    META_REDELIVERY_DAYS,
    NUMBER_MODES,
    RESERVED_NAMES,
    SIGNING_SECRETS_ENV,
    TRACE_EXPORTERS,
    AdminConfig,
    ClusterConfig,
    DlqConfig,
    ForwardingConfig,
    HomeMenuConfig,
    MenuItem,
    RateLimitConfig,
    RoutingConfig,
    ServerConfig,
    ServiceConfig,
    SessionsConfig,
    SloConfig,
    StoreConfig,
    SupervisorConfig,
    TelemetryConfig,
    WhatsAppConfig,
)

T = TypeVar("T")


class _Section:
    def __init__(self, data: Any, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.append(f"{path}: must be a table")
            data = {}
        self.data: dict[str, Any] = dict(data)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, text: str) -> None:
        self.problems.append(f"{self.key(name)}: {text}")

    def take(self, name: str, default: T, check: Callable[[Any], str | None] | None = None) -> T:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is tuple:
            numbers = bool(default) and isinstance(default[0], float)  # type: ignore[index]
            ok = isinstance(value, list) and all(
                (isinstance(v, (int, float)) and not isinstance(v, bool)) if numbers else isinstance(v, str)
                for v in value
            )
            if not ok:
                self.problem(name, f"must be a list of {'numbers' if numbers else 'strings'}")
                return default
            value = tuple(float(v) for v in value) if numbers else tuple(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            self.problem(name, f"must be {_type_name(expected)}, got {_type_name(type(value))}")
            return default
        if check is not None and (message := check(value)) is not None:
            self.problem(name, message)
            return default
        return value  # type: ignore[no-any-return]

    def problems_so_far(self) -> str:
        """The problems reported for this section so far, as one string to search for a key."""
        return " ".join(p for p in self.problems if p.startswith(f"{self.path}."))

    def finish(self) -> None:
        for name in sorted(self.data):
            self.problem(name, "unknown key")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _positive_seconds(value: float) -> str | None:
    return None if 0 < value < 86400 else "must be a number of seconds greater than 0 (and under a day)"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _http_url(value: str) -> str | None:
    if value.startswith(("http://", "https://")) and len(value.split("://", 1)[1]) > 0:
        return None
    return "must be an http:// or https:// URL"


_ENV_TYPES: dict[str, type] = {"ttl_hours": float, "timeout_ms": int, "p95_ms": int, "cold_start_ms": int}


def _apply_env(data: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (section, key), names in ENV_ALIASES.items():
        name = next((n for n in names if env.get(n)), None)
        if name is None:
            continue
        raw = env[name]
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            continue
        kind = _ENV_TYPES.get(key, str)
        try:
            target[key] = kind(raw)
        except ValueError:
            problems.append(f"env {name}: must be {_type_name(kind)}, got {raw!r}")
    return merged


def _postgres_url(value: str) -> str | None:
    """Empty (SQLite), or a PostgreSQL URL libpq takes: ``postgresql://user@host:port/db``. Only its
    shape is checked here; whether the database answers is `check-config`'s and `run`'s to find."""
    if not value:
        return None
    problem = "must be a PostgreSQL URL, postgresql://user@host:port/database (or empty for SQLite)"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError on a port that is not a number in range
    except ValueError:
        return problem
    if parts.scheme not in ("postgresql", "postgres") or not (parts.netloc or "host=" in parts.query):
        return problem
    return None


def _parse_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be host:port, e.g. 127.0.0.1:8080"
    return None


def _read_server(data: Any, problems: list[str]) -> ServerConfig:
    s = _Section(data, "server", problems)
    listen = s.take("listen", "127.0.0.1:8080", _parse_listen)
    max_body = s.take("max_body_bytes", 3 * 1024 * 1024, _positive)
    drain = s.take("drain_timeout_s", ServerConfig.drain_timeout_s, _not_negative)
    read_timeout = s.take("read_timeout_s", ServerConfig.read_timeout_s, _positive_seconds)
    max_connections = s.take("max_connections", ServerConfig.max_connections, _positive)
    max_unverified = s.take("max_unverified_bytes", ServerConfig.max_unverified_bytes, _positive)
    certfile = s.take("certfile", "")
    keyfile = s.take("keyfile", "")
    processes = s.take("processes", ServerConfig.processes, _processes)
    s.finish()
    if bool(certfile) != bool(keyfile):
        s.problem("certfile", "certfile and keyfile must be set together")
    if max_unverified < max_body:
        # Below one whole body, a single legitimate POST could never be read.
        s.problem("max_unverified_bytes", f"must be at least max_body_bytes ({max_body})")
    host, _, port = listen.rpartition(":")
    return ServerConfig(
        host=host.strip("[]"),
        port=int(port),
        max_body_bytes=max_body,
        drain_timeout_s=drain,
        read_timeout_s=read_timeout,
        max_connections=max_connections,
        max_unverified_bytes=max_unverified,
        certfile=certfile,
        keyfile=keyfile,
        processes=processes,
    )


def _processes(value: int) -> str | None:
    return None if value >= 0 else "must be 0 (one process per CPU), 1 (one process) or more, not negative"


def _read_whatsapp(data: Any, problems: list[str]) -> WhatsAppConfig:
    s = _Section(data, "whatsapp", problems)
    cfg = WhatsAppConfig(
        verify_token=s.take("verify_token", ""),
        app_secret=s.take("app_secret", ""),
        app_secret_previous=s.take("app_secret_previous", ""),
        access_token=s.take("access_token", ""),
        phone_number_id=s.take("phone_number_id", ""),
        graph_api_url=s.take("graph_api_url", WhatsAppConfig.graph_api_url, _http_url),
        numbers=s.take("numbers", WhatsAppConfig.numbers, _one_of(NUMBER_MODES)),
    )
    s.finish()
    return cfg


def _read_forwarding(s: _Section, base: ForwardingConfig) -> ForwardingConfig:
    return ForwardingConfig(
        timeout_ms=s.take("timeout_ms", base.timeout_ms, _positive),
        retries=s.take("retries", base.retries, _not_negative),
        retry_base_ms=s.take("retry_base_ms", base.retry_base_ms, _not_negative),
        concurrency=s.take("concurrency", base.concurrency, _positive),
        breaker_failures=s.take("breaker_failures", base.breaker_failures, _positive),
        breaker_open_s=s.take("breaker_open_s", base.breaker_open_s, _positive),
        retry_after_max_s=s.take("retry_after_max_s", base.retry_after_max_s, _not_negative),
    )


def _read_services(
    data: Any, forwarding: ForwardingConfig, env: Mapping[str, str], problems: list[str]
) -> dict[str, ServiceConfig]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append("services: must be a table of [services.NAME] tables")
        return {}
    services: dict[str, ServiceConfig] = {}
    owner: dict[str, str] = {}
    for name, raw in data.items():
        s = _Section(raw, f"services.{name}", problems)
        if name in RESERVED_NAMES:
            problems.append(f"services.{name}: the name {name!r} is reserved")
        if "url" not in s.data:
            s.problem("url", "required")
        url = s.take("url", "", _http_url)
        raw_keys: tuple[str, ...] = s.take("keys", ())
        keys = tuple(k.strip().lower() for k in raw_keys)
        for key in keys:
            if not key:
                s.problem("keys", "keys must not be empty")
            elif key in owner and owner[key] != name:
                s.problem("keys", f"key {key!r} is also a key of services.{owner[key]}")
            owner[key] = name
        fwd = _read_forwarding(s, forwarding)
        secrets, legacy = _read_signing(s, name, env)
        ca_file = s.take("ca_file", "")
        s.finish()
        services[name] = ServiceConfig(
            name=name,
            url=url,
            keys=keys,
            forwarding=fwd,
            signing_secrets=secrets,
            legacy_signature=legacy,
            ca_file=ca_file,
        )
    return services


def _read_signing(s: _Section, name: str, env: Mapping[str, str]) -> tuple[tuple[str, ...], bool]:
    """A service's signing secrets (the environment's, when set, replace the file's) and its legacy flag."""
    secrets: tuple[str, ...] = s.take("signing_secrets", ())
    from_env = env.get(SIGNING_SECRETS_ENV + name.upper())
    if from_env:
        secrets = tuple(part.strip() for part in from_env.split(",") if part.strip())
    for i, secret in enumerate(secrets):
        if problem := secret_problem(secret):
            where = f"env {SIGNING_SECRETS_ENV + name.upper()}" if from_env else "signing_secrets"
            s.problem("signing_secrets", f"{where}[{i}] {problem}")
    legacy = s.take("legacy_signature", False)
    if legacy and not secrets:
        s.problem("legacy_signature", "needs a signing secret to sign with (never the app secret)")
    return secrets, legacy


def _signing_warnings(services: Mapping[str, ServiceConfig]) -> list[str]:
    return [
        f"services.{name}.signing_secrets: none; the service cannot verify that a forward came from wacored"
        f" (set {SIGNING_SECRETS_ENV}{name.upper()} or signing_secrets; `wacored secrets new` makes one)"
        for name, svc in services.items()
        if not svc.signing_secrets
    ]


def _read_menu(
    data: Any, services: Mapping[str, ServiceConfig], problems: list[str], path: str = "home_menu"
) -> HomeMenuConfig:
    """A home menu at `path`, whose rows must be keys of `services`."""
    s = _Section(data, path, problems)
    raw_items = s.data.pop("items", [])
    menu = HomeMenuConfig(
        header=s.take("header", HomeMenuConfig.header),
        body=s.take("body", HomeMenuConfig.body),
        button=s.take("button", HomeMenuConfig.button),
    )
    s.finish()
    if not isinstance(raw_items, list):
        problems.append(f"{path}.items: must be an array of [[{path}.items]] tables")
        raw_items = []
    if len(raw_items) > MAX_MENU_ROWS:
        problems.append(f"{path}.items: WhatsApp lists hold at most {MAX_MENU_ROWS} rows, got {len(raw_items)}")
    known = {key for svc in services.values() for key in svc.keys}
    items: list[MenuItem] = []
    for i, raw in enumerate(raw_items):
        it = _Section(raw, f"{path}.items[{i}]", problems)
        key = it.take("key", "")
        title = it.take("title", "")
        description = it.take("description", "")
        it.finish()
        if not key:
            it.problem("key", "required")
        elif key.strip().lower() not in known:
            it.problem("key", f"{key!r} is not a key of any service")
        if not title:
            it.problem("title", "required")
        items.append(MenuItem(key=key, title=title, description=description))
    return HomeMenuConfig(header=menu.header, body=menu.body, button=menu.button, items=tuple(items))


def _menu_warnings(menu: HomeMenuConfig, path: str = "home_menu") -> list[str]:
    limits = [(name, getattr(menu, name), MENU_LIMITS[name]) for name in ("header", "body", "button")]
    for i, item in enumerate(menu.items):
        limits.append((f"items[{i}].title", item.title, MENU_LIMITS["row_title"]))
        limits.append((f"items[{i}].description", item.description, MENU_LIMITS["row_description"]))
    return [
        f"{path}.{name}: {len(text)} characters, WhatsApp allows {limit}; it will be cut with '…'"
        for name, text, limit in limits
        if len(text) > limit
    ]


def _read_store(data: Any, problems: list[str]) -> StoreConfig:
    s = _Section(data, "store", problems)
    store = StoreConfig(
        path=Path(s.take("path", "var/wacored.db", lambda v: None if v else "must not be empty")),
        url=s.take("url", "", _postgres_url),
        busy_timeout_ms=s.take("busy_timeout_ms", 5000, _not_negative),
        unhealthy_after_s=s.take("unhealthy_after_s", StoreConfig.unhealthy_after_s, _positive),
    )
    s.finish()
    return store


def _read_ratelimit(data: Any, problems: list[str]) -> RateLimitConfig:
    s = _Section(data, "ratelimit", problems)
    ratelimit = RateLimitConfig(
        per_sender=s.take("per_sender", 30, _positive), window_s=s.take("window_s", 60.0, _positive)
    )
    s.finish()
    return ratelimit


def _clock_time(value: str) -> str | None:
    hours, sep, minutes = value.partition(":")
    if sep and hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60 and len(minutes) == 2:
        return None
    return 'must be a time of day "HH:MM" (UTC)'


def _read_sessions(data: Any, problems: list[str]) -> SessionsConfig:
    s = _Section(data, "sessions", problems)
    base = SessionsConfig()
    sessions = SessionsConfig(
        ttl_hours=s.take("ttl_hours", base.ttl_hours, _positive),
        reap_at=s.take("reap_at", base.reap_at, _clock_time),
        dlq_retention_days=s.take("dlq_retention_days", base.dlq_retention_days, _positive),
        abandoned_retention_days=s.take("abandoned_retention_days", base.abandoned_retention_days, _positive),
        seen_retention_days=s.take("seen_retention_days", base.seen_retention_days, _positive),
        cache_size=s.take("cache_size", base.cache_size, _positive),
    )
    if "seen_retention_days" not in s.problems_so_far() and sessions.seen_retention_days <= META_REDELIVERY_DAYS:
        s.problem(
            "seen_retention_days",
            f"must exceed Meta's {META_REDELIVERY_DAYS}-day redelivery horizon, "
            f"or a late redelivery is taken as new (got {sessions.seen_retention_days:g})",
        )
    s.finish()
    return sessions


def _read_fields(
    data: Any, path: str, problems: list[str], cls: type[T], checks: Mapping[str, Callable[[Any], str | None]]
) -> tuple[T, _Section]:
    """A section whose keys are exactly `cls`'s fields, each defaulting to `cls()`'s value."""
    s = _Section(data, path, problems)
    base = cls()
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]  # every cls passed is a dataclass
    values = {f.name: s.take(f.name, getattr(base, f.name), checks.get(f.name)) for f in fields}
    s.finish()
    return cls(**values), s


def _read_dlq(data: Any, problems: list[str]) -> DlqConfig:
    checks: dict[str, Callable[[Any], str | None]] = {
        "interval_s": _positive,
        "batch": _positive,
        "backoff_s": _backoff_steps,
        "max_attempts": _not_negative,
    }
    return _read_fields(data, "dlq", problems, DlqConfig, checks)[0]


def _backoff_steps(value: tuple[float, ...]) -> str | None:
    if not value or any(v <= 0 for v in value):
        return "must be a non-empty list of positive numbers of seconds"
    return None


def _read_admin(data: Any, problems: list[str]) -> AdminConfig:
    return _read_fields(data, "admin", problems, AdminConfig, {})[0]


def _read_telemetry(data: Any, problems: list[str]) -> TelemetryConfig:
    checks = {
        "log_level": _one_of(LOG_LEVELS),
        "traces": _one_of(TRACE_EXPORTERS),
        "otlp_endpoint": lambda v: None if not v else _http_url(v),
        "service_name": lambda v: None if v else "must not be empty",
    }
    telemetry, s = _read_fields(data, "telemetry", problems, TelemetryConfig, checks)
    if telemetry.traces == "otlp" and not telemetry.otlp_endpoint:
        s.problem("otlp_endpoint", 'required when traces = "otlp"')
    return telemetry


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def _read_slo(data: Any, problems: list[str]) -> SloConfig:
    return _read_fields(data, "slo", problems, SloConfig, {"p95_ms": _positive, "cold_start_ms": _positive})[0]


def _read_supervisor(data: Any, problems: list[str]) -> SupervisorConfig:
    checks = dict.fromkeys(("max_restarts", "window_s", "backoff_base_s", "backoff_max_s"), _positive)
    return _read_fields(data, "supervisor", problems, SupervisorConfig, checks)[0]


def _read_cluster(data: Any, problems: list[str]) -> ClusterConfig:
    return _read_fields(data, "cluster", problems, ClusterConfig, {"lease_ttl_s": _positive, "node_id": _node_id})[0]


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PID_NAME = re.compile(r".*-[0-9]+")


def _node_id(value: str) -> str | None:
    """Empty (``host-pid``), or a name of letters, digits, ``.``, ``_`` and ``-`` (at most 64) that
    does not end in ``-<digits>``: a lease owner of that shape is taken for a process of the host of
    that name, and taken over at once when that pid is gone (`store.lanes.this_host_dead`)."""
    if not value:
        return None
    if not _NODE_ID.fullmatch(value):
        return "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if _PID_NAME.fullmatch(value):
        return "must not end in '-<digits>' (the shape of a default host-pid name)"
    return None


def _read_routing(data: Any, services: Mapping[str, ServiceConfig], problems: list[str]) -> RoutingConfig:
    s = _Section(data, "routing", problems)
    menu_words: tuple[str, ...] = s.take("menu_words", RoutingConfig.menu_words)
    routing = RoutingConfig(
        menu_words=tuple(w.strip().lower() for w in menu_words),
        fallback=s.take("fallback", "menu"),
        statuses=s.take("statuses", ""),
    )
    s.finish()
    if routing.fallback != "menu" and routing.fallback not in services:
        problems.append(f'routing.fallback: must be "menu" or a service name, got {routing.fallback!r}')
    if routing.statuses and routing.statuses not in services:
        problems.append(f'routing.statuses: must be "" or a service name, got {routing.statuses!r}')
    all_keys = {key: svc.name for svc in services.values() for key in svc.keys}
    for word in routing.menu_words:
        if word in all_keys:
            problems.append(f"routing.menu_words: {word!r} is also a key of services.{all_keys[word]}")
    return routing


def _credential_warnings(whatsapp: WhatsAppConfig) -> list[str]:
    return [
        f"whatsapp.{key}: empty; replies such as the home menu will be dead-lettered"
        for key in ("access_token", "phone_number_id")
        if not getattr(whatsapp, key)
    ]


def read(data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Every section of `data`, overridden from `env`: (the sections by name, problems, warnings).

    The sections are only complete when there are no problems.
    """
    problems: list[str] = []
    top = _Section(_apply_env(data, env, problems), "", problems)
    sections: dict[str, Any] = {}
    for name, reader in (
        ("server", _read_server),
        ("whatsapp", _read_whatsapp),
        ("store", _read_store),
        ("ratelimit", _read_ratelimit),
        ("sessions", _read_sessions),
        ("dlq", _read_dlq),
        ("admin", _read_admin),
        ("telemetry", _read_telemetry),
        ("slo", _read_slo),
        ("supervisor", _read_supervisor),
        ("cluster", _read_cluster),
    ):
        sections[name] = reader(top.data.pop(name, None), problems)
    fw = _Section(top.data.pop("forwarding", None), "forwarding", problems)
    sections["forwarding"] = _read_forwarding(fw, ForwardingConfig())
    fw.finish()
    services = _read_services(top.data.pop("services", None), sections["forwarding"], env, problems)
    if not services:
        problems.append("services: at least one [services.NAME] is required")
    sections["services"] = services
    sections["routing"] = _read_routing(top.data.pop("routing", None), services, problems)
    sections["home_menu"] = _read_menu(top.data.pop("home_menu", None), services, problems)
    # Imported here: `_numbers` builds on this module's section readers.
    from ._numbers import number_warnings, read_numbers

    sections["numbers"] = read_numbers(top.data.pop("numbers", None), sections, env, problems)
    top.finish()
    warnings = (
        _menu_warnings(sections["home_menu"])
        + _credential_warnings(sections["whatsapp"])
        + _signing_warnings(services)
        + number_warnings(sections["numbers"])
    )
    return sections, problems, warnings

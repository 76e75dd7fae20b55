"""The daemon's configuration: a frozen value object read from TOML plus the environment.

`Config.load` reads the file, applies environment overrides (secrets live in the environment in
production), validates everything and either returns a `Config` or raises `ConfigError` carrying every
problem found, each prefixed with its key path (``services.rides.url: ...``). Nothing here mutates a
config after it is built: a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HOME_SERVICE = "wacored"
"""The pseudo-service a message is routed to when wacored itself answers it (the home menu)."""
GRAPH_SENDER = "whatsapp"
"""The forwarder whose downstream is the Graph API (replies such as the home menu)."""
RESERVED_NAMES = frozenset({HOME_SERVICE, GRAPH_SENDER})

# WhatsApp interactive list limits (Cloud API reference, "Interactive list messages").
MAX_MENU_ROWS = 10

ENV_ALIASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("whatsapp", "verify_token"): ("WACORED_VERIFY_TOKEN", "WA_VERIFY_TOKEN"),
    ("whatsapp", "app_secret"): ("WACORED_APP_SECRET", "WHATSAPP_APP_SECRET", "WA_APP_SECRET"),
    ("whatsapp", "access_token"): ("WACORED_ACCESS_TOKEN", "WA_TOKEN", "WHATSAPP_ACCESS_TOKEN"),
    ("whatsapp", "phone_number_id"): (
        "WACORED_PHONE_NUMBER_ID",
        "WA_PHONE_ID",
        "WHATSAPP_PHONE_NUMBER_ID",
    ),
    ("sessions", "ttl_hours"): ("SESSION_TTL_HOURS",),
    ("forwarding", "timeout_ms"): ("WA_ROUTER_TIMEOUT_MS",),
}


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 3 * 1024 * 1024

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class WhatsAppConfig:
    verify_token: str = ""
    app_secret: str = field(default="", repr=False)
    access_token: str = field(default="", repr=False)
    phone_number_id: str = ""
    graph_api_url: str = "https://graph.facebook.com/v21.0"

    @property
    def messages_url(self) -> str:
        return f"{self.graph_api_url.rstrip('/')}/{self.phone_number_id}/messages"


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("var/wacored.db")
    busy_timeout_ms: int = 5000


@dataclass(frozen=True)
class RateLimitConfig:
    per_sender: int = 30
    window_s: float = 60.0


@dataclass(frozen=True)
class RoutingConfig:
    menu_words: tuple[str, ...] = ("menu", "home", "exit")
    fallback: str = "menu"
    statuses: str = ""


@dataclass(frozen=True)
class SessionsConfig:
    ttl_hours: float = 24.0

    @property
    def ttl_s(self) -> float:
        return self.ttl_hours * 3600.0


@dataclass(frozen=True)
class ForwardingConfig:
    timeout_ms: int = 4000
    retries: int = 2
    retry_base_ms: int = 200
    concurrency: int = 16


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    url: str
    keys: tuple[str, ...]
    forwarding: ForwardingConfig


@dataclass(frozen=True)
class MenuItem:
    key: str
    title: str
    description: str = ""


@dataclass(frozen=True)
class HomeMenuConfig:
    header: str = "Services"
    body: str = "What would you like to do?"
    button: str = "View Services"
    items: tuple[MenuItem, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    whatsapp: WhatsAppConfig
    store: StoreConfig
    ratelimit: RateLimitConfig
    routing: RoutingConfig
    sessions: SessionsConfig
    forwarding: ForwardingConfig
    home_menu: HomeMenuConfig
    services: Mapping[str, ServiceConfig]
    source: Path | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str]) -> Config:
        """Read, override from `env` and validate `path`; raise `ConfigError` listing every problem."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
        return cls.from_mapping(data, env, source=path)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], env: Mapping[str, str], source: Path | None = None) -> Config:
        problems: list[str] = []
        warnings: list[str] = []
        merged = _apply_env(data, env, problems)
        config = _build(merged, problems, warnings, source)
        if problems or config is None:
            raise ConfigError(problems)
        return config

    def secret_problems(self) -> list[str]:
        """What keeps this config from serving Meta: there is no unsigned mode."""
        if not self.whatsapp.app_secret:
            names = ", ".join(ENV_ALIASES[("whatsapp", "app_secret")])
            return [f"whatsapp.app_secret: required (set it in the environment: {names})"]
        return []


# --------------------------------------------------------------------------------------------------
# Reading and validation. Each section reader pops the keys it knows, so what is left is unknown.

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
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            if not ok:
                self.problem(name, "must be a list of strings")
                return default
            value = tuple(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            self.problem(name, f"must be {_type_name(expected)}, got {_type_name(type(value))}")
            return default
        if check is not None and (message := check(value)) is not None:
            self.problem(name, message)
            return default
        return value  # type: ignore[no-any-return]

    def finish(self) -> None:
        for name in sorted(self.data):
            self.problem(name, "unknown key")


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        kind, kind.__name__
    )


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _http_url(value: str) -> str | None:
    if value.startswith(("http://", "https://")) and len(value.split("://", 1)[1]) > 0:
        return None
    return "must be an http:// or https:// URL"


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
        if key == "ttl_hours":
            try:
                target[key] = float(raw)
            except ValueError:
                problems.append(f"env {name}: must be a number, got {raw!r}")
        elif key == "timeout_ms":
            try:
                target[key] = int(raw)
            except ValueError:
                problems.append(f"env {name}: must be an integer, got {raw!r}")
        else:
            target[key] = raw
    return merged


def _parse_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be host:port, e.g. 127.0.0.1:8080"
    return None


def _read_server(data: Any, problems: list[str]) -> ServerConfig:
    s = _Section(data, "server", problems)
    listen = s.take("listen", "127.0.0.1:8080", _parse_listen)
    max_body = s.take("max_body_bytes", 3 * 1024 * 1024, _positive)
    s.finish()
    host, _, port = listen.rpartition(":")
    return ServerConfig(host=host.strip("[]"), port=int(port), max_body_bytes=max_body)


def _read_whatsapp(data: Any, problems: list[str]) -> WhatsAppConfig:
    s = _Section(data, "whatsapp", problems)
    cfg = WhatsAppConfig(
        verify_token=s.take("verify_token", ""),
        app_secret=s.take("app_secret", ""),
        access_token=s.take("access_token", ""),
        phone_number_id=s.take("phone_number_id", ""),
        graph_api_url=s.take("graph_api_url", WhatsAppConfig.graph_api_url, _http_url),
    )
    s.finish()
    return cfg


def _read_forwarding(s: _Section, base: ForwardingConfig) -> ForwardingConfig:
    return ForwardingConfig(
        timeout_ms=s.take("timeout_ms", base.timeout_ms, _positive),
        retries=s.take("retries", base.retries, _not_negative),
        retry_base_ms=s.take("retry_base_ms", base.retry_base_ms, _not_negative),
        concurrency=s.take("concurrency", base.concurrency, _positive),
    )


def _read_services(
    data: Any, forwarding: ForwardingConfig, problems: list[str]
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
        s.finish()
        services[name] = ServiceConfig(name=name, url=url, keys=keys, forwarding=fwd)
    return services


def _read_menu(data: Any, services: Mapping[str, ServiceConfig], problems: list[str]) -> HomeMenuConfig:
    s = _Section(data, "home_menu", problems)
    raw_items = s.data.pop("items", [])
    menu = HomeMenuConfig(
        header=s.take("header", HomeMenuConfig.header),
        body=s.take("body", HomeMenuConfig.body),
        button=s.take("button", HomeMenuConfig.button),
    )
    s.finish()
    if not isinstance(raw_items, list):
        problems.append("home_menu.items: must be an array of [[home_menu.items]] tables")
        raw_items = []
    if len(raw_items) > MAX_MENU_ROWS:
        problems.append(f"home_menu.items: WhatsApp lists hold at most {MAX_MENU_ROWS} rows, got {len(raw_items)}")
    known = {key for svc in services.values() for key in svc.keys}
    items: list[MenuItem] = []
    for i, raw in enumerate(raw_items):
        it = _Section(raw, f"home_menu.items[{i}]", problems)
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


def _menu_warnings(menu: HomeMenuConfig) -> list[str]:
    limits = [("header", menu.header, 60), ("body", menu.body, 1024), ("button", menu.button, 20)]
    for i, item in enumerate(menu.items):
        limits.append((f"items[{i}].title", item.title, 24))
        limits.append((f"items[{i}].description", item.description, 72))
    return [
        f"home_menu.{name}: {len(text)} characters, WhatsApp allows {limit}; it will be cut with '…'"
        for name, text, limit in limits
        if len(text) > limit
    ]


def _build(
    data: Mapping[str, Any], problems: list[str], warnings: list[str], source: Path | None
) -> Config | None:
    top = _Section(data, "", problems)
    server = _read_server(top.data.pop("server", None), problems)
    whatsapp = _read_whatsapp(top.data.pop("whatsapp", None), problems)

    st = _Section(top.data.pop("store", None), "store", problems)
    store = StoreConfig(
        path=Path(st.take("path", "var/wacored.db", lambda v: None if v else "must not be empty")),
        busy_timeout_ms=st.take("busy_timeout_ms", 5000, _not_negative),
    )
    st.finish()

    rl = _Section(top.data.pop("ratelimit", None), "ratelimit", problems)
    ratelimit = RateLimitConfig(
        per_sender=rl.take("per_sender", 30, _positive), window_s=rl.take("window_s", 60.0, _positive)
    )
    rl.finish()

    se = _Section(top.data.pop("sessions", None), "sessions", problems)
    sessions = SessionsConfig(ttl_hours=se.take("ttl_hours", 24.0, _positive))
    se.finish()

    fw = _Section(top.data.pop("forwarding", None), "forwarding", problems)
    forwarding = _read_forwarding(fw, ForwardingConfig())
    fw.finish()

    services = _read_services(top.data.pop("services", None), forwarding, problems)
    if not services:
        problems.append("services: at least one [services.NAME] is required")

    ro = _Section(top.data.pop("routing", None), "routing", problems)
    menu_words: tuple[str, ...] = ro.take("menu_words", RoutingConfig.menu_words)
    routing = RoutingConfig(
        menu_words=tuple(w.strip().lower() for w in menu_words),
        fallback=ro.take("fallback", "menu"),
        statuses=ro.take("statuses", ""),
    )
    ro.finish()
    if routing.fallback != "menu" and routing.fallback not in services:
        problems.append(f"routing.fallback: must be \"menu\" or a service name, got {routing.fallback!r}")
    if routing.statuses and routing.statuses not in services:
        problems.append(f"routing.statuses: must be \"\" or a service name, got {routing.statuses!r}")
    all_keys = {key: svc.name for svc in services.values() for key in svc.keys}
    for word in routing.menu_words:
        if word in all_keys:
            problems.append(f"routing.menu_words: {word!r} is also a key of services.{all_keys[word]}")

    home_menu = _read_menu(top.data.pop("home_menu", None), services, problems)
    warnings.extend(_menu_warnings(home_menu))
    for key in ("access_token", "phone_number_id"):
        if not getattr(whatsapp, key):
            warnings.append(f"whatsapp.{key}: empty; replies such as the home menu will be dead-lettered")
    top.finish()
    if problems:
        return None
    return Config(
        server=server,
        whatsapp=whatsapp,
        store=store,
        ratelimit=ratelimit,
        routing=routing,
        sessions=sessions,
        forwarding=forwarding,
        home_menu=home_menu,
        services=services,
        source=source,
        warnings=tuple(warnings),
    )

"""The configuration's sections: frozen, typed values, and the names and limits they rely on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

HOME_SERVICE = "wacored"
"""The pseudo-service a message is routed to when wacored itself answers it (the home menu)."""
GRAPH_SENDER = "whatsapp"
"""The forwarder whose downstream is the Graph API (replies such as the home menu)."""
RESERVED_NAMES = frozenset({HOME_SERVICE, GRAPH_SENDER})

# WhatsApp interactive list limits (Cloud API reference, "Interactive list messages").
MAX_MENU_ROWS = 10
MENU_LIMITS = {"header": 60, "body": 1024, "button": 20, "row_title": 24, "row_description": 72, "section": 24}
"""Characters allowed in each text of the list message; longer text is cut with '…'."""

ENV_ALIASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("whatsapp", "verify_token"): ("WACORED_VERIFY_TOKEN", "WA_VERIFY_TOKEN"),
    ("whatsapp", "app_secret"): ("WACORED_APP_SECRET", "WHATSAPP_APP_SECRET", "WA_APP_SECRET"),
    ("whatsapp", "app_secret_previous"): ("WACORED_APP_SECRET_PREVIOUS",),
    ("whatsapp", "access_token"): ("WACORED_ACCESS_TOKEN", "WA_TOKEN", "WHATSAPP_ACCESS_TOKEN"),
    ("whatsapp", "phone_number_id"): (
        "WACORED_PHONE_NUMBER_ID",
        "WA_PHONE_ID",
        "WHATSAPP_PHONE_NUMBER_ID",
    ),
    ("sessions", "ttl_hours"): ("SESSION_TTL_HOURS",),
    ("forwarding", "timeout_ms"): ("WA_ROUTER_TIMEOUT_MS",),
    ("admin", "token"): ("WACORED_ADMIN_TOKEN",),
    ("store", "url"): ("WACORED_STORE_URL", "DATABASE_URL"),
    ("cluster", "node_id"): ("WACORED_NODE_ID",),
    ("slo", "p95_ms"): ("WA_CORE_P95_SLO_MS",),
    ("slo", "cold_start_ms"): ("WA_CORE_COLD_START_SLO_MS",),
}
META_REDELIVERY_DAYS = 7
"""Meta retries a webhook for up to 7 days: dedupe rows must outlive that."""
TRACE_EXPORTERS = ("none", "console", "otlp")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 3 * 1024 * 1024
    drain_timeout_s: float = 10.0
    """How long forwarders may finish their current attempts after SIGTERM."""
    read_timeout_s: float = 10.0
    """A webhook body not wholly received this long after its headers is answered 408."""
    max_connections: int = 1000
    """Requests in flight; a newcomer at the cap sheds the oldest unverified body read."""
    max_unverified_bytes: int = 64 * 1024 * 1024
    """Body bytes buffered, across every webhook read not yet complete (so not yet verified)."""
    certfile: str = ""
    keyfile: str = ""
    processes: int = 1
    """Worker processes sharing the port: 1 is one process with no supervisor in front; 0 is one per
    CPU (`workers`)."""

    @property
    def workers(self) -> int:
        """How many worker processes ``processes`` asks for (0: one per CPU)."""
        return self.processes or os.cpu_count() or 1

    @property
    def tls(self) -> bool:
        return bool(self.certfile)

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class WhatsAppConfig:
    verify_token: str = ""
    app_secret: str = field(default="", repr=False)
    app_secret_previous: str = field(default="", repr=False)
    """Also accepted while set: the app secret before a rotation (counted, so the operator knows when
    no POST needs it any more)."""
    access_token: str = field(default="", repr=False)
    phone_number_id: str = ""
    """The default number: replies to a message whose change names no number go from it."""
    graph_api_url: str = "https://graph.facebook.com/v21.0"
    numbers: str = "any"
    """``any``: a message to any number is routed (by its section, else the top-level config);
    ``listed``: one to a number the config does not know is stored as ``unknown_number``, not routed."""

    @property
    def messages_url(self) -> str:
        return self.messages_url_of(self.phone_number_id)

    def messages_url_of(self, number: str) -> str:
        """Where a reply from business number `number` is POSTed."""
        return f"{self.graph_api_url.rstrip('/')}/{number}/messages"


@dataclass(frozen=True)
class StoreConfig:
    path: Path = Path("var/wacored.db")
    url: str = ""
    """A PostgreSQL URL (``postgresql://user@host:port/db``): the store is that database, shared by
    every node that names it; empty, the SQLite file at `path`."""
    busy_timeout_ms: int = 5000
    unhealthy_after_s: float = 60.0
    """Commits failing this long make /health ``unhealthy`` (503); before that, ``degraded``."""


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
    reap_at: str = "02:00"
    """When the daily reap runs, ``HH:MM`` UTC."""
    dlq_retention_days: float = 7.0
    abandoned_retention_days: float = 30.0
    seen_retention_days: float = 8.0
    cache_size: int = 50_000
    """Sessions the writer keeps in memory in front of the store (an LRU; a restart applies a change).
    ~300 bytes an entry (measured: 100 000 entries, 30 MB): the default keeps a worker's peak RSS
    under its 80 MB budget (57 MB measured without the cache) once the cache is full."""

    @property
    def reap_minute(self) -> int:
        """`reap_at` as minutes after midnight UTC."""
        hours, minutes = self.reap_at.split(":")
        return int(hours) * 60 + int(minutes)

    @property
    def ttl_s(self) -> float:
        return self.ttl_hours * 3600.0


@dataclass(frozen=True)
class ForwardingConfig:
    timeout_ms: int = 4000
    retries: int = 2
    retry_base_ms: int = 200
    concurrency: int = 16
    breaker_failures: int = 5
    """Consecutive transient failures that open the service's circuit breaker."""
    breaker_open_s: float = 30.0
    retry_after_max_s: float = 300.0
    """The longest ``Retry-After`` honoured: a service cannot park a lane or a dead letter longer."""


@dataclass(frozen=True)
class DlqConfig:
    interval_s: float = 300.0
    batch: int = 50
    backoff_s: tuple[float, ...] = (120.0, 240.0, 480.0)
    max_attempts: int = 3

    def delay_s(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based) of a dead letter; the last step repeats."""
        return self.backoff_s[min(retry, len(self.backoff_s)) - 1]


@dataclass(frozen=True)
class AdminConfig:
    token: str = field(default="", repr=False)
    """Bearer token for ``/admin/``; empty turns the admin API off."""


@dataclass(frozen=True)
class TelemetryConfig:
    log_level: str = "info"
    traces: str = "none"
    otlp_endpoint: str = ""
    service_name: str = "wacored"


@dataclass(frozen=True)
class SloConfig:
    p95_ms: int = 1200
    cold_start_ms: int = 1750


@dataclass(frozen=True)
class SupervisorConfig:
    max_restarts: int = 5
    """Crashes of one actor within `window_s` that stop the daemon (systemd restarts it)."""
    window_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True)
class ClusterConfig:
    lease_ttl_s: float = 10.0
    """How long a lane's or a singleton's lease lasts unrenewed: a worker that dies without giving
    its leases back has them taken over this long after its last renewal (at most)."""
    node_id: str = ""
    """This node's name in the leases, the attempts log, /health and the log lines; empty: the
    process's ``host-pid`` (`daemon.node_name`). With ``[server] processes = N`` each worker is
    ``<node_id>-w<index>``. It must not end in ``-<digits>``: that shape is a default name, whose
    owner's death is seen by its pid (`store.lanes.this_host_dead`); a configured name is only ever
    taken over when its leases expire."""


NUMBER_MODES = ("any", "listed")
ACCESS_TOKEN_ENV = "WACORED_ACCESS_TOKEN_"
"""``WACORED_ACCESS_TOKEN_<PHONE_NUMBER_ID>`` overrides ``[numbers.<id>] access_token``."""

SIGNING_SECRETS_ENV = "WACORED_SIGNING_SECRETS_"
"""``WACORED_SIGNING_SECRETS_<NAME>`` (upper-case service name, comma-separated) overrides a service's
``signing_secrets``."""


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    url: str
    keys: tuple[str, ...]
    forwarding: ForwardingConfig
    signing_secrets: tuple[str, ...] = field(default=(), repr=False)
    """``whsec_`` secrets the service verifies wacored with (Standard Webhooks); the first is the newest."""
    legacy_signature: bool = False
    """Also send ``X-Hub-Signature-256``, computed with the first signing secret (never the app secret)."""
    ca_file: str = ""
    """A PEM file of the CA that signed the service's certificate (a private CA), trusted besides the
    system's trust store and certifi's bundle."""


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
class NumberConfig:
    """``[numbers.<phone_number_id>]``: what one business number overrides; None (or "") inherits the
    top-level value."""

    id: str
    access_token: str = field(default="", repr=False)
    """The Graph API token of this number's WABA; "" = ``[whatsapp] access_token``."""
    services: tuple[str, ...] | None = None
    """The configured services (with their keys) that route from this number; None = every one."""
    fallback: str | None = None
    statuses: str | None = None
    home_menu: HomeMenuConfig | None = None

"""The daemon's configuration: a frozen value object read from TOML plus the environment.

`Config.load` reads the file, applies environment overrides (secrets live in the environment in
production), validates everything and either returns a `Config` or raises `ConfigError` carrying every
problem found, each prefixed with its key path (``services.rides.url: ...``). Nothing here mutates a
config after it is built: a reload builds a new one and swaps it in whole.

`_sections` holds the section types and the names and limits they rely on, `_reader` the validation
(pure, no I/O); `Config`, here, puts them together.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._reader import read
from ._sections import (
    ENV_ALIASES,
    GRAPH_SENDER,
    HOME_SERVICE,
    MAX_MENU_ROWS,
    MENU_LIMITS,
    RESERVED_NAMES,
    AdminConfig,
    ClusterConfig,
    DlqConfig,
    ForwardingConfig,
    HomeMenuConfig,
    MenuItem,
    NumberConfig,
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

__all__ = [
    "ENV_ALIASES",
    "GRAPH_SENDER",
    "HOME_SERVICE",
    "MAX_MENU_ROWS",
    "MENU_LIMITS",
    "RESERVED_NAMES",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DlqConfig",
    "ForwardingConfig",
    "HomeMenuConfig",
    "MenuItem",
    "NumberConfig",
    "RateLimitConfig",
    "RoutingConfig",
    "ServerConfig",
    "ServiceConfig",
    "SessionsConfig",
    "SloConfig",
    "StoreConfig",
    "SupervisorConfig",
    "ClusterConfig",
    "TelemetryConfig",
    "WhatsAppConfig",
]


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


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
    dlq: DlqConfig = DlqConfig()
    admin: AdminConfig = AdminConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    slo: SloConfig = SloConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    cluster: ClusterConfig = ClusterConfig()
    numbers: Mapping[str, NumberConfig] = field(default_factory=dict)
    """``[numbers.<phone_number_id>]`` sections, by id (none: every number uses the top-level config)."""
    source: Path | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str]) -> Config:
        """Read, override from `env` and validate `path`; raise `ConfigError` listing every problem.

        A relative ``[store] path`` is taken relative to the folder of `path`."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
        config = cls.from_mapping(data, env, source=path)
        if not config.store.path.is_absolute():
            # Relative to the file that names it, not to wherever the command happens to run.
            store = dataclasses.replace(config.store, path=path.parent / config.store.path)
            config = dataclasses.replace(config, store=store)
        return config

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], env: Mapping[str, str], source: Path | None = None) -> Config:
        """Validate an already parsed mapping (the TOML document) the way `load` does."""
        sections, problems, warnings = read(data, env)
        if problems:
            raise ConfigError(problems)
        return cls(**sections, source=source, warnings=tuple(warnings))

    def secret_problems(self) -> list[str]:
        """What keeps this config from serving Meta: there is no unsigned mode."""
        if not self.whatsapp.app_secret:
            names = ", ".join(ENV_ALIASES[("whatsapp", "app_secret")])
            return [f"whatsapp.app_secret: required (set it in the environment: {names})"]
        return []

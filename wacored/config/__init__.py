"""The daemon's configuration: a frozen value object read from TOML plus the environment.

`Config.load` reads the file, applies environment overrides (secrets live in the environment in
production), validates everything and either returns a `Config` or raises `ConfigError` carrying every
problem found, each prefixed with its key path (``services.rides.url: ...``). Nothing here mutates a
config after it is built: a reload builds a new one and swaps it in whole.

`_sections` holds the section types and the names and limits they rely on, `_reader` the validation
(pure, no I/O), `_config` the `Config` that puts them together.
"""

from ._config import Config, ConfigError
from ._sections import (
    ENV_ALIASES,
    GRAPH_SENDER,
    HOME_SERVICE,
    MAX_MENU_ROWS,
    MENU_LIMITS,
    RESERVED_NAMES,
    ForwardingConfig,
    HomeMenuConfig,
    MenuItem,
    RateLimitConfig,
    RoutingConfig,
    ServerConfig,
    ServiceConfig,
    SessionsConfig,
    StoreConfig,
    WhatsAppConfig,
)

__all__ = [
    "ENV_ALIASES",
    "GRAPH_SENDER",
    "HOME_SERVICE",
    "MAX_MENU_ROWS",
    "MENU_LIMITS",
    "RESERVED_NAMES",
    "Config",
    "ConfigError",
    "ForwardingConfig",
    "HomeMenuConfig",
    "MenuItem",
    "RateLimitConfig",
    "RoutingConfig",
    "ServerConfig",
    "ServiceConfig",
    "SessionsConfig",
    "StoreConfig",
    "WhatsAppConfig",
]

"""Reading and validating ``[numbers.<phone_number_id>]`` sections, without I/O.

One Meta app's webhook receives the messages of every business number of its WhatsApp Business
Accounts. A number may override the Graph API token (another WABA), the home menu, the routing
fallback, the statuses target and which services route from it; ``[services.NAME]`` stays the one
place where a service's URL and keys live. Whatever a section leaves out is the top-level config's.

Rules (each broken one is a problem with its key path):

- the id is a Graph API id: digits only (it becomes a URL path segment and a header);
- ``services`` names configured services, each once, at least one;
- ``fallback`` is ``menu`` or one of the number's services; one inherited from ``[routing]`` must be too;
- ``statuses`` is "" or a configured service;
- the number's menu rows are keys of its own services. Without a menu of its own a number shows the
  top-level menu's rows for its services, and at least one must remain.

Service keys are unique across all services (`_reader._read_services`), so the keys of one number's
services never collide either; menu words are shared by every number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._reader import _menu_warnings, _read_menu, _Section
from ._sections import ACCESS_TOKEN_ENV, HomeMenuConfig, NumberConfig, RoutingConfig, ServiceConfig


def read_numbers(
    data: Any, sections: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> dict[str, NumberConfig]:
    """Every ``[numbers.ID]`` section, checked against the already read `sections`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append("numbers: must be a table of [numbers.PHONE_NUMBER_ID] tables")
        return {}
    numbers = {
        str(number_id): _read_number(str(number_id), raw, sections, env, problems) for number_id, raw in data.items()
    }
    whatsapp = sections["whatsapp"]
    if whatsapp.numbers == "listed" and not numbers and not whatsapp.phone_number_id:
        problems.append(
            'whatsapp.numbers: "listed" knows no number: set whatsapp.phone_number_id or add'
            " [numbers.PHONE_NUMBER_ID] sections"
        )
    return numbers


def _read_number(
    number_id: str, raw: Any, sections: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> NumberConfig:
    path = f"numbers.{number_id}"
    if not number_id.isdigit() or not number_id.isascii():
        problems.append(f"{path}: a phone number id is digits only (WhatsApp Manager, API Setup), got {number_id!r}")
    s = _Section(raw, path, problems)
    all_services: Mapping[str, ServiceConfig] = sections["services"]
    routing: RoutingConfig = sections["routing"]
    token = s.take("access_token", "")
    token = env.get(ACCESS_TOKEN_ENV + number_id) or token  # the environment's, when set, wins
    names = _services_of(s, all_services)
    own = {name: all_services[name] for name in (names if names is not None else all_services) if name in all_services}
    # Present or not matters: "" is a value of `statuses` ("count and drop"), absence inherits.
    fallback: str | None = s.take("fallback", "") if "fallback" in s.data else None
    statuses: str | None = s.take("statuses", "") if "statuses" in s.data else None
    menu_data = s.data.pop("home_menu", None)
    s.finish()
    if fallback is not None and fallback != "menu" and fallback not in own:
        s.problem("fallback", f'must be "menu" or one of this number\'s services, got {fallback!r}')
    elif fallback is None and routing.fallback != "menu" and routing.fallback not in own:
        s.problem(
            "fallback",
            f"the top-level fallback {routing.fallback!r} does not route from this number:"
            ' set one of its services, or "menu"',
        )
    if statuses and statuses not in all_services:
        s.problem("statuses", f'must be "" or a service name, got {statuses!r}')
    menu = _menu_of(menu_data, own, sections["home_menu"], names is not None, s, problems)
    return NumberConfig(
        id=number_id, access_token=token, services=names, fallback=fallback, statuses=statuses, home_menu=menu
    )


def _services_of(s: _Section, services: Mapping[str, ServiceConfig]) -> tuple[str, ...] | None:
    if "services" not in s.data:
        return None
    names: tuple[str, ...] = s.take("services", ())
    if not names:
        s.problem("services", "must name at least one service (leave it out for every service)")
    for name in names:
        if name not in services:
            s.problem("services", f"{name!r} is not a configured service")
    for name in sorted({n for n in names if names.count(n) > 1}):
        s.problem("services", f"{name!r} is listed twice")
    return names


def _menu_of(
    data: Any,
    own: Mapping[str, ServiceConfig],
    top: HomeMenuConfig,
    restricted: bool,
    s: _Section,
    problems: list[str],
) -> HomeMenuConfig | None:
    """The number's own menu, or (its services restricted) the top-level one cut to its services'
    rows; None: the top-level menu as it is."""
    if data is not None:
        return _read_menu(data, own, problems, path=s.key("home_menu"))
    if not restricted:
        return None
    keys = {key for svc in own.values() for key in svc.keys}
    rows = tuple(item for item in top.items if item.key.strip().lower() in keys)
    if top.items and not rows:
        s.problem(
            "home_menu",
            "no row of the top-level menu is a key of this number's services:"
            " give it a [numbers.ID.home_menu] of its own",
        )
    return HomeMenuConfig(header=top.header, body=top.body, button=top.button, items=rows)


def number_warnings(numbers: Mapping[str, NumberConfig]) -> list[str]:
    """Menu texts longer than WhatsApp allows, in each number's own menu."""
    return [
        warning
        for number in numbers.values()
        if number.home_menu is not None
        for warning in _menu_warnings(number.home_menu, path=f"numbers.{number.id}.home_menu")
    ]

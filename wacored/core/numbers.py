"""Business numbers: which number a message was written to, and that number's rules (pure, no I/O).

Every change of a webhook names its business number in ``value.metadata.phone_number_id``. `Numbers`,
built from one config (a reload builds a new one), turns that id into a *number key*, the value
stored with each row (``messages.number``), each session and each rate-limit window:

- ``""`` is the default number, ``[whatsapp] phone_number_id``: a change naming no number, or naming
  the default one, or (under ``numbers = "any"``) naming something that is not a Graph id (digits),
  such as the ``PHONE_NUMBER_ID`` placeholder of Meta's sample payloads. Keeping the default number
  as ``""`` means rows and sessions written before numbers were told apart (schema v6 gave them ``""``)
  are the default number's without rewriting them;
- the id itself for any other number: one with a ``[numbers.ID]`` section, or (``any``) one the
  config does not know, which then follows the top-level rules and replies from its own id;
- None for a number the config does not know under ``numbers = "listed"``: stored as
  ``unknown_number``, never routed.

A number's `Plan` holds its routing table, menu, statuses target and services. Metrics label a number
with `Numbers.label`: a configured id or ``other``, never an arbitrary id from a payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Config, HomeMenuConfig, NumberConfig
from .routing import RoutingTable

DEFAULT = ""
"""The number key of the default number (``[whatsapp] phone_number_id``)."""
OTHER = "other"
"""The metrics label of every number the config does not know (and of a POST refused before parsing)."""
UNKNOWN_NUMBER = "unknown_number"
"""The route reason of a message to a number ``numbers = "listed"`` does not know."""


@dataclass(frozen=True)
class Plan:
    """What one number routes by."""

    routing: RoutingTable
    menu: HomeMenuConfig
    statuses: str
    """The service that receives this number's status updates; "" = count and drop."""
    services: frozenset[str]


@dataclass(frozen=True)
class Numbers:
    default_id: str
    listed: bool
    plans: Mapping[str, Plan]
    """By number key: ``""`` and every ``[numbers.ID]`` other than the default one."""
    labels: frozenset[str]
    """The configured ids: the default one (if set) and every section's."""

    @classmethod
    def from_config(cls, config: Config) -> Numbers:
        default_id = config.whatsapp.phone_number_id
        sections = dict(config.numbers)
        plans = {DEFAULT: _plan(config, sections.pop(default_id, None))}
        plans.update({number_id: _plan(config, section) for number_id, section in sections.items()})
        labels = frozenset(config.numbers) | ({default_id} if default_id else set())
        return cls(default_id=default_id, listed=config.whatsapp.numbers == "listed", plans=plans, labels=labels)

    def key_of(self, number: str | None) -> str | None:
        """The number key of a change naming `number` (see the module docstring); None: unknown, listed."""
        if number is None or number == self.default_id:
            return DEFAULT
        if number in self.plans:
            return number
        if self.listed:
            return None
        return number if number.isdigit() and number.isascii() else DEFAULT

    def plan(self, key: str) -> Plan:
        """The rules of number `key`; a number without a section follows the top-level ones."""
        return self.plans.get(key) or self.plans[DEFAULT]

    def id_of(self, key: str) -> str:
        """The phone number id replies of number `key` go from ("" when the default is not set)."""
        return key or self.default_id

    def label(self, key: str | None) -> str:
        """The ``number`` label of number `key`: its id when configured, else ``other``."""
        number = None if key is None else self.id_of(key)
        return number if number in self.labels else OTHER


def _plan(config: Config, section: NumberConfig | None) -> Plan:
    services = config.services
    if section is not None and section.services is not None:
        services = {name: config.services[name] for name in section.services}
    fallback = config.routing.fallback
    if section is not None and section.fallback is not None:
        fallback = section.fallback
    statuses = config.routing.statuses
    if section is not None and section.statuses is not None:
        statuses = section.statuses
    menu = section.home_menu if section is not None and section.home_menu is not None else config.home_menu
    routing = RoutingTable(
        keys={key: svc.name for svc in services.values() for key in svc.keys},
        menu_words=frozenset(config.routing.menu_words),
        fallback=fallback,
    )
    return Plan(routing=routing, menu=menu, statuses=statuses, services=frozenset(services))


def number_tokens(config: Config) -> dict[str, str]:
    """Each number key with a token of its own (another WABA's): the Graph sender uses it for that key."""
    tokens = {number_id: section.access_token for number_id, section in config.numbers.items() if section.access_token}
    if config.whatsapp.phone_number_id in tokens:
        tokens[DEFAULT] = tokens.pop(config.whatsapp.phone_number_id)
    return tokens

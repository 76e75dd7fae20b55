"""What the daemon counts, one group per owner: shown by /health and exported by /metrics.

Each group has one writer (its owner, named in its docstring); /health and /metrics only read. Keys
are bounded label values, a tuple where there are several (never a phone number or message id):
nothing is joined into a string only to be split apart again. Plain data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

K = TypeVar("K", str, tuple[str, str])


def bump(table: dict[K, int], key: K, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


@dataclass
class IngressCounts:
    """Owner: ingress (the HTTP app: `ingress.Webhook`, and `api` for requests it sheds)."""

    requests: dict[str, int] = field(default_factory=dict)
    """Webhook POSTs by outcome (accepted, duplicate, bad_signature, ...)."""
    previous_secret: int = 0
    """Webhook POSTs verified with ``[whatsapp] app_secret_previous`` (a rotation in progress)."""
    handshakes: dict[str, int] = field(default_factory=dict)
    """Webhook verification handshakes by result (ok, refused)."""
    routed: dict[tuple[str, str], int] = field(default_factory=dict)
    """Messages by (service, reason)."""
    probes: int = 0
    """Probes accepted (`core/probe.py`): routed and stored, never forwarded, never counted in `routed`."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Status updates by status, counted whether forwarded or dropped."""
    by_number: dict[tuple[str, ...], int] = field(default_factory=dict)
    """The per-number counts behind the ``number`` label: (``requests``, outcome, number),
    (``routed``, service, reason, number) and (``statuses``, status, number), `number` a label of
    `numbers.Numbers.label` (a configured id or ``other``)."""

    def request(self, outcome: str, number: str) -> None:
        """A webhook POST ended with `outcome`; `number` labels it (its first change's, or ``other``)."""
        bump(self.requests, outcome)
        self.count(("requests", outcome, number))

    def count(self, key: tuple[str, ...], n: int = 1) -> None:
        self.by_number[key] = self.by_number.get(key, 0) + n


@dataclass
class AttemptCounts:
    """Owner: `forwarder.guarded_attempt` (every attempt, the lanes' and the DLQ retrier's) and
    `forwarder.deliver_contained`."""

    forwards: dict[tuple[str, str], int] = field(default_factory=dict)
    """Forward attempts by (service, outcome): delivered, transient, permanent, breaker_open."""
    internal_errors: dict[str, int] = field(default_factory=dict)
    """First deliveries that raised something unexpected, by service; each dead-lettered its one
    message as ``internal_error``."""


@dataclass
class RetryCounts:
    """Owner: the DLQ retrier (`deadletters.py`)."""

    dlq_retries: dict[tuple[str, str], int] = field(default_factory=dict)
    """Dead-letter retries by (service, outcome): delivered, failed, abandoned, breaker_open."""
    internal_errors: dict[str, int] = field(default_factory=dict)
    """Retries that raised something unexpected, by service (the entry is abandoned)."""


@dataclass
class ReapCounts:
    """Owner: the reaper."""

    reaped: dict[str, int] = field(default_factory=dict)
    """Rows deleted by kind (`store.REAP_SQL`: sessions, rate_hits, dead letters, attempts, messages)."""


@dataclass
class ReloadCounts:
    """Owner: `daemon.Daemon.reload`."""

    results: dict[str, int] = field(default_factory=dict)
    """Config reloads by result (ok, failed)."""
    last_ok: bool = True
    """Whether the config in force is the one the file holds: False from a refused reload until one
    succeeds (Prometheus's own ``*_config_last_reload_successful``)."""
    last_success_at: float | None = None
    """Wall-clock time the config in force was loaded (start-up, or the last reload that worked)."""

"""Prometheus metrics of one daemon: its own registry, the histograms observed on the hot paths, and a
collector exporting at scrape time what the daemon already keeps.

Counters and gauges that mirror state the daemon already keeps (its counts, `counts.py`; breakers;
the stats actor's store figures; actors; lanes; SLO figures) are read at scrape time from those cached
values, never from the database: a scrape costs microseconds and cannot block on a lock.

Every known label value is exported from the start (zero-valued), so a query or an alert rule finds
its series before the first event. Labels are bounded: services come from the config (read at scrape
time: a reload swaps it whole), outcomes from fixed lists; never a phone number or a message id. The
``number`` label (requests, routes, status updates; present once the config has ``[numbers.ID]``
sections) holds a configured business number id or ``other``.
The catalogue (names and labels) is a contract with the alert rules and dashboards: see
docs/metrics.md (tests/test_docs.py keeps the two the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import trio
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..config import GRAPH_SENDER, HOME_SERVICE
from ..core.numbers import OTHER, UNKNOWN_NUMBER
from ..ops.pauses import paused_seconds
from ..store import DEAD_LETTER_STATES, REAP_SQL

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..actors.lanes import LaneBoard
    from ..actors.pausewatch import PauseBoard
    from ..config import Config
    from ..core.breaker import Breaker
    from ..core.numbers import Numbers
    from ..siblings import Siblings
    from ..store.writer import StoreWrites
    from .counts import AttemptCounts, IngressCounts, ReapCounts, ReloadCounts, RetryCounts
    from .slo import SloState
    from .state import ActorState, StoreStats


class Observed(Protocol):
    """What /metrics reads of a running daemon, and only reads (the `runtime.Runtime` is one): this
    module needs no import of the runtime, which builds a `Metrics` of its own."""

    @property
    def config(self) -> Config: ...
    @property
    def numbers(self) -> Numbers: ...
    @property
    def lanes(self) -> LaneBoard: ...
    @property
    def wall_clock(self) -> Callable[[], float]: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ingress_counts(self) -> IngressCounts: ...
    @property
    def attempt_counts(self) -> AttemptCounts: ...
    @property
    def retry_counts(self) -> RetryCounts: ...
    @property
    def reap_counts(self) -> ReapCounts: ...
    @property
    def reload_counts(self) -> ReloadCounts: ...
    @property
    def stats(self) -> StoreStats: ...
    @property
    def breakers(self) -> Mapping[str, Breaker]: ...
    @property
    def pauses(self) -> PauseBoard: ...
    @property
    def actors(self) -> Mapping[str, ActorState]: ...
    @property
    def siblings(self) -> Siblings: ...
    @property
    def store_writes(self) -> StoreWrites: ...
    @property
    def slo(self) -> SloState: ...


ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Around the 1.2 s ack SLO (``[slo] p95_ms``), with room below it to see normal latency."""
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Up to twice the default forward timeout (4 s)."""

REQUEST_OUTCOMES = (
    "accepted",
    "duplicate",
    "bad_signature",
    "bad_request",
    "too_large",
    "rate_limited",
    "unavailable",
    "client_gone",
    "read_timeout",
    "shed",
    "over_capacity",
)
HANDSHAKE_RESULTS = ("ok", "refused")
STATUSES = ("sent", "delivered", "read", "failed")
OTHER_STATUS = "other"
"""Status values are Meta's strings: any but the known ones are counted under one label."""
FORWARD_OUTCOMES = ("delivered", "transient", "permanent", "breaker_open")
DLQ_RETRY_OUTCOMES = ("delivered", "failed", "abandoned", "breaker_open")
RELOAD_RESULTS = ("ok", "failed")
INTERNAL_ERROR_STAGES = ("delivery", "dlq_retry")
REAPED_KINDS = tuple(REAP_SQL)
SERVICE_REASONS = ("keyword", "interactive", "state")
HOME_REASONS = ("home_menu", "fallback")


Series = dict[tuple[str, ...], float]
"""Label values -> sample value, for one metric family."""


class Metrics:
    """The registry of one daemon (never the global one: tests run many daemons in one process)."""

    def __init__(self) -> None:
        # No ``*_created`` series: they double the exposition and no rule or dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus-client 0.26
        self.registry = CollectorRegistry(auto_describe=True)
        self.ack_latency = Histogram(
            "wacored_ack_latency_seconds",
            "Time from a webhook POST's arrival to its answer.",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.forward_latency = Histogram(
            "wacored_forward_latency_seconds",
            "Duration of one forward attempt, by target service.",
            ["service"],
            buckets=FORWARD_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._state: StateCollector | None = None

    def watch(self, rt: Observed, version: str) -> None:
        """Export `rt`'s state from now on (called once, when the runtime is built)."""
        self._state = StateCollector(rt, version)
        self.registry.register(self._state)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for a scrape whose ``Accept`` header is `accept`: body and content type."""
        if self._state is not None:
            # Before encoding, so the per-service histograms have series from the first scrape on.
            for service in targets(self._state.rt):
                self.forward_latency.labels(service)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def targets(rt: Observed) -> list[str]:
    """The label values of ``service`` for forwarding targets: the configured services, ``whatsapp``,
    and any target the daemon still holds a queue for (a service removed by a reload)."""
    names = [*rt.config.services, GRAPH_SENDER]
    return names + sorted(set(rt.lanes.lanes) - set(names))


class StateCollector(Collector):
    """Reads one daemon's cached state at scrape time (see the module docstring)."""

    def __init__(self, rt: Observed, version: str) -> None:
        self.rt = rt
        self.version = version

    def describe(self) -> list[Metric]:
        # Nothing to announce: registering must not run `collect` (the runtime may not be serving yet).
        return []

    def collect(self) -> Iterator[Metric]:
        rt = self.rt
        now = rt.wall_clock()
        services = targets(rt)
        yield _gauge("wacored_build_info", "The running version (always 1).", ["version"], {(self.version,): 1})
        yield from self._ingress(services)
        yield _counter(
            "wacored_probes",
            "Probes accepted: signed test messages routed and stored, never forwarded"
            " (not in wacored_messages_routed_total).",
            [],
            {(): rt.ingress_counts.probes},
        )
        yield from self._forwarding(services, now)
        yield from self._dead_letters(services, now)
        yield from self._operations(now)
        yield from self._store_writes(now)
        yield from self._slo()

    def _ingress(self, services: list[str]) -> Iterator[Metric]:
        c = self.rt.ingress_counts
        if self.rt.config.numbers:
            yield from self._ingress_by_number()
            return
        yield _counter(
            "wacored_webhook_requests", "Webhook POSTs by outcome.", ["outcome"], _known(c.requests, REQUEST_OUTCOMES)
        )
        yield from self._handshakes()
        routed: Series = {(s, r): 0 for s in services if s != GRAPH_SENDER for r in SERVICE_REASONS}
        routed.update({(HOME_SERVICE, r): 0 for r in HOME_REASONS})
        if (fallback := self.rt.config.routing.fallback) != "menu":
            routed[(fallback, "fallback")] = 0
        if self.rt.numbers.listed:
            routed[(HOME_SERVICE, UNKNOWN_NUMBER)] = 0
        for route, n in c.routed.items():
            routed[route] = n
        yield _counter(
            "wacored_messages_routed", "Routed messages by service and reason.", ["service", "reason"], routed
        )
        statuses: Series = {(s,): 0 for s in STATUSES}
        for status, n in c.statuses.items():
            key = (_status(status),)
            statuses[key] = statuses.get(key, 0) + n
        yield _counter("wacored_status_updates", "Status updates received, by status.", ["status"], statuses)

    def _handshakes(self) -> Iterator[Metric]:
        c = self.rt.ingress_counts
        yield _counter(
            "wacored_webhook_previous_secret",
            "Webhook POSTs verified with the previous app secret (drop it once this stops growing).",
            [],
            {(): c.previous_secret},
        )
        yield _counter(
            "wacored_handshakes",
            "Webhook verification handshakes by result.",
            ["result"],
            _known(c.handshakes, HANDSHAKE_RESULTS),
        )

    def _ingress_by_number(self) -> Iterator[Metric]:
        """The same families with a ``number`` label, once the config has ``[numbers.ID]`` sections
        (with one number the label would only ever repeat it). Its values are the configured ids
        and ``other`` (`numbers.Numbers.label`), never an id from a payload."""
        numbers, counts = self.rt.numbers, self.rt.ingress_counts.by_number
        labels = sorted(numbers.labels) + [OTHER]
        requests: Series = {(o, n): 0 for o in REQUEST_OUTCOMES for n in labels}
        routed: Series = {}
        for label in labels:
            plan = numbers.plan("" if label in (OTHER, numbers.default_id) else label)
            routed.update({(s, r, label): 0 for s in sorted(plan.services) for r in SERVICE_REASONS})
            routed.update({(HOME_SERVICE, r, label): 0 for r in HOME_REASONS})
            if plan.routing.fallback != "menu":
                routed[(plan.routing.fallback, "fallback", label)] = 0
        if numbers.listed:
            routed[(HOME_SERVICE, UNKNOWN_NUMBER, OTHER)] = 0
        statuses: Series = {(s, n): 0 for s in STATUSES for n in labels}
        for key, n in counts.items():
            kind, *values = key
            if kind == "requests":
                requests[tuple(values)] = n
            elif kind == "routed":
                routed[tuple(values)] = n
            elif kind == "statuses":
                status = (_status(values[0]), values[1])
                statuses[status] = statuses.get(status, 0) + n
        yield _counter(
            "wacored_webhook_requests",
            "Webhook POSTs by outcome and (first change's) number.",
            ["outcome", "number"],
            requests,
        )
        yield from self._handshakes()
        yield _counter(
            "wacored_messages_routed",
            "Routed messages by service, reason and number.",
            ["service", "reason", "number"],
            routed,
        )
        yield _counter(
            "wacored_status_updates", "Status updates received, by status and number.", ["status", "number"], statuses
        )

    def _forwarding(self, services: list[str], now: float) -> Iterator[Metric]:
        rt = self.rt
        yield _counter(
            "wacored_forward_attempts",
            "Forward attempts by service and outcome.",
            ["service", "outcome"],
            _by_service(rt.attempt_counts.forwards, services, FORWARD_OUTCOMES),
        )
        stats = rt.stats
        yield _gauge(
            "wacored_queue_depth",
            "Messages accepted and not yet delivered nor dead-lettered.",
            ["service"],
            {(s,): stats.queued.get(s, 0) for s in services},
        )
        yield _gauge(
            "wacored_queue_oldest_age_seconds",
            "Age of the oldest queued message (0 when none).",
            ["service"],
            {(s,): _age(now, stats.oldest_queued_at.get(s)) for s in services},
        )
        held = set(rt.lanes.held_lanes())
        yield _gauge(
            "wacored_lanes_held",
            "Lanes of the service whose lease this process holds (it delivers their rows).",
            ["service"],
            {(s,): sum(1 for lane in rt.lanes.lanes.get(s, ()) if lane.name in held) for s in services},
        )
        yield _counter(
            "wacored_lanes_taken",
            "Lane leases this process took: at start, or from a worker or node that died or gave them back.",
            [],
            {(): rt.lanes.taken},
        )
        yield _counter(
            "wacored_lanes_lost",
            "Lane leases this process lost to another before giving them back (it stalled past their expiry).",
            [],
            {(): rt.lanes.lost},
        )
        mono = _monotonic_now()
        breakers = {s: rt.breakers.get(s) for s in services}
        yield _gauge(
            "wacored_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["service"],
            {(s,): b.state(mono).gauge if b else 0 for s, b in breakers.items()},
        )
        yield _counter(
            "wacored_breaker_trips",
            "Times the circuit breaker opened.",
            ["service"],
            {(s,): b.trips if b else 0 for s, b in breakers.items()},
        )
        paused = rt.pauses.paused
        yield _gauge(
            "wacored_service_paused",
            "1 while an operator has paused forwarding to the service.",
            ["service"],
            {(s,): int(s in paused) for s in services},
        )
        yield _gauge(
            "wacored_service_paused_seconds",
            "How long the service has been paused (0 when not).",
            ["service"],
            {(s,): paused_seconds(paused.get(s), now) for s in services},
        )

    def _dead_letters(self, services: list[str], now: float) -> Iterator[Metric]:
        rt = self.rt
        dead: Series = {(s, state): 0 for s in services if s != GRAPH_SENDER for state in DEAD_LETTER_STATES}
        dead.update({key: n for key, n in rt.stats.dead_letters_by_service.items()})
        yield _gauge("wacored_dead_letters", "Dead letters by service and state.", ["service", "state"], dead)
        yield _gauge(
            "wacored_dead_letter_oldest_pending_age_seconds",
            "Age of the oldest pending dead letter (0 when none).",
            [],
            {(): _age(now, rt.stats.oldest_pending_at)},
        )
        yield _counter(
            "wacored_dlq_retries",
            "Dead-letter retries by service and outcome.",
            ["service", "outcome"],
            _by_service(rt.retry_counts.dlq_retries, services, DLQ_RETRY_OUTCOMES),
        )
        yield _counter(
            "wacored_internal_errors",
            "Deliveries that raised something unexpected (each dead-lettered its message as"
            " internal_error), by service and stage.",
            ["service", "stage"],
            _by_service(
                {
                    **{(s, "delivery"): n for s, n in rt.attempt_counts.internal_errors.items()},
                    **{(s, "dlq_retry"): n for s, n in rt.retry_counts.internal_errors.items()},
                },
                services,
                INTERNAL_ERROR_STAGES,
            ),
        )

    def _operations(self, now: float) -> Iterator[Metric]:
        rt = self.rt
        yield _gauge("wacored_sessions_active", "Senders with a live session.", [], {(): rt.stats.sessions_active})
        actors = sorted(rt.actors.items())
        yield _gauge(
            "wacored_actor_up", "1 while the actor runs.", ["actor"], {(name,): int(a.running) for name, a in actors}
        )
        yield _counter(
            "wacored_actor_restarts",
            "Restarts of the actor by the supervisor.",
            ["actor"],
            {(name,): a.restarts for name, a in actors},
        )
        yield _counter(
            "wacored_config_reloads",
            "Config reloads (SIGHUP) by result.",
            ["result"],
            _known(rt.reload_counts.results, RELOAD_RESULTS),
        )
        yield _gauge(
            "wacored_config_last_reload_successful",
            "1 while the config in force is the file's; 0 from a refused reload until one works.",
            [],
            {(): int(rt.reload_counts.last_ok)},
        )
        yield _gauge(
            "wacored_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (start-up, or the last reload that worked).",
            [],
            {(): rt.reload_counts.last_success_at or rt.started_at},
        )
        yield _gauge(
            "wacored_store_size_bytes",
            "The store's bytes on disk, write-ahead log included.",
            [],
            {(): rt.stats.size_bytes or 0},
        )
        yield _counter(
            "wacored_reaped", "Rows the reaper deleted, by kind.", ["kind"], _known(rt.reap_counts.reaped, REAPED_KINDS)
        )
        siblings = rt.siblings
        yield _gauge(
            "wacored_workers",
            "Worker processes serving ([server] processes); each worker counts itself, the merge adds up.",
            [],
            {(): 1},
        )
        yield _counter(
            "wacored_worker_restarts",
            "Times the supervisor restarted a worker process (of the workers answering).",
            [],
            {(): siblings.place.restarts},
        )
        yield _counter(
            "wacored_worker_scrape_failures",
            "Requests to a sibling worker for its figures that got no answer (it was skipped).",
            [],
            {(): siblings.unanswered},
        )

    def _store_writes(self, now: float) -> Iterator[Metric]:
        w = self.rt.store_writes
        yield _counter(
            "wacored_store_commit_failures",
            "Store transactions that failed (disk full, locked, I/O).",
            [],
            {(): w.failures},
        )
        yield _gauge(
            "wacored_store_commit_failing_seconds",
            "How long the store's commits have been failing (0 while they succeed).",
            [],
            {(): _age(now, w.failing_since)},
        )
        yield _gauge(
            "wacored_store_outcomes_held",
            "Delivery outcomes waiting for the store to take them.",
            [],
            {(): len(w.held)},
        )

    def _slo(self) -> Iterator[Metric]:
        rt, slo = self.rt, self.rt.slo
        yield _gauge(
            "wacored_slo_ack_p95_seconds",
            "p95 of the ack latency over the last POSTs (window).",
            [],
            {(): slo.p95.window.p95()},
        )
        yield _gauge(
            "wacored_slo_ack_p95_target_seconds",
            "The ack latency p95 objective.",
            [],
            {(): rt.config.slo.p95_ms / 1000},
        )
        yield _gauge(
            "wacored_slo_cold_start_seconds",
            "Process start to ready (bound and recovered).",
            [],
            {(): slo.cold_start_s or 0.0},
        )
        yield _gauge(
            "wacored_slo_cold_start_target_seconds",
            "The cold start objective.",
            [],
            {(): rt.config.slo.cold_start_ms / 1000},
        )
        yield _counter(
            "wacored_slo_breaches",
            "Times an SLO was breached (p95: crossings above target).",
            ["slo"],
            {(name,): n for name, n in slo.breaches.items()},
        )


def _status(status: str) -> str:
    return status if status in STATUSES else OTHER_STATUS


def _monotonic_now() -> float:
    """The breakers' clock: trio's (a scrape runs in the daemon's trio loop), else time.monotonic()."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def _age(now: float, since: float | None) -> float:
    return max(0.0, now - since) if since is not None else 0.0


def _known(counts: Mapping[str, int], known: Iterable[str]) -> Series:
    values: Series = {(k,): 0 for k in known}
    values.update({(k,): v for k, v in counts.items()})
    return values


def _by_service(counts: Mapping[tuple[str, str], int], services: list[str], outcomes: Iterable[str]) -> Series:
    values: Series = {(s, o): 0 for s in services for o in outcomes}
    for key, n in counts.items():
        values[key] = n
    return values


def _counter(name: str, doc: str, labels: list[str], values: Series) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: Series) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family

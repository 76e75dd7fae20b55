"""What the actors of one running daemon share: the current config and the live in-memory state.

Built once by the daemon and passed to each actor that needs it (no globals). The config is swapped
whole, never mutated in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from opentelemetry.trace import Tracer

from .admission import Admission
from .config import Config
from .core.breaker import Breaker
from .core.numbers import Numbers
from .core.ratelimit import RateLimit
from .core.routing import RoutingTable
from .ingest import SessionCacheStats
from .lanes import LaneBoard
from .metrics import Metrics
from .pausewatch import PauseBoard
from .siblings import Siblings
from .slo import SloState
from .store import DEAD_LETTER_STATES, Reader
from .targets import Target, targets_of
from .telemetry import NO_TRACER
from .version import VERSION
from .writer import HEARTBEAT_S, StoreWrites, WriteOp

K = TypeVar("K", str, tuple[str, str])


@dataclass
class Counters:
    """Plain counts of what the daemon did, shown by /health and exported as Prometheus counters.

    Keys are bounded label values, a tuple where there are several (never a phone number or message
    id): nothing is joined into a string only to be split apart again.
    """

    requests: dict[str, int] = field(default_factory=dict)
    """Webhook POSTs by outcome (accepted, duplicate, bad_signature, ...)."""
    previous_secret: int = 0
    """Webhook POSTs verified with ``[whatsapp] app_secret_previous`` (a rotation in progress)."""
    handshakes: dict[str, int] = field(default_factory=dict)
    """Webhook verification handshakes by result (ok, refused)."""
    routed: dict[tuple[str, str], int] = field(default_factory=dict)
    """Messages by (service, reason)."""
    probes: int = 0
    """Probes accepted (`probe.py`): routed and stored, never forwarded, never counted in `routed`."""
    statuses: dict[str, int] = field(default_factory=dict)
    """Status updates by status, counted whether forwarded or dropped."""
    forwards: dict[tuple[str, str], int] = field(default_factory=dict)
    """Forward attempts by (service, outcome): delivered, transient, permanent, breaker_open."""
    dlq_retries: dict[tuple[str, str], int] = field(default_factory=dict)
    """Dead-letter retries by (service, outcome): delivered, failed, abandoned, breaker_open."""
    reloads: dict[str, int] = field(default_factory=dict)
    """Config reloads by result (ok, failed)."""
    last_reload_ok: bool = True
    """Whether the config in force is the one the file holds: False from a refused reload until one
    succeeds (Prometheus's own ``*_config_last_reload_successful``). Owner: `Daemon.reload`."""
    last_reload_success_at: float | None = None
    """Wall-clock time the config in force was loaded (start-up, or the last reload that worked)."""
    internal_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    """Deliveries that raised something unexpected, by (service, stage): delivery, dlq_retry; each
    dead-lettered its one message as ``internal_error``."""
    reaped: dict[str, int] = field(default_factory=dict)
    """Rows the reaper deleted by kind (`store.REAP_SQL`: sessions, rate_hits, dead letters, attempts, messages)."""

    by_number: dict[tuple[str, ...], int] = field(default_factory=dict)
    """The per-number counts behind the ``number`` label: (``requests``, outcome, number),
    (``routed``, service, reason, number) and (``statuses``, status, number), `number` a label of
    `numbers.Numbers.label` (a configured id or ``other``)."""

    @staticmethod
    def bump(table: dict[K, int], key: K, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def request(self, outcome: str, number: str) -> None:
        """A webhook POST ended with `outcome`; `number` labels it (its first change's, or ``other``)."""
        self.bump(self.requests, outcome)
        self.count(("requests", outcome, number))

    def count(self, key: tuple[str, ...], n: int = 1) -> None:
        self.by_number[key] = self.by_number.get(key, 0) + n


@dataclass
class ActorState:
    """What the supervisor and the actor itself tell about one actor."""

    running: bool = False
    error: str = ""
    """The last crash, if any (kept after a restart)."""
    restarts: int = 0
    heartbeat: float = 0.0
    """`trio.current_time()` of the actor's last sign of life; the watchdog wants it fresh."""
    last_run: float | None = None
    """Periodic actors: wall-clock time their last run ended."""
    next_run: float | None = None
    """Periodic actors: wall-clock time of their next run."""


@dataclass
class StoreStats:
    """Figures read from the store now and then (never at scrape time), cached for /health and metrics."""

    queued: dict[str, int] = field(default_factory=dict)
    """Accepted, not yet delivered nor dead-lettered, by target."""
    oldest_queued_at: dict[str, float] = field(default_factory=dict)
    """Wall-clock time the oldest queued message of each target was received."""
    dead_letters_by_service: dict[tuple[str, str], int] = field(default_factory=dict)
    """Dead letters by (service, state)."""
    size_bytes: int | None = None
    """The store's bytes on disk, write-ahead log included."""
    oldest_pending_at: float | None = None
    """Wall-clock time the oldest pending dead letter was created."""
    sessions_active: int = 0
    """Sessions whose last interaction is within the session TTL."""
    refreshed_at: float | None = None

    @property
    def dead_letters(self) -> dict[str, int]:
        """Dead letters by state, every state named (pending, abandoned, delivered, replayed)."""
        by_state = dict.fromkeys(DEAD_LETTER_STATES, 0)
        for (_, state), n in self.dead_letters_by_service.items():
            by_state[state] = by_state.get(state, 0) + n
        return by_state


@dataclass
class Runtime:
    config: Config
    routing: RoutingTable
    ratelimit: RateLimit
    """The per-sender limit, from `config` (rebuilt by a reload); the hits are counted in the store."""
    writes: trio.MemorySendChannel[WriteOp]
    lanes: LaneBoard
    """This node's lanes and leases (`lanes.py`)."""
    reader: Reader
    wall_clock: Callable[[], float] = time.time
    started_at: float = 0.0
    draining: bool = False
    in_flight: int = 0
    """HTTP requests begun before `draining` was set and not yet answered."""
    admission: Admission = field(default_factory=Admission)
    """Requests in flight and unverified webhook reads, for the bounds of ``[server]`` (`admission`)."""
    counters: Counters = field(default_factory=Counters)
    actors: dict[str, ActorState] = field(default_factory=dict)
    reader_lock: trio.Lock = field(default_factory=trio.Lock)
    targets: dict[str, Target] = field(default_factory=dict)
    """Where each forwarder delivers, rebuilt from each config (a reload swaps the dict whole)."""
    stopping: trio.Event = field(default_factory=trio.Event)
    """Set once ingress has stopped: forwarders finish their current attempt and take no more."""
    breakers: dict[str, Breaker] = field(default_factory=dict)
    """One per target, kept across config reloads (reconfigured in place)."""
    stats: StoreStats = field(default_factory=StoreStats)
    metrics: Metrics = field(default_factory=Metrics)
    tracer: Tracer = NO_TRACER
    """The daemon's own tracer (`telemetry.Tracing`); the no-op one when traces are off."""
    slo: SloState = field(default_factory=SloState)
    dlq_due: trio.Event = field(default_factory=trio.Event)
    """Set to make the DLQ retrier look for due entries now (an operator replayed some)."""
    node: str = ""
    """This process in the attempts log: ``host-pid``, computed once at start (`daemon.node_name`)."""
    pauses: PauseBoard = field(default_factory=PauseBoard)
    """The services an operator has paused, as the store says. Owner: the pause watcher actor
    (`pausewatch.run_pause_watch`; filled once at start-up before any forwarder runs); lanes, the DLQ
    retrier, /health, /metrics and the admin API only read it (the admin API asks for a refresh)."""
    session_cache: SessionCacheStats = field(default_factory=SessionCacheStats)
    """The writer's session cache figures. Owner: the writer actor; /health only reads it."""
    store_writes: StoreWrites = field(default_factory=StoreWrites)
    """How the writer's commits are going and the outcomes it holds. Owner: the writer actor (kept
    here so a restarted writer carries on); /health and /metrics only read it."""
    siblings: Siblings = field(default_factory=Siblings)
    """Which worker this process is under ``[server] processes`` and how to reach the others (`siblings`);
    set once at start. Owns its count of siblings that did not answer."""

    numbers: Numbers = field(init=False)
    """Which number a message was written to and that number's rules (`numbers.py`), built from
    `config` and rebuilt with each reload's."""

    def __post_init__(self) -> None:
        self.numbers = Numbers.from_config(self.config)
        self.metrics.watch(self, VERSION)

    def wake_retrier(self) -> None:
        self.dlq_due.set()

    def wake_lanes(self) -> None:
        """Make every lane held here read the store now (an operator queued rows again), rather than
        at its next idle heartbeat."""
        self.lanes.wake_all()

    def actor(self, name: str) -> ActorState:
        return self.actors.setdefault(name, ActorState())

    def beat(self, actor: str) -> None:
        """Record a sign of life from `actor` (see `ActorState.heartbeat`)."""
        self.actor(actor).heartbeat = trio.current_time()

    @classmethod
    def build(
        cls,
        config: Config,
        writes: trio.MemorySendChannel[WriteOp],
        lanes: LaneBoard,
        reader: Reader,
        wall_clock: Callable[[], float] = time.time,
        node: str = "",
    ) -> Runtime:
        targets = targets_of(config)
        return cls(
            config=config,
            routing=RoutingTable.from_config(config),
            ratelimit=RateLimit(config.ratelimit.per_sender, config.ratelimit.window_s),
            writes=writes,
            lanes=lanes,
            reader=reader,
            wall_clock=wall_clock,
            started_at=wall_clock(),
            node=node,
            targets=targets,
            breakers={
                name: Breaker(t.forwarding.breaker_failures, t.forwarding.breaker_open_s) for name, t in targets.items()
            },
        )


__all__ = ["HEARTBEAT_S", "ActorState", "Counters", "Runtime", "StoreStats", "StoreWrites"]

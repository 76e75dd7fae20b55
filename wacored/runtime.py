"""What the actors of one running daemon share: the current config and the live in-memory state.

Built once by the daemon and passed to each actor that needs it (no globals). The config is swapped
whole, never mutated in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from opentelemetry.trace import Tracer

from .actors.lanes import LaneBoard
from .actors.pausewatch import PauseBoard
from .actors.targets import Target, targets_of
from .config import Config
from .core.breaker import Breaker
from .core.numbers import Numbers
from .core.ratelimit import RateLimit
from .core.routing import RoutingTable
from .http.admission import Admission
from .observe.counts import AttemptCounts, IngressCounts, ReapCounts, ReloadCounts, RetryCounts
from .observe.metrics import Metrics
from .observe.slo import SloState
from .observe.state import ActorState, StoreStats
from .observe.telemetry import NO_TRACER
from .siblings import Siblings
from .store.ingest import SessionCacheStats
from .store.interface import Reads
from .store.writer import HEARTBEAT_S, StoreWrites, WriteOp
from .version import VERSION


@dataclass
class Runtime:
    config: Config
    routing: RoutingTable
    ratelimit: RateLimit
    """The per-sender limit, from `config` (rebuilt by a reload); the hits are counted in the store."""
    writes: trio.MemorySendChannel[WriteOp]
    lanes: LaneBoard
    """This node's lanes and leases (`lanes.py`)."""
    reader: Reads
    wall_clock: Callable[[], float] = time.time
    started_at: float = 0.0
    draining: bool = False
    in_flight: int = 0
    """HTTP requests begun before `draining` was set and not yet answered."""
    admission: Admission = field(default_factory=Admission)
    """Requests in flight and unverified webhook reads, for the bounds of ``[server]`` (`admission`)."""
    ingress_counts: IngressCounts = field(default_factory=IngressCounts)
    attempt_counts: AttemptCounts = field(default_factory=AttemptCounts)
    retry_counts: RetryCounts = field(default_factory=RetryCounts)
    reap_counts: ReapCounts = field(default_factory=ReapCounts)
    reload_counts: ReloadCounts = field(default_factory=ReloadCounts)
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
    """This process in the attempts log and the leases: ``host-pid`` or ``[cluster] node_id``, computed
    once at start (`daemon.node_name`)."""
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
        reader: Reads,
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


__all__ = ["HEARTBEAT_S", "ActorState", "Runtime", "StoreStats", "StoreWrites"]

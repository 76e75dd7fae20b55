"""What the actors of one running daemon share: the current config and the live in-memory state.

Built once by the daemon and passed to each actor that needs it (no globals). The config is swapped
whole, never mutated in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from .config import Config
from .ratelimit import SlidingWindowLimiter
from .routing import RoutingTable
from .sessions import SessionTable
from .store import Reader
from .writer import DeliveryQueue, WriteOp

VERSION = "0.1.0"


@dataclass
class Counters:
    """Plain counts of what ingress did, shown by /health: requests by outcome, messages routed by
    ``service:reason``, and status updates by status (counted whether forwarded or dropped)."""

    requests: dict[str, int] = field(default_factory=dict)
    routed: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def bump(table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


@dataclass
class ActorState:
    running: bool = False
    error: str = ""


@dataclass
class Runtime:
    config: Config
    routing: RoutingTable
    sessions: SessionTable
    limiter: SlidingWindowLimiter
    writes: trio.MemorySendChannel[WriteOp]
    queues: Mapping[str, DeliveryQueue]
    reader: Reader
    wall_clock: Callable[[], float] = time.time
    started_at: float = 0.0
    draining: bool = False
    counters: Counters = field(default_factory=Counters)
    actors: dict[str, ActorState] = field(default_factory=dict)
    reader_lock: trio.Lock = field(default_factory=trio.Lock)

    @classmethod
    def build(
        cls,
        config: Config,
        writes: trio.MemorySendChannel[WriteOp],
        queues: Mapping[str, DeliveryQueue],
        reader: Reader,
        sessions: SessionTable,
        wall_clock: Callable[[], float] = time.time,
    ) -> Runtime:
        return cls(
            config=config,
            routing=RoutingTable.from_config(config),
            sessions=sessions,
            limiter=SlidingWindowLimiter(config.ratelimit.per_sender, config.ratelimit.window_s),
            writes=writes,
            queues=queues,
            reader=reader,
            wall_clock=wall_clock,
            started_at=wall_clock(),
        )

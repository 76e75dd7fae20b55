"""What each actor may touch of the running daemon: one narrow Protocol per kind of actor.

The daemon's `runtime.Runtime` satisfies all of them; an actor is typed with its own, so it neither
reads nor writes what it has no business with, and a test can hand it a smaller object. Read-only
members are properties; the one field an actor replaces (`Retrying.dlq_due`) is a plain attribute.
Owners of what they write: `Delivering.attempt_counts` the forwarders' attempts, `Retrying.retry_counts`
and `dlq_due` the DLQ retrier, `Reaping.reap_counts` the reaper (`counts.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import trio
from opentelemetry.trace import Tracer

from .actors.pausewatch import PauseBoard
from .actors.targets import Target
from .config import Config
from .core.breaker import Breaker
from .observe.counts import AttemptCounts, ReapCounts, RetryCounts
from .observe.metrics import Metrics
from .observe.state import ActorState


class Beating(Protocol):
    """Any actor: the config in force, the clock, and its sign of life for the watchdog."""

    @property
    def config(self) -> Config: ...
    @property
    def wall_clock(self) -> Callable[[], float]: ...
    @property
    def stopping(self) -> trio.Event: ...
    def beat(self, actor: str) -> None: ...
    def actor(self, name: str) -> ActorState: ...


class Delivering(Beating, Protocol):
    """A forwarder's lanes (and any attempt, `forwarder.guarded_attempt`)."""

    @property
    def targets(self) -> Mapping[str, Target]: ...
    @property
    def breakers(self) -> Mapping[str, Breaker]: ...
    @property
    def pauses(self) -> PauseBoard: ...
    @property
    def node(self) -> str: ...
    @property
    def tracer(self) -> Tracer: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def attempt_counts(self) -> AttemptCounts: ...


class Retrying(Delivering, Protocol):
    """The DLQ retrier: attempts, plus its own counts and wake-up."""

    dlq_due: trio.Event
    """Set by an operator's replay to make the retrier look now; the retrier replaces it once seen."""

    @property
    def retry_counts(self) -> RetryCounts: ...


class Reaping(Beating, Protocol):
    """The reaper."""

    @property
    def reap_counts(self) -> ReapCounts: ...

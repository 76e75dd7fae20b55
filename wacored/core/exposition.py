"""Merging the metric families of several worker processes into the one daemon's (pure).

Under ``[server] processes = N`` every worker keeps its own in-memory counters, and the worker that
answers ``/metrics`` merges its own families with its siblings' (`siblings.py` fetches them). How a
family merges follows from what it means, not only from its type:

- counters, histograms and summaries are summed per label set (every worker counted its own events;
  histograms share their buckets, so summing bucket by bucket is exact);
- a gauge that is a per-process figure is summed (deliveries in memory, resident memory) or taken at
  its worst (a breaker's state, how long commits have failed, the ack p95: the worst worker is the
  one to alert on; an actor up, a reload in force: the minimum, so ``== 0`` still fires when one
  worker's actor is down);
- a gauge that is the same store or config figure in every worker (queued messages, dead letters,
  store size, a target) is taken once, from the first exposition that has the series.

A gauge not listed in `GAUGES` is taken at its maximum: never summed, since summing a figure every
worker reads from the store would multiply it. Families of other types (info, stateset) are taken
once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

Labels = tuple[tuple[str, str], ...]
"""Label names and values, sorted by name."""


class How(Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    ONCE = "once"


@dataclass
class Family:
    """One metric family of one exposition: its samples by (sample name, labels)."""

    name: str
    type: str
    documentation: str = ""
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)


GAUGES: Mapping[str, How] = {
    # The same figure in every worker: the store's (read by each worker's stats actor), the config's.
    "wacored_build_info": How.ONCE,
    "wacored_queue_depth": How.ONCE,
    "wacored_queue_oldest_age_seconds": How.ONCE,
    "wacored_service_paused": How.ONCE,
    "wacored_service_paused_seconds": How.ONCE,
    "wacored_dead_letters": How.ONCE,
    "wacored_dead_letter_oldest_pending_age_seconds": How.ONCE,
    "wacored_store_size_bytes": How.ONCE,
    "wacored_slo_ack_p95_target_seconds": How.ONCE,
    "wacored_slo_cold_start_target_seconds": How.ONCE,
    "python_info": How.ONCE,
    "process_max_fds": How.ONCE,
    # Per process, adding up to the daemon's.
    "wacored_workers": How.SUM,
    "wacored_lanes_held": How.SUM,
    "wacored_sessions_active": How.ONCE,
    "wacored_store_outcomes_held": How.SUM,
    "process_resident_memory_bytes": How.SUM,
    "process_virtual_memory_bytes": How.SUM,
    "process_open_fds": How.SUM,
    # Per process, the worst worker speaks for the daemon.
    "wacored_breaker_state": How.MAX,
    "wacored_store_commit_failing_seconds": How.MAX,
    "wacored_slo_ack_p95_seconds": How.MAX,
    "wacored_slo_cold_start_seconds": How.MAX,
    "wacored_actor_up": How.MIN,
    "wacored_config_last_reload_successful": How.MIN,
    "wacored_config_last_reload_success_timestamp_seconds": How.MIN,
    "process_start_time_seconds": How.MIN,
}
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


def how(name: str, kind: str) -> How:
    """How the family `name` of type `kind` merges (see the module docstring)."""
    if kind in SUMMED_TYPES:
        return How.SUM
    if kind == "gauge":
        return GAUGES.get(name, How.MAX)
    return How.ONCE


def merge(expositions: Sequence[Iterable[Family]]) -> list[Family]:
    """The families of `expositions` (the answering worker's first) merged into one exposition.

    Families and samples keep the order in which they first appear. A family whose type differs
    between workers (a version skew during an upgrade) keeps the first worker's type and rule.
    """
    merged: dict[str, Family] = {}
    for exposition in expositions:
        for family in exposition:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = Family(family.name, family.type, family.documentation, dict(family.samples))
                continue
            rule = how(into.name, into.type)
            for key, value in family.samples.items():
                if key not in into.samples:
                    into.samples[key] = value
                elif rule is How.SUM:
                    into.samples[key] += value
                elif rule is How.MAX:
                    into.samples[key] = max(into.samples[key], value)
                elif rule is How.MIN:
                    into.samples[key] = min(into.samples[key], value)
    return list(merged.values())

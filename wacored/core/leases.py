"""Leases: which worker owns each lane, and which one runs the singleton actors (pure policy).

A lease is a row in the store: a name (``lane:SERVICE:I``, or a singleton such as ``dlq_retrier``), an
owner (a node name: ``host-pid``, or ``[cluster] node_id``) and an expiry. A worker renews what it
holds every `tick_s` (a third of the TTL) and, on the same tick, claims what nobody live holds, up to
its fair share of the lanes: the lanes divided by the live nodes, rounded up. A node that holds more
than its share gives the excess back, each lane as soon as it is idle, and a node short of its share
ticks every `CATCH_UP_TICK_S` while another holds more than its share, so a worker that joins gets its
lanes within a second or so of its first tick. Singletons
are claimed by whoever finds them free and kept until that node stops or dies.

A lease is free when it has no row, when it expired, or when its owner is known to be dead (a process
of this host whose pid is gone: a restarted worker takes over its predecessor's lanes at once, not a
TTL later). The caller works out which owners are dead; this module only decides.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

LANE_PREFIX = "lane:"
DLQ_RETRIER = "dlq_retrier"
REAPER = "reaper"
SINGLETONS = (DLQ_RETRIER, REAPER)


def lane_lease(target: str, lane: int) -> str:
    return f"{LANE_PREFIX}{target}:{lane}"


def parse_lane_lease(name: str) -> tuple[str, int] | None:
    """(target, lane) of a lane lease's name; None for any other lease."""
    if not name.startswith(LANE_PREFIX):
        return None
    target, _, lane = name[len(LANE_PREFIX) :].rpartition(":")
    return (target, int(lane)) if target and lane.isdigit() else None


def tick_s(ttl_s: float) -> float:
    """How often a worker renews and claims: three renewals fit in one TTL, so one late tick (a
    busy event loop, a slow commit) never loses a lease."""
    return ttl_s / 3


@dataclass(frozen=True)
class Lease:
    name: str
    owner: str
    expires_at: float


@dataclass(frozen=True)
class LeasePlan:
    claim: tuple[str, ...]
    """Free leases to take now, in name order."""
    give_back: tuple[str, ...]
    """Lane leases held beyond the fair share: to release once their lanes are idle."""


@dataclass(frozen=True)
class Held:
    """What a lease tick ended with (`store.WriteConnection.keep_leases`)."""

    mine: dict[str, float]
    """The leases this node holds, by name, with their expiry (wall clock)."""
    plan: LeasePlan
    leases: tuple[Lease, ...]
    """Every lease row after the tick (/health, `wacored status`)."""
    live_nodes: tuple[str, ...]


def free(lease: Lease | None, now: float, dead: Collection[str]) -> bool:
    return lease is None or lease.expires_at <= now or lease.owner in dead


def fair_share(lanes: int, live_nodes: int) -> int:
    return math.ceil(lanes / max(1, live_nodes))


CATCH_UP_TICK_S = 0.25
"""How often a node short of its fair share ticks while another node holds more than its share: that
one gives lanes back as soon as they are idle, and they wait, unowned, until somebody's tick takes
them. At the normal tick (a third of the TTL, 3.3 s by default) a second worker starting under load
left the lanes it was due stalled for ~3.6 s (bench, `[server] processes = 2`)."""


def next_tick_s(ttl_s: float, me: str, lanes: int, held: Held | None, now: float) -> float:
    """When the lease keeper of `me`, serving `lanes` lanes, ticks again after a tick that ended with
    `held` (None: it failed) at wall-clock `now`."""
    normal = tick_s(ttl_s)
    if held is None:
        return normal
    owners = Counter(
        lease.owner
        for lease in held.leases
        if parse_lane_lease(lease.name) is not None and lease.expires_at > now and lease.owner in held.live_nodes
    )
    share = fair_share(lanes, len({*held.live_nodes, me}))
    giving_back = any(count > share for owner, count in owners.items() if owner != me)
    return min(normal, CATCH_UP_TICK_S) if owners[me] < share and giving_back else normal


def plan(
    me: str,
    lanes: Sequence[str],
    singletons: Sequence[str],
    leases: Mapping[str, Lease],
    live_nodes: Collection[str],
    now: float,
    dead: Collection[str] = (),
) -> LeasePlan:
    """What `me` should claim and give back, given every lease row and the nodes alive now.

    `lanes` are the lane leases this node can serve (its configured targets' lanes); `live_nodes`
    should include `me`. Claims go in name order so that two nodes racing for free lanes mostly want
    different ones only after the first has taken its share."""
    mine = sorted(
        n for n in lanes if (lease := leases.get(n)) is not None and lease.owner == me and lease.expires_at > now
    )
    share = fair_share(len(lanes), len({*live_nodes, me}))
    claim: list[str] = []
    room = share - len(mine)
    for name in sorted(lanes):
        if room <= 0:
            break
        if name not in mine and free(leases.get(name), now, dead):
            claim.append(name)
            room -= 1
    claim.extend(n for n in singletons if free(leases.get(n), now, dead))
    give_back = tuple(mine[share:]) if len(mine) > share else ()
    return LeasePlan(tuple(claim), give_back)

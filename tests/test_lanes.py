"""Lanes from the store: who holds which lease (on SQLite and on PostgreSQL), and several daemons
sharing one store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from wacored.actors.lanes import Lane, LaneBoard, run_lease_keeper
from wacored.core.delivery import lane_of
from wacored.core.leases import (
    CATCH_UP_TICK_S,
    DLQ_RETRIER,
    REAPER,
    SINGLETONS,
    Held,
    Lease,
    LeasePlan,
    fair_share,
    lane_lease,
    next_tick_s,
    parse_lane_lease,
    plan,
    tick_s,
)
from wacored.daemon import node_name
from wacored.store import WriteConnection, migrate
from wacored.store.interface import WriteTx
from wacored.store.lanes import this_host_dead
from wacored.store.writer import WriteOp, run_writer

from .conftest import Daemon, Downstream, Received, StoreUnderTest, make_config, open_daemon, rows
from .support import health, parse, until_settled, value, wait_until

LANES = [lane_lease("rides", i) for i in range(4)]


def test_a_lone_node_claims_every_free_lane_and_the_singletons() -> None:
    decided = plan("a", LANES, SINGLETONS, {}, ["a"], now=100.0)
    assert decided.claim == (*sorted(LANES), *SINGLETONS)
    assert decided.give_back == ()


def test_a_node_claims_up_to_its_fair_share_and_gives_back_the_excess() -> None:
    mine = {n: Lease(n, "a", 110.0) for n in LANES}
    # b has joined: a holds 4 of 4 lanes, its share is now 2.
    assert plan("a", LANES, (), mine, ["a", "b"], now=100.0).give_back == tuple(sorted(LANES)[2:])
    # b finds nothing free until a gives back.
    assert plan("b", LANES, (), mine, ["a", "b"], now=100.0).claim == ()
    half = {n: mine[n] for n in sorted(LANES)[:2]}
    assert plan("b", LANES, (), half, ["a", "b"], now=100.0).claim == tuple(sorted(LANES)[2:])
    assert fair_share(5, 2) == 3
    assert fair_share(4, 0) == 4


def test_expired_leases_and_dead_owners_are_free_live_ones_are_not() -> None:
    leases = {
        LANES[0]: Lease(LANES[0], "b", 99.0),  # expired
        LANES[1]: Lease(LANES[1], "c", 200.0),  # c's pid is gone
        LANES[2]: Lease(LANES[2], "b", 200.0),  # b is alive and holds it
        DLQ_RETRIER: Lease(DLQ_RETRIER, "b", 200.0),
        REAPER: Lease(REAPER, "c", 200.0),
    }
    decided = plan("a", LANES, SINGLETONS, leases, ["a"], now=100.0, dead={"c"})
    assert decided.claim == (LANES[0], LANES[1], LANES[3], REAPER)


def test_a_node_short_of_its_share_ticks_fast_only_while_another_holds_more_than_its_share() -> None:
    def held(*owners: str, live: tuple[str, ...] = ("a", "b")) -> Held:
        leases = tuple(Lease(name, owner, 110.0) for name, owner in zip(sorted(LANES), owners, strict=False))
        return Held({}, LeasePlan((), ()), (*leases, Lease(DLQ_RETRIER, "b", 110.0)), live)

    normal = tick_s(10.0)
    assert next_tick_s(10.0, "a", 4, held("b", "b", "b", "b"), now=100.0) == CATCH_UP_TICK_S  # b gives 2 back
    assert next_tick_s(10.0, "a", 4, held("a", "b", "b", "b"), now=100.0) == CATCH_UP_TICK_S
    assert next_tick_s(10.0, "a", 4, held("a", "a", "b", "b"), now=100.0) == normal  # shared out
    assert next_tick_s(10.0, "b", 4, held("b", "b", "b", "b"), now=100.0) == normal  # b is the one over
    # Short, but nobody holds more than the share (4 lanes, 3 nodes: a share of 2): nothing is coming.
    assert next_tick_s(10.0, "a", 4, held("b", "b", "c", "c", live=("a", "b", "c")), now=100.0) == normal
    # Leases of a node no longer live, or expired, give nothing back: they are free to claim already.
    assert next_tick_s(10.0, "a", 4, held("b", "b", "b", "b", live=("a",)), now=100.0) == normal
    assert next_tick_s(10.0, "a", 4, held("b", "b", "b", "b"), now=120.0) == normal
    assert next_tick_s(10.0, "a", 4, None, now=100.0) == normal


async def test_lanes_given_back_are_taken_by_the_node_due_them_within_a_catch_up_tick(
    tmp_path: Path, store_clock: trio.testing.MockClock
) -> None:
    """b holds every lane when a joins. b sees a at its next tick and gives half back at once (its
    lanes are idle); a, short of its share while b holds more, ticks every `CATCH_UP_TICK_S` and takes
    them. With ticks only every third of the TTL this took two more ticks (bench: lanes stalled ~3.6 s)."""
    path = tmp_path / "db"
    migrate(path)
    boards = {me: LaneBoard(10.0) for me in ("a", "b")}
    async with trio.open_nursery() as nursery:

        async def start(me: str) -> None:
            boards[me].ensure("rides", 4)
            send, receive = trio.open_memory_channel[WriteOp](10)
            await nursery.start(run_writer, WriteConnection(path), receive, boards[me])
            await nursery.start(
                partial(
                    run_lease_keeper,
                    boards[me],
                    send,
                    me=me,
                    started_at=0.0,
                    wall_clock=lambda: 1000.0 + trio.current_time(),
                    dead=lambda owner: False,
                )
            )

        await start("b")
        assert len(boards["b"].held_lanes()) == 4
        await start("a")
        joined = trio.current_time()
        await wait_until(lambda: len(boards["a"].held_lanes()) >= 2, timeout_s=60)
        assert trio.current_time() - joined <= tick_s(10.0) + 2 * CATCH_UP_TICK_S
        assert len(boards["b"].held_lanes()) == 2
        nursery.cancel_scope.cancel()


def test_lane_lease_names_round_trip() -> None:
    assert parse_lane_lease(lane_lease("jobs:v2", 7)) == ("jobs:v2", 7)
    assert parse_lane_lease(DLQ_RETRIER) is None


def tick(conn: WriteTx, me: str, now: float, release: list[str] | None = None, ttl: float = 10.0) -> Held:
    conn.begin_waiting()
    held = conn.keep_leases(
        me=me,
        lanes=LANES,
        singletons=SINGLETONS,
        release=release or [],
        now=now,
        ttl_s=ttl,
        started_at=0.0,
        dead=lambda owner: False,
    )
    conn.commit()
    return held


def test_two_nodes_on_one_store_share_the_lanes_and_take_over_expired_ones(store: StoreUnderTest) -> None:
    store.migrate()
    a, b = store.writer(), store.writer()
    first = tick(a, "a", 100.0)
    assert sorted(first.mine) == sorted([*LANES, *SINGLETONS])
    assert tick(b, "b", 101.0).mine == {}  # nothing free yet
    second = tick(a, "a", 103.0)  # a sees b alive: it gives two lanes back once they are idle
    assert second.plan.give_back == tuple(sorted(LANES)[2:])
    tick(a, "a", 106.0, release=list(second.plan.give_back))
    assert sorted(tick(b, "b", 107.0).mine) == sorted(LANES)[2:]
    # a stops renewing: after the TTL its lanes and singletons are b's.
    taken = tick(b, "b", 117.0)
    assert sorted(taken.mine) == sorted([*LANES, *SINGLETONS])
    assert {lease.owner for lease in taken.leases} == {"b"}
    a.close()
    b.close()


def test_two_nodes_ticking_at_once_never_both_win_a_lease(store: StoreUnderTest) -> None:
    """Each tick reads the leases and claims the free ones in one transaction: however the two
    interleave, every lease has one owner and the two hold them all between them."""
    store.migrate()
    conns = {me: store.writer() for me in ("a", "b")}
    results: dict[str, Held] = {}

    def node(me: str) -> None:
        results[me] = tick(conns[me], me, 100.0)

    threads = [threading.Thread(target=node, args=(me,)) for me in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine_a, mine_b = set(results["a"].mine), set(results["b"].mine)
    assert not mine_a & mine_b
    assert mine_a | mine_b == {*LANES, *SINGLETONS}
    assert dict(store.rows("SELECT name, COUNT(*) FROM leases GROUP BY name")) == dict.fromkeys(
        [*LANES, *SINGLETONS], 1
    )
    for conn in conns.values():
        conn.close()


def test_a_dead_process_of_this_host_is_taken_over_at_once(store: StoreUnderTest) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = f"{socket.gethostname()}-{int(gone.stdout)}"
    assert this_host_dead(dead)
    assert not this_host_dead(f"{socket.gethostname()}-{os.getpid()}")
    assert not this_host_dead(f"elsewhere-{int(gone.stdout)}")  # another host: only its lease's expiry tells
    # A configured node (and its workers) never has the default shape: only its leases' expiry tells.
    host = socket.gethostname()
    for configured in (f"{host}.a", f"{host}.a-w{int(gone.stdout)}", node_name(f"{host}.a", 3)):
        assert not this_host_dead(configured)
    assert node_name() == f"{host}-{os.getpid()}"
    assert node_name("", 2) == node_name()  # a default name is one per process already
    assert node_name("eu.a", 2) == "eu.a-w2"
    store.migrate()
    conn = store.writer()
    for n in LANES:
        store.execute("INSERT INTO leases VALUES (?, ?, ?)", n, dead, 1e12)
    conn.begin_waiting()
    held = conn.keep_leases(
        me="a",
        lanes=LANES,
        singletons=(),
        release=[],
        now=100.0,
        ttl_s=10.0,
        started_at=0.0,
        dead=this_host_dead,
    )
    conn.commit()
    conn.close()
    assert sorted(held.mine) == sorted(LANES)


def test_queued_rows_follow_a_new_lane_count_once(store: StoreUnderTest) -> None:
    store.migrate()
    for i in range(5):
        store.execute(
            "INSERT INTO messages (key, kind, sender, service, reason, target, body, received_at)"
            " VALUES (?, 'message', '', 'rides', 'keyword', 'rides', ?, 1.0)",
            f"m{i}",
            b"{}",
        )
    store.execute("UPDATE messages SET sender = 'sender-' || id")
    ids = [i for (i,) in store.rows("SELECT id FROM messages")]
    conn = store.writer()
    conn.begin_waiting()
    moved = conn.split_lanes("rides", 4)
    again = conn.split_lanes("rides", 4)
    conn.commit()
    want = {i: lane_of(f"sender-{i}", 4) for i in ids}
    assert moved == sum(1 for lane in want.values() if lane != 0)
    assert again == 0
    conn.close()
    assert dict(store.rows("SELECT id, lane FROM messages")) == want


@pytest.mark.single_worker("runs two daemons as two nodes itself and counts one node's leases and lane metrics")
async def test_two_daemons_on_one_store_deliver_every_message_once_in_each_senders_order(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Two daemons (two nodes' worth of ingress, lanes and leases) on one SQLite file: POSTs alternate
    between them, each lane is delivered by the one holding it (rows the other ingested reach it
    through the relay), and one daemon killed without giving its leases back has its lanes taken over
    by the other once they expire."""
    config = make_config(tmp_path, services, graph, forwarding={"concurrency": 4}, cluster={"lease_ttl_s": 1.5})
    senders = [f"25078800{i:04d}" for i in range(8)]
    # Every message is the keyword itself: sessions are still per process (moving them into the
    # store is a change of its own); here what is tested is delivery.
    sent: dict[str, list[str]] = {s: [] for s in senders}
    async with open_daemon(config, node="b") as b:
        async with trio.open_nursery() as killed:

            async def run_a(task_status: trio.TaskStatus[object]) -> None:
                async with open_daemon(config, node="a") as a:
                    task_status.started(a)
                    await trio.sleep_forever()

            a = await killed.start(run_a)
            await _shared_out(tmp_path / "wacored.db")
            for round_ in range(6):
                for sender in senders:
                    daemon = a if (round_ + senders.index(sender)) % 2 else b
                    sent[sender].append(await _send(daemon, sender))
            # Killed: cancelled without a clean stop, its leases stay until they expire.
            killed.cancel_scope.cancel()
        for _ in range(3):
            for sender in senders:
                sent[sender].append(await _send(b, sender))
        await until_settled(tmp_path / "wacored.db")
        report = await health(b)
        samples = parse((await b.client.get(f"{b.url}/metrics")).text)
    # b took every lane when it started alone, gave half back when a came, and took a's after the kill.
    lanes = len(report["checks"]["leases"]["lanes_held"])
    assert value(samples, "wacored_lanes_taken_total") > lanes
    assert value(samples, "wacored_lanes_lost_total") == 0
    got = services.on("/rides")
    firsts: list[Received] = []
    for g in got:
        if all(f.headers["idempotency-key"] != g.headers["idempotency-key"] for f in firsts):
            firsts.append(g)
    assert len(firsts) == 8 * 9
    # Sent again only what a was delivering when it was killed (same key, so the service dedupes).
    assert len(got) - len(firsts) <= 4
    for sender in senders:
        assert [g.message["id"] for g in firsts if g.message["from"] == sender] == sent[sender]
    assert {lane_lease("rides", i) for i in range(4)} <= set(report["checks"]["leases"]["lanes_held"])
    # b stopped cleanly: it gave its leases back (a next start, or another node, takes over at once).
    assert rows(tmp_path / "wacored.db", "SELECT COUNT(*) FROM leases") == [(0,)]


async def _send(daemon: Daemon, sender: str) -> str:
    """A keyword message (every one routes by itself, whichever daemon's sessions): its wamid."""
    r = await daemon.send_text("rides", sender=sender)
    assert r.status_code == 200
    return str(r.json()["routes"][0]["message_id"])


async def _shared_out(db: Path) -> None:
    """Until nodes a and b hold the same number of lanes (b started alone and gave half back)."""
    with trio.fail_after(10):
        while True:
            held = dict(rows(db, "SELECT owner, COUNT(*) FROM leases WHERE name LIKE 'lane:%' GROUP BY owner"))
            if held.get("a", 0) and held.get("a") == held.get("b"):
                return
            await trio.sleep(0.05)


def node_a_holding_four_lanes(tmp_path: Path) -> tuple[WriteConnection, WriteConnection, LaneBoard, list[Lane]]:
    """Node a's connection and board, holding every lane of rides (4) since its tick at 100; node b's
    connection, not seen yet."""
    path = tmp_path / "db"
    migrate(path)
    a, b = WriteConnection(path), WriteConnection(path)
    board = LaneBoard(10.0)
    lanes = board.ensure("rides", 4)
    board.apply(tick(a, "a", 100.0), [], 100.0)
    return a, b, board, lanes


async def test_a_lane_claimed_again_in_the_tick_that_gives_it_back_is_woken(tmp_path: Path) -> None:
    """Found by tests/test_kills.py: a worker marked lanes to give back (a third node counted live: a
    killed worker's row, not yet stale), and in the tick that released them, its share grew again (that
    row aged out), so it claimed them straight back. Its lane tasks, asleep since the lanes stopped being
    theirs to deliver, were not woken: their queued rows waited a heartbeat (5 s) for nothing."""
    a, b, board, lanes = node_a_holding_four_lanes(tmp_path)
    assert all(lane.held() for lane in lanes)
    tick(b, "b", 101.0)  # b is seen: a's share drops to 2
    board.apply(tick(a, "a", 103.0), [], 103.0)
    giving = [lane for lane in lanes if lane.giving_back]
    assert len(giving) == 2
    assert not any(lane.held() for lane in giving)
    # b is gone (unseen for a TTL) when a gives them back: a takes them again in the same transaction.
    released = board.releasable()
    assert released == [lane.name for lane in giving]
    again = tick(a, "a", 112.0, release=released)
    assert set(released) <= set(again.mine)
    for lane in lanes:
        lane.rearm()
    board.apply(again, released, 112.0)
    assert all(lane.held() for lane in lanes)
    for lane in giving:
        with trio.fail_after(1):
            await lane.sleep(60)  # woken at once: the lane reads its queued rows now


async def test_lanes_to_give_back_are_given_back_at_once_when_idle(tmp_path: Path) -> None:
    """Found by the suite's two-worker mode: a lane marked to give back takes no new row, and no other
    node may take it while this one holds it, so its rows waited for this node's next tick (3.3 s by
    default) and then the other's. The keeper is now woken to release it at once, and a lane that was
    busy as soon as the writer records its last outcome."""
    a, b, board, lanes = node_a_holding_four_lanes(tmp_path)
    board.keeper_wake = trio.Event()  # `ensure` set it (new lanes): start from a quiet keeper
    tick(b, "b", 101.0)  # b is seen: a's share drops to 2, it gives back rides:2 and rides:3
    lanes[3].handed.add(7)  # a delivery of rides:3 whose outcome the writer has not recorded yet
    board.apply(tick(a, "a", 103.0), [], 103.0)
    assert [lane.giving_back for lane in lanes] == [False, False, True, True]
    assert board.releasable() == [lanes[2].name]
    assert board.keeper_wake.is_set()  # the keeper ticks again now, and releases rides:2
    board.keeper_wake = trio.Event()
    released = board.releasable()
    board.apply(tick(a, "a", 103.1, release=released), released, 103.1)
    assert not board.keeper_wake.is_set()  # nothing idle left to give back: no tick for nothing
    board.recorded("rides", 7)
    assert board.keeper_wake.is_set()  # rides:3 is idle now: given back at once too

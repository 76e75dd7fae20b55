"""wacored.actors.supervisor: restart policy (pure), and supervision of real failing actors under a mock clock."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from wacored.actors.supervisor import ActorGaveUp, RestartPolicy, supervise
from wacored.config import SupervisorConfig

from .conftest import bare_runtime
from .support import ingest_op

POLICY = SupervisorConfig(max_restarts=3, window_s=60.0, backoff_base_s=0.5, backoff_max_s=1.5)


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(POLICY)
    assert [policy.crashed(t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 1.5]


def test_more_crashes_than_allowed_within_the_window_give_up() -> None:
    policy = RestartPolicy(POLICY)
    for t in (0.0, 1.0, 2.0):
        assert policy.crashed(t) is not None
    assert policy.crashed(3.0) is None


def test_crashes_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(POLICY)
    for t in (0.0, 1.0, 2.0):
        policy.crashed(t)
    assert policy.crashed(61.0) == 1.0  # the window (1, 61] holds 2.0 and 61.0
    assert policy.crashed(200.0) == 0.5


class Flaky:
    """An actor that starts, then crashes its first `crashes` runs."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.started_at: list[float] = []

    async def __call__(self, task_status: trio.TaskStatus[Any]) -> None:
        self.runs += 1
        self.started_at.append(trio.current_time())
        task_status.started("ready")
        await trio.sleep(1)
        if self.runs <= self.crashes:
            raise RuntimeError(f"boom {self.runs}")


async def test_a_crashed_actor_is_restarted_with_backoff(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    rt = bare_runtime(tmp_path, supervisor={"max_restarts": 3, "window_s": 60, "backoff_base_s": 0.5})
    actor = Flaky(crashes=2)
    restarts: list[int] = []
    async with trio.open_nursery() as nursery:
        run = partial(supervise, rt, "flaky", actor, on_restart=lambda: restarts.append(1))
        assert await nursery.start(run) == "ready"
    assert actor.runs == 3
    # Each run lasts 1 s; the restarts wait 0.5 s then 1 s.
    assert actor.started_at == [0.0, 1.5, 3.5]
    assert rt.actors["flaky"].restarts == 2 == len(restarts)
    assert rt.actors["flaky"].error == "RuntimeError: boom 2"
    assert not rt.actors["flaky"].running


async def test_an_actor_crashing_too_often_stops_the_daemon(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    rt = bare_runtime(tmp_path, supervisor={"max_restarts": 2, "window_s": 60})
    actor = Flaky(crashes=100)
    with pytest.RaisesGroup(pytest.RaisesExc(ActorGaveUp, match="actor flaky crashed 3 times in 60 s")):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, rt, "flaky", actor)
    assert actor.runs == 3


async def test_an_actor_failing_before_it_starts_is_not_restarted(tmp_path: Path) -> None:
    rt = bare_runtime(tmp_path)
    runs = 0

    async def cannot_bind(task_status: trio.TaskStatus[Any]) -> None:
        nonlocal runs
        runs += 1
        raise OSError("address in use")

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="address in use")):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, rt, "ingress", cannot_bind)
    assert runs == 1


async def test_cancellation_is_not_a_crash(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    rt = bare_runtime(tmp_path)
    actor = Flaky(crashes=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, rt, "calm", actor)
        nursery.cancel_scope.cancel()
    assert (actor.runs, rt.actors["calm"].restarts, rt.actors["calm"].error) == (1, 0, "")


async def test_a_writer_that_crashes_answers_its_callers_and_is_restarted(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    from wacored.store import StoreUnavailable, WriteConnection
    from wacored.store.writer import NoLanes, Write, WriteOp, run_writer

    send, receive = trio.open_memory_channel[WriteOp](10)
    rt = bare_runtime(tmp_path, writes=send, supervisor={"backoff_base_s": 0.5})
    path = tmp_path / "bare.db"

    def writer(task_status: trio.TaskStatus[Any]) -> Any:
        return run_writer(WriteConnection(path), receive, NoLanes(), task_status=task_status)

    def bug(conn: WriteConnection) -> object:
        raise RuntimeError("a bug in a write")

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, rt, "writer", writer)
        broken = Write(bug)
        await send.send(broken)
        with pytest.raises(StoreUnavailable, match="a bug in a write"):
            await broken.reply.wait()
        ingest = ingest_op("wamid.1")
        await send.send(ingest)  # waits in the channel for the restarted writer
        assert (await ingest.reply.wait()).ids == (1,)
        assert rt.actors["writer"].restarts == 1
        await send.aclose()

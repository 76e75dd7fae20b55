"""The daemon as N workers in one trio run: the test suite's two-worker mode (``WACORED_TEST_WORKERS=2``).

Each worker is what ``wacored worker`` runs in a process of its own under ``[server] processes = N``:
`run_daemon` with its own SO_REUSEPORT socket on the port the supervisor reserved, its `Place` (so
``/metrics`` and ``/health`` ask its siblings over their private sockets) and a node name of its own
(its leases, its attempts). The port, the private directory and the one migration come from
`workers.shared_port`, each worker's socket from `workers.take_seat`: the same calls as
`run_supervisor` and `cli.cmd_worker`, so this mode cannot drift from how real workers are wired.
They share one store as real workers do: lane leases and their fair share, the relay, the DLQ
retrier's and the reaper's singleton leases.

What it does not cover: the supervisor process itself (restarts, signals, systemd), nor one worker
dying while the other serves (tests/test_workers.py and tests/test_kills.py run real processes).
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial
from typing import Any

import trio

from wacored.config import Config
from wacored.daemon import node_name, run_daemon
from wacored.reloads import ReloadRequest
from wacored.siblings import Place
from wacored.workers import shared_port, take_seat


def worker_nodes(config: Config, node: str | None, count: int) -> list[str]:
    """Each worker's node name: the test's `node`, else ``[cluster] node_id``, else this process's
    ``host-pid``, suffixed ``-w<index>`` as `node_name` suffixes a configured id. Every worker of one
    trio run shares the pid, so the default name alone would make them one node."""
    base = node or config.cluster.node_id or node_name()
    return [node_name(base, index) for index in range(count)]


async def fan_out_reloads(
    requests: trio.MemoryReceiveChannel[ReloadRequest], workers: list[trio.MemorySendChannel[ReloadRequest]]
) -> None:
    """Each reload to every worker, as the supervisor signals each one on SIGHUP; it is done, and
    succeeded, once every worker has reloaded and all succeeded."""
    async for request in requests:
        copies = [ReloadRequest(request.load) for _ in workers]
        for send, copy in zip(workers, copies, strict=True):
            await send.send(copy)
        results = [await copy.done.wait() for copy in copies]
        request.done.set(all(results))


async def run_workers(
    config: Config,
    count: int,
    *,
    stop: trio.Event,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None = None,
    node: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """Run `count` workers of `config` until `stop` is set; `task_status.started` gets the shared
    port's URL and each worker's private socket once every worker serves. `kwargs` go to every
    worker's `run_daemon`."""
    nodes = worker_nodes(config, node, count)
    async with shared_port(config) as (reserved, directory), trio.open_nursery() as outer:
        channels = [trio.open_memory_channel[ReloadRequest](0) for _ in range(count)]
        if reloads is not None:
            outer.start_soon(fan_out_reloads, reloads, [send for send, _ in channels])
        with ExitStack() as seats:
            seated = [seats.enter_context(take_seat(reserved, Place(i, count, directory))) for i in range(count)]
            async with trio.open_nursery() as workers:
                # One after the other, as a restarted worker joins one that serves. Started at once,
                # each test would begin in the lease handover (the lanes worker 0 gives back wait for
                # worker 1's next tick, up to `tick_s`, 3.3 s by default), so nearly every test would
                # wait it out; this way the handover comes `tick_s` into a test, and the longer tests
                # cross it.
                urls = []
                for index, seat in enumerate(seated):
                    urls.append(
                        await workers.start(
                            partial(
                                run_daemon,
                                config,
                                stop=stop,
                                reloads=channels[index][1] if reloads is not None else None,
                                node=nodes[index],
                                listener=seat.listener,
                                place=seat.place,
                                **kwargs,
                            )
                        )
                    )
                # Every worker's first URL is the shared port's; then each one's private socket.
                task_status.started([urls[0][0], *(seat.place.socket_path(i) for i, seat in enumerate(seated))])
        outer.cancel_scope.cancel(reason="every worker has stopped")

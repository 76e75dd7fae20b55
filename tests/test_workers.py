"""``[server] processes = N``: real `wacored run` supervisors over real worker processes, on port 0's
cousin (a free port), with real HTTP to the shared port and to each worker's private socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import trio

from wacored.core.whatsapp import sign, text_webhook

from .conftest import SECRET, Downstream, config_mapping, rows
from .support import Workers, alive, clean_env, parse, run_cli, toml_text, value, wait_until, workers_process


def children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def post_once(url: str) -> int:
    """One signed webhook POST on a connection of its own (so the kernel picks a worker for it)."""
    body = text_webhook(text="hi", sender="250788000001", wamid=f"wamid.W{uuid.uuid4().hex}", timestamp=1700000000)
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body), "Connection": "close"}
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.post(f"{url}/webhook", content=body, headers=headers)).status_code


async def accepted(workers: Workers, index: int) -> float:
    """Webhook POSTs accepted by worker `index` alone."""
    text = (await workers.local(index, "/metrics")).text
    return value(parse(text), "wacored_webhook_requests_total", outcome="accepted")


async def reloads(workers: Workers, result: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(f"{workers.url}/metrics")).text
    return value(parse(text), "wacored_config_reloads_total", result=result)


async def test_two_workers_serve_and_either_one_shows_the_whole_daemon(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with workers_process(tmp_path, services, graph) as workers:
        health = await workers.health()
        assert health["status"] == "healthy"
        listed = health["workers"]
        assert [w["index"] for w in listed] == [0, 1]
        assert all(w["ready"] and w["restarts"] == 0 and w["status"] == "healthy" for w in listed)
        pids = {w["pid"] for w in listed}
        assert len(pids) == 2
        assert workers.process.pid not in pids
        assert {w["node"] for w in listed} == {f"{socket.gethostname()}-{pid}" for pid in pids}
        assert all("writer" in w["actors"] and "ingress" in w["actors"] for w in listed)

        # Connections of their own until both workers have accepted some (bounded).
        for _ in range(200):
            assert await post_once(workers.url) == 200
            if await accepted(workers, 0) and await accepted(workers, 1):
                break
        each = [await accepted(workers, 0), await accepted(workers, 1)]
        async with httpx.AsyncClient(trust_env=False) as http:
            before = parse((await http.get(f"{workers.url}/metrics")).text)
        # Start-up probes may have asked a sibling that was not serving yet: none since.
        skipped = value(before, "wacored_worker_scrape_failures_total")
        assert all(each), f"one worker got every connection: {each}"
        # Whichever worker answers the scrape shows both workers' requests, and each worker once.
        for _ in range(4):
            async with httpx.AsyncClient(trust_env=False) as http:
                merged = parse((await http.get(f"{workers.url}/metrics", headers={"Connection": "close"})).text)
            assert value(merged, "wacored_webhook_requests_total", outcome="accepted") == sum(each)
            assert value(merged, "wacored_workers") == 2
            assert value(merged, "wacored_worker_scrape_failures_total") == skipped
            assert value(merged, "wacored_actor_up", actor="writer") == 1
        # A local scrape is that worker's alone.
        assert value(parse((await workers.local(1, "/metrics")).text), "wacored_workers") == 1


async def test_a_configured_node_id_names_each_worker(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    async with workers_process(tmp_path, services, graph, env={"WACORED_NODE_ID": "eu.a"}) as workers:
        listed = (await workers.health())["workers"]
        assert [w["node"] for w in listed] == ["eu.a-w0", "eu.a-w1"]
        for index in (0, 1):
            mine = (await workers.local(index, "/health")).json()["checks"]["leases"]
            assert mine["node"] == f"eu.a-w{index}"
        owners = {owner for (owner,) in rows(tmp_path / "wacored.db", "SELECT DISTINCT owner FROM leases")}
        assert owners <= {"eu.a-w0", "eu.a-w1"}
        assert owners
    lines = [json.loads(line) for line in workers.log.read_text().splitlines() if line.startswith("{")]
    listening = [line for line in lines if line.get("event") == "listening" and line["logger"] == "wacored.daemon"]
    assert sorted((line["worker"], line["node"]) for line in listening) == [("0", "eu.a-w0"), ("1", "eu.a-w1")]


async def test_a_killed_worker_is_restarted_and_health_shows_it(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with workers_process(tmp_path, services, graph) as workers:
        victim = (await workers.health())["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        # Until it is gone it may still accept a connection, which its death then resets.
        await wait_until(lambda: not alive(victim["pid"]))

        async def restarted() -> bool:
            listed = (await workers.health())["workers"]
            return len(listed) == 2 and listed[1].get("pid") not in (None, victim["pid"]) and listed[1]["ready"]

        with trio.fail_after(15):
            while not await restarted():  # noqa: ASYNC110 -- another process's state, over HTTP
                await trio.sleep(0.05)
        health = await workers.health()
        assert health["workers"][1]["restarts"] == 1
        assert health["workers"][0]["restarts"] == 0
        assert not alive(victim["pid"])
        async with httpx.AsyncClient(trust_env=False) as http:
            merged = parse((await http.get(f"{workers.url}/metrics")).text)
        assert value(merged, "wacored_worker_restarts_total") == 1
        log = workers.log.read_text()
        assert '"event": "worker_exited"' in log
        assert '"signal": "SIGKILL"' in log
        assert await post_once(workers.url) == 200
        status = await run_cli("status", "-c", str(workers.config), env=clean_env(WACORED_APP_SECRET=SECRET))
        out = status.stdout.decode()
        assert f"daemon        {workers.url}: healthy, 2 worker(s)" in out
        assert f"worker 1: pid {health['workers'][1]['pid']} (" in out
        assert "restarts 1" in out
        assert out.count("    lanes held: ") == 2


async def test_sighup_reloads_every_worker_or_none(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    async with workers_process(tmp_path, services, graph) as workers:
        good = workers.config.read_text().replace("concurrency = 4", "concurrency = 4\nretries = 3", 1)
        workers.config.write_text(good)
        workers.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: workers.logged("reloaded") == 2)
        assert await reloads(workers, "ok") == 2  # one per worker, summed

        workers.config.write_text(good.replace("[server]", "[server]\nbogus = 1", 1))
        workers.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: workers.logged("reload_failed") >= 1)
        assert "server.bogus: unknown key" in workers.log.read_text()
        # Refused by the supervisor: no worker was told, so none reloaded or refused.
        assert workers.logged("reloaded") == 2
        assert await reloads(workers, "ok") == 2
        assert await reloads(workers, "failed") == 0
        assert workers.logged("reloading") == 2 + 2  # the supervisor twice, each worker once


async def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with workers_process(tmp_path, services, graph) as workers:
        pids = [w["pid"] for w in (await workers.health())["workers"]]
        workers.process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await workers.process.wait() == 0
        assert not any(alive(pid) for pid in pids)
        assert workers.logged("worker_exited") == 2
        assert '"exit_code": 0' in workers.log.read_text()


async def test_a_killed_supervisor_leaves_no_worker_serving(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with workers_process(tmp_path, services, graph) as workers:
        pids = [w["pid"] for w in (await workers.health())["workers"]]
        workers.process.kill()
        await workers.process.wait()
        await wait_until(lambda: not any(alive(pid) for pid in pids), timeout_s=10)
        assert "the supervisor is gone" in workers.log.read_text() or workers.logged("stopping") == 2


async def test_processes_1_is_one_process_with_no_supervisor(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    async with workers_process(tmp_path, services, graph, processes=1) as workers:
        [only] = (await workers.health())["workers"]
        assert only["pid"] == workers.process.pid
        assert only["index"] == 0
        assert only["restarts"] == 0
        assert children(workers.process.pid) == []
        assert os.listdir(workers.runtime_dir) == []


async def test_a_port_in_use_fails_before_any_worker_starts(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data = config_mapping(tmp_path, services.url, graph.url)
        data["server"].update(listen=f"127.0.0.1:{taken.getsockname()[1]}", processes=2)
        (tmp_path / "wacored.toml").write_text(toml_text(data))
        with trio.fail_after(30):
            done = await trio.run_process(
                [sys.executable, "-m", "wacored", "run", "-c", str(tmp_path / "wacored.toml")],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=clean_env(),
                cwd=tmp_path,
            )
    assert done.returncode == 1
    assert b"cannot listen on" in done.stderr
    assert b"worker_started" not in done.stderr


async def test_ready_goes_to_systemd_once_every_worker_is_ready(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="wacored-sd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
    ):
        path = os.path.join(directory, "notify")
        receiver.bind(path)
        receiver.setblocking(False)
        messages: list[dict[str, str]] = []

        async def next_with(key: str) -> dict[str, str]:
            with trio.fail_after(20):
                while True:
                    try:
                        data = receiver.recv(4096)
                    except BlockingIOError:
                        await trio.sleep(0.01)
                        continue
                    message = dict(line.split("=", 1) for line in data.decode().split("\n"))
                    messages.append(message)
                    if key in message:
                        return message

        async with workers_process(tmp_path, services, graph, env={"NOTIFY_SOCKET": path}) as workers:
            ready = await next_with("READY")
            assert ready["MAINPID"] == str(workers.process.pid)
            # Once READY=1 is out, each worker answers on its own socket, ready.
            for index in (0, 1):
                [own] = (await workers.local(index, "/health")).json()["workers"]
                assert own["index"] == index
                assert own["ready"]
            assert ready["STATUS"] == f"listening on {workers.url}"
            workers.process.send_signal(signal.SIGHUP)
            assert (await next_with("RELOADING"))["RELOADING"] == "1"
            assert (await next_with("READY"))["STATUS"] == "serving (reloaded)"
            assert workers.logged("reloaded") == 2  # READY only once both workers had reloaded
            workers.process.send_signal(signal.SIGTERM)
            assert (await next_with("STOPPING"))["STOPPING"] == "1"
            with trio.fail_after(15):
                assert await workers.process.wait() == 0
        # Only the supervisor talked to systemd: one READY at start, one after the reload.
        assert [m.get("MAINPID") for m in messages if "READY" in m] == [str(workers.process.pid)] * 2


async def test_the_watchdog_pings_only_while_every_worker_pings(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="wacored-sd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver,
    ):
        path = os.path.join(directory, "notify")
        receiver.bind(path)
        receiver.setblocking(False)

        def pings() -> int:
            count = 0
            while True:
                try:
                    count += b"WATCHDOG=1" in receiver.recv(4096)
                except BlockingIOError:
                    return count

        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
        async with workers_process(tmp_path, services, graph, env=env) as workers:
            await wait_until(lambda: pings() > 0)
            frozen = (await workers.health())["workers"][1]["pid"]
            os.kill(frozen, signal.SIGSTOP)  # a wedged worker: alive, silent
            try:
                await wait_until(lambda: workers.logged("watchdog_stale") > 0)
                pings()  # what was sent before the supervisor noticed
                stale = workers.logged("watchdog_stale")
                await wait_until(lambda: workers.logged("watchdog_stale") >= stale + 2)
                assert pings() == 0  # none while a worker is silent
            finally:
                os.kill(frozen, signal.SIGCONT)
            await wait_until(lambda: pings() > 0)

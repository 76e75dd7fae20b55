"""The ``wacored`` command: config checking, local secrets, simulate, and a real daemon process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from wacored.cli import main

from .conftest import Downstream, config_mapping, make_config, open_daemon

ROOT = Path(__file__).parent.parent
BAD_CONFIG = """
[server]
listen = "nowhere"
bogus = 1
[routing]
fallback = "taxis"
[services.rides]
keys = ["rides"]
"""
BAD_PROBLEMS = [
    "server.listen: must be host:port, e.g. 127.0.0.1:8080",
    "server.bogus: unknown key",
    "services.rides.url: required",
    "routing.fallback: must be \"menu\" or a service name, got 'taxis'",
]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WACORED_", "WA_", "WHATSAPP_"))}
    env.update(extra)
    return env


def wacored(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wacored", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60, check=False)


def test_the_shipped_config_is_valid() -> None:
    result = wacored("check-config", "-c", "wacored.toml", "--env-file", "/nonexistent",
                     env=clean_env(WACORED_APP_SECRET="s"))
    assert result.returncode == 0, result.stderr
    assert "7 services" in result.stdout


def test_check_config_and_run_print_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIG)
    env = clean_env(WACORED_APP_SECRET="s")
    for command in ("check-config", "run"):
        result = wacored(command, "-c", str(path), env=env, cwd=tmp_path)
        assert result.returncode == 1
        for problem in BAD_PROBLEMS:
            assert problem in result.stderr, (command, result.stderr)


def test_run_refuses_to_start_without_an_app_secret(tmp_path: Path) -> None:
    result = wacored("run", "-c", str(ROOT / "wacored.toml"), env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1
    assert "whatsapp.app_secret: required" in result.stderr


def test_dev_env_generates_private_secrets_once(tmp_path: Path) -> None:
    env = clean_env()
    first = wacored("dev-env", env=env, cwd=tmp_path)
    path = tmp_path / "var" / "dev.env"
    assert "generated local secrets in var/dev.env" in first.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_text()
    assert "WACORED_APP_SECRET=" in content and "WACORED_VERIFY_TOKEN=" in content  # noqa: PT018
    second = wacored("dev-env", env=env, cwd=tmp_path)
    assert "local secrets in var/dev.env" in second.stdout
    assert path.read_text() == content
    with_secret = wacored("dev-env", str(tmp_path / "other.env"), env=clean_env(WA_APP_SECRET="x"), cwd=tmp_path)
    assert "comes from the environment" in with_secret.stdout
    assert not (tmp_path / "other.env").exists()


@pytest.mark.parametrize(("kind", "text", "service"), [
    ("text", "rides", "rides"),
    ("interactive", "insurance", "insurance"),
    ("location", "here", "wacored"),
    ("image", "a photo", "wacored"),
])
async def test_simulate_posts_a_signed_webhook(
    tmp_path: Path, services: Downstream, graph: Downstream, capsys: pytest.CaptureFixture[str],
    kind: str, text: str, service: str,
) -> None:
    config = make_config(tmp_path, services, graph)
    path = tmp_path / "wacored.toml"
    path.write_text(_toml(config_mapping(tmp_path, services.url, graph.url)))
    async with open_daemon(config) as daemon:
        args = ["simulate", text, "--type", kind, "-c", str(path), "--url", f"{daemon.url}/webhook",
                "--env-file", str(tmp_path / "none.env")]
        code = await trio.to_thread.run_sync(main, args)
    out = capsys.readouterr().out
    assert code == 0
    assert "HTTP 200" in out
    assert f"X-Routed-Service: {service}" in out


def _toml(data: dict[str, object]) -> str:
    """Just enough TOML for the test configs (tables of scalars, lists and one array of tables)."""
    import json

    lines: list[str] = []

    def table(prefix: str, values: dict[str, object]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and k != "items"}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for item in values.get("items", []) if prefix == "home_menu" else []:  # type: ignore[union-attr]
            lines.append("[[home_menu.items]]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in item.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for name, section in data.items():
        table(name, section)  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_process(tmp_path: Path, services: Downstream, graph: Downstream) -> tuple[trio.Process, int]:
    data = config_mapping(tmp_path, services.url, graph.url)
    port = free_port()
    data["server"]["listen"] = f"127.0.0.1:{port}"
    path = tmp_path / "wacored.toml"
    path.write_text(_toml(data))
    with (tmp_path / "daemon.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wacored", "run", "-c", str(path)], env=clean_env(), cwd=tmp_path,
            stdout=log, stderr=log,
        )
    async with httpx.AsyncClient(trust_env=False) as client:
        with trio.fail_after(20):
            while True:
                try:
                    await client.get(f"http://127.0.0.1:{port}/health")
                    return process, port
                except httpx.ConnectError:
                    await trio.sleep(0.05)


async def test_a_second_signal_stops_at_once_with_exit_1(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    process, port = await start_process(tmp_path, services, graph)
    try:
        # A request whose body never finishes keeps the graceful stop waiting.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await trio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(1):
            await process.wait()
        assert process.returncode is None  # still draining
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 1
        assert '"event": "forced_stop"' in (tmp_path / "daemon.log").read_text()
        await stream.aclose()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_real_daemon_process_serves_and_stops_on_sigterm(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    process, port = await start_process(tmp_path, services, graph)
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            health = await client.get(f"http://127.0.0.1:{port}/health")
        assert health.json()["status"] == "healthy"
        result = await trio.to_thread.run_sync(
            lambda: wacored("simulate", "rides", "-c", str(tmp_path / "wacored.toml"), env=clean_env(), cwd=tmp_path))
        assert "HTTP 200" in result.stdout, result.stderr
        await services.wait_for(1, "/rides")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await process.wait()
        log = (tmp_path / "daemon.log").read_text()
        assert code == 0, log
        assert '"event": "stopped"' in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    data = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data["server"]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        (tmp_path / "wacored.toml").write_text(_toml(data))
        result = wacored("run", "-c", str(tmp_path / "wacored.toml"), env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1
    assert "wacored: cannot run: [Errno 98] Address already in use" in result.stderr

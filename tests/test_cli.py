"""The ``wacored`` command: config checking, local secrets, simulate, and a real daemon process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from wacored.cli import main
from wacored.config import StoreConfig
from wacored.ops.connection import open_ops
from wacored.store import SCHEMA_VERSION

from .conftest import Downstream, StoreUnderTest, config_mapping, fresh_store, make_config, open_daemon
from .support import add_dead_letter, clean_env, free_port, store_execute, store_rows, toml_text

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


def wacored(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wacored", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_the_shipped_config_is_valid() -> None:
    result = wacored(
        "check-config", "-c", "wacored.toml", "--env-file", "/nonexistent", env=clean_env(WACORED_APP_SECRET="s")
    )
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


def test_check_config_without_an_app_secret_warns_that_run_would_refuse(tmp_path: Path) -> None:
    result = wacored("check-config", "-c", str(ROOT / "wacored.toml"), env=clean_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: whatsapp.app_secret: required" in result.stdout
    assert "`run` will refuse to start" in result.stdout


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


@pytest.mark.parametrize(
    ("kind", "text", "service"),
    [
        ("text", "rides", "rides"),
        ("interactive", "insurance", "insurance"),
        ("location", "here", "wacored"),
        ("image", "a photo", "wacored"),
    ],
)
async def test_simulate_posts_a_signed_webhook(
    tmp_path: Path,
    services: Downstream,
    graph: Downstream,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    text: str,
    service: str,
) -> None:
    config = make_config(tmp_path, services, graph)
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(config_mapping(tmp_path, services.url, graph.url)))
    async with open_daemon(config) as daemon:
        args = [
            "simulate",
            text,
            "--type",
            kind,
            "-c",
            str(path),
            "--url",
            f"{daemon.url}/webhook",
            "--env-file",
            str(tmp_path / "none.env"),
        ]
        code = await trio.to_thread.run_sync(main, args)
    out = capsys.readouterr().out
    assert code == 0
    assert "HTTP 200" in out
    assert f"X-Routed-Service: {service}" in out


async def start_process(tmp_path: Path, services: Downstream, graph: Downstream) -> tuple[trio.Process, int]:
    data = config_mapping(tmp_path, services.url, graph.url)
    port = free_port()
    data["server"]["listen"] = f"127.0.0.1:{port}"
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    with (tmp_path / "daemon.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "wacored", "run", "-c", str(path)],
            env=clean_env(),
            cwd=tmp_path,
            stdout=log,
            stderr=log,
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
            lambda: wacored("simulate", "rides", "-c", str(tmp_path / "wacored.toml"), env=clean_env(), cwd=tmp_path)
        )
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


async def test_an_idle_keep_alive_connection_does_not_hold_the_stop(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """A monitor's kept-alive connection, idle after its GET /health, is closed at once on SIGTERM
    instead of holding the stop for hypercorn's whole graceful timeout (10 s)."""
    process, port = await start_process(tmp_path, services, graph)
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            for path in ("/health", "/metrics"):
                assert (await client.get(f"http://127.0.0.1:{port}{path}")).status_code == 200
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(3):
                assert await process.wait() == 0
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
        (tmp_path / "wacored.toml").write_text(toml_text(data))
        result = wacored("run", "-c", str(tmp_path / "wacored.toml"), env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1
    address = data["server"]["listen"]
    assert f"wacored: cannot run: [Errno 98] cannot listen on {address}: Address already in use" in result.stderr
    # Bound before any actor starts: no actor crashed (no traceback), and the store was not even opened.
    assert "Traceback" not in result.stderr
    assert "actor_crashed" not in result.stderr
    assert not (tmp_path / "wacored.db").exists()


# The operator's commands on the store: dlq list|replay|purge and status, run in-process.

OPS_NOW = 1_700_000_000.0
"""When the seeded entries were made: in the past, as the commands use the real clock."""


BOTH_STORES = pytest.mark.parametrize("ops_store", ["sqlite", "postgres"], indirect=True)
"""An operator command tested on both stores; the others (arguments, SQLite's own failures) on SQLite."""


@pytest.fixture
def ops_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUnderTest]:
    yield from fresh_store(request, tmp_path, getattr(request, "param", "sqlite"))


@pytest.fixture
def ops_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ops_store: StoreUnderTest) -> Path:
    """A config without an app secret (the operator's commands do not need it), its store migrated."""
    for name in list(os.environ):
        if name.startswith(("WACORED_", "WA_", "WHATSAPP_", "DATABASE_URL")):
            monkeypatch.delenv(name)
    data = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", store=ops_store.section())
    del data["whatsapp"]["app_secret"]
    data["store"]["busy_timeout_ms"] = 20
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    ops_store.migrate()
    return path


def store_of(config: Path) -> StoreConfig:
    """The ``[store]`` of the config file at `config`."""
    section = tomllib.loads(config.read_text())["store"]
    return StoreConfig(path=Path(section["path"]), url=section.get("url", ""))


def ops_main(config: Path, *args: str) -> int:
    return main([*args, "-c", str(config), "--env-file", str(config.parent / "none.env")])


def seed(config: Path) -> dict[str, int]:
    conn = open_ops(store_of(config))
    try:
        return {
            "old": add_dead_letter(conn, "wamid.OLD", state="delivered", created_at=OPS_NOW - 30 * 86400),
            "ab": add_dead_letter(conn, "wamid.AB", created_at=OPS_NOW - 100),
            "jobs": add_dead_letter(conn, "wamid.JOBS", service="jobs", created_at=OPS_NOW - 50),
            "p": add_dead_letter(conn, "wamid.P", state="pending", created_at=OPS_NOW - 10, next_attempt_at=OPS_NOW),
        }
    finally:
        conn.close()


def dead_letters(config: Path) -> dict[str, tuple[str, int]]:
    return {
        key: (state, attempts)
        for key, state, attempts in store_rows(store_of(config), "SELECT key, state, attempts FROM dead_letters")
    }


@BOTH_STORES
def test_dlq_list_as_json_and_as_a_table(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = seed(ops_config)
    assert ops_main(ops_config, "dlq", "list", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["message_id"] for e in entries] == ["wamid.OLD", "wamid.AB", "wamid.JOBS", "wamid.P"]
    assert entries[1]["id"] == ids["ab"]
    assert entries[1]["created_at"] == "2023-11-14T22:11:40Z"
    assert entries[1]["next_attempt_at"] is None
    assert {
        "id",
        "message_id",
        "service",
        "state",
        "reason",
        "error",
        "attempts",
        "next_attempt_at",
        "created_at",
        "status_code",
        "updated_at",
    } <= set(entries[0])
    assert ops_main(ops_config, "dlq", "list", "--json", "--state", "abandoned", "--service", "jobs") == 0
    assert [e["message_id"] for e in json.loads(capsys.readouterr().out)] == ["wamid.JOBS"]
    assert ops_main(ops_config, "dlq", "list") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "ID",
        "MESSAGE_ID",
        "SERVICE",
        "STATE",
        "REASON",
        "ATTEMPTS",
        "RETRIES",
        "NEXT_ATTEMPT_AT",
        "CREATED_AT",
        "ERROR",
    ]
    assert rows[3].split()[:4] == [str(ids["p"]), "wamid.P", "rides", "pending"]
    assert ops_main(ops_config, "dlq", "list", "--state", "pending", "--service", "wallet") == 0
    assert capsys.readouterr().out == "no dead letters\n"


@BOTH_STORES
def test_dlq_replay_by_id_all_and_unknown(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = seed(ops_config)
    assert ops_main(ops_config, "dlq", "replay", str(ids["ab"]), "wamid.P") == 0
    assert capsys.readouterr().out == "replayed 2 dead letter(s): due now\n"
    assert dead_letters(ops_config)["wamid.AB"] == ("pending", 0)
    assert dead_letters(ops_config)["wamid.P"] == ("pending", 0)
    assert ops_main(ops_config, "dlq", "replay", "wamid.OLD", "4242", "wamid.NOPE") == 1
    out, err = capsys.readouterr()
    assert out == "replayed 0 dead letter(s): due now\n"
    assert "unknown dead letter: 4242" in err
    assert "unknown dead letter: wamid.NOPE" in err
    assert "already delivered, not replayed: wamid.OLD" in err
    assert dead_letters(ops_config)["wamid.OLD"] == ("delivered", 3)
    assert ops_main(ops_config, "dlq", "replay", "--all") == 0
    assert capsys.readouterr().out == "replayed 1 dead letter(s): due now\n"
    assert dead_letters(ops_config)["wamid.JOBS"] == ("pending", 0)
    assert ops_main(ops_config, "dlq", "replay", "--all", "--state", "pending", "--service", "jobs") == 0
    assert capsys.readouterr().out == "replayed 1 dead letter(s): due now\n"


@BOTH_STORES
def test_dlq_purge(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(ops_config)
    conn = open_ops(store_of(ops_config))
    try:
        add_dead_letter(conn, "wamid.RECENT", state="delivered", created_at=time.time() - 3600)
    finally:
        conn.close()
    assert ops_main(ops_config, "dlq", "purge", "--state", "delivered", "--older-than", "7d") == 0
    assert capsys.readouterr().out == "purged 1 delivered dead letter(s)\n"
    assert "wamid.OLD" not in dead_letters(ops_config)
    assert ops_main(ops_config, "dlq", "purge", "--state", "abandoned", "--older-than", "90s") == 0
    assert capsys.readouterr().out == "purged 2 abandoned dead letter(s)\n"
    assert set(dead_letters(ops_config)) == {"wamid.P", "wamid.RECENT"}


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "purge", "--state", "pending", "--older-than", "7d"],
        ["dlq", "purge", "--state", "delivered", "--older-than", "7w"],
        ["dlq", "purge", "--state", "delivered"],
        ["dlq", "replay"],
        ["dlq", "replay", "1", "--all"],
        ["dlq", "replay", "1", "--service", "rides"],
        ["dlq", "list", "--state", "queued"],
    ],
)
def test_operator_commands_reject_bad_arguments(
    ops_config: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ops_main(ops_config, *args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@BOTH_STORES
def test_status(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = seed(ops_config)
    store = store_of(ops_config)
    store_execute(store, "INSERT INTO runs VALUES ('dlq_retrier', ?, ?, 'delivered=1')", OPS_NOW, OPS_NOW + 300)
    store_execute(store, "INSERT INTO sessions (sender, service, last_interaction) VALUES ('a', 'rides', 0)")
    assert ops_main(ops_config, "status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dead_letters"]["pending"] == 1
    assert report["dead_letters"]["oldest_pending"]["id"] == ids["p"]
    assert report["sessions"] == {"active": 0, "stale": 1}
    assert report["runs"]["dlq_retrier"]["result"] == "delivered=1"
    assert report["runs"]["reaper"] == {"last_run": None, "next_run": None, "result": None}
    assert ops_main(ops_config, "status") == 0
    out = capsys.readouterr().out
    assert "dead letters  pending 1, abandoned 2, delivered 1" in out
    assert f"oldest pending: id {ids['p']} (wamid.P, rides)" in out
    assert "sessions      active 0, stale 1" in out
    assert "dlq_retrier: last 2023-11-14T22:13:20Z (delivered=1), next 2023-11-14T22:18:20Z" in out
    assert "reaper: last never, next never" in out


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["dlq", "list"],
        ["dlq", "replay", "--all"],
        ["sessions", "reap"],
        ["dlq", "purge", "--state", "delivered", "--older-than", "1d"],
    ],
)
def test_operator_commands_never_create_a_missing_database(
    ops_config: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    db = ops_config.parent / "wacored.db"
    db.unlink()
    assert ops_main(ops_config, *args) == 1
    assert f"wacored: no database at {db}" in capsys.readouterr().err
    assert not db.exists()


def test_operator_commands_refuse_a_newer_schema(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(ops_config.parent / "wacored.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    assert ops_main(ops_config, "dlq", "replay", "--all") == 1
    assert "newer than this wacored" in capsys.readouterr().err


def test_operator_commands_work_while_another_connection_reads(
    ops_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(ops_config)
    reader = sqlite3.connect(ops_config.parent / "wacored.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        assert ops_main(ops_config, "dlq", "replay", "wamid.AB") == 0
        assert ops_main(ops_config, "dlq", "purge", "--state", "delivered", "--older-than", "1d") == 0
        assert ops_main(ops_config, "status", "--json") == 0
        assert ops_main(ops_config, "dlq", "list", "--json") == 0
    finally:
        reader.close()
    assert "purged 1 delivered" in capsys.readouterr().out


def test_a_write_lock_held_too_long_is_one_line_and_exit_1(
    ops_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(ops_config)
    writer = sqlite3.connect(ops_config.parent / "wacored.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        assert ops_main(ops_config, "dlq", "replay", "--all") == 1  # the busy timeout is 20 ms here
        assert capsys.readouterr().err == "wacored: database is locked\n"
        assert ops_main(ops_config, "dlq", "list", "--json") == 0  # reads go on meanwhile
    finally:
        writer.close()


def test_simulate_still_needs_the_app_secret(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ops_main(ops_config, "simulate", "rides") == 1
    assert "whatsapp.app_secret: required" in capsys.readouterr().err


@BOTH_STORES
def test_sessions_reap_runs_the_reaper_once_and_status_shows_it(
    ops_config: Path, ops_store: StoreUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(ops_config)  # long ago: the delivered entry and the two abandoned ones are past retention
    now = time.time()
    for sender, at in [("idle", now - 25 * 3600), ("live", now - 60)]:
        ops_store.execute("INSERT INTO sessions (sender, service, last_interaction) VALUES (?, 'rides', ?)", sender, at)
    if ops_store.url:
        assert ops_main(ops_config, "sessions", "reap", "--json") == 0
    else:  # while another connection reads (WAL): the reap does not wait for it
        reader = sqlite3.connect(ops_config.parent / "wacored.db", isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM sessions").fetchone()
            assert ops_main(ops_config, "sessions", "reap", "--json") == 0
        finally:
            reader.close()
    counts = json.loads(capsys.readouterr().out)
    assert counts["sessions"] == 1
    assert counts["dead_letters_delivered"] == 1
    assert counts["dead_letters_abandoned"] == 2
    assert counts["messages"] == 3  # the dead letters' messages, once their dead letters are gone
    assert set(dead_letters(ops_config)) == {"wamid.P"}
    assert ops_main(ops_config, "sessions", "reap") == 0
    assert capsys.readouterr().out == (
        "reaped: sessions 0, rate_hits 0, dead_letters_delivered 0, dead_letters_abandoned 0, attempts 0, messages 0\n"
    )
    assert ops_main(ops_config, "status", "--json") == 0
    reaper = json.loads(capsys.readouterr().out)["runs"]["reaper"]
    assert reaper["last_run"] is not None
    assert reaper["next_run"] is not None
    assert (
        reaper["result"]
        == "sessions 0, rate_hits 0, dead_letters_delivered 0, dead_letters_abandoned 0, attempts 0, messages 0"
    )


def test_secrets_new_prints_a_fresh_standard_webhooks_secret() -> None:
    from wacored.core.signing import secret_problem

    first, second = (wacored("secrets", "new", env=clean_env()) for _ in range(2))
    assert first.returncode == second.returncode == 0
    assert first.stdout.startswith("whsec_")
    assert secret_problem(first.stdout.strip()) is None
    assert first.stdout != second.stdout


def test_dlq_list_shows_the_whole_error(ops_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed(ops_config)
    long_error = "HTTP 503: " + "the service says why at length, " * 6 + "and the cause is at the end"
    db = sqlite3.connect(ops_config.parent / "wacored.db")
    with db:
        db.execute("UPDATE dead_letters SET error = ?", (long_error,))
    db.close()
    assert ops_main(ops_config, "dlq", "list") == 0
    assert all(line.endswith("and the cause is at the end") for line in capsys.readouterr().out.splitlines()[1:])


# --- options and paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["before", "after", "split"])
def test_config_and_env_file_go_before_or_after_the_subcommand(tmp_path: Path, order: str) -> None:
    data = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    del data["whatsapp"]["app_secret"]
    config = tmp_path / "my.toml"
    config.write_text(toml_text(data))
    env = tmp_path / "my.env"
    env.write_text("WACORED_APP_SECRET=from-the-env-file\n")
    c, e = ["-c", str(config)], ["--env-file", str(env)]
    argv = {"before": [*c, *e, "check-config"], "after": ["check-config", *c, *e], "split": [*c, "check-config", *e]}[
        order
    ]
    result = wacored(*argv, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{config}: ok" in result.stdout
    assert "app_secret" not in result.stdout  # the env file was read: no warning that it is missing


def test_version(tmp_path: Path) -> None:
    from wacored.version import VERSION

    result = wacored("--version", env=clean_env(), cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, f"wacored {VERSION}")


def test_without_c_the_config_is_looked_for_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wacored import cli

    system = tmp_path / "etc" / "wacored.toml"
    monkeypatch.setattr(cli, "SYSTEM_CONFIG", system)
    here = tmp_path / "here"
    here.mkdir()
    assert cli.find_config({}, here) == (here / "wacored.toml", "default")
    system.parent.mkdir()
    system.write_text("")
    assert cli.find_config({}, here) == (system, "found")
    (here / "wacored.toml").write_text("")
    assert cli.find_config({}, here) == (here / "wacored.toml", "found")
    assert cli.find_config({"WACORED_CONFIG": "/x.toml"}, here) == (Path("/x.toml"), "$WACORED_CONFIG")
    data = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    (here / "wacored.toml").write_text(toml_text(data))
    result = wacored("check-config", env=clean_env(), cwd=here)
    assert result.returncode == 0, result.stderr
    assert f"wacored: using {here / 'wacored.toml'} (no -c given)" in result.stderr


def test_run_logs_config_warnings_as_json_and_journald_priorities(tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM set) every line carries its <N> priority, so `journalctl -p warning`
    works; config warnings are log lines like any other, not plain text."""
    data = config_mapping(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    data["home_menu"]["header"] = "H" * 80  # will be cut: a warning
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        data["server"]["listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        (tmp_path / "wacored.toml").write_text(toml_text(data))
        result = wacored(
            "run", "-c", str(tmp_path / "wacored.toml"), env=clean_env(JOURNAL_STREAM="8:12345"), cwd=tmp_path
        )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("<")]
    warning = next(json.loads(line[3:]) for line in lines if '"config_warning"' in line)
    assert lines[0].startswith("<4>{")
    assert "home_menu.header" in warning["warning"]
    assert any(line.startswith("<3>{") and '"run_failed"' in line for line in lines)
    assert not any(line.startswith("warning:") for line in result.stderr.splitlines())

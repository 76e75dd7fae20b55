"""deploy/: the files an operator installs, each checked by the real tool that reads it.

promtool (alert rules and their unit tests), systemd-analyze (the unit), nginx (the TLS site, run in
front of a real daemon), shellcheck, and the two scripts: install.sh as a dry install under
``--prefix``, verify.sh against real daemon processes on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import ssl
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

from wacored.core.whatsapp import sign, text_webhook
from wacored.version import VERSION

from .conftest import SECRET, VERIFY_TOKEN, Downstream, Received, rows
from .postgres import own_schema
from .support import (
    POLL_S,
    clean_env,
    daemon_process,
    free_port,
    parse,
    stop_process,
    toml_text,
    value,
    wait_until_answering,
)

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "wacored.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "wacored.rules.test.yml"
UNIT = DEPLOY / "systemd" / "wacored.service"
SITE = DEPLOY / "nginx" / "wacored.conf"
CLUSTER_SITE = DEPLOY / "nginx" / "wacored-cluster.conf"
CLUSTER = DEPLOY / "cluster"
README = ROOT / "README.md"
RUNBOOKS = ROOT / "docs" / "runbooks.md"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (`make tools` installs it)")
    return path


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


# --- Prometheus rules ------------------------------------------------------------------------------


def alerts() -> dict[str, str]:
    """Each alert's name and its block of the rules file."""
    blocks = re.split(r"^      - alert: ", RULES.read_text(), flags=re.M)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def test_promtool_accepts_the_scrape_config_and_the_rules() -> None:
    result = run(need("promtool"), "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_alert_unit_tests_pass() -> None:
    result = run(need("promtool"), "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in re.split(r"^      - alertname: ", RULE_TESTS.read_text(), flags=re.M)[1:]:
        name = case.split("\n", 1)[0].strip()
        table = firing if "exp_alerts:" in case else quiet
        table[name] = table.get(name, 0) + 1
    names = set(alerts())
    assert len(names) >= 12
    assert names - set(firing) == set(), "alerts never tested firing"
    assert names - set(quiet) == set(), "alerts never tested quiet"
    assert set(firing) | set(quiet) <= names, "tests of alerts that do not exist"


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    runbooks = RUNBOOKS.read_text()
    for name, block in alerts().items():
        assert re.search(r"severity: (critical|warning)\n", block), name
        assert "summary: " in block, name
        assert "description: " in block, name
        assert f'runbook_url: "RUNBOOKS_URL#{name.lower()}"' in block, name
        assert f"\n## {name}\n" in runbooks, f"docs/runbooks.md has no entry for {name}"


# --- systemd ---------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_has_the_promised_settings() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/opt/wacored/venv/bin/wacored run -c /etc/wacored/wacored.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["StateDirectory"] == ["wacored"]
    # [server] processes > 1: SIGTERM reaches the supervisor alone (it forwards it once to each worker),
    # only it talks to systemd, and the workers' private sockets live in /run/wacored (0700).
    assert s["KillMode"] == ["mixed"]
    assert s["NotifyAccess"] == ["main"]
    assert s["RuntimeDirectory"] == ["wacored"]
    assert s["RuntimeDirectoryMode"] == ["0700"]
    assert s["EnvironmentFile"] == ["/etc/wacored/wacored.env"]
    assert s["User"] == ["wacored"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert "@system-service" in s["SystemCallFilter"]
    # The drain (deliveries in flight, then hypercorn's keep-alive grace) must end before systemd kills.
    config = tomllib.loads((ROOT / "wacored.toml").read_text())
    assert int(s["TimeoutStopSec"][0]) > config["server"]["drain_timeout_s"] + 10


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    # verify also checks that ExecStart's binary exists: point it at this checkout's wacored.
    wacored = Path(sys.executable).parent / "wacored"
    unit = tmp_path / "wacored.service"
    unit.write_text(UNIT.read_text().replace("/opt/wacored/venv/bin/wacored", str(wacored)))
    result = run(tool, "verify", unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    if not Path("/opt/wacored/venv/bin/wacored").exists():
        # The shipped file as it is: the missing binary is the one and only complaint.
        result = run(tool, "verify", UNIT)
        complaints = {line for line in result.stderr.splitlines() if line}
        assert complaints == {
            "wacored.service: Command /opt/wacored/venv/bin/wacored is not executable: No such file or directory"
        }


def test_the_unit_is_well_hardened(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    unit = tmp_path / "wacored.service"
    shutil.copy(UNIT, unit)
    # --threshold is on systemd's internal 0-100 scale: 20 is the "2.0" it prints.
    result = subprocess.run(
        [tool, "security", "--offline=true", "--threshold=20", unit.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Overall exposure level for wacored.service: [01]\.\d OK", result.stdout)


# --- shell scripts ---------------------------------------------------------------------------------


def test_the_scripts_are_shellcheck_clean() -> None:
    result = run(need("shellcheck"), DEPLOY / "install.sh", DEPLOY / "verify.sh")
    assert result.returncode == 0, result.stdout


# --- install.sh --prefix ---------------------------------------------------------------------------


@dataclass
class Install:
    root: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """One dry install, then a second run over it after the operator edited the config and secrets."""
    root = tmp_path_factory.mktemp("install")
    first = run("bash", DEPLOY / "install.sh", "--prefix", root, "--python", sys.executable, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    with (root / "etc/wacored/wacored.toml").open("a") as f:
        f.write("# edited by the operator\n")
    env = root / "etc/wacored/wacored.env"
    env.write_text(env.read_text().replace("WACORED_APP_SECRET=\n", "WACORED_APP_SECRET=s3cret\n"))
    second = run(
        "bash",
        DEPLOY / "install.sh",
        "--prefix",
        root,
        "--python",
        sys.executable,
        "--runbooks-url",
        RUNBOOKS_URL,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    return Install(root, first, second)


RUNBOOKS_URL = "https://git.example.com/wacored/blob/main/docs/runbooks.md"


def test_the_installed_rules_link_absolute_runbooks(install: Install, tmp_path: Path) -> None:
    """Each alert's runbook_url is absolute: the installed docs by default, or where --runbooks-url says."""
    assert "runbook_url: file:///opt/wacored/docs/runbooks.md#<alert>" in install.first.stdout
    assert (install.root / "opt/wacored/docs/runbooks.md").read_text() == RUNBOOKS.read_text()
    rules = install.root / "etc/wacored/prometheus/wacored.rules.yml"
    urls = re.findall(r'runbook_url: "([^"]+)"', rules.read_text())
    assert len(urls) == len(alerts())
    anchors = {m.lower() for m in re.findall(r"^## (\w+)$", RUNBOOKS.read_text(), re.M)}
    for url in urls:
        base, _, anchor = url.partition("#")
        assert base == RUNBOOKS_URL, url
        assert anchor in anchors, url
    result = run(need("promtool"), "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dry_install_writes_everything_under_the_prefix(install: Install) -> None:
    root = install.root
    assert (root / "etc/systemd/system/wacored.service").read_text() == UNIT.read_text()
    config = tomllib.loads((root / "etc/wacored/wacored.toml").read_text())
    assert config["store"]["path"] == "/var/lib/wacored/wacored.db"
    assert config["services"] == tomllib.loads((ROOT / "wacored.toml").read_text())["services"]
    assert os.access(root / "opt/wacored/venv/bin/wacored", os.X_OK)
    assert sorted(p.name for p in root.iterdir()) == ["etc", "opt", "usr"]


def test_install_puts_wacored_on_the_path(install: Install) -> None:
    link = install.root / "usr/local/bin/wacored"
    target = install.root / "opt/wacored/venv/bin/wacored"
    assert link.is_symlink()
    assert os.readlink(link) == str(target)
    assert f"linked {link} -> {target}" in install.first.stdout
    assert f"exists: {link} -> {target}" in install.second.stdout  # a re-run leaves it as it is
    result = run(link, "--version", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["wacored", VERSION]


def test_install_never_replaces_a_wacored_command_that_is_not_its_link(tmp_path: Path) -> None:
    """Someone else's file (a pip install, a wrapper script) at the link's place is kept, and said so."""
    theirs = tmp_path / "usr/local/bin/wacored"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("#!/bin/sh\necho theirs\n")
    result = run("bash", DEPLOY / "install.sh", "--prefix", tmp_path, "--python", sys.executable, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not theirs.is_symlink()
    assert theirs.read_text() == "#!/bin/sh\necho theirs\n"
    assert f"{theirs} exists and is not a link: kept" in result.stderr


def test_the_secrets_file_is_private_and_holds_empty_placeholders(install: Install) -> None:
    env = install.root / "etc/wacored/wacored.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assignments = [line for line in env.read_text().splitlines() if line and not line.startswith("#")]
    # systemd takes everything after "=" as the value: a comment on the line would become the secret.
    assert assignments == [
        "WACORED_APP_SECRET=s3cret",
        "WACORED_VERIFY_TOKEN=",
        "WACORED_ACCESS_TOKEN=",
        "WACORED_PHONE_NUMBER_ID=",
    ]


def test_a_dry_install_only_says_what_it_would_do_to_the_system(install: Install) -> None:
    out = install.first.stdout
    assert "would run: useradd --system --user-group --home-dir /var/lib/wacored" in out
    for command in (
        "systemctl daemon-reload",
        "systemctl enable wacored.service",
        "systemctl try-restart wacored.service",
    ):
        assert f"would run: {command}" in out
    assert "ok (7 services" in out  # the installed wacored checked the installed config


def test_installing_again_keeps_the_operators_config_and_secrets(install: Install) -> None:
    assert install.second.stdout.count("exists: kept as it is") == 2
    assert (install.root / "etc/wacored/wacored.toml").read_text().endswith("# edited by the operator\n")
    assert "WACORED_APP_SECRET=s3cret\n" in (install.root / "etc/wacored/wacored.env").read_text()


def test_the_installed_unit_verifies_against_the_installed_wacored(install: Install, tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    unit = tmp_path / "wacored.service"
    installed = (install.root / "etc/systemd/system/wacored.service").read_text()
    unit.write_text(installed.replace("/opt/wacored/", f"{install.root}/opt/wacored/"))
    result = run(tool, "verify", unit)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- real daemon processes -------------------------------------------------------------------------

MDWE = """
import ctypes, os, sys
# PR_SET_MDWE (65), PR_MDWE_REFUSE_EXEC_GAIN (1): what MemoryDenyWriteExecute=yes asks of the kernel.
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


async def verify(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = await trio.run_process(
        ["bash", str(DEPLOY / "verify.sh"), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env or clean_env(),
    )
    return result.returncode, result.stdout.decode().splitlines()


def verdicts(lines: list[str]) -> dict[str, str]:
    """`{"health": "PASS", ...}` from verify.sh's output."""
    return {m[2]: m[1] for line in lines if (m := re.match(r"^(PASS|WARN|FAIL)  (\w+) ", line))}


def line_of(lines: list[str], check: str) -> str:
    [line] = [line for line in lines if re.match(rf"^(PASS|WARN|FAIL)  {check} ", line)]
    return line


async def wait_for_health_of(url: str, ready: Callable[[httpx.Response], bool]) -> httpx.Response:
    """Poll a daemon process's /health until `ready(answer)` (the caller bounds the wait)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        while not ready(answer := await http.get(f"{url}/health")):  # noqa: ASYNC110 -- another process's state
            await trio.sleep(POLL_S)
    return answer


async def test_a_daemon_on_sqlite_never_loads_psycopg(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    """psycopg (the PostgreSQL store) costs a process 0.2 s of start-up and ~10 MB: a daemon on its
    embedded SQLite default, serving a message, never loads it."""
    config = str(tmp_path / "wacored.toml")
    async with daemon_process(tmp_path, services, graph) as url:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            body = text_webhook(text="rides", sender="250788000123", wamid="wamid.NOPG", timestamp=1700000000)
            sent = await client.post(
                f"{url}/webhook", content=body, headers={"X-Hub-Signature-256": sign(SECRET, body)}
            )
            assert sent.status_code == 200
        await services.wait_for(1)
        maps = _maps_of(config)
    assert "psycopg" not in maps


def _maps_of(config: str) -> str:
    """/proc/PID/maps of the one process whose command line names `config`."""
    pids = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and config in _cmdline(d)]
    assert len(pids) == 1, pids
    return Path(f"/proc/{pids[0]}/maps").read_text()


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def test_verify_passes_every_check_but_metrics_against_a_running_daemon(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    env_file = tmp_path / "wacored.env"
    env_file.write_text(f"WACORED_APP_SECRET={SECRET}\nexport WACORED_VERIFY_TOKEN='{VERIFY_TOKEN}'\n")
    async with daemon_process(tmp_path, services, graph) as url:
        code, lines = await verify("--env-file", str(env_file), "--from", "250788000777", url)
    got = verdicts(lines)
    assert set(got) == {"health", "database", "actors", "metrics", "handshake", "message"}, lines
    assert {name: v for name, v in got.items() if name != "metrics"} == dict.fromkeys(
        ["health", "database", "actors", "handshake", "message"], "PASS"
    ), lines
    assert re.match(
        r"PASS  message +routed to wacored \(home_menu\), message wamid\.WACORED_PROBE\.verify-\w+"
        r" \(a probe: not forwarded\)$",
        line_of(lines, "message"),
    ), lines
    assert code == (0 if got["metrics"] == "PASS" else 1)
    # The test message is a probe: stored with its route in its final state, sent nowhere (the daemon
    # has stopped, so nothing can still be on its way), no dead letter to alert on.
    db = tmp_path / "wacored.db"
    assert rows(db, "SELECT service, reason, state, attempts FROM messages") == [("wacored", "home_menu", "probe", 0)]
    assert rows(db, "SELECT COUNT(*) FROM dead_letters") == [(0,)]
    assert (services.received, graph.received) == ([], [])


async def test_verify_passes_completely_against_a_running_daemon(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Needs /metrics serving the catalogue (the metrics work of issue 4)."""
    async with daemon_process(tmp_path, services, graph) as url:
        code, lines = await verify(url, env=clean_env(WACORED_APP_SECRET=SECRET, WACORED_VERIFY_TOKEN=VERIFY_TOKEN))
    assert (code, lines[-1]) == (0, "6 passed, 0 warned, 0 failed"), lines


async def test_verify_fails_on_a_wrong_url() -> None:
    code, lines = await verify(
        f"http://127.0.0.1:{free_port()}", env=clean_env(WACORED_APP_SECRET=SECRET, WACORED_VERIFY_TOKEN=VERIFY_TOKEN)
    )
    assert code == 1
    assert set(verdicts(lines).values()) == {"FAIL"}
    assert lines[-1] == "0 passed, 0 warned, 6 failed"
    assert "no answer from http://127.0.0.1:" in lines[0]


async def test_verify_fails_on_wrong_secrets(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    async with daemon_process(tmp_path, services, graph) as url:
        code, lines = await verify(url, env=clean_env(WACORED_APP_SECRET="wrong", WACORED_VERIFY_TOKEN="wrong"))
        no_secrets, bare = await verify(url)
    got = verdicts(lines)
    assert code == 1
    assert (got["handshake"], got["message"]) == ("FAIL", "FAIL")
    assert "HTTP 401" in next(line for line in lines if line.startswith("FAIL  message"))
    assert no_secrets == 1
    assert "WACORED_APP_SECRET is not set" in "\n".join(bare)
    assert services.received == []
    assert graph.received == []


async def test_verify_warns_and_passes_when_a_services_breaker_is_open(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """A downstream down is not wacored broken: /health says degraded, verify.sh names the breaker."""

    async def down(_: Received) -> int:
        return 503

    services.respond = down

    def one_failure_opens_rides_breaker(data: dict[str, Any]) -> None:
        data["services"]["rides"].update(breaker_failures=1, retries=0, breaker_open_s=600)

    async with daemon_process(tmp_path, services, graph, edit=one_failure_opens_rides_breaker) as url:
        body = text_webhook(text="rides", sender="250788000780", wamid="wamid.BREAKER1", timestamp=1700000000)
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.post(f"{url}/webhook", content=body, headers={"X-Hub-Signature-256": sign(SECRET, body)})
        assert r.status_code == 200, r.text
        with trio.fail_after(15):
            health = await wait_for_health_of(url, lambda a: a.json()["services"]["rides"]["breaker"] == "open")
        assert (health.status_code, health.json()["status"]) == (200, "degraded")
        code, lines = await verify(url, env=clean_env(WACORED_APP_SECRET=SECRET, WACORED_VERIFY_TOKEN=VERIFY_TOKEN))
    assert code == 0, lines
    assert verdicts(lines) == {
        **dict.fromkeys(["database", "actors", "metrics", "handshake", "message"], "PASS"),
        "health": "WARN",
    }, lines
    assert "status degraded" in line_of(lines, "health")
    assert "breaker of rides open" in line_of(lines, "health")
    assert lines[-1] == "5 passed, 1 warned, 0 failed"


async def test_verify_fails_when_the_daemon_is_unhealthy(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """Commits refused past `unhealthy_after_s` (here another process holds the store's write lock):
    wacored itself cannot take webhooks, a FAIL naming why."""

    def fails_fast(data: dict[str, Any]) -> None:
        data["store"].update(busy_timeout_ms=100, unhealthy_after_s=0.5)

    async with daemon_process(tmp_path, services, graph, edit=fails_fast) as url:
        lock = sqlite3.connect(tmp_path / "wacored.db", isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            body = text_webhook(text="rides", sender="250788000781", wamid="wamid.LOCKED1", timestamp=1700000000)
            async with httpx.AsyncClient(trust_env=False) as http:
                r = await http.post(f"{url}/webhook", content=body, headers={"X-Hub-Signature-256": sign(SECRET, body)})
            assert r.status_code == 503, r.text
            with trio.fail_after(15):
                await wait_for_health_of(url, lambda a: a.status_code == 503)
            code, lines = await verify(url, env=clean_env(WACORED_APP_SECRET=SECRET, WACORED_VERIFY_TOKEN=VERIFY_TOKEN))
        finally:
            lock.close()
    assert code == 1, lines
    got = verdicts(lines)
    assert (got["health"], got["message"]) == ("FAIL", "FAIL"), lines
    assert "status unhealthy" in line_of(lines, "health")
    assert "store commits failing since" in line_of(lines, "health")


async def test_the_daemon_runs_with_memory_deny_write_execute(
    tmp_path: Path, services: Downstream, graph: Downstream
) -> None:
    """MemoryDenyWriteExecute=yes in the unit: the same kernel rule, applied by prctl, then the daemon's
    whole path (HTTP, SQLite, forwarding) exercised."""
    async with daemon_process(tmp_path, services, graph, wrapper=["-c", MDWE]) as url:
        body = text_webhook(text="rides", sender="250788000778", wamid="wamid.MDWE1", timestamp=1700000000)
        async with httpx.AsyncClient(trust_env=False) as http:
            r = await http.post(f"{url}/webhook", content=body, headers={"X-Hub-Signature-256": sign(SECRET, body)})
        assert r.status_code == 200, r.text
        [got] = await services.wait_for(1, "/rides")
    assert got.message["id"] == "wamid.MDWE1"
    assert "Permission denied" not in (tmp_path / "daemon.log").read_text()


# --- nginx -----------------------------------------------------------------------------------------


def nginx_site(
    tmp_path: Path, *, https_port: int, http_port: int, backends: dict[str, int], site_file: Path = SITE
) -> Path:
    """A shipped site with this test's ports, certificate and log paths: nothing else changed.
    `backends` maps each upstream address in the file (``127.0.0.1:8080``) to this test's port."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    site = site_file.read_text()
    for old, new in [
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("listen [::]:443 ssl http2;", ""),
        *((f"server {address}", f"server 127.0.0.1:{port}") for address, port in backends.items()),
        ("/etc/letsencrypt/live/webhook.example.com/fullchain.pem", str(tmp_path / "cert.pem")),
        ("/etc/letsencrypt/live/webhook.example.com/privkey.pem", str(tmp_path / "key.pem")),
        ("/var/log/nginx/", f"{tmp_path}/"),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    (tmp_path / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"{user}pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/site.conf;\n}}\n"
    )
    return conf


def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    conf = nginx_site(tmp_path, https_port=free_port(), http_port=free_port(), backends={"127.0.0.1:8080": 8080})
    result = run(need("nginx"), "-t", "-p", tmp_path, "-c", conf)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


async def test_nginx_proxies_the_webhook_over_tls(tmp_path: Path, services: Downstream, graph: Downstream) -> None:
    nginx = need("nginx")
    (tmp_path / "nginx").mkdir()
    https_port = free_port()
    async with daemon_process(tmp_path, services, graph) as url:
        conf = nginx_site(
            tmp_path / "nginx",
            https_port=https_port,
            http_port=free_port(),
            backends={"127.0.0.1:8080": int(url.rsplit(":", 1)[1])},
        )
        process = await trio.lowlevel.open_process(
            [nginx, "-p", str(tmp_path / "nginx"), "-c", str(conf), "-g", "daemon off;"]
        )
        try:
            public = f"https://localhost:{https_port}"
            tls = ssl.create_default_context(cafile=tmp_path / "nginx" / "ca.pem")
            await wait_until_answering(public, process, verify=tls)
            async with httpx.AsyncClient(trust_env=False, verify=tls) as http:
                body = text_webhook(text="jobs", sender="250788000779", wamid="wamid.NGINX1", timestamp=1700000000)
                signed = {"X-Hub-Signature-256": sign(SECRET, body), "Content-Type": "application/json"}
                ours = await http.post(f"{public}/webhook", content=body, headers={**signed, "X-Request-ID": "rid-1"})
                theirs = await http.post(f"{public}/webhook", content=body, headers=signed)
                handshake = await http.get(
                    f"{public}/webhook",
                    params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "c-1"},
                )
                health = await http.get(f"{public}/health")
                big = await http.post(f"{public}/webhook", content=b"x" * (3 * 1024 * 1024 + 1), headers=signed)
            [got] = await services.wait_for(1, "/jobs")
        finally:
            await stop_nginx(process)
    assert (ours.status_code, ours.headers["X-Routed-Service"], ours.headers["X-Request-ID"]) == (200, "jobs", "rid-1")
    assert theirs.json()["duplicates"] == 1
    assert re.fullmatch(r"[0-9a-f]{32}", theirs.headers["X-Request-ID"])  # nginx's $request_id
    assert got.message["id"] == "wamid.NGINX1"
    assert (handshake.status_code, handshake.text) == (200, "c-1")
    assert health.status_code == 404  # only /webhook is public
    assert big.status_code == 413


async def stop_nginx(process: trio.Process) -> None:
    await stop_process(process, signal.SIGQUIT, grace_s=10)


CLUSTER_NODES = {"10.0.0.11:8080": 8081, "10.0.0.12:8080": 8082}
"""The two nodes' addresses in the cluster site (deploy/nginx/wacored-cluster.conf), to local ports."""


def test_nginx_accepts_the_cluster_site(tmp_path: Path) -> None:
    conf = nginx_site(
        tmp_path, https_port=free_port(), http_port=free_port(), backends=CLUSTER_NODES, site_file=CLUSTER_SITE
    )
    result = run(need("nginx"), "-t", "-p", tmp_path, "-c", conf)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


async def test_the_cluster_site_spreads_webhooks_over_both_nodes_and_skips_one_that_is_down(
    tmp_path: Path, services: Downstream, graph: Downstream, pg_url: str
) -> None:
    """Two real nodes on one PostgreSQL schema behind the shipped cluster site: POSTs reach both, and
    once one node is stopped every POST is still answered 200 by the other (nginx skips the refused
    connection), and every message is delivered once."""
    nginx = need("nginx")
    for name in ("nginx", "a", "b"):
        (tmp_path / name).mkdir()
    https_port = free_port()
    with own_schema(pg_url) as store_url:

        def shared_store(data: dict[str, Any]) -> None:
            data["store"]["url"] = store_url

        async with AsyncExitStack() as stack:
            node_a = await stack.enter_async_context(daemon_process(tmp_path / "a", services, graph, edit=shared_store))
            b_stack = AsyncExitStack()
            stack.push_async_exit(b_stack)
            node_b = await b_stack.enter_async_context(
                daemon_process(tmp_path / "b", services, graph, edit=shared_store)
            )
            ports = [int(url.rsplit(":", 1)[1]) for url in (node_a, node_b)]
            conf = nginx_site(
                tmp_path / "nginx",
                https_port=https_port,
                http_port=free_port(),
                backends=dict(zip(CLUSTER_NODES, ports, strict=True)),
                site_file=CLUSTER_SITE,
            )
            process = await trio.lowlevel.open_process(
                [nginx, "-p", str(tmp_path / "nginx"), "-c", str(conf), "-g", "daemon off;"]
            )
            stack.push_async_callback(stop_nginx, process)
            public = f"https://localhost:{https_port}"
            tls = ssl.create_default_context(cafile=tmp_path / "nginx" / "ca.pem")
            await wait_until_answering(public, process, verify=tls)
            async with httpx.AsyncClient(trust_env=False, verify=tls) as http:

                async def post(n: int) -> int:
                    body = text_webhook(
                        text="jobs", sender=f"25078800{n:04d}", wamid=f"wamid.CLUSTER{n}", timestamp=1700000000
                    )
                    signed = {"X-Hub-Signature-256": sign(SECRET, body), "Content-Type": "application/json"}
                    return (await http.post(f"{public}/webhook", content=body, headers=signed)).status_code

                async def accepted(node: str) -> float:
                    text = (await http.get(f"{node}/metrics")).text
                    return value(parse(text), "wacored_webhook_requests_total", outcome="accepted")

                both_up = [await post(n) for n in range(10)]
                spread = [await accepted(node_a), await accepted(node_b)]
                await b_stack.aclose()  # node b drains and stops: its port refuses connections
                one_down = [await post(n) for n in range(10, 20)]
                a_after = await accepted(node_a)
            got = await services.wait_for(20, "/jobs")
    assert both_up == [200] * 10
    assert sum(spread) == 10
    assert min(spread) >= 1, spread  # round robin: both nodes took POSTs
    assert one_down == [200] * 10
    assert a_after == spread[0] + 10  # node a took every POST once b was down
    assert sorted(r.message["id"] for r in got) == sorted(f"wamid.CLUSTER{n}" for n in range(20))


def test_the_cluster_node_config_passes_check_config(tmp_path: Path, pg_url: str) -> None:
    """The shipped single-node config with deploy/cluster/wacored.toml merged in, and the env file's
    store URL pointed at a real database: `wacored check-config` accepts it and reaches the database."""
    config = tomllib.loads((ROOT / "wacored.toml").read_text())
    for section, keys in tomllib.loads((CLUSTER / "wacored.toml").read_text()).items():
        config.setdefault(section, {}).update(keys)
    config["store"]["path"] = str(tmp_path / "wacored.db")
    (tmp_path / "wacored.toml").write_text(toml_text(config))
    [line] = [ln for ln in (CLUSTER / "wacored.env").read_text().splitlines() if ln and not ln.startswith("#")]
    assert line.startswith("WACORED_STORE_URL=postgresql://")
    with own_schema(pg_url) as store_url:
        (tmp_path / "wacored.env").write_text(f"WACORED_APP_SECRET=cluster-check\nWACORED_STORE_URL={store_url}\n")
        result = run(
            sys.executable,
            "-m",
            "wacored",
            "check-config",
            "-c",
            tmp_path / "wacored.toml",
            "--env-file",
            tmp_path / "wacored.env",
            env=clean_env(),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "store.url" not in result.stdout, result.stdout  # no warning: the database answers


def test_promtool_accepts_the_cluster_scrape_config() -> None:
    result = run(need("promtool"), "check", "config", CLUSTER / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    """On a fresh clone `make run` installs wacored alone; the test tools come with `make test`."""
    import shutil

    copy = tmp_path / "clone"
    copy.mkdir()
    shutil.copy(ROOT / "Makefile", copy / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    planned = subprocess.run(["make", "-n", "run"], cwd=copy, capture_output=True, text=True, check=True).stdout
    assert "pip install --quiet -e ." in planned
    assert ".[test]" not in planned
    assert "==> make: installing wacored" in planned
    tested = subprocess.run(["make", "-n", "test"], cwd=copy, capture_output=True, text=True, check=True).stdout
    assert '-e ".[test]"' in tested

"""wacored throughput benchmark: a no-op ceiling (S1), then wacored's rows, side by side.

Run with ``make bench`` (installs wrk and nginx if missing) or ``.venv/bin/python bench/bench.py [options]``.
It prints a table of figures and never asserts on timing; bench/README.md explains how to read it.

What runs, all on 127.0.0.1, one scenario at a time:

S1          `bench/noop.py`: a raw ASGI callable that reads the body and answers 200 ``{}``, served by
            ``hypercorn.trio.serve``. The ceiling of the stack wacored is built on. Run again after
            the rows, to show how far this VM's speed moved meanwhile (the ratios are to the first).
messages    ``.venv/bin/wacored run -c <tmp config>`` as a real subprocess, a fresh SQLite store in a
            temp dir, every service URL and the Graph API URL pointing at the downstream (nginx
            answering 200 ``{}``, or `noop.py` with ``--downstream noop``), so forwarding runs while
            the load runs: acked msgs/s (ingest), then, polling the store read-only until no message is
            ``queued``, delivered msgs/s = delivered / (last ``done_at`` - first ``received_at``).
statuses    the same with bodies of one ``delivered`` status update each: ``[routing] statuses = ""``
            (counted and dropped: acked/s) and ``= <the first service>`` (forwarded: end to end/s).
processes-2 the messages row with ``[server] processes = 2``, not pinned; n/a when
            ``wacored check-config`` refuses the key.
pg          the messages row on PostgreSQL (``[store] url``): one node, pinned like the messages row,
            on a database ``wacored_bench_<random>`` the bench creates on ``--pg`` (default the server
            at 127.0.0.1:5432) and drops after the row; never another database. Not in the default rows.
pg-2-nodes  the same with two nodes (two ``wacored run`` processes, one config, one database), not
            pinned, no balancer: wrk's threads are split over the two ports (bench/bodies.lua,
            ``BENCH_TARGETS``). PostgreSQL's own CPU shows in the ``others`` column of these rows.
--held      (optional diagnostic) the messages row with `noop.py` holding every request until the load
            is over: ingest without forwarding competing for the CPU, then the backlog's drain.

Pinning (``--pin``, the default; ``--no-pin`` turns it off): the server under test (S1, wacored) runs
on the first CPU, wrk and the downstream on the others, so S1 and wacored are measured on equal terms.
CPU is read from /proc for whole process trees (wacored's workers, nginx's master and worker).

Load: wrk (``bench/bodies.lua``) posts pre-generated, signed, unique webhooks (one text message each,
a unique wamid), each wrk thread from its own file so no body is ever sent twice. Message mix per
sender, in a cycle of 10: 1 service key (typed in even blocks of senders, an interactive list reply in
odd ones; starts a session), 8 free texts (routed by the session), 1 "menu" (ends the session; the
home menu goes to the Graph API sender).

Errors: a failed start or wrk run raises and ends the bench (exit 1 with the reason); every process
it started is stopped at the end, on error, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = ROOT / ".venv" / "bin" / "python"
WACORED = ROOT / ".venv" / "bin" / "wacored"
LUA = BENCH / "bodies.lua"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BENCH_SIGNING_SECRET = "whsec_" + "YmVuY2gtc2lnbmluZy1rZXktb2YtdGhpcnR5LXR3bzE="

TARGET_INGEST = 0.9
TARGET_E2E = 0.5
TARGET_STATUSES_DROPPED = 0.9
TARGET_STATUSES_FORWARDED = 0.6
TARGET_PROCESSES_2 = 1.6
"""processes = 2 end to end, as a ratio to processes = 1 (the messages row) of the same run."""
TARGET_BIG = 0.9
"""The big row: a store of 5 M messages and 1 M sessions keeps >= 0.9x the empty store's end-to-end rate."""
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
"""Where the pg rows create (and drop) their database: the test server of this project's machines."""
TARGET_RSS_MB = 80.0
CYCLE = 10
"""Messages per sender per session cycle: 1 service key, 8 free texts, 1 "menu"."""
BLOCK = 200
"""Senders per wrk thread going through a cycle together (a sender's next message is BLOCK requests on)."""
HELD_TIMEOUT_MS = 120_000
"""Forwarding timeout in the --held run, so held deliveries neither time out nor retry."""
CLK_TCK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))
from wacored.core.whatsapp import sign, text_webhook  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Bodies


def service_keys() -> list[str]:
    base = tomllib.loads((ROOT / "wacored.toml").read_text())
    return [svc["keys"][0] for svc in base["services"].values()]


def schedule(senders: list[int], count: int) -> Iterator[tuple[int, int, int]]:
    """(sender, block number, position in the cycle) of `count` messages: blocks of BLOCK senders each
    go through one whole cycle round-robin, then the next block; after the last block, the next cycle.
    Any prefix of the stream has the documented mix, and a sender's next message comes BLOCK requests
    after its previous one (far more than a wrk thread has in flight), so it is routed after that one
    was committed."""
    n, block = 0, 0
    while True:
        for b in range(0, len(senders), BLOCK):
            for pos in range(CYCLE):
                for s in senders[b : b + BLOCK]:
                    if n == count:
                        return
                    yield s, block, pos
                    n += 1
            block += 1


def generate(prefix: Path, secret: str, threads: int, per_thread: int, senders: int) -> None:
    """`threads` files of `per_thread` signed bodies; file n+1 holds the senders s with s % threads == n."""
    keys = service_keys()
    now = int(time.time())
    for t in range(threads):
        mine = [s for s in range(senders) if s % threads == t]
        with open(f"{prefix}.{t + 1}", "w", encoding="utf-8") as f:
            for i, (s, block, pos) in enumerate(schedule(mine, per_thread)):
                kind, text = "text", f"free text {i} from sender {s}"
                if pos == 0:  # the service key: typed in even blocks, an interactive list reply in odd ones
                    kind, text = ("text" if block % 2 == 0 else "interactive"), keys[s % len(keys)]
                elif pos == CYCLE - 1:
                    text = "menu"
                body = text_webhook(
                    text=text,
                    sender=f"25078{s:07d}",
                    wamid=f"wamid.BENCH.{t}.{i:09d}",
                    timestamp=now,
                    phone_number_id="BENCH_PHONE",
                    kind=kind,
                )
                f.write(f"{sign(secret, body)}\t{body.decode()}\n")


def status_webhook(*, status_id: str, recipient: str, timestamp: int, phone_number_id: str) -> bytes:
    """A webhook carrying one ``delivered`` status update, shaped like Meta's (the fields of
    tests/fixtures/whatsapp/status_delivered.json), with wacored's compact JSON encoding."""
    status = {
        "id": status_id,
        "status": "delivered",
        "timestamp": str(timestamp),
        "recipient_id": recipient,
        "conversation": {"id": "7270432eae37498234f4444b35ffc5", "origin": {"type": "service"}},
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "service"},
    }
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
        "contacts": [{"profile": {"name": "Bench User"}, "wa_id": recipient}],
        "statuses": [status],
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA_ID", "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def generate_statuses(prefix: Path, secret: str, threads: int, per_thread: int, senders: int) -> None:
    """`threads` files of `per_thread` signed bodies, one ``delivered`` status each with a unique id."""
    now = int(time.time())
    for t in range(threads):
        with open(f"{prefix}.{t + 1}", "w", encoding="utf-8") as f:
            for i in range(per_thread):
                body = status_webhook(
                    status_id=f"wamid.BENCHOUT.{t}.{i:09d}",
                    recipient=f"25078{(i * threads + t) % senders:07d}",
                    timestamp=now,
                    phone_number_id="BENCH_PHONE",
                )
                f.write(f"{sign(secret, body)}\t{body.decode()}\n")


def write_config(
    path: Path,
    store: Path,
    downstream: str,
    timeout_ms: int | None = None,
    statuses: str | None = None,
    processes: int | None = None,
    store_url: str = "",
) -> None:
    """The repo's wacored.toml (services, keys, home menu, rate limit, forwarding), pointed at the bench's
    downstream and a fresh store, listening on a free port; `statuses` replaces ``[routing] statuses``,
    `processes` sets ``[server] processes`` and `store_url` ``[store] url`` (PostgreSQL)."""
    base = tomllib.loads((ROOT / "wacored.toml").read_text())
    q = json.dumps
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        *([f"processes = {processes}"] if processes is not None else []),
        "",
        "[whatsapp]",
        'phone_number_id = "BENCH_PHONE"',
        f"graph_api_url = {q(downstream + '/graph')}",
        "",
        "[store]",
        f"path = {q(str(store))}",
        *([f"url = {q(store_url)}"] if store_url else []),
        "",
    ]
    for section in ("ratelimit", "routing", "sessions", "forwarding"):
        values = dict(base.get(section, {}))
        if section == "forwarding" and timeout_ms is not None:
            values["timeout_ms"] = timeout_ms
        if section == "routing" and statuses is not None:
            values["statuses"] = statuses
        lines += [f"[{section}]", *(f"{k} = {q(v)}" for k, v in values.items()), ""]
    menu = base.get("home_menu", {})
    lines += ["[home_menu]", *(f"{k} = {q(v)}" for k, v in menu.items() if k != "items")]
    for item in menu.get("items", []):
        lines += ["", "[[home_menu.items]]", *(f"{k} = {q(v)}" for k, v in item.items())]
    for name, svc in base["services"].items():
        lines += ["", f"[services.{name}]", f"url = {q(f'{downstream}/{name}')}", f"keys = {q(svc['keys'])}"]
        lines += [f"{k} = {q(v)}" for k, v in svc.items() if k not in ("url", "keys")]
        if timeout_ms is not None:
            lines.append(f"timeout_ms = {timeout_ms}")
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Procs:
    """Every subprocess started, so that all of them are stopped at the end, even on error."""

    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        stdout: Any = None,
        cpus: set[int] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`; with `cpus`, pinned to those CPUs before it runs (its threads and children too)."""
        with open(log, "ab") as err:
            p = subprocess.Popen(
                argv,
                stdout=stdout if stdout is not None else err,
                stderr=err,
                env=env,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=pinned(cpus),
            )
        self.running.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.running:
            self.running.remove(p)
        return p.returncode

    def stop_all(self) -> None:
        for p in list(self.running):
            self.stop(p, timeout=5.0)


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child to `cpus` before exec, so every thread and process it starts
    inherits the mask (setting it after the start would miss threads already running)."""
    if cpus is None:
        return None
    mask = set(cpus)
    return lambda: os.sched_setaffinity(0, mask)


def cores_of(pid: int) -> str:
    """The CPUs a live process may run on, read back from the kernel: "0", "1", "0-1"."""
    try:
        cpus = sorted(os.sched_getaffinity(pid))
    except OSError:
        return "?"
    return (
        str(cpus[0])
        if len(cpus) == 1
        else f"{cpus[0]}-{cpus[-1]}"
        if cpus == list(range(cpus[0], cpus[-1] + 1))
        else ",".join(map(str, cpus))
    )


def cores_text(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (wacored's worker processes, nginx's master and worker)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process tree: every live process's own time plus the time of the
    children it has already reaped (cutime, cstime), so a worker that exits is still counted."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def process_cpu_s(pid: int) -> tuple[float, float]:
    """User + system CPU seconds of one process (all its threads) and of its main thread (where
    wacored's event loop runs); 0 once it is gone."""

    def cpu(stat: str) -> float:
        try:
            fields = Path(stat).read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    return cpu(f"/proc/{pid}/stat"), cpu(f"/proc/{pid}/task/{pid}/stat")


def memory_mb(pid: int) -> tuple[float, float]:
    """(peak RSS VmHWM, current RSS VmRSS) of a live process, in MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmHWM", 0.0), values.get("VmRSS", 0.0)


def machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def cpu_by_process() -> dict[int, float]:
    """CPU seconds of every process now running (for naming what else loaded the machine)."""
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def others(before: dict[int, float], after: dict[int, float], mine: set[int], min_s: float = 0.3) -> str:
    """Processes outside the bench that used at least `min_s` CPU seconds between two snapshots (those
    that started and ended in between are not seen: the "others" column of the CPU table counts them)."""
    used = []
    for pid, cpu in after.items():
        spent = cpu - before.get(pid, 0.0)
        if pid in mine or spent < min_s:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        used.append((spent, f"{cmd.strip()[:50]} (pid {pid})"))
    return ", ".join(f"{name} {cpu:.1f}s" for cpu, name in sorted(used, reverse=True)[:3]) or "none seen"


def wait_quiet(max_wait_s: float, busy_limit: float = 0.15) -> float:
    """Wait (at most `max_wait_s`) for a second in which all CPUs together are under `busy_limit` busy;
    return the busy fraction of the last second measured."""
    ncpu = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = machine_busy_s()
        time.sleep(1.0)
        busy = (machine_busy_s() - b0) / ncpu
        if busy < busy_limit or time.monotonic() >= deadline:
            return busy


def wait_for(what: str, check: Callable[[], str], p: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout}s:\n{log.read_text()[-3000:]}")


def start_noop(procs: Procs, tmp: Path, name: str, cpus: set[int] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    url_file, log = tmp / f"{name}.url", tmp / f"{name}.log"
    with open(url_file, "wb") as out:
        p = procs.start([str(PYTHON), str(BENCH / "noop.py")], log, stdout=out, cpus=cpus)
    url = wait_for(name, lambda: url_file.read_text().strip() if url_file.exists() else "", p, log)
    return p, url


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format connection '$connection';
    access_log {dir}/access.log connection;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_body_buffer_size 1m;
    client_max_body_size 4m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 '{{}}'; }}
    }}
}}
"""
"""The near-free downstream. One worker; `keepalive_requests` raised from nginx's 1000 so wacored's
kept-alive lanes are never closed under it (the TCP connection count stays comparable with noop.py's);
the access log holds one line per request, the connection's serial number, to count POSTs and TCP
connections like noop.py's ``GET /count``."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def start_nginx(procs: Procs, run_dir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], str]:
    """nginx in the foreground on a free 127.0.0.1 port, everything it writes under `run_dir`/nginx."""
    prefix = run_dir / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=prefix, port=port))
    log = prefix / "stderr.log"
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    p = procs.start(argv, log, cpus=cpus)

    def answering() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return f"http://127.0.0.1:{port}"
        except OSError:
            return ""

    return p, wait_for("nginx", answering, p, log)


@dataclass
class Downstream:
    """The process every service URL and the Graph API URL point at."""

    kind: str
    proc: subprocess.Popen[bytes]
    url: str
    run_dir: Path

    def count(self) -> dict[str, int]:
        """POSTs answered, and over how many TCP connections."""
        if self.kind == "noop":
            counted: dict[str, int] = json.loads(get(f"{self.url}/count"))
            return counted
        lines = (self.run_dir / "nginx" / "access.log").read_text().split()
        return {"posts": len(lines), "connections": len(set(lines))}


def start_downstream(procs: Procs, run_dir: Path, kind: str, cpus: set[int] | None) -> Downstream:
    if kind == "nginx":
        p, url = start_nginx(procs, run_dir, cpus)
    else:
        p, url = start_noop(procs, run_dir, "downstream", cpus)
    return Downstream(kind, p, url, run_dir)


def wacored_env(secret: str) -> dict[str, str]:
    env = {**os.environ, "WACORED_APP_SECRET": secret, "WACORED_ACCESS_TOKEN": "bench-token"}
    # Every service signs its forwards with a secret of its own, as in production (one HMAC per
    # forward); an older wacored ignores these variables.
    services = tomllib.loads((ROOT / "wacored.toml").read_text())["services"]
    env.update({f"WACORED_SIGNING_SECRETS_{name.upper()}": BENCH_SIGNING_SECRET for name in services})
    return env


def config_refused(config: Path, secret: str, command: str) -> str:
    """Why `wacored check-config` refuses `config` (its last output line), or "" when it accepts it."""
    argv = [*shlex.split(command), "check-config", "-c", str(config)]
    done = subprocess.run(argv, env=wacored_env(secret), cwd=ROOT, capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return ""
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1][:160] if lines else f"exit status {done.returncode}"


def start_wacored(
    procs: Procs, run_dir: Path, config: Path, secret: str, command: str, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    log = run_dir / "wacored.log"
    env = wacored_env(secret)
    argv = [*shlex.split(command), "run", "-c", str(config), "--env-file", str(run_dir / "none.env")]
    started = time.monotonic()
    p = procs.start(argv, log, env=env, cpus=cpus)

    def listening() -> str:
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                return str(event["urls"][0])
        return ""

    url = wait_for("wacored", listening, p, log)
    return p, url, time.monotonic() - started


def health_statuses(url: str) -> int | None:
    """The ``delivered`` status updates /health says this process counted (None if it does not say)."""
    try:
        body = get(f"{url}/health")
    except urllib.error.HTTPError as exc:  # 503 unhealthy still carries the body
        body = exc.read().decode()
    except OSError:
        return None
    counted = json.loads(body).get("checks", {}).get("statuses", {}).get("delivered")
    return int(counted) if counted is not None else None


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        body: bytes = answer.read()
    return body.decode()


# --------------------------------------------------------------------------------------------------
# Load


@dataclass
class Load:
    requests: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    sent: int
    exhausted_threads: int
    started_at: float
    ended_at: float
    wrk_cpu_s: float
    machine_s: float
    """CPU seconds the whole machine was busy during the load (every process, this one's children too)."""
    others: str
    """Processes outside the bench that used CPU during the load."""
    busy_before: float
    """Fraction of all CPUs busy in the second before the load (the bench's servers idle)."""

    @property
    def ok(self) -> int:
        return self.requests - self.errors["status"]

    @property
    def rate(self) -> float:
        return self.ok / self.duration_s

    @property
    def socket_errors(self) -> int:
        e = self.errors
        return e["connect"] + e["read"] + e["write"] + e["timeout"]


def run_wrk(
    url: str,
    prefix: Path,
    args: argparse.Namespace,
    log: Path,
    roots: list[int],
    cpus: set[int] | None,
    at_start: Callable[[], list[int]] | None = None,
    targets: Sequence[str] = (),
) -> Load:
    """wrk against `url` with `prefix`'s bodies, pinned to `cpus`; `roots` are the bench's own processes
    (with their descendants, read after the load: they are not "others"). `at_start` runs once the
    machine is quiet, right before wrk (a sampler must cover the load, not the wait for quiet), and
    returns more pids of the bench's own. `targets` (``host:port``, several nodes) spreads wrk's threads
    over them, thread n to target n mod len (bench/bodies.lua); without them every thread goes to `url`."""
    argv = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(LUA),
        f"{url}/webhook",
    ]
    env = {**os.environ, "BENCH_BODIES": str(prefix), **({"BENCH_TARGETS": ",".join(targets)} if targets else {})}
    idle_busy = wait_quiet(args.quiet_wait)
    if idle_busy >= 0.15:
        print(
            f"  note: the machine is {idle_busy:.0%} busy before this load (other processes): figures are disturbed",
            flush=True,
        )
    if at_start is not None:
        roots = [*roots, *at_start()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs0 = cpu_by_process()
    busy0 = machine_busy_s()
    started = time.time()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=args.duration + 60, preexec_fn=pinned(cpus)
    )
    ended = time.time()
    busy = machine_busy_s() - busy0
    mine = {pid for root in roots for pid in tree(root)}
    other = others(procs0, cpu_by_process(), mine | {os.getpid()})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(done.stdout + done.stderr)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(line.removeprefix("BENCH_JSON "))
    lat = r["latency_us"]
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Load(
        r["requests"],
        r["duration_us"] / 1e6,
        r["errors"],
        lat["p50"] / 1000,
        lat["p99"] / 1000,
        lat["max"] / 1000,
        r["sent"],
        r["exhausted_threads"],
        started,
        ended,
        wrk_cpu,
        busy,
        other,
        idle_busy,
    )


# --------------------------------------------------------------------------------------------------
# The store, read-only


Store = Path | str
"""A SQLite file, or a PostgreSQL URL (the pg rows): the queries below are the same on both."""


def read_store(store: Store, query: Callable[[Any], Any]) -> Any:
    if isinstance(store, str):
        with psycopg.connect(store, autocommit=True) as pg:
            return query(pg)
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5.0)
    try:
        return query(conn)
    finally:
        conn.close()


@contextmanager
def bench_database(server: str) -> Iterator[str]:
    """A new database ``wacored_bench_<random>`` on `server` (a libpq URL of a role that may create
    databases), dropped on exit even when wacored still holds connections: the URL to give wacored.
    Only the database created here is ever dropped."""
    name = f"wacored_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urllib.parse.urlsplit(server)._replace(path=f"/{name}").geturl()  # wacored takes a URL only
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def store_counts(store: Store, after_id: int = 0) -> dict[str, int]:
    """Messages by state, of the rows after `after_id` (those of this run: the big row's store starts full)."""
    sql = f"SELECT state, COUNT(*) FROM messages WHERE id > {int(after_id)} GROUP BY state"  # as `store_facts`
    counts: dict[str, int] = read_store(store, lambda c: dict(c.execute(sql).fetchall()))
    counts["total"] = sum(counts.values())
    return counts


def wait_delivered(store: Store, timeout_s: float, after_id: int = 0) -> tuple[dict[str, int], bool]:
    """Poll until no message is queued and the row count is stable (in-flight requests committed)."""
    deadline = time.monotonic() + timeout_s
    last_total = -1
    while True:
        counts = store_counts(store, after_id)
        if counts.get("queued", 0) == 0 and counts["total"] == last_total:
            return counts, True
        if time.monotonic() > deadline:
            return counts, False
        last_total = counts["total"]
        time.sleep(0.25)


def store_facts(store: Store, after_id: int = 0) -> dict[str, Any]:
    """What the store says of this run's rows (those after `after_id`)."""
    a = f"id > {int(after_id)}"  # an int: safe inline, and the same text on SQLite and PostgreSQL

    def query(c: Any) -> dict[str, Any]:  # a sqlite3 or a psycopg connection
        first, last = c.execute(
            f"SELECT MIN(received_at), MAX(done_at) FROM messages WHERE state = 'delivered' AND {a}"
        ).fetchone()
        lags = [
            row[0]
            for row in c.execute(
                f"SELECT done_at - received_at FROM messages WHERE state = 'delivered' AND {a} ORDER BY 1"
            )
        ]
        return {
            "first_received": first,
            "last_done": last,
            "lag_p50_ms": lags[len(lags) // 2] * 1000 if lags else 0.0,
            "lag_p99_ms": lags[min(len(lags) - 1, len(lags) * 99 // 100)] * 1000 if lags else 0.0,
            "reasons": dict(c.execute(f"SELECT reason, COUNT(*) FROM messages WHERE {a} GROUP BY reason").fetchall()),
            "targets": dict(c.execute(f"SELECT target, COUNT(*) FROM messages WHERE {a} GROUP BY target").fetchall()),
            "attempts": int(c.execute(f"SELECT COALESCE(SUM(attempts), 0) FROM messages WHERE {a}").fetchone()[0]),
            "senders": c.execute(f"SELECT COUNT(DISTINCT sender) FROM messages WHERE {a}").fetchone()[0],
            "sessions": c.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
        }

    facts: dict[str, Any] = read_store(store, query)
    return facts


# --------------------------------------------------------------------------------------------------
# Scenarios


def scenario_s1(procs: Procs, tmp: Path, prefix: Path, args: argparse.Namespace, name: str = "s1") -> dict[str, Any]:
    p, url = start_noop(procs, tmp, name, args.server_cpus)
    try:
        cores = cores_of(p.pid)
        cpu0 = tree_cpu_s(p.pid)
        load = run_wrk(url, prefix, args, tmp / f"wrk-{name}.txt", [p.pid], args.load_cpus)
        cpu = tree_cpu_s(p.pid) - cpu0
        hwm, _ = memory_mb(p.pid)
    finally:
        procs.stop(p)
    return {"load": load, "rss_mb": hwm, "cpu_s": cpu, "cores": cores}


@dataclass(frozen=True)
class Run:
    """One wacored scenario: its name (files, profiles), what it sends and how wacored is configured."""

    name: str
    bodies: Path
    held: bool = False
    statuses: str | None = None
    """``[routing] statuses`` (None: the repo's, which is "")."""
    processes: int | None = None
    """``[server] processes`` (None: not set)."""
    pin: bool = True
    nodes: int = 0
    """0: SQLite; n: n wacored nodes on one fresh PostgreSQL database (the pg rows)."""
    filled: Path | None = None
    """A pre-filled SQLite store (`bench/prefill.py --store PATH --keep`) copied as the run's store (the
    big row); only the rows this run adds are counted."""


def scenario_wacored(procs: Procs, tmp: Path, secret: str, args: argparse.Namespace, run: Run) -> dict[str, Any] | str:
    """Run wacored under load, wait for the drain, and return its figures; or, when `wacored check-config`
    refuses the run's config, why (the row is then printed n/a)."""
    with ExitStack() as stack:
        store_url = stack.enter_context(bench_database(args.pg)) if run.nodes else ""
        return run_wacored(procs, tmp, secret, args, run, store_url)


def run_wacored(
    procs: Procs, tmp: Path, secret: str, args: argparse.Namespace, run: Run, store_url: str
) -> dict[str, Any] | str:
    run_dir = tmp / run.name
    run_dir.mkdir()
    sqlite_file = run_dir / "wacored.db"  # a fresh store for every run
    store: Store = store_url or sqlite_file
    after_id = 0
    if run.filled is not None:
        # SQLite's online backup, not a file copy: it takes what the filled store's WAL holds too.
        with closing(sqlite3.connect(f"file:{run.filled}?mode=ro", uri=True)) as src:
            with closing(sqlite3.connect(sqlite_file)) as dst:
                src.backup(dst)
        after_id = read_store(
            sqlite_file, lambda c: int(c.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])
        )
    server_cpus, load_cpus = (args.server_cpus, args.load_cpus) if run.pin else (None, None)
    kind = "noop" if run.held else args.downstream  # only noop.py can hold requests
    down = start_downstream(procs, run_dir, kind, load_cpus)
    if run.held:
        get(f"{down.url}/_gate/close")
    config = run_dir / "wacored.toml"
    write_config(
        config, sqlite_file, down.url, HELD_TIMEOUT_MS if run.held else None, run.statuses, run.processes, store_url
    )
    if run.processes is not None and (why := config_refused(config, secret, args.wacored)):
        procs.stop(down.proc)
        return why
    p, url, startup_s = start_wacored(procs, run_dir, config, secret, args.wacored, server_cpus)
    nodes = [p]
    urls = [url]
    for n in range(2, run.nodes + 1):  # more nodes on the same database: same config, a port each
        node_dir = run_dir / f"node{n}"
        node_dir.mkdir()
        q, node_url, _ = start_wacored(procs, node_dir, config, secret, args.wacored, server_cpus)
        nodes.append(q)
        urls.append(node_url)

    def all_pids() -> list[int]:
        return [pid for node in nodes for pid in tree(node.pid)]

    def cpu_now() -> float:
        return sum(tree_cpu_s(node.pid) for node in nodes)

    try:
        idle_hwm = sum(memory_mb(pid)[0] for pid in all_pids())
        cores = {"wacored": " ".join(cores_of(node.pid) for node in nodes), "downstream": cores_of(down.proc.pid)}
        cpu0, down0 = cpu_now(), tree_cpu_s(down.proc.pid)
        each0 = {pid: process_cpu_s(pid) for pid in all_pids()}
        spies: list[subprocess.Popen[bytes]] = []

        def sample() -> list[int]:  # sampling costs CPU: the figures of such a run are lower
            spy = procs.start(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(p.pid),
                    *(["--subprocesses"] if run.processes else []),
                    "--duration",
                    str(args.duration),
                    "--rate",
                    "200",
                    # Never stop the process to sample it: a worker stopped while it holds the store's
                    # write lock stalls the other (processes = 2 ran at 0.94x p=1 sampled, 1.5x not).
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(OUT / f"profile-{run.name}.txt"),
                ],
                run_dir / "py-spy.log",
            )
            spies.append(spy)
            return [spy.pid]

        try:
            load = run_wrk(
                url,
                run.bodies,
                args,
                run_dir / "wrk.txt",
                [*(node.pid for node in nodes), down.proc.pid],
                load_cpus,
                sample if args.py_spy else None,
                [u.removeprefix("http://") for u in urls] if len(urls) > 1 else (),
            )
        except RuntimeError as exc:
            # The temp dir goes at the end: say here what wacored logged, or the cause is lost with it.
            tail = (run_dir / "wacored.log").read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"{exc}\nwacored.log, last lines:\n" + "\n".join(tail)) from exc
        pids = all_pids()
        cpu_load, down_load = cpu_now() - cpu0, tree_cpu_s(down.proc.pid) - down0

        def since_start(pid: int) -> tuple[float, float]:
            (total, loop), (total0, loop0) = process_cpu_s(pid), each0.get(pid, (0.0, 0.0))
            return total - total0, loop - loop0

        each_load = sorted(map(since_start, pids), reverse=True)
        load_hwm = sum(memory_mb(pid)[0] for pid in all_pids())
        opened_at = time.time()
        if run.held:
            get(f"{down.url}/_gate/open")
        counts, drained = wait_delivered(store, args.drain_timeout, after_id)
        cpu_all, down_all = cpu_now() - cpu0, tree_cpu_s(down.proc.pid) - down0
        mem = [memory_mb(pid) for pid in all_pids()]
        hwm, rss = sum(m[0] for m in mem), sum(m[1] for m in mem)
        facts = store_facts(store, after_id)
        downstream = down.count()
        statuses_counted = health_statuses(url) if run.processes is None and not run.nodes else None
        for spy in spies:
            spy.wait(30)
    finally:
        code = procs.stop(p)
        for node in nodes[1:]:
            procs.stop(node)
        procs.stop(down.proc)
    lines = (run_dir / "wacored.log").read_text().splitlines()
    problems = [ln for ln in lines if '"level": "warning"' in ln or '"level": "error"' in ln]
    return {
        "run": run,
        "load": load,
        "counts": counts,
        "drained": drained,
        "facts": facts,
        "opened_at": opened_at,
        "rss_mb": hwm,
        "rss_load_mb": load_hwm,
        "rss_idle_mb": idle_hwm,
        "rss_now_mb": rss,
        "cpu_load_s": cpu_load,
        "cpu_each_s": each_load,
        "down_load_s": down_load,
        "cpu_all_s": cpu_all,
        "down_all_s": down_all,
        "downstream": downstream,
        "downstream_kind": kind,
        "processes": len(pids),
        "cores": cores,
        "statuses_counted": statuses_counted,
        "exit_code": code,
        "startup_s": startup_s,
        "log_problems": problems,
    }


# --------------------------------------------------------------------------------------------------
# Report


def code_version() -> str:
    """The commit under test, and whether wacored/ differs from it (read-only git)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status must not take the index lock
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, env=env
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "wacored"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {head or '?'}{' + uncommitted changes in wacored/' if dirty else ''}"


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()

    return [fmt(head), *(fmt(r) for r in rows)]


def us_per(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e6:.0f}" if n else "-"


def report(
    s1: dict[str, Any],
    results: dict[str, dict[str, Any] | str],
    args: argparse.Namespace,
    gen_s: float,
    version: str,
    s1_end: dict[str, Any] | None = None,
) -> str:
    """The tables and the details of one bench run; `results` holds each wacored scenario run, by row
    name (a string: why that row did not run); `s1_end`, S1 run again after them."""
    base: Load = s1["load"]
    ncpu = os.cpu_count() or 1
    ran = {name: r for name, r in results.items() if not isinstance(r, str)}
    ran_out = [name for name, ld in [("S1", base), *((n, r["load"]) for n, r in ran.items())] if ld.exhausted_threads]

    def goal(target: float, ratio: float) -> str:
        return f">= {target} {'n/a' if ran_out else mark(ratio >= target)}"

    def e2e(w: dict[str, Any]) -> tuple[float, float, int]:
        """(delivered msgs/s from the store, seconds from first receipt to last delivery, delivered)."""
        f, delivered = w["facts"], w["counts"].get("delivered", 0)
        seconds = (f["last_done"] - f["first_received"]) if f["first_received"] else 0.0
        return (delivered / seconds if seconds > 0 else 0.0), seconds, delivered

    def rss(w: dict[str, Any]) -> tuple[str, str]:
        return f"{w['rss_mb']:.0f}", f"<= {TARGET_RSS_MB:.0f} {mark(w['rss_mb'] <= TARGET_RSS_MB)}"

    rows: list[tuple[str, ...]] = [
        (
            "S1 no-op",
            f"{base.rate:.0f}",
            "1.00",
            "",
            f"{base.p50_ms:.1f}",
            f"{base.p99_ms:.1f}",
            f"({s1['rss_mb']:.0f})",
            "",
        )
    ]
    cpu_rows: list[tuple[str, ...]] = []

    def load_cpu(name: str, ld: Load, server_s: float, down_s: float) -> tuple[str, ...]:
        mine = server_s + down_s + ld.wrk_cpu_s
        return (
            name,
            f"{ld.ok}",
            us_per(server_s, ld.ok),
            us_per(down_s, ld.ok) if down_s else "-",
            us_per(ld.wrk_cpu_s, ld.ok),
            f"{server_s / ld.duration_s * 100:.0f}%",
            f"{down_s / ld.duration_s * 100:.0f}%" if down_s else "-",
            f"{ld.wrk_cpu_s / ld.duration_s * 100:.0f}%",
            f"{ld.machine_s / ld.duration_s / ncpu * 100:.0f}%",
            f"{max(0.0, ld.machine_s - mine) / ld.duration_s / ncpu * 100:.0f}%",
        )

    def drain_cpu(name: str, w: dict[str, Any], delivered: int) -> tuple[str, ...]:
        return (name, f"{delivered}", us_per(w["cpu_all_s"], delivered), us_per(w["down_all_s"], delivered), *[""] * 6)

    cpu_rows.append(load_cpu("S1 no-op (load)", base, s1["cpu_s"], 0.0))
    if s1_end is not None:
        again: Load = s1_end["load"]
        rows.append(
            ("S1 no-op, again after", f"{again.rate:.0f}", f"{again.rate / base.rate:.2f}", "", f"{again.p50_ms:.1f}",
             f"{again.p99_ms:.1f}", f"({s1_end['rss_mb']:.0f})", "")
        )  # fmt: skip
        cpu_rows.append(load_cpu("S1 no-op, again after (load)", again, s1_end["cpu_s"], 0.0))

    def s1_of(w: dict[str, Any]) -> float:
        """The S1 rate a row is a ratio to: its own, run just before it (``--paired``), else the first."""
        paired = w.get("s1")
        return float(paired["load"].rate) if paired else base.rate

    p1_rate = 0.0
    if "messages" in ran:
        w = ran["messages"]
        load: Load = w["load"]
        p1_rate, _, delivered = e2e(w)
        rows += [
            ("ingest", f"{load.rate:.0f}", f"{load.rate / s1_of(w):.2f}", goal(TARGET_INGEST, load.rate / s1_of(w)),
             f"{load.p50_ms:.1f}", f"{load.p99_ms:.1f}", *rss(w)),
            ("messages end to end", f"{p1_rate:.0f}", f"{p1_rate / s1_of(w):.2f}",
             goal(TARGET_E2E, p1_rate / s1_of(w)), f"[{w['facts']['lag_p50_ms']:.0f}]",
             f"[{w['facts']['lag_p99_ms']:.0f}]", *rss(w)),
        ]  # fmt: skip
        cpu_rows += [
            load_cpu("messages (load)", load, w["cpu_load_s"], w["down_load_s"]),
            drain_cpu("messages end to end (load + drain)", w, delivered),
        ]
    if "statuses-dropped" in ran:
        w = ran["statuses-dropped"]
        load = w["load"]
        ratio = load.rate / s1_of(w)
        rows.append(
            ("statuses dropped", f"{load.rate:.0f}", f"{ratio:.2f}", goal(TARGET_STATUSES_DROPPED, ratio),
             f"{load.p50_ms:.1f}", f"{load.p99_ms:.1f}", *rss(w))
        )  # fmt: skip
        cpu_rows.append(load_cpu("statuses dropped (load)", load, w["cpu_load_s"], w["down_load_s"]))
    if "statuses-forwarded" in ran:
        w = ran["statuses-forwarded"]
        rate, _, delivered = e2e(w)
        rows.append(
            ("statuses forwarded end to end", f"{rate:.0f}", f"{rate / s1_of(w):.2f}",
             goal(TARGET_STATUSES_FORWARDED, rate / s1_of(w)), f"[{w['facts']['lag_p50_ms']:.0f}]",
             f"[{w['facts']['lag_p99_ms']:.0f}]", *rss(w))
        )  # fmt: skip
        cpu_rows += [
            load_cpu("statuses forwarded (load)", w["load"], w["cpu_load_s"], w["down_load_s"]),
            drain_cpu("statuses forwarded end to end (load + drain)", w, delivered),
        ]
    if isinstance(results.get("processes-2"), str):
        rows.append(("processes = 2, end to end", "n/a (processes not supported by this build)", *[""] * 6))
    elif "processes-2" in ran:
        w = ran["processes-2"]
        rate, _, delivered = e2e(w)
        versus = rate / p1_rate if p1_rate else 0.0
        met = "n/a" if ran_out or not p1_rate else mark(versus >= TARGET_PROCESSES_2)
        target = f"{versus:.2f}x p=1, >= {TARGET_PROCESSES_2}x {met}"
        rows.append(
            ("processes = 2, end to end", f"{rate:.0f}", f"{rate / s1_of(w):.2f}", target,
             f"[{w['facts']['lag_p50_ms']:.0f}]", f"[{w['facts']['lag_p99_ms']:.0f}]", f"{w['rss_mb']:.0f}", "")
        )  # fmt: skip
        cpu_rows += [
            load_cpu("processes = 2 (load)", w["load"], w["cpu_load_s"], w["down_load_s"]),
            drain_cpu("processes = 2 end to end (load + drain)", w, delivered),
        ]
    if "big" in ran:
        w = ran["big"]
        rate, _, delivered = e2e(w)
        versus = rate / p1_rate if p1_rate else 0.0
        met = "n/a" if not p1_rate else mark(versus >= TARGET_BIG)
        rows.append(
            ("filled store, end to end", f"{rate:.0f}", f"{rate / s1_of(w):.2f}",
             f"{versus:.2f}x empty, >= {TARGET_BIG}x {met}", f"[{w['facts']['lag_p50_ms']:.0f}]",
             f"[{w['facts']['lag_p99_ms']:.0f}]", *rss(w))
        )  # fmt: skip
        cpu_rows += [
            load_cpu("filled store (load)", w["load"], w["cpu_load_s"], w["down_load_s"]),
            drain_cpu("filled store end to end (load + drain)", w, delivered),
        ]
    for name, title in [("pg", "pg, 1 node, end to end"), ("pg-2-nodes", "pg, 2 nodes, end to end")]:
        if name not in ran:
            continue
        w = ran[name]
        load = w["load"]
        rate, _, delivered = e2e(w)
        versus = f"{rate / p1_rate:.2f}x sqlite" if p1_rate else ""
        rows += [
            (f"{name} ingest", f"{load.rate:.0f}", f"{load.rate / s1_of(w):.2f}", "", f"{load.p50_ms:.1f}",
             f"{load.p99_ms:.1f}", f"{w['rss_mb']:.0f}", ""),
            (title, f"{rate:.0f}", f"{rate / s1_of(w):.2f}", versus, f"[{w['facts']['lag_p50_ms']:.0f}]",
             f"[{w['facts']['lag_p99_ms']:.0f}]", f"{w['rss_mb']:.0f}", ""),
        ]  # fmt: skip
        cpu_rows += [
            load_cpu(f"{name} (load)", load, w["cpu_load_s"], w["down_load_s"]),
            drain_cpu(f"{name} end to end (load + drain)", w, delivered),
        ]
    if "held" in ran:
        held = ran["held"]
        hl: Load = held["load"]
        hf, h_delivered = held["facts"], held["counts"].get("delivered", 0)
        drain_s = (hf["last_done"] - held["opened_at"]) if hf["last_done"] else 0.0
        drain_rate = h_delivered / drain_s if drain_s > 0 else 0.0
        rows += [
            ("ingest, forwarding held*", f"{hl.rate:.0f}", f"{hl.rate / s1_of(held):.2f}", "", f"{hl.p50_ms:.1f}",
             f"{hl.p99_ms:.1f}", f"{held['rss_load_mb']:.0f}", ""),
            ("forwarding alone*", f"{drain_rate:.0f}", f"{drain_rate / s1_of(held):.2f}", "", "", "",
             f"{held['rss_mb']:.0f}", ""),
        ]  # fmt: skip
        cpu_rows += [
            load_cpu("ingest, forwarding held* (load)", hl, held["cpu_load_s"], held["down_load_s"]),
            (
                "forwarding alone* (drain)",
                f"{h_delivered}",
                us_per(held["cpu_all_s"] - held["cpu_load_s"], h_delivered),
                us_per(held["down_all_s"] - held["down_load_s"], h_delivered),
                *[""] * 6,
            ),
        ]
    head = ("scenario", "msgs/s", "x S1", "target", "p50 ms", "p99 ms", "RSS MB", "RSS target")
    cpu_head = (
        "CPU per message",
        "msgs",
        "server us",
        "downstream us",
        "wrk us",
        "server %",
        "downstream %",
        "wrk %",
        "machine busy",
        "others",
    )
    if args.pin and args.server_cpus is not None:
        pinning = (
            f"pinned: the server under test on CPU {s1['cores']}, wrk and the"
            f" downstream on CPU {','.join(map(str, sorted(args.load_cpus)))} (the processes = 2 row: not pinned)"
        )
    else:
        pinning = "not pinned: wrk, the server and the downstream share every CPU"
    out = [
        f"wacored bench {dt.datetime.now().isoformat(timespec='seconds')}, {version}: {ncpu} CPUs,"
        f" wrk -t{args.threads} -c{args.connections} -d{args.duration}s, downstream {args.downstream}",
        pinning,
        *(
            [
                f"WARNING: wrk ran out of bodies in {', '.join(ran_out)}: those msgs/s are understated and the"
                " ratios meaningless; raise --bodies"
            ]
            if ran_out
            else []
        ),
        "",
        *table(head, rows, {1, 2, 4, 5, 6}),
        "",
        "p50/p99: ack latency seen by wrk; [end to end]: delivery lag, received -> delivered (ms).",
        "RSS: wacored's VmHWM (summed over its processes); (S1) is the no-op server's, for reference.",
        *(
            [
                "* --held diagnostic: the downstream holds every request until the load ends (ingest without"
                " forwarding), then the backlog drains (forwarding alone; msgs/s from the release)."
            ]
            if "held" in ran
            else []
        ),
        "",
        *table(cpu_head, cpu_rows, set(range(1, 10))),
        "us: CPU time (user+sys, all threads, the whole process tree) per message; %: of one CPU during the"
        " load (100% = one core saturated);",
        "machine busy: all CPUs, from /proc/stat; others: CPU taken by processes outside the bench during the"
        " load (figures are only comparable when it is ~0%).",
        "",
        f"cores              S1 {s1['cores']}; "
        + "; ".join(
            f"{n}: wacored {r['cores']['wacored']}, downstream {r['cores']['downstream']}" for n, r in ran.items()
        )
        + f"; wrk {','.join(map(str, sorted(args.load_cpus))) if args.load_cpus else 'any'}"
        + " (the processes = 2 row: any)",
        f"S1                 {base.ok} x 200 in {base.duration_s:.1f}s; non-2xx {base.errors['status']}, "
        f"socket errors {base.socket_errors}; busy before {base.busy_before:.0%}; others: {base.others}",
    ]
    if s1_end is not None:
        again = s1_end["load"]
        out.append(
            f"S1 again           {again.ok} x 200 in {again.duration_s:.1f}s after the rows: "
            f"{again.rate / base.rate:.2f}x the first S1 ({us_per(s1_end['cpu_s'], again.ok)} against "
            f"{us_per(s1['cpu_s'], base.ok)} us of CPU a request): this VM's speed moved by the difference "
            "while the rows ran (the ratios are to the first S1, or with --paired to each row's own)"
        )
    for name, r in results.items():
        if isinstance(r, str):
            out.append(f"{name:<18} not run: {r}")
            continue
        ld, f, counts = r["load"], r["facts"], r["counts"]
        _, seconds, delivered = e2e(r)
        stored = counts["total"]
        duplicates = max(0, ld.ok - stored) if stored else 0  # dropped statuses store no row
        out.append(
            f"{name:<18} {ld.ok} x 200 in {ld.duration_s:.1f}s; non-2xx {ld.errors['status']}, socket errors"
            f" {ld.socket_errors}; rows stored {stored}; delivered {delivered} (dead-lettered"
            f" {counts.get('dead_lettered', 0)}, still queued {counts.get('queued', 0)}"
            f"{'' if r['drained'] else ', DRAIN TIMED OUT'}) in {seconds:.1f}s from first receipt to last delivery"
            f" ({max(0.0, (f['last_done'] or 0) - ld.ended_at):.1f}s after wrk ended)"
            + (f"; statuses counted by /health {r['statuses_counted']}" if r["statuses_counted"] else "")
        )
        out.append(
            f"{'':<18} {r['processes']} wacored process(es)"
            + " (CPU during the load, of which the event loop's thread: "
            + ", ".join(f"{s / ld.duration_s:.0%} ({loop / ld.duration_s:.0%})" for s, loop in r["cpu_each_s"])
            + ")"
            + f"; {r['downstream_kind']} downstream answered"
            f" {r['downstream']['posts']} POSTs for {f['attempts']} attempts over {r['downstream']['connections']}"
            f" TCP connections; threads out of bodies {ld.exhausted_threads}; duplicates {duplicates};"
            f" busy before {ld.busy_before:.0%}; others: {ld.others}"
        )
        out.append(
            f"{'':<18} RSS idle {r['rss_idle_mb']:.0f} MB, after load {r['rss_load_mb']:.0f} MB, after drain"
            f" {r['rss_mb']:.0f} MB (VmHWM), now {r['rss_now_mb']:.0f} MB; start-up {r['startup_s']:.1f}s;"
            f" {len(r['log_problems'])} warning/error log lines; exit code {r['exit_code']}"
        )
        out += [f"{'':<18}   {problem[:200]}" for problem in r["log_problems"][:3]]
        if "s1" in r:
            paired: Load = r["s1"]["load"]
            out.append(
                f"{'':<18} its ratios are to S1 run just before it (--paired): {paired.rate:.0f} msgs/s,"
                f" {paired.rate / base.rate:.2f}x the first S1, {us_per(r['s1']['cpu_s'], paired.ok)} us of CPU"
                " a request"
            )
    if "messages" in ran:
        f = ran["messages"]["facts"]
        out += [
            f"routes             {json.dumps(f['reasons'], sort_keys=True)}",
            f"targets            {json.dumps(f['targets'], sort_keys=True)}",
            f"senders            {f['senders']} reached (of {args.senders} in the bodies),"
            f" {f['sessions']} sessions open",
        ]
    out.append(f"bodies             {args.bodies} messages and {args.bodies} statuses signed in {gen_s:.1f}s")
    return "\n".join(out)


DEFAULT_ROWS = ("messages", "statuses-dropped", "statuses-forwarded", "processes-2")
ROWS = (*DEFAULT_ROWS, "big", "pg", "pg-2-nodes")
"""The pg rows need a PostgreSQL server (``--pg``), so they run only when asked for."""


def main() -> int:
    p = argparse.ArgumentParser(description="wacored throughput benchmark (prints figures, asserts nothing)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (at most 15; default 10)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--senders", type=int, default=5000, help="distinct senders in the bodies (default 5000)")
    p.add_argument(
        "--bodies",
        type=int,
        default=200_000,
        help="signed unique bodies to generate, all threads together (default 200000)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=45.0,
        help="seconds to wait for every message to be delivered after the load (default 45)",
    )
    p.add_argument(
        "--held", action="store_true", help="add the diagnostic run: ingest with forwarding held, then forwarding alone"
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="run S1 again just before each row and take that row's ratio to it (this VM's speed drifts"
        " up to ~20 %% within one run: see bench/README.md)",
    )
    p.add_argument(
        "--py-spy",
        metavar="BIN",
        help="py-spy executable: sample wacored during each load into bench/out/profile-*.txt",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each load, wait up to this many seconds for the machine to be idle (default 15)",
    )
    p.add_argument(
        "--wacored",
        default=str(WACORED),
        help="command that runs wacored (default .venv/bin/wacored); `run -c FILE ...` is appended",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pin the server under test (S1, wacored) to one CPU and wrk + the downstream to the others"
        " (default on; the processes = 2 row is never pinned)",
    )
    p.add_argument(
        "--downstream",
        choices=("nginx", "noop"),
        default="nginx",
        help="what the services and the Graph API point at: nginx answering 200 {} (default: near-free,"
        " so it does not take wrk's CPU) or bench/noop.py (hypercorn, ~0.5 ms a request); --held always uses noop",
    )
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"wacored rows to run, comma-separated, in this order (default {','.join(DEFAULT_ROWS)}; also"
        " pg, pg-2-nodes); S1 always runs, before the rows and after",
    )
    p.add_argument(
        "--pg",
        default=DEFAULT_PG,
        help="PostgreSQL server for the pg rows, a libpq URL of a role that may create databases"
        f" (default {DEFAULT_PG}); each row creates its own wacored_bench_<random> database there and drops it",
    )
    p.add_argument(
        "--big",
        type=Path,
        metavar="STORE",
        help="the big row's store, filled by `bench/prefill.py --store STORE --keep` (copied for the run, never"
        " written); the big row is the messages row on it, as a ratio to the messages row on an empty store",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (bodies, stores, logs)")
    args = p.parse_args()
    args.duration = max(1, min(args.duration, 15))
    rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    if "big" in rows and (args.big is None or not args.big.is_file()):
        p.error("the big row needs --big STORE, a store filled by bench/prefill.py --store STORE --keep")
    if shutil.which("wrk") is None:
        print("bench needs wrk: apt-get install wrk (make bench does it)", file=sys.stderr)
        return 2
    if args.downstream == "nginx" and not Path(NGINX).exists():
        print("--downstream nginx needs nginx: apt-get install nginx (make bench does it)", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    args.server_cpus = args.load_cpus = None
    if args.pin and len(cpus) >= 2:  # the server under test on one CPU, the load and downstream on the rest
        args.server_cpus, args.load_cpus = {cpus[0]}, set(cpus[1:])
    elif args.pin:
        print("note: one CPU only, nothing to pin", flush=True)
        args.pin = False
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wacored-bench-"))
    procs = Procs()
    secret = secrets.token_hex(32)
    version = code_version()  # before the runs: wacored/ is read at each start

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the cleanup below

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        started = time.monotonic()
        prefix, statuses = tmp / "bodies", tmp / "statuses"
        print(f"generating {args.bodies} signed message bodies and as many status bodies in {tmp} ...", flush=True)
        generate(prefix, secret, args.threads, args.bodies // args.threads, args.senders)
        if {"statuses-dropped", "statuses-forwarded"} & set(rows):
            generate_statuses(statuses, secret, args.threads, args.bodies // args.threads, args.senders)
        gen_s = time.monotonic() - started
        print(f"S1: no-op ASGI app on hypercorn trio, wrk {args.duration}s ...", flush=True)
        s1 = scenario_s1(procs, tmp, prefix, args)
        print(f"  cores: S1 {s1['cores']}, wrk {cores_text(args.load_cpus)}", flush=True)
        service = next(iter(tomllib.loads((ROOT / "wacored.toml").read_text())["services"]))
        runs = {
            "messages": Run("messages", prefix),
            "statuses-dropped": Run("statuses-dropped", statuses, statuses=""),
            "statuses-forwarded": Run("statuses-forwarded", statuses, statuses=service),
            "processes-2": Run("processes-2", prefix, processes=2, pin=False),
            "big": Run("big", prefix, filled=args.big),
            "pg": Run("pg", prefix, nodes=1),
            "pg-2-nodes": Run("pg-2-nodes", prefix, nodes=2, pin=False),
        }
        chosen = [runs[r] for r in rows] + ([Run("held", prefix, held=True)] if args.held else [])
        results: dict[str, dict[str, Any] | str] = {}
        for run in chosen:
            paired = None
            if args.paired:
                print(f"S1 paired with {run.name}: wrk {args.duration}s ...", flush=True)
                paired = scenario_s1(procs, tmp, prefix, args, f"s1-{run.name}")
            print(f"{run.name}: wacored, wrk {args.duration}s, then waiting for delivery ...", flush=True)
            result = results[run.name] = scenario_wacored(procs, tmp, secret, args, run)
            if paired is not None and not isinstance(result, str):
                result["s1"] = paired
            if isinstance(result, str):
                print(f"  n/a: wacored check-config refuses it: {result}", flush=True)
            else:
                where = cores_text(args.load_cpus if run.pin else None)
                print(
                    f"  cores: wacored {result['cores']['wacored']} ({result['processes']} process(es)),"
                    f" downstream {result['cores']['downstream']}, wrk {where}",
                    flush=True,
                )
        # S1 once more after the rows: how far this VM's speed moved while they ran (the ratios are to
        # the first S1; a run whose two S1s differ by more than a few % is one to run again).
        print(f"S1 again, after the rows: wrk {args.duration}s ...", flush=True)
        s1_end = scenario_s1(procs, tmp, prefix, args, "s1-end")
        text = report(s1, results, args, gen_s, version, s1_end)
        print()
        print(text)
        print(f"\n(took {time.monotonic() - started:.0f}s; temp dir {tmp}{'' if args.keep else ' removed'})")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        (OUT / f"bench-{stamp}.txt").write_text(text + "\n")
        (OUT / "last.txt").write_text(text + "\n")
        return 0
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        sys.exit(130)

"""wacored throughput benchmark: a no-op ceiling (S1), ingest, and end-to-end delivery, side by side.

Run with ``make bench`` (installs wrk if missing) or ``.venv/bin/python bench/bench.py [options]``.
It prints a table of figures and never asserts on timing; bench/README.md explains how to read it.

What runs, all on 127.0.0.1, one scenario at a time:

S1          `bench/noop.py`: a raw ASGI callable that reads the body and answers 200 ``{}``, served by
            ``hypercorn.trio.serve``. The ceiling of the stack wacored is built on.
ingest      ``.venv/bin/wacored run -c <tmp config>`` as a real subprocess, a fresh SQLite store in a
            temp dir, every service URL and the Graph API URL pointing at a second `noop.py` (the
            downstream), so forwarding runs in the background while the load runs.
end-to-end  The same wacored run: after the load, the store is polled read-only until no message is
            ``queued``; delivered msgs/s = delivered / (last ``done_at`` - first ``received_at``).
--held      (optional diagnostic) the same again with the downstream holding every request until the
            load is over: ingest without forwarding competing for the CPU, then the backlog's drain
            (forwarding alone).

Load: wrk (``bench/bodies.lua``) posts pre-generated, signed, unique webhooks (one text message each,
a unique wamid), each wrk thread from its own file so no body is ever sent twice. Message mix per
sender, in a cycle of 10: 1 service key (typed in even blocks of senders, an interactive list reply in
odd ones; starts a session), 8 free texts (routed by the session), 1 "menu" (ends the session; the
home menu goes to the Graph API sender). wrk, wacored and the downstream share the machine's CPUs.
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
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = ROOT / ".venv" / "bin" / "python"
WACORED = ROOT / ".venv" / "bin" / "wacored"
LUA = BENCH / "bodies.lua"
BENCH_SIGNING_SECRET = "whsec_" + "YmVuY2gtc2lnbmluZy1rZXktb2YtdGhpcnR5LXR3bzE="

TARGET_INGEST = 0.9
TARGET_E2E = 0.5
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


def write_config(path: Path, store: Path, downstream: str, timeout_ms: int | None = None) -> None:
    """The repo's wacored.toml (services, keys, home menu, rate limit, forwarding), pointed at the bench's
    downstream and a fresh store, listening on a free port."""
    base = tomllib.loads((ROOT / "wacored.toml").read_text())
    q = json.dumps
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        "",
        "[whatsapp]",
        'phone_number_id = "BENCH_PHONE"',
        f"graph_api_url = {q(downstream + '/graph')}",
        "",
        "[store]",
        f"path = {q(str(store))}",
        "",
    ]
    for section in ("ratelimit", "routing", "sessions", "forwarding"):
        values = dict(base.get(section, {}))
        if section == "forwarding" and timeout_ms is not None:
            values["timeout_ms"] = timeout_ms
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
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, stdout: Any = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as err:
            p = subprocess.Popen(
                argv,
                stdout=stdout if stdout is not None else err,
                stderr=err,
                env=env,
                cwd=ROOT,
                start_new_session=True,
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


def memory_mb(pid: int) -> tuple[float, float]:
    """(peak RSS VmHWM, current RSS VmRSS) of a live process, in MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmHWM", 0.0), values.get("VmRSS", 0.0)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


def start_noop(procs: Procs, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    url_file, log = tmp / f"{name}.url", tmp / f"{name}.log"
    with open(url_file, "wb") as out:
        p = procs.start([str(PYTHON), str(BENCH / "noop.py")], log, stdout=out)
    url = wait_for(name, lambda: url_file.read_text().strip() if url_file.exists() else "", p, log)
    return p, url


def start_wacored(
    procs: Procs, run_dir: Path, config: Path, secret: str, command: str
) -> tuple[subprocess.Popen[bytes], str, float]:
    log = run_dir / "wacored.log"
    env = {**os.environ, "WACORED_APP_SECRET": secret, "WACORED_ACCESS_TOKEN": "bench-token"}
    # Every service signs its forwards with a secret of its own, as in production (one HMAC per
    # forward); an older wacored ignores these variables.
    services = tomllib.loads((ROOT / "wacored.toml").read_text())["services"]
    env.update({f"WACORED_SIGNING_SECRETS_{name.upper()}": BENCH_SIGNING_SECRET for name in services})
    argv = [*shlex.split(command), "run", "-c", str(config), "--env-file", str(run_dir / "none.env")]
    started = time.monotonic()
    p = procs.start(argv, log, env=env)

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


def run_wrk(url: str, prefix: Path, args: argparse.Namespace, log: Path, mine: set[int]) -> Load:
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
    env = {**os.environ, "BENCH_BODIES": str(prefix)}
    idle_busy = wait_quiet(args.quiet_wait)
    if idle_busy >= 0.15:
        print(
            f"  note: the machine is {idle_busy:.0%} busy before this load (other processes): figures are disturbed",
            flush=True,
        )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs0 = cpu_by_process()
    busy0 = machine_busy_s()
    started = time.time()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.duration + 60)
    ended = time.time()
    busy = machine_busy_s() - busy0
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


def read_store(store: Path, query: Callable[[sqlite3.Connection], Any]) -> Any:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5.0)
    try:
        return query(conn)
    finally:
        conn.close()


def store_counts(store: Path) -> dict[str, int]:
    counts: dict[str, int] = read_store(
        store, lambda c: dict(c.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
    )
    counts["total"] = sum(counts.values())
    return counts


def wait_delivered(store: Path, timeout_s: float) -> tuple[dict[str, int], bool]:
    """Poll until no message is queued and the row count is stable (in-flight requests committed)."""
    deadline = time.monotonic() + timeout_s
    last_total = -1
    while True:
        counts = store_counts(store)
        if counts.get("queued", 0) == 0 and counts["total"] == last_total:
            return counts, True
        if time.monotonic() > deadline:
            return counts, False
        last_total = counts["total"]
        time.sleep(0.25)


def store_facts(store: Path) -> dict[str, Any]:
    def query(c: sqlite3.Connection) -> dict[str, Any]:
        first, last = c.execute(
            "SELECT MIN(received_at), MAX(done_at) FROM messages WHERE state = 'delivered'"
        ).fetchone()
        lags = [
            row[0]
            for row in c.execute("SELECT done_at - received_at FROM messages WHERE state = 'delivered' ORDER BY 1")
        ]
        return {
            "first_received": first,
            "last_done": last,
            "lag_p50_ms": lags[len(lags) // 2] * 1000 if lags else 0.0,
            "lag_p99_ms": lags[min(len(lags) - 1, len(lags) * 99 // 100)] * 1000 if lags else 0.0,
            "reasons": dict(c.execute("SELECT reason, COUNT(*) FROM messages GROUP BY reason").fetchall()),
            "targets": dict(c.execute("SELECT target, COUNT(*) FROM messages GROUP BY target").fetchall()),
            "attempts": c.execute("SELECT COALESCE(SUM(attempts), 0) FROM messages").fetchone()[0],
            "senders": c.execute("SELECT COUNT(DISTINCT sender) FROM messages").fetchone()[0],
            "sessions": c.execute("SELECT COUNT(*) FROM sessions").fetchone()[0],
        }

    facts: dict[str, Any] = read_store(store, query)
    return facts


# --------------------------------------------------------------------------------------------------
# Scenarios


def scenario_s1(procs: Procs, tmp: Path, prefix: Path, args: argparse.Namespace) -> dict[str, Any]:
    p, url = start_noop(procs, tmp, "s1")
    try:
        cpu0 = cpu_s(p.pid)
        load = run_wrk(url, prefix, args, tmp / "wrk-s1.txt", {p.pid})
        cpu = cpu_s(p.pid) - cpu0
        hwm, _ = memory_mb(p.pid)
    finally:
        procs.stop(p)
    return {"load": load, "rss_mb": hwm, "cpu_s": cpu}


def scenario_wacored(
    procs: Procs, tmp: Path, prefix: Path, secret: str, args: argparse.Namespace, held: bool = False
) -> dict[str, Any]:
    name = "held" if held else "wacored"
    run_dir = tmp / name
    run_dir.mkdir()
    store = run_dir / "wacored.db"  # a fresh store for every run
    down, down_url = start_noop(procs, run_dir, "downstream")
    if held:
        get(f"{down_url}/_gate/close")
    config = run_dir / "wacored.toml"
    write_config(config, store, down_url, HELD_TIMEOUT_MS if held else None)
    p, url, startup_s = start_wacored(procs, run_dir, config, secret, args.wacored)
    try:
        idle_hwm, _ = memory_mb(p.pid)
        cpu0, down0 = cpu_s(p.pid), cpu_s(down.pid)
        spy = None
        if args.py_spy:  # sampling costs CPU: the figures of such a run are lower
            spy = procs.start(
                [
                    args.py_spy,
                    "record",
                    "--pid",
                    str(p.pid),
                    "--duration",
                    str(args.duration),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "-o",
                    str(OUT / f"profile-{name}.txt"),
                ],
                run_dir / "py-spy.log",
            )
        load = run_wrk(url, prefix, args, run_dir / "wrk.txt", {p.pid, down.pid} | ({spy.pid} if spy else set()))
        cpu_load, down_load = cpu_s(p.pid) - cpu0, cpu_s(down.pid) - down0
        load_hwm, _ = memory_mb(p.pid)
        opened_at = time.time()
        if held:
            get(f"{down_url}/_gate/open")
        counts, drained = wait_delivered(store, args.drain_timeout)
        cpu_all, down_all = cpu_s(p.pid) - cpu0, cpu_s(down.pid) - down0
        hwm, rss = memory_mb(p.pid)
        facts = store_facts(store)
        downstream = json.loads(get(f"{down_url}/count"))
        if spy is not None:
            spy.wait(30)
    finally:
        code = procs.stop(p)
        procs.stop(down)
    lines = (run_dir / "wacored.log").read_text().splitlines()
    problems = [ln for ln in lines if '"level": "warning"' in ln or '"level": "error"' in ln]
    return {
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
        "down_load_s": down_load,
        "cpu_all_s": cpu_all,
        "down_all_s": down_all,
        "downstream": downstream,
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
    w: dict[str, Any],
    held: dict[str, Any] | None,
    args: argparse.Namespace,
    gen_s: float,
    version: str,
) -> str:
    base: Load = s1["load"]
    load: Load = w["load"]
    f, counts = w["facts"], w["counts"]
    delivered = counts.get("delivered", 0)
    e2e_s = (f["last_done"] - f["first_received"]) if f["first_received"] else 0.0
    e2e_rate = delivered / e2e_s if e2e_s > 0 else 0.0
    ratio_in, ratio_e2e = load.rate / base.rate, e2e_rate / base.rate
    rss = f"{w['rss_mb']:.0f}"
    rss_mark = f"<= {TARGET_RSS_MB:.0f} {mark(w['rss_mb'] <= TARGET_RSS_MB)}"
    ran_out = [
        name
        for name, ld in [("S1", base), ("ingest", load)] + ([("held", held["load"])] if held else [])
        if ld.exhausted_threads
    ]

    def goal(target: float, ratio: float) -> str:
        return f">= {target} {'n/a' if ran_out else mark(ratio >= target)}"

    rows = [
        (
            "S1 no-op",
            f"{base.rate:.0f}",
            "1.00",
            "",
            f"{base.p50_ms:.1f}",
            f"{base.p99_ms:.1f}",
            f"({s1['rss_mb']:.0f})",
            "",
        ),
        (
            "ingest",
            f"{load.rate:.0f}",
            f"{ratio_in:.2f}",
            goal(TARGET_INGEST, ratio_in),
            f"{load.p50_ms:.1f}",
            f"{load.p99_ms:.1f}",
            rss,
            rss_mark,
        ),
        (
            "end-to-end",
            f"{e2e_rate:.0f}",
            f"{ratio_e2e:.2f}",
            goal(TARGET_E2E, ratio_e2e),
            f"[{f['lag_p50_ms']:.0f}]",
            f"[{f['lag_p99_ms']:.0f}]",
            rss,
            rss_mark,
        ),
    ]
    ncpu = os.cpu_count() or 1

    def load_cpu(name: str, ld: Load, server_s: float, down_s: float) -> tuple[str, ...]:
        mine = server_s + down_s + ld.wrk_cpu_s
        return (
            name,
            f"{ld.ok}",
            us_per(server_s, ld.ok),
            us_per(down_s, ld.ok) if down_s else "-",
            us_per(ld.wrk_cpu_s, ld.ok),
            f"{ld.machine_s / ld.duration_s / ncpu * 100:.0f}%",
            f"{max(0.0, ld.machine_s - mine) / ld.duration_s / ncpu * 100:.0f}%",
        )

    cpu_rows = [
        load_cpu("S1 no-op (load)", base, s1["cpu_s"], 0.0),
        load_cpu("ingest (load)", load, w["cpu_load_s"], w["down_load_s"]),
        (
            "end-to-end (load + drain)",
            f"{delivered}",
            us_per(w["cpu_all_s"], delivered),
            us_per(w["down_all_s"], delivered),
            "",
            "",
            "",
        ),
    ]
    if held is not None:
        hl: Load = held["load"]
        hf, hc = held["facts"], held["counts"]
        h_delivered = hc.get("delivered", 0)
        drain_s = (hf["last_done"] - held["opened_at"]) if hf["last_done"] else 0.0
        drain_rate = h_delivered / drain_s if drain_s > 0 else 0.0
        rows += [
            (
                "ingest, forwarding held*",
                f"{hl.rate:.0f}",
                f"{hl.rate / base.rate:.2f}",
                "",
                f"{hl.p50_ms:.1f}",
                f"{hl.p99_ms:.1f}",
                f"{held['rss_load_mb']:.0f}",
                "",
            ),
            (
                "forwarding alone*",
                f"{drain_rate:.0f}",
                f"{drain_rate / base.rate:.2f}",
                "",
                "",
                "",
                f"{held['rss_mb']:.0f}",
                "",
            ),
        ]
        cpu_rows += [
            load_cpu("ingest, forwarding held* (load)", hl, held["cpu_load_s"], held["down_load_s"]),
            (
                "forwarding alone* (drain)",
                f"{h_delivered}",
                us_per(held["cpu_all_s"] - held["cpu_load_s"], h_delivered),
                us_per(held["down_all_s"] - held["down_load_s"], h_delivered),
                "",
                "",
                "",
            ),
        ]
    head = ("scenario", "msgs/s", "x S1", "target", "p50 ms", "p99 ms", "RSS MB", "RSS target")
    cpu_head = ("CPU us per message", "msgs", "server", "downstream", "wrk", "machine busy", "others")
    duplicates = max(0, load.ok - counts["total"])
    held_note = held_others = held_busy = ""
    if held is not None:
        held_others = f"; during held ingest: {held['load'].others}"
        held_busy = f", held {held['load'].busy_before:.0%}"
        hc = held["counts"]
        held_note = (
            f"; held run: {len(held['log_problems'])} warning/error lines, dead-lettered "
            f"{hc.get('dead_lettered', 0)}, still queued {hc.get('queued', 0)}, "
            f"{held['downstream']['connections']} TCP connections for {held['downstream']['posts']} POSTs"
            f"{'' if held['drained'] else ', DRAIN TIMED OUT'}"
        )
    out = [
        f"wacored bench {dt.datetime.now().isoformat(timespec='seconds')}, {version}: {os.cpu_count()} CPUs"
        f" shared by wrk -t{args.threads} -c{args.connections} -d{args.duration}s, the server and its downstream",
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
        "p50/p99: ack latency seen by wrk; [end-to-end]: delivery lag, received -> delivered (ms).",
        "RSS: wacored's VmHWM; (S1) is the no-op server's, for reference.",
        *(
            [
                "* --held diagnostic: the downstream holds every request until the load ends (ingest without"
                " forwarding), then the backlog drains (forwarding alone; msgs/s from the release)."
            ]
            if held
            else []
        ),
        "",
        *table(cpu_head, cpu_rows, {1, 2, 3, 4, 5, 6}),
        "server/downstream/wrk: CPU time (user+sys, all threads) per message. machine busy: all CPUs, from /proc/stat;",
        "others: CPU taken by processes outside the bench during the load (figures are only comparable"
        " when it is ~0%).",
        "",
        f"others      busy before the loads (servers idle): S1 {base.busy_before:.0%}, ingest {load.busy_before:.0%}"
        f"{held_busy}; processes during S1: {base.others}; during ingest: {load.others}{held_others}",
        f"S1          {base.ok} x 200 in {base.duration_s:.1f}s; non-2xx {base.errors['status']}, "
        f"socket errors {base.socket_errors}",
        f"ingest      {load.ok} x 200 in {load.duration_s:.1f}s; non-2xx {load.errors['status']}, socket errors "
        f"{load.socket_errors}; rows stored {counts['total']}; duplicates {duplicates}; "
        f"threads out of bodies {load.exhausted_threads}",
        f"end-to-end  delivered {delivered}/{counts['total']} (dead-lettered {counts.get('dead_lettered', 0)}, "
        f"still queued {counts.get('queued', 0)}{'' if w['drained'] else ', DRAIN TIMED OUT'}) in {e2e_s:.1f}s "
        f"from first receipt to last delivery ({max(0.0, (f['last_done'] or 0) - load.ended_at):.1f}s after "
        f"wrk ended); downstream answered {w['downstream']['posts']} POSTs for {f['attempts']} attempts, "
        f"over {w['downstream']['connections']} TCP connections from wacored",
        f"routes      {json.dumps(f['reasons'], sort_keys=True)}",
        f"targets     {json.dumps(f['targets'], sort_keys=True)}",
        f"senders     {f['senders']} reached (of {args.senders} in the bodies), {f['sessions']} sessions open",
        f"RSS         wacored idle {w['rss_idle_mb']:.0f} MB, peak after load {w['rss_load_mb']:.0f} MB, "
        f"after drain {w['rss_mb']:.0f} MB (VmHWM), current {w['rss_now_mb']:.0f} MB; "
        f"start-up to listening {w['startup_s']:.1f}s",
        f"log         {len(w['log_problems'])} warning/error lines; wacored exit code {w['exit_code']}{held_note}",
        f"bodies      {args.bodies} signed in {gen_s:.1f}s",
    ]
    for problem in w["log_problems"][:3]:
        out.append(f"  {problem[:200]}")
    return "\n".join(out)


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
    p.add_argument("--keep", action="store_true", help="keep the temp dir (bodies, stores, logs)")
    args = p.parse_args()
    args.duration = max(1, min(args.duration, 15))
    if shutil.which("wrk") is None:
        print("bench needs wrk: apt-get install wrk (make bench does it)", file=sys.stderr)
        return 2
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
        prefix = tmp / "bodies"
        print(f"generating {args.bodies} signed bodies in {tmp} ...", flush=True)
        generate(prefix, secret, args.threads, args.bodies // args.threads, args.senders)
        gen_s = time.monotonic() - started
        print(f"S1: no-op ASGI app on hypercorn trio, wrk {args.duration}s ...", flush=True)
        s1 = scenario_s1(procs, tmp, prefix, args)
        print(f"ingest + end-to-end: wacored, wrk {args.duration}s, then waiting for delivery ...", flush=True)
        w = scenario_wacored(procs, tmp, prefix, secret, args)
        held = None
        if args.held:
            print(f"diagnostic: wacored with forwarding held, wrk {args.duration}s, then the drain ...", flush=True)
            held = scenario_wacored(procs, tmp, prefix, secret, args, held=True)
        text = report(s1, w, held, args, gen_s, version)
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

"""``wacored dlq list|replay|purge``, ``services pause|resume|list``, ``sessions reap`` and ``status``:
the store's state, read and repaired on a connection of its own (safe while the daemon runs).

Each command's work runs through the CLI's `on_store` (`cli._on_store`): a missing or foreign
database, or the store refusing, is one line on stderr and exit 1. `status` also asks the running
daemon's /health for its workers and the lanes they hold (2 s at most; "not answering" otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ..config import Config
from .cli_messages import OnStore
from .connection import OpsConnection, store_where


def cmd_dlq_list(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import operations as ops

    def work(conn: OpsConnection, _: Config) -> int:
        entries = [e.to_json() for e in ops.list_dead_letters(conn, state=args.state, service=args.service)]
        print(json.dumps(entries, indent=2) if args.json else ops.dead_letter_table(entries))
        return 0

    return on_store(args, work)


def cmd_dlq_replay(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import operations as ops

    def work(conn: OpsConnection, _: Config) -> int:
        if args.all:
            count = ops.replay_all(conn, time.time(), state=args.state or "abandoned", service=args.service)
            print(f"replayed {count} dead letter(s): due now")
            return 0
        result = ops.replay(conn, args.ids, time.time())
        print(f"replayed {result.replayed} dead letter(s): due now")
        for ident in result.unknown:
            print(f"unknown dead letter: {ident}", file=sys.stderr)
        for ident in result.delivered:
            print(f"already delivered, not replayed: {ident}", file=sys.stderr)
        for ident in result.queued:
            print(f"its message is queued again (messages replay), not replayed: {ident}", file=sys.stderr)
        return 1 if result.unknown or result.delivered or result.queued else 0

    return on_store(args, work)


def cmd_dlq_purge(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import operations as ops

    def work(conn: OpsConnection, _: Config) -> int:
        count = ops.purge(conn, state=args.state, older_than_s=args.older_than, now=time.time())
        print(f"purged {count} {args.state} dead letter(s)")
        return 0

    return on_store(args, work)


def cmd_status(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import operations as ops

    def work(conn: OpsConnection, config: Config) -> int:
        report = ops.status(conn, session_ttl_s=config.sessions.ttl_s, now=time.time(), path=store_where(config.store))
        report["daemon"] = _ask_daemon(config)
        print(json.dumps(report, indent=2) if args.json else ops.status_text(report))
        return 0

    return on_store(args, work)


def _ask_daemon(config: Config) -> dict[str, Any]:
    """The running daemon's status and workers, from its /health on ``[server] listen``."""
    import httpx

    host = config.server.host if config.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"{'https' if config.server.tls else 'http'}://{host}:{config.server.port}"
    try:
        # verify=False: our own daemon, asked for its /health only; its certificate names the
        # public host, not the address it listens on.
        body = httpx.get(f"{url}/health", timeout=2.0, trust_env=False, verify=not config.server.tls).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "error": f"not answering ({type(exc).__name__})"}
    return {"url": url, "status": body.get("status"), "workers": body.get("workers", [])}


def cmd_sessions_reap(args: argparse.Namespace, on_store: OnStore) -> int:
    from ..actors.reaper import reap
    from ..daemon import StoreParts

    def work(_: OpsConnection, config: Config) -> int:
        # `reap` runs on a write connection of its own (the daemon's kind, SQLite or PostgreSQL);
        # ours only proved the store exists and is ours.
        counts = reap(
            StoreParts(config.store).writer(), config.sessions, time.time(), rate_window_s=config.ratelimit.window_s
        )
        if args.json:
            print(json.dumps(counts, indent=2))
        else:
            print("reaped: " + ", ".join(f"{kind} {n}" for kind, n in counts.items()))
        return 0

    return on_store(args, work)


def cmd_services_list(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import pauses

    def work(conn: OpsConnection, config: Config) -> int:
        entries = pauses.list_services(conn, list(config.services))
        print(json.dumps(entries, indent=2) if args.json else pauses.services_table(entries))
        return 0

    return on_store(args, work)


def cmd_services_pause(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import pauses
    from .operations import iso

    def work(conn: OpsConnection, config: Config) -> int:
        changed = pauses.pause(conn, args.name, services=list(config.services), reason=args.reason, now=time.time())
        state = pauses.read_pauses(conn)[args.name]
        said = "paused" if changed else "was already paused"
        print(
            f"{args.name} {said} since {iso(state.since)}"
            f"{f' ({state.reason})' if state.reason else ''}; the running daemon holds its deliveries"
            f" within {pauses.POLL_S:g} s"
        )
        return 0

    return on_store(args, work)


def cmd_services_resume(args: argparse.Namespace, on_store: OnStore) -> int:
    from . import pauses

    def work(conn: OpsConnection, config: Config) -> int:
        changed = pauses.resume(conn, args.name, services=list(config.services))
        print(
            f"{args.name} resumed: the running daemon delivers what is queued within {pauses.POLL_S:g} s"
            if changed
            else f"{args.name} was not paused"
        )
        return 0

    return on_store(args, work)


def _duration(text: str) -> float:
    from .operations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
    on_store: OnStore,
) -> None:
    """``dlq list|replay|purge``, ``sessions reap`` and ``status``: the store's state, safe while the
    daemon runs."""
    from ..store import DEAD_LETTER_STATES

    dlq = sub.add_parser("dlq", help="list, replay or purge dead letters").add_subparsers(dest="dlq", required=True)
    ls = dlq.add_parser("list", help="dead letters, oldest first")
    common(ls)
    ls.add_argument("--state", choices=DEAD_LETTER_STATES)
    ls.add_argument("--service")
    ls.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    ls.set_defaults(func=partial(cmd_dlq_list, on_store=on_store))

    replay = dlq.add_parser("replay", help="make dead letters pending and due now, with a fresh retry budget")
    common(replay)
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead letter row id or WhatsApp message id (wamid)")
    replay.add_argument("--all", action="store_true", help="every entry in --state (default: abandoned)")
    replay.add_argument("--service", help="with --all: only this service's entries")
    replay.add_argument("--state", choices=["abandoned", "pending"], help="with --all: which entries")
    replay.set_defaults(func=partial(cmd_dlq_replay, on_store=on_store), check=lambda args: _check_replay(replay, args))

    purge = dlq.add_parser("purge", help="delete delivered or abandoned dead letters older than a duration")
    common(purge)
    purge.add_argument("--state", required=True, choices=["delivered", "abandoned"])
    purge.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="DURATION",
        help="e.g. 90s, 30m, 12h, 7d (since the entry last changed)",
    )
    purge.set_defaults(func=partial(cmd_dlq_purge, on_store=on_store))

    sessions = sub.add_parser("sessions", help="sessions and old rows").add_subparsers(dest="sessions", required=True)
    reap = sessions.add_parser("reap", help="run the reaper once now: idle sessions, old dead letters and messages")
    common(reap)
    reap.add_argument("--json", action="store_true")
    reap.set_defaults(func=partial(cmd_sessions_reap, on_store=on_store))

    services = sub.add_parser("services", help="pause, resume or list services").add_subparsers(
        dest="services", required=True
    )
    pause = services.add_parser("pause", help="hold a service's deliveries (kept in the store, across restarts)")
    common(pause)
    pause.add_argument("name", help="a configured service")
    pause.add_argument("--reason", default="", help="why, for the next operator (at most 200 characters)")
    pause.set_defaults(func=partial(cmd_services_pause, on_store=on_store))
    resume = services.add_parser("resume", help="deliver a paused service's queued messages again, in order")
    common(resume)
    resume.add_argument("name")
    resume.set_defaults(func=partial(cmd_services_resume, on_store=on_store))
    ls_services = services.add_parser("list", help="each service: paused or not, since when, why, queued")
    common(ls_services)
    ls_services.add_argument("--json", action="store_true")
    ls_services.set_defaults(func=partial(cmd_services_list, on_store=on_store))

    status = sub.add_parser("status", help="dead letters, sessions, queued messages and periodic runs")
    common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=partial(cmd_status, on_store=on_store))


def _check_replay(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.all == bool(args.ids):
        p.error("give dead letter ids or --all (not both)")
    if args.ids and (args.service or args.state):
        p.error("--service and --state go with --all")

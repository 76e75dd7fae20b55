"""``wacored messages show|list|replay``: where messages went, and sending some again, on the store of
the config (safe while the daemon runs; see `messages`).

A replay asks first: it prints how many messages it would queue again and waits for ``y`` on a
terminal; without one (a script, a pipe) it refuses unless ``--yes`` is given.

Error handling:
    A bad selection (time, state, kind, limit) is one line on stderr and exit 2; a key that matches
    nothing, a message already queued, or a replay declined is exit 1; the store refusing is one line
    and exit 1 (`cli._on_store`).

Cancellation:
    Ctrl-C at the question replays nothing; during the replay, whole batches already committed stay
    queued (`messages.requeue`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from ..config import Config
from . import messages as msgs
from .connection import OpsConnection

OnStore = Callable[[argparse.Namespace, Callable[[OpsConnection, Config], int]], int]


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
    on_store: OnStore,
) -> None:
    messages = sub.add_parser("messages", help="where messages went; replay them").add_subparsers(
        dest="messages", required=True
    )

    show = messages.add_parser("show", help="one message: its route, state, every attempt, its dead letter")
    common(show)
    show.add_argument("key", metavar="WAMID", help="the message's key: its wamid, or status:<id>:<status>")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=lambda args: on_store(args, _show(args)))

    ls = messages.add_parser("list", help="messages, newest first")
    common(ls)
    _selection_options(ls, msgs.STATE_FILTERS)
    ls.add_argument(
        "--limit",
        default=str(msgs.DEFAULT_LIMIT),
        help=f"at most this many, up to {msgs.MAX_LIMIT} (default {msgs.DEFAULT_LIMIT})",
    )
    ls.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    ls.set_defaults(func=lambda args: on_store(args, _list(args)))

    replay = messages.add_parser("replay", help="queue messages again, with the same Idempotency-Key")
    common(replay)
    replay.add_argument("keys", nargs="*", metavar="WAMID", help="message keys (or select with --service and --since)")
    _selection_options(replay, msgs.REPLAY_STATES)
    replay.add_argument("--yes", action="store_true", help="replay without asking")
    replay.set_defaults(func=lambda args: on_store(args, _replay(args)), check=lambda args: _check_replay(replay, args))


def _selection_options(p: argparse.ArgumentParser, states: tuple[str, ...]) -> None:
    p.add_argument("--since", metavar="T", help="received at or after T: ISO-8601, or a duration back (2h, 7d)")
    p.add_argument("--until", metavar="T", help="received before T")
    p.add_argument("--service")
    p.add_argument("--state", choices=states)
    p.add_argument("--kind", choices=msgs.KINDS)


def _check_replay(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    filters = any(getattr(args, name) for name in ("service", "since", "until", "state", "kind"))
    if args.keys and filters:
        p.error("give message keys, or --service and --since (not both)")
    if not args.keys and not (args.service and args.since):
        p.error("give message keys, or --service S --since T")


def _selection(args: argparse.Namespace, states: tuple[str, ...], limit: str | None = None) -> msgs.Selection | None:
    try:
        return msgs.selection(
            time.time(),
            since=args.since,
            until=args.until,
            service=args.service,
            state=args.state,
            kind=args.kind,
            limit=limit,
            states=states,
        )
    except ValueError as exc:
        print(f"wacored: {exc}", file=sys.stderr)
        return None


def _show(args: argparse.Namespace) -> Callable[[OpsConnection, Config], int]:
    def work(conn: OpsConnection, _: Config) -> int:
        report = msgs.show(conn, args.key)
        if report is None:
            print(f"wacored: no message {args.key!r}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=2) if args.json else msgs.show_text(report))
        return 0

    return work


def _list(args: argparse.Namespace) -> Callable[[OpsConnection, Config], int]:
    def work(conn: OpsConnection, _: Config) -> int:
        if (sel := _selection(args, msgs.STATE_FILTERS, args.limit)) is None:
            return 2
        entries = msgs.list_messages(conn, sel)
        print(json.dumps(entries, indent=2) if args.json else msgs.message_table(entries))
        return 0

    return work


def _replay(args: argparse.Namespace) -> Callable[[OpsConnection, Config], int]:
    def work(conn: OpsConnection, _: Config) -> int:
        if args.keys:
            plan = msgs.plan_replay(conn, args.keys)
        elif (sel := _selection(args, msgs.REPLAY_STATES)) is None:
            return 2
        else:
            plan = msgs.plan_matching(conn, sel)
        for key in plan.unknown:
            print(f"unknown message: {key}", file=sys.stderr)
        for key in plan.queued:
            print(f"already queued, not replayed: {key}", file=sys.stderr)
        incomplete = 1 if plan.unknown or plan.queued else 0
        if not plan.ids:
            print("no messages to replay")
            return incomplete
        if not args.yes and not _confirmed(len(plan.ids)):
            return 1
        count = msgs.requeue(conn, plan.ids, time.time())
        print(f"replayed {count} message(s): queued again, the running daemon delivers them within seconds")
        return incomplete

    return work


def _confirmed(count: int) -> bool:
    """Whether the person at the terminal said yes; never without a terminal."""
    if not sys.stdin.isatty():
        print(
            f"wacored: would replay {count} message(s); stdin is not a terminal: pass --yes to replay them",
            file=sys.stderr,
        )
        return False
    try:
        answer = input(f"replay {count} message(s) to their services again? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("not replayed")
    return False

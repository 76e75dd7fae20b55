"""The ``wacored`` command: run, check-config, simulate, dev-env, and the operator's commands on the
store (dlq list|replay|purge, messages show|list|replay (`cli_messages`), sessions reap, status,
services pause|resume|list), which work while the daemon runs, and ``store copy`` (`ops.copy`: a SQLite
store into PostgreSQL, the daemon stopped).

Every subcommand takes ``-c FILE`` (default ``wacored.toml``, or ``$WACORED_CONFIG``) and reads
secrets from the environment; only run, simulate and check-config need the app secret.
``--env-file`` (default ``var/dev.env`` when it exists) fills in variables the environment does not
set: that is where ``make run`` keeps generated local secrets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ENV_ALIASES, Config, ConfigError
from .observe import logs
from .observe.slo import process_started_at
from .version import VERSION

if TYPE_CHECKING:
    from .ops.connection import OpsConnection

log = logging.getLogger(__name__)

DEV_ENV = Path("var/dev.env")
SYSTEM_CONFIG = Path("/etc/wacored/wacored.toml")


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export``, optional quotes).

    Raises:
        ConfigError: the file cannot be read or is not UTF-8 text (at start-up `run` refuses to
            start; on SIGHUP the reload is refused and the old config stays).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the env file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: the env file is not UTF-8 text: {exc.reason} at byte {exc.start}"]) from exc
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def environment(env_file: Path | None) -> dict[str, str]:
    """The process environment, with `env_file`'s values for keys it does not set (`ConfigError` when the
    file exists but cannot be read)."""
    env = dict(os.environ)
    if env_file is not None and env_file.exists():
        for key, value in read_env_file(env_file).items():
            env.setdefault(key, value)
    return env


def load_config(args: argparse.Namespace, *, need_secret: bool = True) -> Config | None:
    """The config with its secrets, or None after printing every problem (to stderr).

    Only what talks to Meta or serves it (`run`, `simulate`) needs the app secret; `check-config` warns
    when it is missing, and the operator's commands work on the store without it.
    """
    try:
        config = Config.load(Path(args.config), environment(args.env_file))
        if need_secret and (problems := config.secret_problems()):
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    if (config := load_config(args, need_secret=False)) is None:
        return 1
    # Only `run` and `simulate` refuse without secrets (docs/operations.md, "Operator commands"): the file
    # may be checked where they are not set. Say what `run` would refuse.
    for problem in config.secret_problems():
        print(f"warning: {problem} (`run` will refuse to start)")
    for warning in config.warnings:
        print(f"warning: {warning}")
    from .http.tls import TLSError, check_ca_file, check_server_tls

    for name, svc in config.services.items():
        try:
            check_ca_file(name, svc.ca_file)
        except TLSError as exc:
            print(f"warning: {exc} (`run` will refuse to start)")
    if config.server.tls:
        # A warning, not an error: the config may be checked on a machine that has no certificate.
        try:
            check_server_tls(config.server.certfile, config.server.keyfile)
        except TLSError as exc:
            print(f"warning: {exc} (`run` will refuse to start)")
    if config.store.url:
        # A warning, like the TLS files: the config may be checked where the database is out of reach.
        from .store.postgres import store_problem

        if why := store_problem(config.store.url):
            print(f"warning: store.url: {why} (`run` will refuse to start)")
    services = ", ".join(config.services)
    print(f"{args.config}: ok ({len(config.services)} services: {services}; listen {config.server.listen})")
    return 0


def cmd_run(args: argparse.Namespace, worker: dict[str, Any] | None = None) -> int:
    """``wacored run``: the daemon, or under ``[server] processes = N > 1`` the supervisor of N
    workers (`workers.py`). `worker` is what `cmd_worker` hands on to `serve_until_signalled`."""
    import trio

    from .actors.supervisor import ActorGaveUp
    from .observe.systemd import Notifier
    from .signals import serve_until_signalled
    from .store import SchemaError, interface

    started = process_started_at()
    if (config := load_config(args)) is None:
        return 1
    # systemd connects stderr to the journal and says so in JOURNAL_STREAM (read here, once).
    logs.setup(args.log_level or config.telemetry.log_level, journald=bool(os.environ.get("JOURNAL_STREAM")))
    for warning in config.warnings:
        log.warning("config warning", extra={"event": "config_warning", "warning": warning})
    failures: list[BaseException] = []
    code = 1

    def refused() -> tuple[type[Exception], ...]:
        """What the environment refused (read when caught: psycopg's errors count once it is loaded)."""
        return (OSError, *interface.STORE_ERRORS, SchemaError, ActorGaveUp)

    def reload() -> Config:
        """The file again, with the environment as it is now (SIGHUP)."""
        new = Config.load(Path(args.config), environment(args.env_file))
        if problems := new.secret_problems():
            raise ConfigError(problems)
        return new

    try:
        # systemd's variables are read here, once, and handed down (none is read deep in the daemon).
        with Notifier.from_environ(os.environ) as notifier:
            if worker is not None:
                code = trio.run(partial(serve_until_signalled, config, reload, notifier=notifier, **worker))
            elif config.server.workers > 1:
                from .workers import PYTHON, Plan, run_supervisor, worker_command

                plan = Plan(worker_command(PYTHON, args.config, str(args.env_file), args.log_level), dict(os.environ))
                # systemd's RuntimeDirectory= (deploy/systemd/), else a temporary directory of our own.
                runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
                code = trio.run(partial(run_supervisor, config, reload, plan, notifier, runtime_dir=runtime_dir))
            else:
                code = trio.run(
                    partial(serve_until_signalled, config, reload, notifier=notifier, process_start=started)
                )
    except* refused() as group:
        # What the environment refused (a port in use, an unwritable store): one clear line each.
        # An actor that crashed has already logged its traceback.
        failures.extend(_leaves(group))
    for failure in failures:
        log.error("cannot run", extra={"event": "run_failed", "error": str(failure)})
        print(f"wacored: cannot run: {failure}", file=sys.stderr)
    return code


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process of ``wacored run`` with ``[server] processes = N`` (started by its
    supervisor, `workers.py`): the daemon, listening at the address of the socket it inherits."""
    import socket
    from contextlib import ExitStack

    from .processes import die_with_parent, parent_gone
    from .siblings import Place
    from .workers import take_seat

    started = process_started_at()
    if not die_with_parent(args.parent_pid):
        print("wacored worker: the supervisor is gone; not starting", file=sys.stderr)
        return 1
    place = Place(args.index, args.count, args.runtime_dir, args.restarts)
    with ExitStack() as stack:
        # The supervisor's socket only holds the port; this worker listens on a socket of its own
        # (SO_REUSEPORT, see `listener.share`).
        with socket.socket(fileno=args.listen_fd) as reserved:
            try:
                seat = stack.enter_context(take_seat(reserved, place))
            except OSError as exc:
                print(f"wacored worker: cannot run: {exc}", file=sys.stderr)
                return 1
        # Every line this worker logs names it (`worker`): the supervisor and every worker share stderr.
        with logs.bound(worker=str(args.index)):
            return cmd_run(
                args,
                worker={
                    "process_start": started,
                    "listener": seat.listener,
                    "place": seat.place,
                    "parent_gone": partial(parent_gone, args.parent_fd),
                },
            )


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def cmd_simulate(args: argparse.Namespace) -> int:
    import httpx

    from .core.whatsapp import sign, text_webhook

    if (config := load_config(args)) is None:
        return 1
    host = config.server.host if config.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = args.url or f"http://{host}:{config.server.port}/webhook"
    body = text_webhook(
        text=args.text,
        sender=args.sender,
        wamid=f"wamid.SIM{uuid.uuid4().hex}",
        timestamp=int(time.time()),
        phone_number_id=args.to or config.whatsapp.phone_number_id or "PHONE_NUMBER_ID",
        kind=args.type,
    )
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": sign(config.whatsapp.app_secret, body)}
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10.0, trust_env=False)
    except httpx.HTTPError as exc:
        print(f"could not reach {url}: {exc}", file=sys.stderr)
        return 2
    print(f"HTTP {response.status_code}")
    for name in ("X-Routed-Service", "X-WA-Core-Latency", "X-Request-ID", "X-Correlation-ID", "Retry-After"):
        if name in response.headers:
            print(f"{name}: {response.headers[name]}")
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.status_code == 200 else 1


def cmd_secrets_new(args: argparse.Namespace) -> int:
    from .core.signing import new_secret

    print(new_secret())
    return 0


def _has_app_secret(env: Mapping[str, str]) -> bool:
    return any(env.get(name) for name in ENV_ALIASES[("whatsapp", "app_secret")])


def cmd_dev_env(args: argparse.Namespace) -> int:
    path: Path = args.path
    if _has_app_secret(os.environ):
        print("wacored: the app secret comes from the environment; no local secrets needed")
        return 0
    if path.exists():
        print(f"wacored: local secrets in {path} (app secret and verify token; mode 0600)")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    content = (
        "# Local development secrets generated by `make run`. Never use these in production.\n"
        f"WACORED_APP_SECRET={secrets.token_hex(32)}\n"
        f"WACORED_VERIFY_TOKEN={secrets.token_urlsafe(24)}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content)
    print(f"wacored: generated local secrets in {path} (mode 0600): WACORED_APP_SECRET, WACORED_VERIFY_TOKEN")
    return 0


def _on_store(args: argparse.Namespace, work: Callable[[OpsConnection, Config], int]) -> int:
    """Run an operator command's `work` on a connection of its own to the configured store, the SQLite
    file or the PostgreSQL database of ``[store] url`` (the daemon may be running); a missing or
    foreign database, or the store refusing, is one line and exit 1."""
    from .ops import operations as ops
    from .ops.connection import open_ops

    if (config := load_config(args, need_secret=False)) is None:
        return 1
    try:
        conn = open_ops(config.store)
        try:
            return work(conn, config)
        finally:
            conn.close()
    except ops.refusals() as exc:
        # psycopg's messages run over several lines (a DETAIL, a HINT): the first says what failed.
        lines = str(exc).strip().splitlines()
        print(f"wacored: {lines[0] if lines else type(exc).__name__}", file=sys.stderr)
        return 1


def _store_copy(args: argparse.Namespace) -> int:
    from .ops.copy import cmd_store_copy  # here: psycopg is not loaded for every command

    return cmd_store_copy(args, partial(load_config, need_secret=False))


def _add_common(sp: argparse.ArgumentParser) -> None:
    """``-c`` and ``--env-file``, taken before or after the subcommand: their defaults are filled in
    after parsing (`_config_defaults`), so a value given in either place is never overwritten."""
    sp.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $WACORED_CONFIG, else ./wacored.toml, else /etc/wacored/wacored.toml)",
    )
    sp.add_argument(
        "--env-file",
        type=Path,
        default=argparse.SUPPRESS,
        help="KEY=VALUE file filling in unset environment variables (default: var/dev.env)",
    )


def find_config(environ: Mapping[str, str], cwd: Path) -> tuple[Path, str]:
    """The config file to use when no ``-c`` was given, and how it was chosen."""
    if named := environ.get("WACORED_CONFIG"):
        return Path(named), "$WACORED_CONFIG"
    for candidate in (cwd / "wacored.toml", SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate, "found"
    return cwd / "wacored.toml", "default"


def _config_defaults(args: argparse.Namespace) -> None:
    if not hasattr(args, "env_file"):
        args.env_file = DEV_ENV
    if not hasattr(args, "config"):
        path, how = find_config(os.environ, Path.cwd())
        args.config = str(path)
        if how == "found" and args.command != "secrets":
            print(f"wacored: using {path} (no -c given)", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wacored", description="WhatsApp webhook core router daemon")
    p.add_argument("--version", action="version", version=f"wacored {VERSION}")
    _add_common(p)
    sub = p.add_subparsers(dest="command", required=True)
    common = _add_common

    run = sub.add_parser("run", help="run the daemon")
    common(run)
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default: [telemetry] log_level"
    )
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="one worker process of `run` (started by it with [server] processes > 1)")
    common(worker)
    worker.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    for name in ("index", "count", "listen-fd", "parent-fd", "parent-pid", "restarts"):
        worker.add_argument(f"--{name}", type=int, required=name != "restarts", default=0)
    worker.add_argument("--runtime-dir", required=True)
    worker.set_defaults(func=cmd_worker)

    check = sub.add_parser("check-config", help="validate a config file and print every problem")
    common(check)
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate", help="post a signed WhatsApp webhook to the running daemon")
    common(sim)
    sim.add_argument("text", help="message text (for --type interactive: the reply id)")
    sim.add_argument("--from", dest="sender", default="250788000001", help="sender phone number")
    sim.add_argument("--type", default="text", choices=["text", "interactive", "location", "image"])
    sim.add_argument(
        "--to", metavar="PHONE_NUMBER_ID", help="the business number written to (default: [whatsapp] phone_number_id)"
    )
    sim.add_argument("--url", help="webhook URL (default: from [server] listen)")
    sim.set_defaults(func=cmd_simulate)

    from .ops import cli_messages, cli_store

    cli_store.add_commands(sub, common, _on_store)
    cli_messages.add_commands(sub, common, _on_store)

    store_cmd = sub.add_parser("store", help="the store itself").add_subparsers(dest="store_command", required=True)
    store_copy = store_cmd.add_parser(
        "copy", help="copy the SQLite store ([store] path) into an empty PostgreSQL database"
    )
    common(store_copy)
    store_copy.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host:port/database")
    store_copy.set_defaults(func=_store_copy)

    secrets_cmd = sub.add_parser("secrets", help="signing secrets for downstream services")
    secrets_sub = secrets_cmd.add_subparsers(dest="secrets_command", required=True)
    new = secrets_sub.add_parser("new", help="print a fresh Standard Webhooks secret (whsec_...)")
    new.set_defaults(func=cmd_secrets_new)

    dev = sub.add_parser("dev-env", help="generate local secrets for development if none are set")
    dev.add_argument("path", type=Path, nargs="?", default=DEV_ENV)
    dev.set_defaults(func=cmd_dev_env)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _config_defaults(args)
    if check := getattr(args, "check", None):
        check(args)  # what argparse cannot say: which options go together
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # Whoever read our output left (`wacored dlq list | head`): nothing more to say, no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

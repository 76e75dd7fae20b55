"""The ``wacored`` command: run, check-config, simulate, dev-env.

Every subcommand takes ``-c FILE`` (default ``wacored.toml``, or ``$WACORED_CONFIG``) and reads
secrets from the environment. ``--env-file`` (default ``var/dev.env`` when it exists) fills in
variables the environment does not set: that is where ``make run`` keeps generated local secrets.
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
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

from . import logs
from .config import ENV_ALIASES, Config, ConfigError
from .slo import process_started_at

log = logging.getLogger(__name__)

DEV_ENV = Path("var/dev.env")


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export``, optional quotes)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def environment(env_file: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if env_file is not None and env_file.exists():
        for key, value in read_env_file(env_file).items():
            env.setdefault(key, value)
    return env


def load_config(args: argparse.Namespace) -> Config | None:
    """The config with its secrets, or None after printing every problem (to stderr)."""
    try:
        config = Config.load(Path(args.config), environment(args.env_file))
        if problems := config.secret_problems():
            raise ConfigError(problems)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return None
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    if (config := load_config(args)) is None:
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}")
    if config.server.tls:
        from .tls import TLSError, check_server_tls

        # A warning, not an error: the config may be checked on a machine that has no certificate.
        try:
            check_server_tls(config.server.certfile, config.server.keyfile)
        except TLSError as exc:
            print(f"warning: {exc} (`run` will refuse to start)")
    services = ", ".join(config.services)
    print(f"{args.config}: ok ({len(config.services)} services: {services}; listen {config.server.listen})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import sqlite3

    import trio

    from .daemon import serve_until_signalled
    from .store import SchemaError
    from .supervisor import ActorGaveUp
    from .systemd import Notifier

    started = process_started_at()
    if (config := load_config(args)) is None:
        return 1
    logs.setup(args.log_level or config.telemetry.log_level)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    failures: list[BaseException] = []
    code = 1

    def reload() -> Config:
        """The file again, with the environment as it is now (SIGHUP)."""
        new = Config.load(Path(args.config), environment(args.env_file))
        if problems := new.secret_problems():
            raise ConfigError(problems)
        return new

    try:
        # systemd's variables are read here, once, and handed down (none is read deep in the daemon).
        with Notifier.from_environ(os.environ) as notifier:
            code = trio.run(partial(serve_until_signalled, config, reload, notifier=notifier,
                                    process_start=started))
    except* (OSError, sqlite3.Error, SchemaError, ActorGaveUp) as group:
        # What the environment refused (a port in use, an unwritable store): one clear line each.
        # An actor that crashed has already logged its traceback.
        failures.extend(_leaves(group))
    for failure in failures:
        log.error("cannot run", extra={"event": "run_failed", "error": str(failure)})
        print(f"wacored: cannot run: {failure}", file=sys.stderr)
    return code


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def cmd_simulate(args: argparse.Namespace) -> int:
    import httpx

    from .whatsapp import sign, text_webhook

    if (config := load_config(args)) is None:
        return 1
    host = config.server.host if config.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = args.url or f"http://{host}:{config.server.port}/webhook"
    body = text_webhook(
        text=args.text, sender=args.sender, wamid=f"wamid.SIM{uuid.uuid4().hex}", timestamp=int(time.time()),
        phone_number_id=config.whatsapp.phone_number_id or "PHONE_NUMBER_ID", kind=args.type,
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wacored", description="WhatsApp webhook core router daemon")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", default=os.environ.get("WACORED_CONFIG", "wacored.toml"),
                        help="config file (default: wacored.toml or $WACORED_CONFIG)")
        sp.add_argument("--env-file", type=Path, default=DEV_ENV,
                        help="KEY=VALUE file filling in unset environment variables (default: var/dev.env)")

    run = sub.add_parser("run", help="run the daemon")
    common(run)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="default: [telemetry] log_level")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print every problem")
    common(check)
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate", help="post a signed WhatsApp webhook to the running daemon")
    common(sim)
    sim.add_argument("text", help="message text (for --type interactive: the reply id)")
    sim.add_argument("--from", dest="sender", default="250788000001", help="sender phone number")
    sim.add_argument("--type", default="text", choices=["text", "interactive", "location", "image"])
    sim.add_argument("--url", help="webhook URL (default: from [server] listen)")
    sim.set_defaults(func=cmd_simulate)

    dev = sub.add_parser("dev-env", help="generate local secrets for development if none are set")
    dev.add_argument("path", type=Path, nargs="?", default=DEV_ENV)
    dev.set_defaults(func=cmd_dev_env)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))

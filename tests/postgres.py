"""PostgreSQL for the tests: which server a run uses, its own fresh database there, and private
throwaway servers that a test may stop and start.

Which server (`find_server`): the one at ``$WACORED_TEST_PG`` (a libpq URL) when that is set; else the
one at 127.0.0.1:5432 when it accepts ``postgres`` without a password (this project's machines and CI
run PostgreSQL 15 there, trust auth); else a private server started here from the ``initdb`` and
``pg_ctl`` of Debian's ``postgresql`` package (``make test`` installs it when they are missing). On the
shared server a run only ever creates and drops its own ``wacored_test_<random>`` database; only a
private server, its own data directory under the temp dir, is ever stopped.

Error handling: when no server can be had, `PgUnavailable` says what was tried and why each failed; the
fixtures turn it into a test failure, never a skip. A private server that does not start raises
`PgUnavailable` with the tail of its log. Cleanup (stop, drop, remove) runs in ``finally`` blocks, and
a test session killed before its cleanup leaves a private server that the next session stops: each
data directory records the pid of the process that made it (`sweep_orphans`).

Cancellation: everything here is blocking (subprocesses, psycopg's sync API), for sync fixtures; an
async test calls `PrivateServer.stop`/`start` through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

ENV = "WACORED_TEST_PG"
SHARED_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
PREFIX = "wacored-pg-"
CONNECT_TIMEOUT_S = 3
START_TIMEOUT_S = 60


class PgUnavailable(Exception):
    """No PostgreSQL could be had; the message says what was tried."""


def unreachable(url: str) -> str | None:
    """None when `url` accepts a connection, else why not (psycopg's message, first line)."""
    try:
        psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True).close()
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def with_dbname(url: str, dbname: str) -> str:
    """`url` naming database `dbname` instead; a URL stays a URL, a ``key=value`` string stays one."""
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path=f"/{dbname}"))
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


def pg_bindir(search: Sequence[Path] | None = None) -> Path | None:
    """The directory holding both ``initdb`` and ``pg_ctl``: `search` when given, else PATH and then
    Debian's ``/usr/lib/postgresql/<version>/bin`` (where the package puts them, off PATH), newest first."""
    if search is None:
        found = shutil.which("pg_ctl")
        on_path = [Path(found).resolve().parent] if found else []
        debian = Path("/usr/lib/postgresql").glob("*/bin")
        by_version = sorted(debian, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)], reverse=True)
        search = [*on_path, *by_version]
    for bindir in search:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_user() -> str | None:
    """initdb and pg_ctl refuse to run as root (the tests do): they run as the ``postgres`` user then."""
    return "postgres" if os.geteuid() == 0 else None


@dataclass
class PrivateServer:
    """A throwaway PostgreSQL of our own: data directory under `root`, 127.0.0.1:`port`, trust auth,
    its socket in `root` (never the shared server's socket directory)."""

    bindir: Path
    root: Path
    port: int
    started_once: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,  # the tests' cwd may be closed to the postgres user
            capture_output=True,
            text=True,
            check=check,
            timeout=START_TIMEOUT_S + 10,
            user=_server_user(),
            group=_server_user(),
        )

    @classmethod
    def create(cls, bindir: Path | None = None) -> PrivateServer:
        """initdb a new cluster (not started). Raises `PgUnavailable` without the binaries."""
        bindir = bindir or pg_bindir()
        if bindir is None:
            raise PgUnavailable(f"no initdb and pg_ctl on PATH or in {DEBIAN_BINDIRS} (`make test` installs them)")
        sweep_orphans(bindir)
        root = Path(tempfile.mkdtemp(prefix=PREFIX))
        (root / "owner").write_text(f"{os.getpid()}\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(bindir, root, free_port())
        try:
            # --no-sync: a throwaway cluster need not reach the disk (initdb took 5.8 s without, 1.4-2.3 s with).
            server._run("initdb", "-D", str(server.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync")  # fmt: skip
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise PgUnavailable(f"initdb failed: {exc.stderr.strip()}") from exc
        with (server.data / "postgresql.conf").open("a") as conf:
            # fsync off loses data only when the machine crashes, never when the server is killed, which is
            # what the tests do to it; a test must never be able to reach the shared server's socket.
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                "fsync = off\nfull_page_writes = off\nmax_connections = 50\n"
            )
        return server

    def start(self) -> None:
        """Start it and wait until it accepts connections. A port taken since it was chosen is changed,
        but only before the first start: afterwards its URL is fixed."""
        for attempt in range(3):
            done = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                             "-t", str(START_TIMEOUT_S), "-o", f"-p {self.port}", check=False)  # fmt: skip
            if done.returncode == 0:
                self.started_once = True
                return
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" in log and attempt < 2 and not self.started_once:
                self.port = free_port()
                continue
            tail = "\n".join(log.splitlines()[-10:])
            raise PgUnavailable(f"pg_ctl start failed ({done.stderr.strip()}); server log:\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``fast``: roll back and disconnect; ``immediate``: as if killed)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(START_TIMEOUT_S))

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def remove(self) -> None:
        """Stop it if it runs, and delete its directory."""
        try:
            if self.data.exists() and self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def sweep_orphans(bindir: Path, tmp: Path | None = None) -> None:
    """Stop and remove the private servers whose making process is gone (a test session killed before
    its cleanup). Only directories this module made (prefix and ``owner`` file) are touched."""
    for root in Path(tmp or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((root / "owner").read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        PrivateServer(bindir, root, 0).remove()


@dataclass(frozen=True)
class Server:
    """The server a test run uses: `url` reaches its ``postgres`` database; `private` when it is ours."""

    url: str
    how: str
    private: PrivateServer | None = None


@contextlib.contextmanager
def find_server(
    env_url: str | None, shared_url: str = SHARED_URL, bindirs: Sequence[Path] | None = None
) -> Iterator[Server]:
    """The server for this run (see the module docstring); a private one is removed on exit.
    Raises `PgUnavailable` naming each thing tried."""
    if env_url:
        if why := unreachable(env_url):
            raise PgUnavailable(f"${ENV} is set but its server does not answer: {why}")
        yield Server(env_url, f"${ENV}")
        return
    tried = [f"${ENV} is not set"]
    why = unreachable(shared_url)
    if why is None:
        yield Server(shared_url, f"the shared server at {shared_url}")
        return
    tried.append(f"{shared_url}: {why}")
    bindir = pg_bindir(bindirs)
    if bindir is None:
        where = ", ".join(map(str, bindirs)) if bindirs is not None else f"PATH and {DEBIAN_BINDIRS}"
        tried.append(f"no initdb and pg_ctl in {where} (`make test` installs Debian's postgresql)")
        raise PgUnavailable("no PostgreSQL for the tests: " + "; ".join(tried))
    try:
        private = PrivateServer.create(bindir)
    except PgUnavailable as exc:
        raise PgUnavailable("no PostgreSQL for the tests: " + "; ".join([*tried, str(exc)])) from exc
    try:
        private.start()
        yield Server(private.url, f"a private server at {private.url}", private)
    finally:
        private.remove()


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database of this run on the server at `server_url`: its URL. Dropped on exit (with
    the connections still open to it, and only it)."""
    name = f"wacored_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def with_search_path(url: str, schema: str) -> str:
    """`url` with its sessions' ``search_path`` set to `schema` (libpq's ``options``): wacored's tables
    are then created and read there. A URL stays a URL (``[store] url`` takes only those)."""
    option = f"-csearch_path={schema}"
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        query = "&".join(q for q in (parts.query, urlencode({"options": option})) if q)
        return urlunsplit(parts._replace(query=query))
    return psycopg.conninfo.make_conninfo(url, options=option)


@contextlib.contextmanager
def own_schema(db_url: str) -> Iterator[str]:
    """A new, empty schema in the database at `db_url` (shared by the whole run): the URL of a session
    that uses it. Dropped with everything in it on exit, so tests never see each other's rows."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(db_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield with_search_path(db_url, name)
    finally:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as admin:
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

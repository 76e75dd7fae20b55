"""The PostgreSQL the tests get (tests/postgres.py): the run's own fresh database, private servers a test
may take down, and the finder's choice when the shared server does not answer."""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from .postgres import PgUnavailable, PrivateServer, find_server, fresh_database, sweep_orphans, with_dbname


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens, held (bound, never listening) so nothing else takes it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def databases(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}


def user_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        return [name for (name,) in tables]


def test_the_runs_database_is_its_own_and_answers(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    name = row[0]
    assert name.startswith("wacored_test_")
    assert name not in {"test", "postgres", "template0", "template1"}
    assert name in databases(with_dbname(pg_url, "postgres"))


def test_a_fresh_database_has_no_tables_and_is_dropped_afterwards(pg_url: str) -> None:
    server_url = with_dbname(pg_url, "postgres")
    with fresh_database(server_url) as url:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        assert user_tables(url) == []
        assert name in databases(server_url)
        assert name != psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
        held = psycopg.connect(url, autocommit=True)  # a connection left open does not keep it alive
    assert name not in databases(server_url)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()


def test_two_connections_see_each_others_commits(pg_url: str) -> None:
    table = sql.Identifier(f"seen_{secrets.token_hex(4)}")
    with psycopg.connect(pg_url) as a, psycopg.connect(pg_url) as b:
        a.execute(sql.SQL("CREATE TABLE {} (n int)").format(table))
        a.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
        a.commit()
        assert b.execute(sql.SQL("SELECT n FROM {}").format(table)).fetchall() == [(1,)]
        b.commit()
        b.execute(sql.SQL("INSERT INTO {} VALUES (2)").format(table))
        assert a.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone() == (1,)  # not yet
        a.commit()
        b.commit()
        assert a.execute(sql.SQL("SELECT n FROM {} ORDER BY n").format(table)).fetchall() == [(1,), (2,)]
        a.execute(sql.SQL("DROP TABLE {}").format(table))
        a.commit()


def test_a_private_server_stops_and_starts_again(private_pg: PrivateServer) -> None:
    url = private_pg.url
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    private_pg.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    private_pg.start()
    assert private_pg.url == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(7,)]


def test_without_the_shared_server_the_finder_starts_a_private_one(closed_port: int) -> None:
    shared = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    with find_server(None, shared) as server:
        assert server.private is not None
        assert server.url == server.private.url != shared
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        assert Path(row[0]) == server.private.data
        root = server.private.root
    assert not root.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)


def test_with_no_server_and_no_binaries_the_failure_says_what_was_tried(closed_port: int, tmp_path: Path) -> None:
    shared = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    with pytest.raises(PgUnavailable) as failed, find_server(None, shared, bindirs=[tmp_path]):
        pass
    message = str(failed.value)
    assert "WACORED_TEST_PG is not set" in message
    assert f"127.0.0.1:{closed_port}" in message
    assert "initdb" in message
    assert str(tmp_path) in message


def test_an_unreachable_env_server_fails_and_is_named(closed_port: int) -> None:
    with (
        pytest.raises(PgUnavailable, match="WACORED_TEST_PG is set"),
        find_server(f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"),
    ):
        pass


def test_a_private_server_left_by_a_dead_session_is_swept() -> None:
    orphan = PrivateServer.create()
    try:
        orphan.start()
        dead = subprocess.Popen(["true"])  # its pid: a process that has exited
        dead.wait()
        (orphan.root / "owner").write_text(f"{dead.pid}\n")
        sweep_orphans(orphan.bindir)
        assert not orphan.root.exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(orphan.url, connect_timeout=2)
    finally:
        orphan.remove()

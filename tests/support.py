"""Helpers shared by several test modules (never import one test module from another)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from wacored.store import WriteConnection

POLL_S = 0.05


async def wait_until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll `check` until it holds (it reads state: the store, a downstream), failing after `timeout_s`."""
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 -- a file or a server, which signal nothing
            await trio.sleep(POLL_S)


def read(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What `sql` reads from the SQLite file at `path`, on a connection of its own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class DiskFull:
    """A switch for `FullDiskConnection`s: while `full`, every COMMIT fails as SQLite's does on a
    full disk (SQLITE_FULL), and the transaction is rolled back; `commits_refused` counts them."""

    def __init__(self) -> None:
        self.full = False
        self.commits_refused = 0

    def connection(self, path: Path, busy_timeout_ms: int = 5000) -> WriteConnection:
        return FullDiskConnection(self, path, busy_timeout_ms)


class FullDiskConnection(WriteConnection):
    def __init__(self, disk: DiskFull, path: Path, busy_timeout_ms: int) -> None:
        super().__init__(path, busy_timeout_ms)
        self.disk = disk

    def commit(self) -> None:
        if self.disk.full:
            self.disk.commits_refused += 1
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[misc]
            raise error
        super().commit()

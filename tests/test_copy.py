"""``wacored store copy`` (`wacored.ops.copy`): a SQLite store that a daemon wrote (delivered messages,
their attempts, sessions, rate hits, the actors' runs) plus queued rows, a dead letter and a pause,
copied into a fresh PostgreSQL schema; a daemon on that database then delivers what was queued,
refuses a copied wamid as a duplicate and numbers new rows after the copied ids."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from wacored.config import Config
from wacored.core.whatsapp import text_webhook
from wacored.ops.copy import IDENTITIES, TABLES

from .conftest import Downstream, config_mapping, make_config, open_daemon, rows
from .postgres import own_schema
from .support import add_dead_letter, add_message, operator_config, pg_rows, run_cli, until_settled, until_settled_pg


@pytest.fixture
def pg(pg_url: str) -> Iterator[str]:
    with own_schema(pg_url) as url:
        yield url


async def test_a_copied_store_carries_on_in_postgresql(
    tmp_path: Path, pg: str, services: Downstream, graph: Downstream
) -> None:
    db = tmp_path / "wacored.db"
    delivered = [f"wamid.COPIED{i}" for i in range(3)]
    async with open_daemon(make_config(tmp_path, services, graph)) as daemon:
        for i, wamid in enumerate(delivered):
            body = text_webhook(text="rides", sender=f"25078805000{i}", wamid=wamid, timestamp=int(time.time()))
            assert (await daemon.post(body)).status_code == 200
        await until_settled(db)
    queued = [f"wamid.QUEUED{i}" for i in range(4)]
    with closing(sqlite3.connect(db)) as conn, conn:
        for wamid in queued:
            add_message(conn, wamid, target="jobs")
        add_dead_letter(conn, "wamid.DEAD0")
        conn.execute("INSERT INTO service_pauses (service, paused_at, reason) VALUES ('wallet', 1.0, 'maintenance')")
        conn.execute("INSERT OR IGNORE INTO runs (actor, last_run, next_run, result) VALUES ('reaper', 1.0, 2.0, 'ok')")
    before = {t: rows(db, f"SELECT * FROM {t} ORDER BY {'id' if t in IDENTITIES else 'rowid'}") for t in TABLES}
    assert all(before.values()), {t for t, r in before.items() if not r}  # rows of every kind

    mapping = config_mapping(tmp_path, services.url, graph.url)
    command = ("store", "copy", "--to", pg, "-c", str(operator_config(tmp_path, mapping)), "--env-file", "/none")
    result = await run_cli(*command)
    assert result.returncode == 0, result.stderr
    assert f"messages: {len(before['messages'])} row(s)" in result.stdout.decode()
    for table in TABLES:
        order = "id" if table in IDENTITIES else "ctid"
        copied = pg_rows(pg, f"SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 -- the module's table names
        assert [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in copied] == before[table], table

    again = await run_cli(*command)
    assert again.returncode == 1
    assert b"not empty" in again.stderr

    config = Config.from_mapping(config_mapping(tmp_path, services.url, graph.url, store={"url": pg}), {})
    async with open_daemon(config) as daemon:
        await until_settled_pg(pg)
        redelivery = text_webhook(text="rides", sender="250788050000", wamid=delivered[0], timestamp=int(time.time()))
        answer = await daemon.post(redelivery)
        assert answer.json() == {"accepted": 0, "duplicates": 1, "statuses": 0, "routes": []}
        assert (await daemon.send_text("jobs", sender="250788050009")).json()["accepted"] == 1
        await until_settled_pg(pg)
    assert sorted(r.headers["idempotency-key"] for r in services.on("/jobs"))[: len(queued)] == queued
    assert sorted(r.headers["idempotency-key"] for r in services.on("/rides")) == delivered  # none twice
    # The new row's id follows the copied ones (not necessarily at once: the refused redelivery's
    # insert took a number from the sequence too); had the sequence not moved, its insert would have
    # collided with copied row 1.
    last = max(r[0] for r in before["messages"])
    assert pg_rows(pg, "SELECT COUNT(*) FROM messages WHERE id > ?", last) == [(1,)]

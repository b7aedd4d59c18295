"""The daemon with ``database.capture = logical`` on a real server: rows from the stream
(no query per change), LSN revisions, the barrier, a lost stream, no slot left behind."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from tests.conftest import RunningDaemon, start_in_process, stop_all

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def lschema(logical_dsn: str) -> AsyncIterator[str]:
    name = f"l_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE SCHEMA {name}")
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


@pytest.fixture
async def start_logical(logical_dsn: str) -> AsyncIterator[Any]:
    running: list[RunningDaemon] = []

    async def start(tables: list[str], wait: bool = True, **settings: Any) -> RunningDaemon:
        values: dict[str, Any] = {
            "dsn": logical_dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "capture": "logical",
            "ping_interval": 1.0,
            "ping_timeout": 1.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "grace_period": 2.0,
            "tables": tuple(cfg.parse_table_spec(t, "test") for t in tables),
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, wait, "daemon")

    yield start
    await stop_all(running)


async def test_rows_come_from_the_stream(logical_dsn: str, lschema: str, start_logical: Any) -> None:
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {lschema}.t (id int PRIMARY KEY, name text, n numeric, at timestamptz)")
    await conn.execute(f"INSERT INTO {lschema}.t VALUES (1, 'a', 1.50, '2020-01-01 00:00+02')")
    daemon = await start_logical([f"{lschema}.t"])
    engine = daemon.engine
    table = daemon.core.tables[f"{lschema}.t"]
    assert table.streamed
    await conn.execute(f"INSERT INTO {lschema}.t VALUES (2, 'b', 2.250, 'infinity')")
    await conn.execute(f"UPDATE {lschema}.t SET name = 'A' WHERE id = 1")
    await conn.execute(f"DELETE FROM {lschema}.t WHERE id = 2")
    await engine.sync()
    want = await conn.fetch(f"SELECT id, row_to_json(t.*)::text AS j FROM {lschema}.t t ORDER BY id")
    got = {k[0]: v for k, v in table.rows.items()}
    assert sorted(got) == [r["id"] for r in want]
    from sidecar.core.wire import row_json

    for r in want:
        assert row_json(got[r["id"]]).decode() == r["j"]
    assert table.refetches == 0 and table.reloads == 1
    lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    assert engine.revision.number > 0
    await conn.close()
    print(engine.revision, lsn)

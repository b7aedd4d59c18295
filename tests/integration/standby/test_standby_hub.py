"""A hub whose database.dsn is a hot standby (issue 23, item 2): it decodes there, loads
there, and the primary sees only its barriers."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from sidecar.core.wire import row_json
from tests.support.standby import StandbyPair

pytestmark = pytest.mark.asyncio


async def _rows(conn: asyncpg.Connection, table: str) -> dict[int, str]:
    rows = await conn.fetch(f"SELECT id, row_to_json(t.*)::text AS j FROM {table} t")
    return {r["id"]: r["j"] for r in rows}


def _cached(daemon: Any, table: str) -> dict[int, str]:
    return {k[0]: row_json(v).decode() for k, v in daemon.core.tables[table].rows.items()}


async def test_rows_served_are_the_primarys(standby_pair: StandbyPair, sschema: str, start_on_standby: Any) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await primary.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 100) g")
    daemon = await start_on_standby([table])
    assert daemon.daemon.primary is not None
    await daemon.engine.sync()
    assert _cached(daemon, table) == await _rows(primary, table)
    await primary.execute(f"UPDATE {table} SET v = 'new' WHERE id = 7")
    await primary.execute(f"DELETE FROM {table} WHERE id = 8")
    await daemon.engine.sync()  # (a barrier: covers every commit made on the primary before it)
    assert _cached(daemon, table) == await _rows(primary, table)
    assert daemon.core.tables[table].refetches == 0
    await primary.close()

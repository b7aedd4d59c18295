"""A lost replication stream is reconnected after the shortest delay each time, as a lost
LISTEN connection is: losses one after the other do not add up to a long backoff."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from sidecar.core.wire import row_json
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

RECONNECT_MIN_DELAY = 1.0  # with backoff, the 4th loss in a row would wait 8 s, the 5th 16 s


@pytest.fixture
async def table(logical_dsn: str) -> AsyncIterator[str]:
    schema = f"r_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id int PRIMARY KEY, v text)")
    await conn.execute(f"INSERT INTO {schema}.t VALUES (1, 'a')")
    yield f"{schema}.t"
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()


@pytest.fixture
async def daemon(logical_dsn: str, table: str) -> AsyncIterator[RunningDaemon]:
    running: list[RunningDaemon] = []
    config = cfg.Config(
        dsn=logical_dsn,
        listen=("127.0.0.1:0",),
        install_triggers=True,
        capture="logical",
        reconnect_min_delay=RECONNECT_MIN_DELAY,
        reconnect_max_delay=30.0,
        tables=(cfg.parse_table_spec(table, "test"),),
    )
    yield await start_in_process(config, running, True, "daemon")
    await stop_all(running)


async def test_each_lost_stream_reconnects_after_the_shortest_delay(
    logical_dsn: str, table: str, daemon: RunningDaemon
) -> None:
    source: Any = daemon.daemon.source
    conn = await asyncpg.connect(logical_dsn)
    try:
        await eventually(lambda: source.slot.streaming, 15, what="streaming")
        for loss in range(1, 6):
            connects = source.connects
            killed = await conn.fetchval(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
                source.slot.name,
            )
            assert killed, f"loss {loss}: no walsender for slot {source.slot.name}"
            lost_at = time.monotonic()
            await eventually(lambda loss=loss: source.losses >= loss, 10, what=f"loss {loss} noticed")
            await eventually(
                lambda connects=connects: source.connects > connects and source.slot.streaming,
                30,
                what=f"streaming again after loss {loss}",
            )
            took = time.monotonic() - lost_at
            # (the shortest delay is at most RECONNECT_MIN_DELAY; the rest is a new slot and a load)
            assert took < RECONNECT_MIN_DELAY + 4.0, f"loss {loss}: streaming again after {took:.1f}s"
        await conn.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")
        await daemon.engine.sync()
        assert b'"v":"b"' in row_json(daemon.core.tables[table].rows[(1,)])  # (and it streams on)
    finally:
        await conn.close()

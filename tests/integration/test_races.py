"""The races of the consistency model, forced deterministically against a real
PostgreSQL: pause a query after it read, commit, let the real notification
arrive (or kill the listener), then let the stale answer land."""

from __future__ import annotations

import asyncio
import random

import pytest
from cache_sidecar_client import AsyncClient

from tests.support import gate as gating
from tests.support.gate import GATE
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture(autouse=True)
def gated(monkeypatch):
    monkeypatch.setattr("sidecar.app.PgDatabase", gating.GatedPgDatabase)
    GATE.open()
    yield
    GATE.open()


@pytest.fixture
async def items(db, schema) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 1 FROM generate_series(1, 10) g"
    )
    return f"{schema}.items"


async def commit_and_deliver(sidecar, db, sql: str) -> None:
    """Commit ``sql`` and wait until the sidecar has received its notification."""
    before = sidecar.core.notices.stats.events
    await db.execute(sql)
    await eventually(lambda: sidecar.core.notices.stats.events > before, what="notification received")


async def test_lazy_fill_that_read_before_a_commit_is_never_stored(start_daemon, db, items):
    sidecar = await start_daemon([f"{items}:lazy"])
    table = sidecar.core.tables[items]
    async with AsyncClient(sidecar.target) as cache:
        GATE.close()
        reader = asyncio.create_task(cache.get(items, 1))
        await GATE.held()  # the fill has read version 1
        await commit_and_deliver(sidecar, db, f"UPDATE {items} SET version = 2 WHERE id = 1")
        GATE.open()
        assert (await reader)["version"] == 1  # concurrent with the commit: fair
        assert (1,) not in table.cache  # ... but never kept
        assert (await cache.get(items, 1))["version"] == 2


# (full tables read whole take their rows from the stream in logical mode: no refetch to race)
@pytest.mark.captures("notify")
async def test_full_refetch_that_read_before_a_newer_commit_cannot_satisfy_it(start_daemon, db, items):
    sidecar = await start_daemon([items])
    table = sidecar.core.tables[items]
    async with AsyncClient(sidecar.target) as cache:
        GATE.close()
        await commit_and_deliver(sidecar, db, f"UPDATE {items} SET version = 2 WHERE id = 1")
        await GATE.held()  # refetch A read version 2
        await commit_and_deliver(sidecar, db, f"UPDATE {items} SET version = 3 WHERE id = 1")
        reader = asyncio.create_task(cache.get(items, 1))  # begins after version 3's notification
        await eventually(lambda: len(table._waiters.get((1,), ())) == 1, what="the read waiting on the key")
        assert not reader.done()
        assert GATE.waiting == 1  # no second refetch of the key while A is in flight
        GATE.open()  # A lands (2), then B is sent and lands (3)
        assert (await reader)["version"] == 3
        assert table.refetches >= 2 and table.low_water() is None


@pytest.mark.captures("notify")
async def test_full_refetch_in_flight_across_a_reconnect_is_superseded(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        GATE.close()
        await commit_and_deliver(sidecar, db, f"UPDATE {items} SET version = 2 WHERE id = 1")
        await GATE.held()  # the refetch read version 2
        history = sidecar.history
        await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
        await db.execute(f"UPDATE {items} SET version = 3 WHERE id = 1")  # maybe never notified
        await eventually(lambda: sidecar.core.trust.up and sidecar.history != history)
        table = sidecar.core.tables[items]
        await eventually(  # the reload is due and its dispatch has run
            lambda: table._reload_needed > table._reload_done and table._dispatch_handle is None
        )
        # The reload waits for the old refetch to land, so the old one can never land last.
        assert GATE.waiting == 1 and not table._reloading
        GATE.open()
        await eventually(lambda: sidecar.engine.ready, what="rebuilt")
        assert (await cache.get(items, 1))["version"] == 3


async def test_lazy_fill_in_flight_across_a_reconnect_is_not_stored(start_daemon, db, items):
    sidecar = await start_daemon([f"{items}:lazy"])
    table = sidecar.core.tables[items]
    async with AsyncClient(sidecar.target) as cache:
        GATE.close()
        reader = asyncio.create_task(cache.get(items, 1))
        await GATE.held()
        history = sidecar.history
        await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
        await db.execute(f"UPDATE {items} SET version = 5 WHERE id = 1")
        await eventually(lambda: sidecar.engine.ready and sidecar.history != history, what="reconnect")
        GATE.open()
        await reader
        assert (1,) not in table.cache
        assert (await cache.get(items, 1))["version"] == 5


async def test_writes_during_the_initial_load_are_not_lost(start_daemon, db, schema):
    """Race-free load: LISTEN is active before the snapshot; changes that
    arrive while a large table loads are applied after it."""
    rows = 200_000
    await db.execute(
        f"CREATE TABLE {schema}.big (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.big SELECT g, 0 FROM generate_series(1, {rows}) g"
    )
    table = f"{schema}.big"
    GATE.close()  # hold the loaded snapshot until writes have happened after it
    sidecar = await start_daemon([table], wait=False)
    await GATE.held()
    rng = random.Random(5)
    touched = {rng.randrange(1, rows + 1) for _ in range(300)}
    for key in touched:  # committed after the snapshot, notified during the load
        await db.execute(f"UPDATE {table} SET version = version + 1 WHERE id = $1", key)
    await db.execute(f"DELETE FROM {table} WHERE id = 1; INSERT INTO {table} VALUES ({rows + 1}, 7)")
    if sidecar.capture == "notify":  # (a logical stream starts at the load's snapshot once it is loaded)
        await eventually(lambda: sidecar.core.notices.stats.events >= len(touched) + 2, what="notifications")
    GATE.open()
    await sidecar.ready()
    async with AsyncClient(sidecar.target) as cache:
        await cache.sync()
        expected = {r["id"]: r["version"] for r in await db.fetch(f"SELECT id, version FROM {table}")}
        held = sidecar.core.tables[table]
        assert held.row_count == len(expected)
        ids = sorted(expected)
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            got = await cache.batch_get(table, chunk)
            assert [r["version"] for r in got] == [expected[i] for i in chunk]
        assert await cache.get(table, 1) is None

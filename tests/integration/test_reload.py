"""Whole-table reloads against a real PostgreSQL: reads meanwhile are answered
from the database at once and never stale; a Watch initial state streamed from

pytestmark = pytest.mark.captures("notify", "logical")
a shared snapshot stays exact while the table changes and reloads under it.

The reload is made slow deterministically: the test database wrapper holds
every load at ``LOADS`` after it read the table (fetches pass)."""

from __future__ import annotations

import asyncio

import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, InitialStateDone, Revision

from sidecar import config as cfg
from sidecar.core.full import FullTable
from tests.support import gate as gating
from tests.support.gate import LOADS
from tests.support.waiting import eventually


@pytest.fixture(autouse=True)
def gated(monkeypatch):
    monkeypatch.setattr("sidecar.app.PgDatabase", gating.GatedPgDatabase)
    LOADS.open()
    yield
    LOADS.open()


@pytest.fixture
async def items(db, schema) -> cfg.TableConfig:
    await db.execute(
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL, grp int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 1, g % 2 FROM generate_series(1, 20) g"
    )
    return cfg.TableConfig(schema=schema, name="items", indexes=(cfg.IndexConfig("by_grp", ("grp",)),))


def full(sidecar, name: str) -> FullTable:
    table = sidecar.core.tables[name]
    assert isinstance(table, FullTable)
    return table


async def test_reads_during_a_reload_come_from_the_database_and_are_never_stale(start_daemon, db, items):
    name = items.qualified
    sidecar = await start_daemon([items], bulk_threshold=5)
    table = full(sidecar, name)
    async with AsyncClient(sidecar.target) as cache:
        LOADS.close()
        await db.execute(f"UPDATE {name} SET version = 2")  # 20 rows: one whole-table event
        await LOADS.held()  # the reload read the table (version 2) and waits
        assert table.reloading
        before = sidecar.core.reads.stats.database_reads[name]
        assert (await cache.get(name, 1, timeout=5))["version"] == 2
        # writes committed during the reload are seen by reads that begin after them
        await db.execute(f"UPDATE {name} SET version = 3 WHERE id = 3")
        await db.execute(f"INSERT INTO {name} VALUES (100, 3, 1)")
        await db.execute(f"DELETE FROM {name} WHERE id = 4")
        assert (await cache.get(name, 3, timeout=5))["version"] == 3
        assert await cache.get(name, 4, timeout=5) is None
        rows = await cache.batch_get(name, [1, 3, 4, 100], timeout=5)
        assert [r and r["version"] for r in rows] == [2, 3, None, 3]
        odd = await cache.query(name, "by_grp", [1], timeout=5)
        assert {r["id"]: r["version"] for r in odd.rows} == {i: 3 if i == 3 else 2 for i in range(1, 21, 2)} | {100: 3}
        assert (await cache.get(name, 5, consistency="strong", timeout=5))["version"] == 2
        received = Revision(
            sidecar.core.revisions.epoch, sidecar.core.revisions.seq
        )  # received, not applied: the reload holds it
        assert sidecar.core.revisions.applied < received.number
        assert (await cache.get(name, 3, min_revision=received, timeout=5))["version"] == 3
        assert table.reloading and LOADS.waiting == 1  # all of that while the reload was held
        assert sidecar.core.reads.stats.database_reads[name] > before
        LOADS.open()
        await eventually(lambda: not table.reloading, what="the reload landed")
        # memory again: the reload's rows and, after them, the writes made meanwhile
        rows = await cache.batch_get(name, [1, 3, 4, 100], consistency="strong", timeout=5)
        assert [r and r["version"] for r in rows] == [2, 3, None, 3]
        served = sidecar.core.reads.stats.database_reads[name]
        assert (await cache.get(name, 3, timeout=5))["version"] == 3
        assert sidecar.core.reads.stats.database_reads[name] == served  # (from memory)
        assert table.reloads == 2


async def test_repeated_invalidations_coalesce_and_never_block_reads(start_daemon, db, items):
    name = items.qualified
    sidecar = await start_daemon([items])
    table = full(sidecar, name)
    async with AsyncClient(sidecar.target) as cache:
        LOADS.close()
        await cache.invalidate(name)  # reload 2 starts and is held
        await LOADS.held()
        for version in range(5, 10):
            await db.execute(f"UPDATE {name} SET version = {version} WHERE id = 1")
            await cache.invalidate(name)
            assert (await cache.get(name, 1, timeout=5))["version"] == version
        assert table.reloads == 1 and LOADS.waiting == 1
        LOADS.open()
        await eventually(lambda: not table.reloading, what="the reloads landed")
        assert table.reloads == 3  # the one held, then one for all five invalidations
        assert (await cache.get(name, 1, timeout=5))["version"] == 9


async def test_an_initial_state_stays_exact_while_the_table_changes_and_reloads_under_it(start_daemon, db, schema):
    await db.execute(
        f"CREATE TABLE {schema}.wide (id int PRIMARY KEY, version int NOT NULL, pad text NOT NULL);"
        f"INSERT INTO {schema}.wide SELECT g, 1, repeat('x', 2000) FROM generate_series(1, 30000) g"
    )
    name = f"{schema}.wide"
    sidecar = await start_daemon([name], bulk_threshold=200)
    table = full(sidecar, name)
    async with AsyncClient(sidecar.target) as watcher, AsyncClient(sidecar.target) as cache:
        stream = watcher.watch([name], initial_state=True)
        first = await asyncio.wait_for(anext(stream), 10)
        assert isinstance(first, ChangeBatch)
        # The client reads no further: the stream waits with most of the snapshot unsent
        # (60 MB of rows), its snapshot alive.
        assert table.store.snapshots == 1
        await db.execute(f"UPDATE {name} SET version = 2 WHERE id BETWEEN 20000 AND 20100")  # keyed
        await db.execute(f"DELETE FROM {name} WHERE id BETWEEN 29000 AND 29050")
        await db.execute(f"INSERT INTO {name} SELECT g, 2, 'y' FROM generate_series(50000, 50010) g")
        await cache.sync()
        await db.execute(f"UPDATE {name} SET version = 3 WHERE id <= 25000")  # bulk: a reload
        await eventually(lambda: table.reloads == 2 and not table.reloading, what="the reload landed")
        await cache.sync()
        assert table.store.snapshots == 1
        snapshot: dict[int, int] = {change.key: change.row["version"] for change in first.changes}
        async with asyncio.timeout(30):
            async for item in stream:
                if isinstance(item, InitialStateDone):
                    break
                assert isinstance(item, ChangeBatch)
                for change in item.changes:
                    assert change.key not in snapshot
                    snapshot[change.key] = change.row["version"]
        await stream.aclose()
    assert snapshot == {i: 1 for i in range(1, 30001)}  # exactly the table as of the revision announced

"""A STRONG read waits for its own table only: another table's reload does not hold it
up, while a change of its own table not applied yet still does (and Sync waits for all)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.assembly import Direct, direct
from sidecar.core.events import Op, RowChange, TableChange
from sidecar.core.full import FullTable
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually, quiescent
from tests.unit.test_reload_reads import HeldLoads, row

BIG, ITEMS = "public.big", "public.items"


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(int_key_schema(BIG), int_key_schema(ITEMS))
    for i in range(1, 4):
        db.put(BIG, (i,), name=f"b{i}")
        db.put(ITEMS, (i,), name=f"v{i}")
    return db


@pytest.fixture
async def core(db: MemoryDatabase):
    loads = HeldLoads(db, only=BIG)
    source = MemoryChangeSource(db)
    core = direct(db, list(db.schemas.values()))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    core.engine.loads = loads  # type: ignore[attr-defined]
    yield core
    loads.gate.set()
    following.cancel()
    await core.close()


def items(core: Direct) -> FullTable:
    table = core.tables[ITEMS]
    assert isinstance(table, FullTable)
    return table


async def big_reloading(core: Direct) -> None:
    loads: HeldLoads = core.engine.loads  # type: ignore[attr-defined]
    loads.gate.clear()
    core.notices.handle(TableChange("public", "big", Op.TRUNCATE, 900, "bulk"))
    await eventually(lambda: loads.waiting == 1, what="the reload of public.big held")


async def quickly(awaitable):
    return await asyncio.wait_for(awaitable, 2)


async def test_a_strong_read_is_not_held_up_by_another_tables_reload(core, db):
    await big_reloading(core)
    db.put(ITEMS, (1,), name="new")
    core.notices.handle(RowChange("public", "items", Op.UPDATE, 901, ((1,),)))
    await quickly(core.engine.prepare_read(True, None, items(core)))  # (a global barrier waits for big)
    assert await quickly(core.engine.get(ITEMS, [1])) == row("new")
    assert core.tables[BIG].reloading  # type: ignore[attr-defined]
    assert core.revisions.applied < core.revisions.applied_for(ITEMS)


async def test_a_strong_read_still_waits_for_its_own_tables_changes(core, db):
    db.hold()  # the refetch of items' change waits
    db.put(ITEMS, (2,), name="changed")
    core.notices.handle(RowChange("public", "items", Op.UPDATE, 902, ((2,),)))
    await db.held(1)
    strong = asyncio.create_task(core.engine.prepare_read(True, None, items(core)))
    await eventually(lambda: core.trust.barrier is not None and core.trust.barrier.rounds >= 1, what="a barrier round")
    await quiescent()
    assert not strong.done()  # the token is back, but the refetch has not landed
    db.release()
    await quickly(strong)
    assert await quickly(core.engine.get(ITEMS, [2])) == row("changed")


async def test_sync_waits_for_every_table(core, db):
    await big_reloading(core)
    sync = asyncio.create_task(core.engine.sync())
    strong = asyncio.create_task(core.engine.prepare_read(True, None, items(core)))
    await quickly(strong)
    assert not sync.done()  # Sync promises every table: it waits for big's reload
    core.engine.loads.gate.set()  # type: ignore[attr-defined]
    await quickly(sync)


async def test_a_strong_read_is_not_held_up_by_a_sync_waiting_for_another_tables_reload(core, db):
    await big_reloading(core)
    sync = asyncio.create_task(core.engine.sync())  # its round waits for big's reload ...
    await eventually(lambda: core.trust.barrier.landing == 1, what="the Sync's token back")
    db.put(ITEMS, (1,), name="later")
    core.notices.handle(RowChange("public", "items", Op.UPDATE, 904, ((1,),)))
    await quickly(core.engine.prepare_read(True, None, items(core)))  # ... the next round does not
    assert await quickly(core.engine.get(ITEMS, [1])) == row("later")
    assert not sync.done()
    core.engine.loads.gate.set()  # type: ignore[attr-defined]
    await quickly(sync)


async def test_a_waiting_strong_read_is_released_when_the_listener_goes(core, db):
    db.hold()
    core.notices.handle(RowChange("public", "items", Op.UPDATE, 903, ((3,),)))
    await db.held(1)
    strong = asyncio.create_task(core.engine.prepare_read(True, None, items(core)))
    await eventually(
        lambda: (
            core.trust.barrier is not None and core.trust.barrier._current is None and core.trust.barrier.rounds >= 1
        )
    )
    await eventually(lambda: core.revisions._moved is not None, what="the read waiting for its table")
    core.notices.source_lost("test")
    await quickly(strong)  # (reads go to the database now)
    db.release()

"""Reads of a full table while it reloads, through the core with fakes: answered
from the database at once (EVENTUAL, STRONG, min_revision), and never contradicted
by memory once the reload landed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.core.assembly import Direct, direct
from sidecar.core.engine import Revision
from sidecar.core.events import Op, RowChange, TableChange
from sidecar.core.full import FullTable
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.wire import entry
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

T = "public.items"


def row(value: str) -> bytes:
    return entry(('{"name":"' + value + '"}').encode())


class HeldLoads:
    """Loads (only; of table ``only``, if given) that read their snapshot, then wait until
    ``gate`` is set."""

    def __init__(self, db: MemoryDatabase, only: str | None = None) -> None:
        self._load = db.load
        self._only = only
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        db.load = self.load  # type: ignore[method-assign]

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        chunks = [chunk async for chunk in self._load(schema)]
        if self._only in (None, schema.qualified):
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        for chunk in chunks:
            yield chunk


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(int_key_schema(T))
    for i in range(1, 4):
        db.put(T, (i,), name=f"v{i}")
    return db


@pytest.fixture
def source(db: MemoryDatabase) -> MemoryChangeSource:
    return MemoryChangeSource(db)


@pytest.fixture
async def core(db: MemoryDatabase, source: MemoryChangeSource):
    core = direct(source.database, list(db.schemas.values()))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    yield core
    following.cancel()
    await core.close()


@pytest.fixture
def loads(db: MemoryDatabase) -> HeldLoads:
    return HeldLoads(db)


def table_of(core: Direct) -> FullTable:
    table = core.tables[T]
    assert isinstance(table, FullTable)
    return table


async def reloading(core: Direct, loads: HeldLoads) -> None:
    """A whole-table change arrives; its reload read the table and is held."""
    loads.gate.clear()
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 900, "bulk"))
    await eventually(lambda: loads.waiting == 1, what="the reload held")


async def quickly(awaitable):
    return await asyncio.wait_for(awaitable, 2)


async def test_reads_during_a_reload_come_from_the_database_at_once(core, db, loads):
    await reloading(core, loads)
    db.put(T, (1,), name="newer")  # committed after the reload read the table
    db.put(T, (9,), name="new")
    assert await quickly(core.engine.get(T, [1])) == row("newer")
    assert await quickly(core.engine.get_many(T, [[9], [2]])) == [row("new"), row("v2")]
    assert core.reads.stats.database_reads[T] == 3
    strong = asyncio.create_task(core.engine.prepare_read(True, None, table_of(core)))
    assert await quickly(strong) is None  # the barrier's token, not the reload
    current = Revision(core.revisions.epoch, core.revisions.seq)  # the revision of the whole-table change, not applied
    assert core.revisions.applied < current.number
    await quickly(core.engine.prepare_read(False, current, table_of(core)))
    loads.gate.set()
    await eventually(lambda: not table_of(core).reloading)


async def test_sync_still_waits_for_the_reload(core, db, loads):
    await reloading(core, loads)
    barrier = core.trust.barrier
    await eventually(lambda: barrier._current is None, what="no round in flight")
    sync = asyncio.create_task(core.engine.sync())
    await eventually(lambda: barrier.landing == 1, what="the token back")
    assert not sync.done()  # every commit before it arrived; the reload is not applied yet
    loads.gate.set()
    assert (await quickly(sync)).number >= core.revisions.seq - 1


async def test_memory_never_contradicts_a_database_read_made_during_the_reload(core, db, source, loads):
    """A database read during the reload saw a commit whose notification had not come yet;
    memory answers again only once the notifications of every earlier commit arrived."""
    await reloading(core, loads)
    db.put(T, (1,), name="newer")  # committed; its notification is on its way
    assert await quickly(core.engine.get(T, [1])) == row("newer")  # (from the database)
    barrier = core.trust.barrier
    send_token = barrier._send

    async def in_commit_order(token: str) -> None:
        # PostgreSQL delivers the notification of every earlier commit before a token.
        source.emit(RowChange("public", "items", Op.UPDATE, 901, ((1,),)))
        await send_token(token)

    barrier._send = in_commit_order
    loads.gate.set()  # the reload lands with what it read: "v1"
    await eventually(lambda: not table_of(core).reloading)
    assert await quickly(core.engine.get(T, [1])) == row("newer")  # never back to "v1"


async def test_invalidate_all_with_refresh_returns_once_reloaded(core, db, loads):
    loads.gate.clear()
    db.put(T, (1,), name="changed")
    invalidating = asyncio.create_task(core.engine.invalidate(T, None, refresh=True))
    await eventually(lambda: loads.waiting == 1, what="the reload held")
    assert await quickly(core.engine.get(T, [1])) == row("changed")  # (reads do not wait)
    assert not invalidating.done()
    loads.gate.set()
    await quickly(invalidating)
    assert table_of(core).rows[(1,)] == row("changed")

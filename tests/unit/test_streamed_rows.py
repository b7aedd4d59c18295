"""A full table that takes rows from its changes (logical decoding), through ``FullTable``
with fakes: rows stored as they come, held while a reload runs, and after it only the
changes its snapshot did not see -- until a fence shows the stream brought all it saw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from sidecar.core.full import FullTable
from sidecar.core.keys import Key
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.wire import entry
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio
T = "public.items"


def row(value: str) -> bytes:
    return entry(('{"name":"' + value + '"}').encode())


class Numbering:
    def __init__(self) -> None:
        self.seq = 0
        self.lows: dict[str, int | None] = {}

    def low_water(self, table: str, low: int | None) -> None:
        self.lows[table] = low


class SnapshotDatabase(MemoryDatabase):
    """Loads that tell their snapshot (``snapshot``), then wait for ``gate``."""

    def __init__(self, schema: TableSchema) -> None:
        super().__init__(schema)
        self.snapshot: str | None = "100:110:105"
        self.gate = asyncio.Event()
        self.gate.set()
        self.refetched: list[Key] = []

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        if seen is not None and self.snapshot is not None:
            seen(self.snapshot)
        rows = dict(self.data[schema.qualified])
        await self.gate.wait()
        yield rows

    async def fetch(self, schema: TableSchema, keys: list[Key]) -> Rows:  # type: ignore[override]
        self.refetched += keys
        return await super().fetch(schema, keys)


async def streamed_table() -> tuple[FullTable, SnapshotDatabase, Numbering, asyncio.Event]:
    schema = int_key_schema(T)
    db = SnapshotDatabase(schema)
    db.put(T, (1,), name="start")
    numbering = Numbering()
    fenced = asyncio.Event()
    table = FullTable(schema, db, numbering=numbering, fence=fenced.wait)
    table.streams = True
    numbering.seq = 1
    fenced.set()
    table.rebuild(1, exact=True)
    await table.until_reloaded()
    assert table.streamed and table.loaded
    return table, db, numbering, fenced


def name_of(table: FullTable, key: int) -> str | None:
    entry_bytes = table.store.get((key,))
    return None if entry_bytes is None else entry_bytes.split(b'"name":"')[1].split(b'"')[0].decode()


async def test_rows_a_change_brings_are_stored_with_no_query() -> None:
    table, db, numbering, _ = await streamed_table()
    numbering.seq = 2
    table.carried({(1,): row("a"), (2,): row("new")}, 2, xid=50)
    assert name_of(table, 1) == "a" and name_of(table, 2) == "new"
    numbering.seq = 3
    table.carried({(2,): None}, 3, xid=51)
    assert name_of(table, 2) is None
    table.emptied(4, xid=52)
    assert len(table.store) == 0
    assert db.refetched == [] and table.reloads == 1


async def test_after_a_reload_changes_its_snapshot_saw_are_skipped_until_the_fence() -> None:
    table, db, numbering, fenced = await streamed_table()
    fenced.clear()  # the reload's fence waits: the stream has not caught up yet
    db.gate.clear()
    db.put(T, (1,), name="b")  # the database as the reload's snapshot sees it (xid 104 committed)
    numbering.seq = 3
    table.changed_all(3)
    await eventually(lambda: table.mixed, 5, what="the reload running")
    numbering.seq = 4
    table.carried({(1,): row("b")}, 4, xid=104)  # seen by the snapshot
    numbering.seq = 5
    table.carried({(1,): row("c")}, 5, xid=105)  # running when it was taken: not seen
    db.gate.set()
    await eventually(lambda: table.reloads == 2, 5, what="the reload landed")
    assert name_of(table, 1) == "c" and table.streamed
    numbering.seq = 6
    table.carried({(1,): row("old")}, 6, xid=103)  # committed before the snapshot, streamed late
    assert name_of(table, 1) == "c"  # (a row older than the one held would go back)
    fenced.set()
    await eventually(lambda: table._seen is None, 5, what="the fence done")
    numbering.seq = 7
    table.carried({(1,): row("d")}, 7, xid=111)
    assert name_of(table, 1) == "d"
    assert db.refetched == []


async def test_a_reload_that_cannot_tell_its_snapshot_leaves_the_held_changes_to_refetches() -> None:
    table, db, numbering, _ = await streamed_table()
    db.snapshot = None
    db.gate.clear()
    numbering.seq = 3
    table.changed_all(3)
    await eventually(lambda: table.mixed, 5, what="the reload running")
    numbering.seq = 4
    db.put(T, (1,), name="e")
    table.carried({(1,): row("e")}, 4, xid=104)
    db.gate.set()
    await eventually(lambda: (1,) in db.refetched, 5, what="the held change refetched")
    assert not table.streamed
    await eventually(lambda: name_of(table, 1) == "e", 5, what="refetched row stored")


async def test_a_keyed_refetch_ends_taking_rows() -> None:
    table, db, numbering, _ = await streamed_table()
    numbering.seq = 2
    table.changed([(1,)], 2)
    assert not table.streamed
    numbering.seq = 3
    table.carried({(1,): row("x")}, 3, xid=60)  # refetched, not stored as brought
    await eventually(lambda: db.refetched.count((1,)) >= 1, 5, what="refetched")


async def test_an_earlier_reloads_fence_does_not_end_a_later_reloads_skipping() -> None:
    table, db, numbering, _ = await streamed_table()
    first = asyncio.Event()
    later = asyncio.Event()
    fences = iter([first, later])
    table._fence_source = lambda: next(fences).wait()
    db.put(T, (1,), name="b")
    numbering.seq = 3
    table.changed_all(3)
    await eventually(lambda: table.reloads == 2, 5, what="the first reload landed")
    first_fence = table._fence
    assert first_fence is not None
    db.snapshot = "200:210:"
    db.put(T, (1,), name="c")
    numbering.seq = 4
    table.changed_all(4)
    await eventually(lambda: table.reloads == 3, 5, what="the second reload landed")
    first.set()  # the first reload's fence completes: it began before the second's snapshot
    await asyncio.wait_for(first_fence, 5)
    numbering.seq = 5
    table.carried({(1,): row("old")}, 5, xid=150)  # seen by the second snapshot, streamed late
    assert name_of(table, 1) == "c"
    later.set()


async def test_the_row_before_a_change_is_the_streams_while_a_reload_holds_changes() -> None:
    table, db, numbering, _ = await streamed_table()
    assert table.row_before((1,)) == row("start")
    db.gate.clear()
    numbering.seq = 3
    table.changed_all(3)
    await eventually(lambda: table.mixed, 5, what="the reload running")
    assert table.row_before((1,)) == row("start")  # no held change names it
    numbering.seq = 4
    table.carried({(1,): row("held")}, 4, xid=120)
    assert table.row_before((1,)) == row("held")
    numbering.seq = 5
    table.emptied(5, xid=121)
    assert table.row_before((1,)) is None
    db.gate.set()
    numbering.seq = 6
    table.changed([(1,)], 6)  # refetched from now on: the stream's rows are not the table's
    assert table.row_before((1,)) is None

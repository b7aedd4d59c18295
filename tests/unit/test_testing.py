"""The in-memory change source and database behave as the PostgreSQL ones do, as far as
the core relies on them (tests on the fakes mean something only then)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.events import Op, RowChange, SyncToken
from sidecar.core.wire import entry
from sidecar.errors import QueryFailed
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually


class Sink:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def source_connected(self) -> None:
        self.seen.append("connected")

    def source_lost(self, reason: str) -> None:
        self.seen.append(f"lost: {reason}")

    def handle(self, event: object) -> None:
        self.seen.append(event)


async def test_the_source_connects_delivers_in_order_and_tokens_come_after_earlier_events():
    source = MemoryChangeSource(MemoryDatabase(int_key_schema()))
    sink = Sink()
    following = asyncio.create_task(source.follow(sink))
    await eventually(lambda: sink.seen == ["connected"])
    change = RowChange("public", "items", Op.UPDATE, 5, ((1,),))
    source.emit(change)
    await source.send_token("t")
    source.lose("cut")
    await eventually(lambda: len(sink.seen) == 4)
    assert sink.seen == ["connected", change, "lost: cut", SyncToken("t")]
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following


async def test_the_database_reads_a_snapshot_and_raises_what_the_adapter_would():
    schema = int_key_schema()
    db = MemoryDatabase(schema)
    db.put("public.items", (1,), name="a")
    assert await db.fetch(schema, [(1,), (2,)]) == {(1,): entry(b'{"name":"a"}')}
    db.error = QueryFailed("column does not exist")
    with pytest.raises(QueryFailed):
        await db.fetch(schema, [(1,)])
    with pytest.raises(QueryFailed):
        async for _ in db.load(schema):
            pass


async def test_the_database_estimates_what_a_load_reads():
    schema = int_key_schema()
    db = MemoryDatabase(schema)
    for key in range(3):
        db.put("public.items", (key,), name="a")
    assert await db.estimate(schema) == sum([len(chunk) async for chunk in db.load(schema)]) == 3
    db.error = QueryFailed("gone")
    with pytest.raises(QueryFailed):
        await db.estimate(schema)

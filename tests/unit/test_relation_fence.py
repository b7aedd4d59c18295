"""A relation's rows just refreshed by key are answered once a barrier round brought every
change their read may have seen (its other rows joined to the same source row are pending by
then): one BatchGet never shows a source row at two versions (the checker's (b))."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.full import FullTable, Reloading
from sidecar.core.wire import entry
from sidecar.errors import Unavailable
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio
R = "public.joined"


class Numbering:
    def __init__(self) -> None:
        self.seq = 1

    def low_water(self, table: str, low: int | None) -> None:
        pass


def row(version: int) -> bytes:
    return entry(f'{{"full_version":{version}}}'.encode())


async def relation() -> tuple[FullTable, MemoryDatabase, list[asyncio.Event]]:
    schema = int_key_schema(R, query="SELECT 1")
    assert schema.config.is_relation
    db = MemoryDatabase(schema)
    db.data[R] = {(1,): row(0), (2,): row(0)}
    rounds: list[asyncio.Event] = []

    async def fence() -> None:
        done = asyncio.Event()
        rounds.append(done)
        await done.wait()

    numbering = Numbering()
    table = FullTable(schema, db, numbering=numbering, fence=fence)
    table.numbering = numbering  # type: ignore[attr-defined]  # (the test moves it)
    table.rebuild(1)
    await table.until_reloaded()
    for done in rounds:
        done.set()
    await eventually(lambda: table._fence is None, 5, what="the first load's fence")
    return table, db, rounds


async def test_a_refreshed_row_waits_for_a_barrier_round_before_memory_answers_it() -> None:
    table, db, rounds = await relation()
    before = len(rounds)
    db.data[R][(2,)] = row(1)  # its refresh reads a commit whose change of row 1 has not come
    table.numbering.seq = 2  # type: ignore[attr-defined]
    table.changed([(2,)], 2)
    await eventually(lambda: len(rounds) > before and table.store.get((2,)) == row(1), 5, what="refreshed")
    assert table.peek((2,))[0] is False and table.peek((1,)) == (True, row(0))
    reading = asyncio.create_task(table.get_many([(2,), (1,)]))
    await asyncio.sleep(0)
    assert not reading.done()
    db.data[R][(1,)] = row(1)
    table.numbering.seq = 3  # type: ignore[attr-defined]
    table.changed([(1,)], 3)  # the change came before the round's token: row 1 is pending now
    rounds[before].set()
    got = await asyncio.wait_for(reading, 5)
    assert got == [row(1), row(1)]


async def test_a_failed_round_sends_the_read_to_the_database() -> None:
    table, _, _ = await relation()
    failing = asyncio.Event()

    async def down() -> None:
        await failing.wait()
        raise Unavailable("the change source is down")

    table._fence_source = down
    table.numbering.seq = 2  # type: ignore[attr-defined]
    table.changed([(2,)], 2)
    await eventually(lambda: (2,) in table._key_fences, 5, what="the refreshed row fenced")
    reading = asyncio.create_task(table.get_many([(2,)]))
    failing.set()
    with pytest.raises(Reloading):
        await asyncio.wait_for(reading, 5)

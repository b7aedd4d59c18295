"""A full relation's refreshes against the in-memory database, with the
interleavings forced: reads and the revision wait for a refresh that is
running, rows that stop matching are refetched (not dropped, not published
stale), keyed refetches are not starved by a stream of source changes, and
Watch batches say what became of each relation row."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.config import IndexConfig, TableConfig
from sidecar.core.assembly import Direct, direct
from sidecar.core.events import Op, RowChange
from sidecar.core.fanout import DELETE, UPDATE
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import SourceSchema, TableSchema
from sidecar.core.wire import entry, row_json
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

REL = "public.user_city"


def relation_schema() -> TableSchema:
    """user_city keyed by user_id; users map to the key, cities to the non-key city_id."""
    config = TableConfig(
        schema="public",
        name="user_city",
        query="(in memory)",
        key=("user_id",),
        indexes=(IndexConfig("by_city", ("city_id",)),),
    )
    return TableSchema(
        config=config,
        key_columns=(KeyColumn.create("user_id", "int4", "integer"),),
        columns={"city_id": KeyColumn.create("city_id", "int4", "integer")},
        sources=(
            SourceSchema(int_key_schema("public.users"), ((0, "user_id"),)),
            SourceSchema(int_key_schema("public.cities"), ((0, "city_id"),)),
        ),
    )


def row(user: int, city: int, city_name: str) -> bytes:
    return entry(json.dumps({"user_id": user, "city_id": city, "city_name": city_name}).encode())


def city_name(stored: bytes | None) -> str | None:
    return None if stored is None else json.loads(row_json(stored))["city_name"]


def users(db: MemoryDatabase) -> dict:
    return db.data[REL]


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(relation_schema())
    for user, city in ((1, 1), (2, 1), (5, 2)):
        users(db)[(user,)] = row(user, city, f"City {city}")
    return db


@pytest.fixture
async def core(db: MemoryDatabase):
    core = direct(db, list(db.schemas.values()))
    core.notices.source_connected()
    await eventually(lambda: core.engine.ready)
    yield core
    await core.close()


def city_changed(xid: int, city: int, op: Op = Op.UPDATE) -> RowChange:
    return RowChange("public", "cities", op, xid, ((city,),))


def user_changed(xid: int, user: int, op: Op = Op.UPDATE) -> RowChange:
    return RowChange("public", "users", op, xid, ((user,),))


def published(core: Direct, revision: int) -> list[tuple[int, tuple, bool]]:
    batches = [b for b in core.fanout._history if getattr(b, "revision", None) == revision]
    return sorted((c.op, c.key, c.has_row) for b in batches for c in b.changes if c.table == REL)


async def test_reads_and_the_revision_wait_for_a_running_refresh(core: Direct, db: MemoryDatabase):
    table = core.engine.table(REL)
    db.hold()
    users(db)[(1,)], users(db)[(2,)] = row(1, 1, "Renamed"), row(2, 1, "Renamed")
    core.notices.handle(city_changed(10, 1))
    seq = core.revisions.seq
    await db.held(1)  # the refresh has read the new rows and not landed
    get = asyncio.ensure_future(core.engine.get(REL, [1]))
    query = asyncio.ensure_future(core.reads.query(table, core.reads.plan_query(table, "by_city", [[1]], None, None)))
    core.revisions.advance()  # (as any other event or landed refetch would)
    await eventually(lambda: len(table._table_waiters) == 2, what="both reads waiting")
    assert core.revisions.applied < seq and not get.done() and not query.done()
    assert table.peek((1,)) == (False, None)
    db.release()
    assert city_name(await get) == "Renamed"
    assert [city_name(e) for e in (await query)[0]] == ["Renamed", "Renamed"]
    await eventually(lambda: core.revisions.applied >= seq)
    assert published(core, seq) == [(UPDATE, (1,), True), (UPDATE, (2,), True)]


async def test_rows_that_stop_matching_are_refetched_not_dropped(core: Direct, db: MemoryDatabase):
    """A user who left a changed city may have moved (kept, refetched) or be gone from the
    join (removed); either way the row ends as the database has it, and Watch says so."""
    users(db)[(5,)] = row(5, 1, "City 1")  # user 5 moved from city 2 to city 1 ...
    core.notices.handle(user_changed(20, 5))
    core.notices.handle(city_changed(20, 2, Op.DELETE))  # ... and city 2 was deleted, same transaction
    seq = core.revisions.seq
    await eventually(lambda: core.revisions.applied >= seq)
    assert city_name(core.engine.table(REL).rows.get((5,))) == "City 1"  # not dropped with city 2
    del users(db)[(1,)]  # city 1's row for user 1 leaves the join (say, its link was deleted)
    core.notices.handle(city_changed(21, 1, Op.DELETE))
    core.notices.handle(user_changed(22, 2))  # (another event in the same listener read)
    await eventually(lambda: core.revisions.applied >= core.revisions.seq)
    assert (1,) not in core.engine.table(REL).rows
    assert published(core, seq + 1) == sorted([(DELETE, (1,), False), (UPDATE, (2,), True), (UPDATE, (5,), True)])
    assert published(core, seq) == [(UPDATE, (5,), True)]  # (told once, though two sources touched it)


async def test_keyed_refetches_go_between_relation_refreshes(core: Direct, db: MemoryDatabase):
    """Source changes arriving during every refresh must not starve a keyed refetch."""
    users(db)[(5,)] = row(5, 2, "moved")
    db.hold()
    core.notices.handle(user_changed(30, 5))
    core.notices.handle(city_changed(31, 1))
    await db.held(1)  # the relation refresh runs first
    core.notices.handle(city_changed(32, 1))  # and another is queued behind it, with the key
    fetches = len(db.fetches)
    db.release()
    db.hold()
    await eventually(lambda: len(db.fetches) > fetches, what="the keyed refetch")
    assert db.fetches[-1] == (REL, ((5,),))
    db.release()
    await eventually(lambda: core.revisions.applied >= core.revisions.seq)
    assert city_name(core.engine.table(REL).rows[(5,)]) == "moved"


async def test_a_refresh_that_would_fail_again_becomes_a_reload(core: Direct, db: MemoryDatabase):
    """A relation refresh refused the same way each time (say, the source's type changed)
    must not hold the revision forever: the relation is reloaded instead."""
    from sidecar.errors import QueryFailed

    calls = 0

    async def refuses(schema, columns, values):
        nonlocal calls
        calls += 1
        raise QueryFailed('UndefinedColumnError: column "city_id" does not exist')

    db.fetch_matching = refuses  # type: ignore[method-assign]
    users(db)[(1,)] = row(1, 1, "Reloaded")
    core.notices.handle(city_changed(10, 1))
    await eventually(lambda: core.revisions.applied == core.revisions.seq, 5, what="the revision advanced")
    table = core.engine.table(REL)
    assert calls == 1 and table.degraded == 1 and table.problem is None  # type: ignore[union-attr]
    assert city_name(await core.engine.get(REL, [1])) == "Reloaded"


async def test_a_refresh_whose_moved_rows_wait_on_later_batches_still_joins_its_own(core: Direct, db: MemoryDatabase):
    """A city renamed (batch A); before A's refresh reads, a user moved into it (B) and one
    of its users was deleted (C), and their events arrive while it runs. The refresh finds
    user 2 gone from the city (moved: a keyed refetch, already due for C). A is applied once
    its refresh landed, and the relation rows it touched must be in A's Watch batch: they
    were added after A had been published, and dropped (a follower then kept the old city
    name for good); and A waits for user 2's refetch, or it would carry user 2's row from
    before A."""
    for user in (1, 2):
        users(db)[(user,)] = row(user, 1, "Renamed")
    users(db)[(3,)] = row(3, 1, "Renamed")  # B: user 3 moved into city 1
    del users(db)[(2,)]  # C: user 2 deleted
    db.hold()
    core.notices.handle(city_changed(40, 1))
    a = core.revisions.seq
    await db.held(1)  # A's refresh has read the rows (B and C committed), not landed
    core.notices.handle(user_changed(41, 3))
    core.notices.handle(user_changed(42, 2, Op.DELETE))
    c = core.revisions.seq
    db.release()
    await eventually(lambda: core.revisions.applied >= c, what="every batch applied")
    # (user 2 as the batch's outcome: gone, not the row it had before A)
    assert published(core, a) == sorted([(UPDATE, (1,), True), (UPDATE, (3,), True), (DELETE, (2,), False)])
    table = core.engine.table(REL)
    assert city_name(table.rows.get((1,))) == "Renamed" and (2,) not in table.rows  # type: ignore[union-attr]

"""Secondary indexes: kept in step with rows, answering equality and ranges
exactly as a brute-force scan of the rows would; and index queries through the
core (fresh after pending changes, from the database while memory cannot be
trusted)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from sidecar.config import IndexConfig, TableConfig
from sidecar.core.assembly import Direct, Options, direct
from sidecar.core.barrier import Barrier
from sidecar.core.events import Op, RowChange, SyncToken
from sidecar.core.indexes import IndexSet, plan
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import TableSchema
from sidecar.core.wire import entry, row_json
from sidecar.errors import InvalidKey, InvalidRequest, Unavailable, UnknownTable
from sidecar.testing import MemoryDatabase
from tests.support.waiting import eventually

TABLE = "public.people"
INDEXES = (
    IndexConfig("by_city", ("city",)),
    IndexConfig("by_city_age", ("city", "age")),
    IndexConfig("by_age", ("age",), range=True),
    IndexConfig("by_name", ("name",), unique=True, range=True),
)
CITIES = ["Oslo", "oslo", "Bergen", "Åsgårdstrand", "Zürich", "bergen"]


def people_schema() -> TableSchema:
    config = TableConfig(schema="public", name="people", indexes=INDEXES)
    return TableSchema(
        config=config,
        key_columns=(KeyColumn.create("id", "int8", "bigint"),),
        columns={
            "city": KeyColumn.create("city", "text", "text"),
            "age": KeyColumn.create("age", "int4", "integer"),
            "name": KeyColumn.create("name", "varchar", "character varying"),
        },
    )


def person(key: int, city: str | None, age: int | None, name: str) -> bytes:
    return entry(json.dumps({"id": key, "city": city, "age": age, "name": name}).encode())


def fields(stored: bytes) -> dict[str, Any]:
    return json.loads(row_json(stored))


def brute_equal(rows: dict, columns: tuple[str, ...], values: list[tuple]) -> list:
    return sorted(k for k, v in rows.items() if tuple(fields(v)[c] for c in columns) in values)


def brute_range(rows: dict, column: str, low, high, low_open, high_open) -> list:
    def inside(value) -> bool:
        if value is None:
            return False
        if low is not None and (value < low or (low_open and value == low)):
            return False
        return not (high is not None and (value > high or (high_open and value == high)))

    matching = [(fields(v)[column], k) for k, v in rows.items() if inside(fields(v)[column])]
    return [k for _, k in sorted(matching)]


def random_person(rng: random.Random, key: int) -> bytes:
    city = rng.choice([*CITIES, None])
    age = rng.choice([None, *range(18, 40)])
    return person(key, city, age, f"{rng.choice('AbcÉz')}{rng.randrange(50)}")


def test_indexes_match_a_scan_of_the_rows_through_random_changes():
    schema = people_schema()
    rng = random.Random(7)
    rows = {(k,): random_person(rng, k) for k in range(200)}
    indexes = IndexSet(schema)
    indexes.rebuild(rows)
    for step in range(3000):
        key = (rng.randrange(260),)
        if rng.random() < 0.2:
            rows.pop(key, None)
            indexes.delete(key)
        else:
            rows[key] = random_person(rng, key[0])
            indexes.put(key, rows[key])
        if step % 100:
            continue
        city = rng.choice(CITIES)
        found, _ = indexes.run(plan(schema, "by_city", [[city], ["oslo"]], None, None, limit=1000))
        assert found == brute_equal(rows, ("city",), [(city,), ("oslo",)])
        found, _ = indexes.run(plan(schema, "by_city_age", [[city, 20]], None, None, limit=1000))
        assert found == brute_equal(rows, ("city", "age"), [(city, 20)])
        low, high = sorted(rng.sample(range(15, 45), 2))
        for low_open in (False, True):
            for high_open in (False, True):
                query = plan(schema, "by_age", None, low, high, low_open=low_open, high_open=high_open, limit=1000)
                assert indexes.run(query)[0] == brute_range(rows, "age", low, high, low_open, high_open)
        # text ranges compare by code point (as COLLATE "C" does): "Z" < "a" < "É"
        query = plan(schema, "by_name", None, "A", "b", limit=1000)
        assert indexes.run(query)[0] == brute_range(rows, "name", "A", "b", False, False)
    fresh = IndexSet(schema)  # a rebuild (a reload) agrees with the maintained one
    fresh.rebuild(rows)
    query = plan(schema, "by_age", None, None, None, limit=1000)
    assert fresh.run(query) == indexes.run(query)


def test_order_limit_and_truncation():
    schema = people_schema()
    rows = {(k,): person(k, "Oslo" if k < 6 else "Bergen", 20 + k % 3, f"n{k:02}") for k in range(10)}
    indexes = IndexSet(schema)
    indexes.rebuild(rows)

    def run(name, values=None, low=None, high=None, **options):
        keys, truncated = indexes.run(plan(schema, name, values, low, high, **options))
        return [k for (k,) in keys], truncated

    # ages: 0 3 6 9 -> 20; 1 4 7 -> 21; 2 5 8 -> 22. Range order: by value, then key.
    assert run("by_age", low=21, limit=3) == ([1, 4, 7], True)
    assert run("by_age", low=21, limit=6) == ([1, 4, 7, 2, 5, 8], False)
    assert run("by_age", low=21, limit=3, descending=True) == ([8, 5, 2], True)
    assert run("by_age", low=21, low_open=True, limit=3) == ([2, 5, 8], False)
    assert run("by_age", high=21, high_open=True, limit=100) == ([0, 3, 6, 9], False)
    assert run("by_age", low=22, high=21, limit=100) == ([], False)
    assert run("by_age", limit=2, descending=True) == ([8, 5], True)
    # equality: primary-key order; a range index answers equality too
    assert run("by_city", [["Bergen"], ["Oslo"]], limit=100, descending=True) == (list(range(9, -1, -1)), False)
    assert run("by_city", [["oslo"]], limit=100) == ([], False)  # exact, case and all
    assert run("by_age", [[22], [20]], limit=2) == ([0, 2], True)
    assert run("by_city_age", [["Oslo", "21"]], limit=100) == ([1, 4], False)  # parts coerced to the column type


def test_nulls_and_unparseable_values_are_not_indexed():
    schema = people_schema()
    indexes = IndexSet(schema)
    indexes.rebuild({(1,): person(1, None, None, "a"), (2,): person(2, "Oslo", 30, "b")})
    assert indexes.run(plan(schema, "by_age", None, None, None, limit=10)) == ([(2,)], False)
    assert indexes.run(plan(schema, "by_city_age", [["Oslo", 30]], None, None, limit=10)) == ([(2,)], False)
    indexes.put((2,), person(2, None, 30, "b"))  # moved out of the city index, kept in the age one
    assert indexes.run(plan(schema, "by_city", [["Oslo"]], None, None, limit=10)) == ([], False)
    assert indexes.run(plan(schema, "by_age", [[30]], None, None, limit=10)) == ([(2,)], False)


def test_bad_queries_name_the_problem():
    schema = people_schema()
    with pytest.raises(UnknownTable, match=r"no index 'nope' \(its indexes: by_city, by_city_age, by_age, by_name\)"):
        plan(schema, "nope", [["x"]], None, None, limit=1)
    with pytest.raises(InvalidRequest, match=r"'by_city' of public\.people is not a range index"):
        plan(schema, "by_city", None, "a", None, limit=1)
    with pytest.raises(InvalidKey, match=r"age \(integer\): 'old' is not an integer"):
        plan(schema, "by_age", None, "old", None, limit=1)
    with pytest.raises(InvalidKey, match=r"key has 1 part\(s\) but the primary key is \(city, age\)"):
        plan(schema, "by_city_age", [["Oslo"]], None, None, limit=1)


# ------------------------------------------------------------ through the core


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(people_schema())
    for k in range(1, 6):
        db.data[TABLE][(k,)] = person(k, "Oslo", 20 + k, f"p{k}")
    return db


@pytest.fixture
async def core(db: MemoryDatabase):
    core = direct(db, list(db.schemas.values()), Options(max_batch_keys=50))

    async def send(token: str) -> None:
        asyncio.get_running_loop().call_soon(core.notices.handle, SyncToken(token))

    core.trust.barrier = Barrier(send)
    core.notices.source_connected()
    await eventually(lambda: core.engine.ready)
    yield core
    await core.close()


def names(entries: list[bytes]) -> list[str]:
    return [fields(e)["name"] for e in entries]


async def test_a_query_sees_every_change_received_before_it(core: Direct, db: MemoryDatabase):
    table = core.engine.table(TABLE)
    oslo = core.reads.plan_query(table, "by_city", [["Oslo"]], None, None)
    assert names((await core.reads.query(table, oslo))[0]) == ["p1", "p2", "p3", "p4", "p5"]
    db.hold()  # the refetch reads the new value, then waits
    db.data[TABLE][(2,)] = person(2, "Bergen", 22, "p2")
    core.notices.handle(RowChange("public", "people", Op.UPDATE, 10, ((2,),)))
    await db.held(1)
    answer = asyncio.ensure_future(core.reads.query(table, oslo))
    await eventually(lambda: table._waiters.get((2,)), what="the query waiting for the refetch")
    assert not answer.done()
    db.release()
    assert names((await answer)[0]) == ["p1", "p3", "p4", "p5"]
    bergen = core.reads.plan_query(table, "by_city", [["Bergen"]], None, None)
    assert names((await core.reads.query(table, bergen))[0]) == ["p2"]


async def test_listener_down_queries_go_to_the_database(core: Direct, db: MemoryDatabase):
    table = core.engine.table(TABLE)
    query = core.reads.plan_query(table, "by_age", None, 22, None, limit=2)
    core.notices.source_lost("test")
    db.data[TABLE][(9,)] = person(9, "Oslo", 22, "p9")  # (no notification: the listener is down)
    entries, truncated = await core.reads.query(table, query)
    assert names(entries) == ["p2", "p9"] and truncated
    db.error = Unavailable("connection refused")
    with pytest.raises(Unavailable, match="database unreachable"):
        await core.reads.query(table, query)
    entries, truncated = await core.reads.query(table, query, allow_stale=True)
    assert names(entries) == ["p2", "p3"] and truncated  # what memory held


async def test_limits_are_checked(core: Direct):
    table = core.engine.table(TABLE)
    with pytest.raises(InvalidRequest, match=r"limit 51 is above .* \(50, server.max_batch_keys\)"):
        core.reads.plan_query(table, "by_age", None, None, None, limit=51)
    with pytest.raises(InvalidRequest, match="51 keys requested"):
        core.reads.plan_query(table, "by_city", [["x"]] * 51, None, None)
    assert core.reads.plan_query(table, "by_age", None, None, None).limit == 50


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'"a string"', b"null", b"[" * 100_000 + b"]" * 100_000, b'{"age": "x"}']
)
def test_a_row_that_is_not_a_row_is_indexed_under_nothing_and_never_fatal(body):
    """A follower indexes the rows its upstream sends; one that is not a JSON object (or
    nests past the parser) must not stop it: it is kept out of every index."""
    schema = people_schema()
    indexes = IndexSet(schema)
    indexes.put((1,), entry(body))
    indexes.put((2,), person(2, "Oslo", 30, "Ada"))
    found, _ = indexes.run(plan(schema, "by_city", [["Oslo"]], None, None, limit=10))
    assert found == [(2,)]
    found, _ = indexes.run(plan(schema, "by_age", None, 0, 200, limit=10))
    assert found == [(2,)]
    indexes.rebuild({(1,): entry(body), (2,): person(2, "Oslo", 30, "Ada")})
    indexes.delete((1,))

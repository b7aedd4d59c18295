"""Secondary indexes and the Query RPC against a real PostgreSQL: index answers
follow inserts, updates, deletes and truncates (of tables and of relation
sources); the database fallback answers exactly what memory answers; bad
queries get a status naming the problem."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import random
import secrets
from typing import Any

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient, Client, IndexInfo, InvalidArgument, TableNotFound

from sidecar import config as cfg
from sidecar.core.indexes import IndexSet, plan
from sidecar.pg.db import PgDatabase
from tests.integration.test_relations import QUERY, relation
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

ORDERS_SQL = """
CREATE TABLE {s}.orders (
    id bigint PRIMARY KEY,
    customer text COLLATE {collation},
    status text NOT NULL,
    created timestamptz,
    total numeric(12, 2)
);
"""
INDEXES = (
    cfg.IndexConfig("by_customer", ("customer",)),
    cfg.IndexConfig("by_customer_status", ("customer", "status")),
    cfg.IndexConfig("by_created", ("created",), range=True),
    cfg.IndexConfig("by_total", ("total",), range=True),
    cfg.IndexConfig("by_customer_name", ("customer",), range=True),
)
CUSTOMERS = ["ada", "Ada", "bob", "Bob", "Émile", "zoë", "Zed", "_x", None]
STATUSES = ["new", "paid", "shipped"]
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


async def collation(db: Any) -> str:
    """A collation that does not sort by code point, where the server has one (so an
    order mismatch between memory and SQL would show)."""
    for name in ("unicode", "und-x-icu", "en-x-icu", "en_US.utf8", "en_US"):
        try:
            if await db.fetchval(f"SELECT 'B' COLLATE \"{name}\" > 'a' COLLATE \"{name}\""):
                return f'"{name}"'
        except asyncpg.PostgresError:
            continue
    return '"default"'


def random_order(rng: random.Random, key: int) -> tuple[Any, ...]:
    created = EPOCH + dt.timedelta(minutes=rng.randrange(600)) if rng.random() > 0.1 else None
    total = decimal.Decimal(rng.randrange(0, 50_000)) / 100 if rng.random() > 0.1 else None
    return key, rng.choice(CUSTOMERS), rng.choice(STATUSES), created, total


@pytest.fixture
async def orders(db, schema) -> str:
    await db.execute(ORDERS_SQL.format(s=schema, collation=await collation(db)))
    rng = random.Random(1)
    await db.executemany(
        f"INSERT INTO {schema}.orders VALUES ($1, $2, $3, $4, $5)", [random_order(rng, k) for k in range(1, 301)]
    )
    return f"{schema}.orders"


def table(schema: str) -> cfg.TableConfig:
    return cfg.TableConfig(schema=schema, name="orders", indexes=INDEXES)


async def truth(db: Any, sql: str, *args: Any) -> list[int]:
    return [r[0] for r in await db.fetch(sql, *args)]


async def check_answers(cache: AsyncClient, db: Any, name: str, rng: random.Random) -> None:
    """Each kind of query, STRONG, equals the database's answer right now."""
    customer = rng.choice(CUSTOMERS[:-1])
    status = rng.choice(STATUSES)
    got = await cache.query(name, "by_customer", [customer, "Bob"], consistency="strong")
    expected = await truth(db, f"SELECT id FROM {name} WHERE customer = ANY($1) ORDER BY id", [customer, "Bob"])
    assert [r["id"] for r in got] == expected, customer
    got = await cache.query(name, "by_customer_status", [(customer, status)], consistency="strong")
    expected = await truth(
        db, f"SELECT id FROM {name} WHERE customer = $1 AND status = $2 ORDER BY id", customer, status
    )
    assert [r["id"] for r in got] == expected
    low = EPOCH + dt.timedelta(minutes=rng.randrange(300))
    high = low + dt.timedelta(minutes=rng.randrange(300))
    got = await cache.query(name, "by_created", lower=low, upper=high, upper_exclusive=True, consistency="strong")
    expected = await truth(
        db, f"SELECT id FROM {name} WHERE created >= $1 AND created < $2 ORDER BY created, id", low, high
    )
    assert [r["id"] for r in got] == expected
    got = await cache.query(name, "by_total", lower="100.00", limit=7, descending=True, consistency="strong")
    expected = await truth(db, f"SELECT id FROM {name} WHERE total >= 100 ORDER BY total DESC, id DESC LIMIT 8")
    assert [r["id"] for r in got] == expected[:7] and got.truncated == (len(expected) == 8)
    got = await cache.query(name, "by_customer_name", lower="B", upper="b", consistency="strong")
    expected = await truth(
        db,
        f'SELECT id FROM {name} WHERE customer COLLATE "C" BETWEEN $1 AND $2 ORDER BY customer COLLATE "C", id',
        "B",
        "b",
    )
    assert [r["id"] for r in got] == expected


async def test_index_answers_follow_every_kind_of_change(start_daemon, db, schema, orders):
    sidecar = await start_daemon([table(schema)])
    rng = random.Random(2)
    async with AsyncClient(sidecar.target) as cache:
        await check_answers(cache, db, orders, rng)
        next_key = 1000
        for step in range(12):
            if step == 8:
                await db.execute(f"TRUNCATE {orders}")
            kind = step % 4
            if kind == 0:  # inserts
                rows = [random_order(rng, next_key + i) for i in range(20)]
                next_key += 20
                await db.executemany(f"INSERT INTO {orders} VALUES ($1, $2, $3, $4, $5)", rows)
            elif kind == 1:  # one statement moving many rows between index values
                await db.execute(
                    f"UPDATE {orders} SET customer = $1, created = created + interval '7 minutes' WHERE id % 5 = $2",
                    rng.choice(CUSTOMERS),
                    rng.randrange(5),
                )
            elif kind == 2:  # single-row updates in one transaction, keys changed too
                async with db.transaction():
                    for key in rng.sample(range(1, next_key), 15):
                        _, customer, status, created, total = random_order(rng, key)
                        await db.execute(
                            f"UPDATE {orders} SET customer = $2, status = $3, created = $4, total = $5 WHERE id = $1",
                            key,
                            customer,
                            status,
                            created,
                            total,
                        )
                    await db.execute(f"UPDATE {orders} SET id = id + 100000 WHERE id = (SELECT min(id) FROM {orders})")
            else:  # deletes
                await db.execute(f"DELETE FROM {orders} WHERE id % 7 = $1", rng.randrange(7))
            await check_answers(cache, db, orders, rng)


async def test_the_database_fallback_answers_what_memory_answers(any_postgres):
    """The SQL used while the listener is down orders and bounds exactly as memory does
    (text by code point, even under a collation that sorts otherwise), on each PostgreSQL."""
    conn = await asyncpg.connect(any_postgres.dsn)
    name = f"q_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE SCHEMA {name}")
    pool = await asyncpg.create_pool(any_postgres.dsn, min_size=1, max_size=2)
    try:
        await conn.execute(ORDERS_SQL.format(s=name, collation=await collation(conn)))
        rng = random.Random(3)
        rows = [random_order(rng, k) for k in range(1, 401)]
        await conn.executemany(f"INSERT INTO {name}.orders VALUES ($1, $2, $3, $4, $5)", rows)
        database = PgDatabase(pool)
        schema = await database.describe(table(name))
        loaded: dict[Any, bytes] = {}
        async for chunk in database.load(schema):
            loaded.update(chunk)
        memory = IndexSet(schema)
        memory.rebuild(loaded)
        checked = 0
        for _ in range(80):
            query = random_query(rng, schema)
            keys, truncated = memory.run(query)
            answered = list((await database.query(schema, query)).items())
            assert [k for k, _ in answered[: query.limit]] == keys, query
            assert (len(answered) > query.limit) == truncated
            assert [loaded[k] for k in keys] == [e for _, e in answered[: query.limit]]
            checked += len(keys)
        assert checked > 300  # the queries matched rows, not just nothing
    finally:
        await pool.close()
        await conn.execute(f"DROP SCHEMA {name} CASCADE")
        await conn.close()


def random_query(rng: random.Random, schema: Any) -> Any:
    index = rng.choice(INDEXES)
    values, low, high = None, None, None
    if not index.range:
        values = [
            [rng.choice(CUSTOMERS[:-1]), rng.choice(STATUSES)][: len(index.columns)] for _ in range(rng.randrange(1, 4))
        ]
    else:
        if index.name == "by_created":
            bounds: list[Any] = [EPOCH + dt.timedelta(minutes=rng.randrange(600)) for _ in range(2)]
        elif index.name == "by_total":
            bounds = [str(decimal.Decimal(rng.randrange(50_000)) / 100) for _ in range(2)]
        else:
            bounds = [rng.choice(CUSTOMERS[:-1]) for _ in range(2)]
        low, high = sorted(bounds) if rng.random() < 0.9 else bounds
        low = None if rng.random() < 0.2 else low
        high = None if rng.random() < 0.2 else high
    return plan(
        schema,
        index.name,
        values,
        low,
        high,
        low_open=rng.random() < 0.3,
        high_open=rng.random() < 0.3,
        limit=rng.choice([1, 5, 50, 1000]),
        descending=rng.random() < 0.5,
    )


async def test_a_relation_index_follows_its_sources(start_daemon, db, schema):
    from tests.integration.test_relations import SCHEMA_SQL

    await db.execute(SCHEMA_SQL.format(s=schema))
    indexes = (cfg.IndexConfig("by_city", ("city_name",)), cfg.IndexConfig("by_user", ("user_name",), range=True))
    sidecar = await start_daemon([relation(schema, indexes=indexes)])
    name = f"{schema}.user_city"
    s = schema

    async def city(city_name: str) -> list[int]:
        return [r["user_id"] for r in await cache.query(name, "by_city", [city_name])]

    async with AsyncClient(sidecar.target) as cache:
        assert await city("City 1") == [1]
        await db.execute(f"UPDATE {s}.cities SET name = 'Oslo' WHERE city_id = 1")
        await eventually(lambda: city("Oslo"), what="the renamed city")
        assert await city("City 1") == []
        await db.execute(
            f"INSERT INTO {s}.users VALUES (3, 'User 3', NULL); INSERT INTO {s}.users_cities VALUES (3, 1);"
            f"UPDATE {s}.users_cities SET city_id = 1 WHERE user_id = 2"
        )
        await cache.sync()
        assert await city("Oslo") == [1, 2, 3]
        assert await city("City 2") == []
        await db.execute(f"DELETE FROM {s}.users WHERE user_id = 1")
        await cache.sync()
        assert await city("Oslo") == [2, 3]
        by_user = await cache.query(name, "by_user", lower="User 2", descending=True)
        assert [r["user_name"] for r in by_user] == ["User 3", "User 2"]
        expected = await db.fetch(f"SELECT * FROM ({QUERY.format(s=s)}) t WHERE city_name = 'Oslo' ORDER BY user_id")
        assert list(await cache.query(name, "by_city", ["Oslo"])) == [dict(r) for r in expected]


async def test_bad_queries_get_a_status_naming_the_problem(start_daemon, db, schema, orders):
    await db.execute(f"CREATE TABLE {schema}.lazy (id int PRIMARY KEY)")
    lazy = cfg.TableConfig(schema=schema, name="lazy", mode="lazy")
    sidecar = await start_daemon([table(schema), lazy], max_batch_keys=100)
    async with AsyncClient(sidecar.target, retries=0) as cache:
        with pytest.raises(TableNotFound, match=r"has no index 'by_nothing' \(its indexes: by_customer, "):
            await cache.query(orders, "by_nothing", ["ada"])
        with pytest.raises(TableNotFound, match="has no index 'x' \\(its indexes: none\\)"):
            await cache.query(f"{schema}.lazy", "x", [1])
        with pytest.raises(TableNotFound, match="is not cached here"):
            await cache.query(f"{schema}.nope", "x", [1])
        with pytest.raises(InvalidArgument, match=r"'by_customer' of .* is not a range index"):
            await cache.query(orders, "by_customer", lower="a")
        with pytest.raises(InvalidArgument, match=r"total \(numeric\(12,2\)\): 'lots' is not a number"):
            await cache.query(orders, "by_total", upper="lots")
        with pytest.raises(InvalidArgument, match=r"key has 1 part\(s\) but .* \(customer, status\)"):
            await cache.query(orders, "by_customer_status", ["ada"])
        with pytest.raises(InvalidArgument, match=r"limit 101 is above"):
            await cache.query(orders, "by_total", limit=101)
        with pytest.raises(ValueError, match="not both"):
            await cache.query(orders, "by_total", [1], lower=1)
        # and the daemon goes on answering
        assert len(await cache.query(orders, "by_total", limit=3)) == 3
        assert (await cache.query(orders, "by_total", [])).rows == []


async def test_the_blocking_client_queries_too(start_daemon, db, schema, orders):
    sidecar = await start_daemon([table(schema)])

    def blocking() -> tuple[Any, Any]:
        with Client(sidecar.target) as cache:
            (info,) = cache.list_tables()
            return info, cache.query(orders, "by_total", lower=decimal.Decimal("100"), limit=5, descending=True)

    info, result = await asyncio.to_thread(blocking)
    assert [i.name for i in info.indexes] == [i.name for i in INDEXES]
    assert info.indexes[2] == IndexInfo("by_created", ("created",), unique=False, range=True)
    expected = await truth(db, f"SELECT id FROM {orders} WHERE total >= 100 ORDER BY total DESC, id DESC LIMIT 5")
    assert [r["id"] for r in result] == expected and result.truncated and result.revision is not None


EDGES_SQL = """
CREATE TYPE {s}.mood AS ENUM ('sad', 'happy');
CREATE TABLE {s}.edges (
    id int PRIMARY KEY, v varchar(3), code char(5), ts timestamp(0), n numeric(6, 2),
    d date, num numeric, f float8, m {s}.mood
);
INSERT INTO {s}.edges VALUES
    (1, 'abc', 'ab', '2024-01-01 00:00:01', 1.01, 'infinity', 'NaN', 'NaN', 'happy'),
    (2, 'abd', 'abcde', '2024-01-01 00:00:00', 1.00, '2021-01-01', 5, 'Infinity', 'sad'),
    (3, NULL, 'x', '-infinity', -1, '-infinity', 7, -2.5, NULL);
CREATE TABLE {s}.codes (code char(3) PRIMARY KEY, name text);
INSERT INTO {s}.codes VALUES ('abc', 'x'), ('a', 'y');
"""
EDGE_INDEXES = (
    cfg.IndexConfig("by_v", ("v",)),
    cfg.IndexConfig("by_code", ("code",)),
    cfg.IndexConfig("by_m", ("m",)),
    cfg.IndexConfig("by_ts", ("ts",), range=True),
    cfg.IndexConfig("by_n", ("n",), range=True),
    cfg.IndexConfig("by_d", ("d",), range=True),
    cfg.IndexConfig("by_num", ("num",), range=True),
    cfg.IndexConfig("by_f", ("f",), range=True),
)
EDGE_QUERIES = [  # (index, values, lower, upper): values that do not fit match nothing
    ("by_v", [["abcdef"]], None, None),  # (a varchar(3) cast would truncate it to 'abc')
    ("by_v", [["abc"]], None, None),
    ("by_code", [["abcdefg"]], None, None),  # (char(5): 'abcde')
    ("by_code", [["ab   "]], None, None),  # char(n) ignores trailing blanks
    ("by_m", [["happy"], ["not a label"]], None, None),
    ("by_ts", None, "2024-01-01T00:00:00.6", None),  # (timestamp(0) would round it up)
    ("by_n", None, None, "1.005"),  # (numeric(6,2): 1.01)
    ("by_d", None, None, None),  # infinite dates are not held
    ("by_num", None, "0", None),  # NaN is not held
    ("by_f", None, None, None),  # Infinity is, NaN is not
]


async def test_values_that_do_not_fit_match_nothing_in_memory_and_in_sql(db, schema, postgres):
    await db.execute(EDGES_SQL.format(s=schema))
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2, server_settings={"TimeZone": "UTC"})
    try:
        database = PgDatabase(pool)
        edges = await database.describe(cfg.TableConfig(schema=schema, name="edges", indexes=EDGE_INDEXES))
        loaded: dict[Any, bytes] = {}
        async for chunk in database.load(edges):
            loaded.update(chunk)
        memory = IndexSet(edges)
        memory.rebuild(loaded)
        answers = []
        for index, values, lower, upper in EDGE_QUERIES:
            query = plan(edges, index, values, lower, upper, limit=10)
            keys, _ = memory.run(query)
            assert list(await database.query(edges, query)) == keys, (index, values, lower, upper)
            answers.append([k for (k,) in keys])
        assert answers == [[], [1], [], [1], [1], [1], [3, 2], [2], [2, 3], [3, 2]]
        codes = await database.describe(cfg.TableConfig(schema=schema, name="codes"))
        assert sorted(await database.fetch(codes, [("abc",), ("a",), ("abcd",)])) == [("a",), ("abc",)]
        relation = cfg.TableConfig(
            schema=schema,
            name="code_names",
            query=f"SELECT code, name FROM {schema}.codes",
            key=("code",),
            sources=(cfg.RelationSource(schema, "codes", (("code", "code"),)),),
        )
        code_names = await database.describe(relation)  # (its key's type comes from the query)
        assert list(await database.fetch(code_names, [("abc",)])) == [("abc",)]  # (char(1) would give 'a')
    finally:
        await pool.close()


# A row Python's json refuses: an integer of more than 4300 digits, nesting deeper than ~1000.
HUGE_INTEGER = "pg_catalog.repeat('9', 5000)::numeric"
DEEP_JSON = "(pg_catalog.repeat('[', 3000) || pg_catalog.repeat(']', 3000))::jsonb"


@pytest.mark.parametrize("value", [HUGE_INTEGER, DEEP_JSON], ids=["huge-integer", "deep-nesting"])
async def test_a_row_pythons_json_refuses_is_indexed_all_the_same(start_daemon, db, schema, value):
    await db.execute(f"CREATE TABLE {schema}.odd (id int PRIMARY KEY, tag text, other jsonb, big numeric)")
    column = "big" if value == HUGE_INTEGER else "other"
    await db.execute(f"INSERT INTO {schema}.odd (id, tag, {column}) VALUES (1, 'x', {value}), (2, 'x', NULL)")
    table = cfg.TableConfig(schema=schema, name="odd", indexes=(cfg.IndexConfig("by_tag", ("tag",)),))
    sidecar = await start_daemon([table])
    async with AsyncClient(sidecar.target, decoder=lambda row: row) as cache:
        assert len((await cache.query(f"{schema}.odd", "by_tag", ["x"])).rows) == 2
        await db.execute(f"INSERT INTO {schema}.odd (id, tag, {column}) VALUES (3, 'x', {value})")  # (a refetch)
        await cache.sync()
        assert len((await cache.query(f"{schema}.odd", "by_tag", ["x"])).rows) == 3

"""Relations (cached joins) against a real PostgreSQL: tablecache's basic
example (users, cities, users_cities joined by user_id) kept current with no
manual invalidation, through inserts, updates and deletes of every source."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch

from sidecar import config as cfg
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.app import Daemon
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

SCHEMA_SQL = """
CREATE TABLE {s}.users (user_id integer PRIMARY KEY, name text NOT NULL, nickname text);
CREATE TABLE {s}.cities (city_id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE {s}.users_cities (
    user_id integer PRIMARY KEY REFERENCES {s}.users (user_id) ON DELETE CASCADE,
    city_id integer NOT NULL REFERENCES {s}.cities (city_id)
);
INSERT INTO {s}.users VALUES (1, 'User 1', 'u1'), (2, 'User 2', NULL);
INSERT INTO {s}.cities VALUES (1, 'City 1'), (2, 'City 2');
INSERT INTO {s}.users_cities VALUES (1, 1), (2, 2);
"""

QUERY = """
SELECT uc.*, u.name AS user_name, u.nickname AS user_nickname, c.name AS city_name
FROM {s}.users u JOIN {s}.users_cities uc USING (user_id) JOIN {s}.cities c USING (city_id)
"""


def relation(schema: str, mode: str = "full", **extra) -> cfg.TableConfig:  # type: ignore[no-untyped-def]
    return cfg.TableConfig(
        schema=schema,
        name="user_city",
        mode=mode,  # type: ignore[arg-type]
        query=QUERY.format(s=schema),
        key=("user_id",),
        sources=(
            cfg.RelationSource(schema, "users", (("user_id", "user_id"),)),
            cfg.RelationSource(schema, "users_cities", (("user_id", "user_id"),)),
            cfg.RelationSource(schema, "cities", (("city_id", "city_id"),)),
        ),
        **extra,
    )


@pytest.fixture
async def users(db, schema) -> str:
    await db.execute(SCHEMA_SQL.format(s=schema))
    return f"{schema}.user_city"


async def follows(cache: AsyncClient, name: str, key: int, expected) -> None:  # type: ignore[no-untyped-def]
    async def matches() -> bool:
        return await cache.get(name, key) == expected

    await eventually(matches, what=f"{name} {key} == {expected}")


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_the_reference_example_follows_every_source(start_daemon, db, schema, users, mode):
    sidecar = await start_daemon([relation(schema, mode)])
    s = schema
    async with AsyncClient(sidecar.target) as cache:
        assert await cache.get(users, 1) == {
            "user_id": 1,
            "city_id": 1,
            "user_name": "User 1",
            "user_nickname": "u1",
            "city_name": "City 1",
        }
        assert (await cache.get(users, 2))["city_name"] == "City 2"
        assert await cache.get(users, 3) is None

        await db.execute(f"UPDATE {s}.users SET name = 'New Name' WHERE user_id = 1")  # a user changes
        await follows(cache, users, 1, {**await cache.get(users, 1, consistency="strong"), "user_name": "New Name"})
        assert (await cache.get(users, 1))["user_name"] == "New Name"

        await db.execute(f"UPDATE {s}.cities SET name = 'Renamed' WHERE city_id = 1")  # a city changes
        await eventually(lambda: _field(cache, users, 1, "city_name", "Renamed"), what="city rename followed")
        assert (await cache.get(users, 2))["city_name"] == "City 2"  # the other city is untouched

        await db.execute(  # a new user with a city: a new relation row
            f"INSERT INTO {s}.users VALUES (3, 'User 3', NULL); INSERT INTO {s}.users_cities VALUES (3, 2)"
        )
        await eventually(lambda: _field(cache, users, 3, "city_name", "City 2"), what="insert appears")

        await db.execute(f"UPDATE {s}.users_cities SET city_id = 1 WHERE user_id = 3")  # a user moves
        await eventually(lambda: _field(cache, users, 3, "city_name", "Renamed"), what="move followed")

        await db.execute(f"DELETE FROM {s}.users_cities WHERE user_id = 2")  # the join no longer matches
        await eventually(lambda: _gone(cache, users, 2), what="relation row gone")

        await db.execute(f"DELETE FROM {s}.users WHERE user_id = 1")  # cascades
        await eventually(lambda: _gone(cache, users, 1), what="cascade followed")

        await db.execute(f"TRUNCATE {s}.users_cities")
        await eventually(lambda: _gone(cache, users, 3), what="truncate followed")
        if mode == "full":  # reads went to PostgreSQL at once; ListTables says so until the reload lands
            async with grpc.aio.insecure_channel(sidecar.target) as channel:
                (listed,) = (await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest())).tables
            assert listed.load.running or listed.row_count == 0, listed
        await cache.sync()  # every change received is applied: the reload landed
        (info,) = await cache.list_tables()
        assert info.name == users and (info.row_count == 0 or mode == "lazy")


async def test_relation_rows_converge_with_the_query(start_daemon, db, schema, users):
    sidecar = await start_daemon([relation(schema)])
    s = schema
    async with AsyncClient(sidecar.target) as cache:
        await db.execute(
            f"INSERT INTO {s}.cities SELECT g, 'City ' || g FROM generate_series(3, 20) g;"
            f"INSERT INTO {s}.users SELECT g, 'User ' || g, NULL FROM generate_series(3, 200) g;"
            f"INSERT INTO {s}.users_cities SELECT g, 1 + g % 20 FROM generate_series(3, 200) g;"
            f"UPDATE {s}.cities SET name = name || '!' WHERE city_id % 3 = 0;"
            f"UPDATE {s}.users_cities SET city_id = 5 WHERE user_id % 7 = 0;"
            f"DELETE FROM {s}.users WHERE user_id % 11 = 0;"
        )
        await cache.sync()
        truth = {r["user_id"]: dict(r) for r in await db.fetch(QUERY.format(s=s))}
        table = sidecar.core.tables[users]
        assert table.row_count == len(truth)
        got = await cache.batch_get(users, sorted(truth))
        assert {r["user_id"]: r for r in got} == truth


async def test_watch_reports_the_relation_rows_a_source_change_touched(start_daemon, db, schema, users):
    sidecar = await start_daemon([relation(schema)])
    async with AsyncClient(sidecar.target) as cache:
        seen: list[ChangeBatch] = []

        async def follow() -> None:
            async for item in cache.watch([users]):
                if isinstance(item, ChangeBatch):
                    seen.append(item)

        following = asyncio.create_task(follow())
        await eventually(lambda: sidecar.core.fanout.subscribers == 1)
        await db.execute(f"INSERT INTO {schema}.users_cities SELECT 1 FROM {schema}.users WHERE false")  # nothing
        await db.execute(f"UPDATE {schema}.cities SET name = 'City A' WHERE city_id = 1")
        await eventually(lambda: seen, what="a batch")
        following.cancel()
    (change,) = seen[0].changes
    assert (change.key, change.operation, change.row["city_name"]) == (1, "update", "City A")


@pytest.mark.parametrize(
    ("mapping", "query", "message"),
    [
        ((("name", "user_name"),), None, "not part of its primary key"),
        ((("user_id", "nope"),), None, "is not a column of its query"),
        ((("user_id", "user_id"),), "SELECT * FROM nowhere", "its query fails"),
    ],
)
async def test_relation_configuration_errors_are_clear(postgres, schema, users, caplog, mapping, query, message):
    bad = relation(schema)
    bad = cfg.TableConfig(
        schema=bad.schema,
        name=bad.name,
        query=query or bad.query,
        key=bad.key,
        sources=(cfg.RelationSource(schema, "users", mapping),),
    )
    config = cfg.Config(dsn=postgres.dsn, listen=("127.0.0.1:0",), install_triggers=True, tables=(bad,))
    assert await Daemon(config, handle_signals=False).run() == 2  # the user's to fix: the exit rule's 2
    assert message in caplog.text


async def _field(cache: AsyncClient, name: str, key: int, field: str, value: str) -> bool:
    row = await cache.get(name, key)
    return row is not None and row[field] == value


async def _gone(cache: AsyncClient, name: str, key: int) -> bool:
    return await cache.get(name, key) is None


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "relations"


def _with_database(dsn: str, name: str) -> str:
    """The same server's DSN for another database."""
    if "://" not in dsn:
        return f"{dsn} dbname={name}"
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def example_dsn(postgres, db) -> AsyncIterator[str]:
    """A fresh database holding examples/relations/schema.sql, as written."""
    name = f"example_{secrets.token_hex(4)}"
    await db.execute(f"CREATE DATABASE {name}")
    dsn = _with_database(postgres.dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute((EXAMPLE / "schema.sql").read_text())
    finally:
        await conn.close()
    yield dsn

    async def unused() -> bool:  # (a stopped daemon's walsender ends, and frees its slot, a moment later)
        slots = "SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE database = $1 AND active"
        return await db.fetchval(slots, name) == 0

    await eventually(unused, what=f"no replication slot in use in {name}")
    await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_the_documented_example_works_as_written(example_dsn, start_daemon):
    """examples/relations: its schema and its sidecar.toml, through the steps of its README."""
    # (example_dsn first: its database is dropped after the daemon stopped -- FORCE ends
    # sessions, but a database with an active replication slot is not dropped)
    config = cfg.load(EXAMPLE / "sidecar.toml", env={})
    sidecar = await start_daemon(list(config.tables), dsn=example_dsn)
    name = "public.user_city"
    conn = await asyncpg.connect(example_dsn)
    try:
        async with AsyncClient(sidecar.target) as cache:
            assert await cache.get(name, 1) == {
                "user_id": 1, "user_name": "User 1", "user_nickname": "u1", "city_id": 1, "city_name": "City 1"
            }  # fmt: skip
            assert [r["user_id"] for r in await cache.query(name, "by_city", [1])] == [1, 3]

            await conn.execute("UPDATE users SET name = 'Userina 1' WHERE user_id = 1")
            await eventually(lambda: _field(cache, name, 1, "user_name", "Userina 1"), what="user rename")
            await conn.execute("UPDATE cities SET name = 'City One' WHERE city_id = 1")
            await eventually(lambda: _field(cache, name, 3, "city_name", "City One"), what="city rename")
            assert [r["city_name"] for r in await cache.query(name, "by_city", [1])] == ["City One"] * 2

            await conn.execute("INSERT INTO users VALUES (4, 'User 4', NULL); INSERT INTO users_cities VALUES (4, 2)")
            await eventually(lambda: _field(cache, name, 4, "city_name", "City 2"), what="new user")

            await conn.execute(
                "INSERT INTO cities VALUES (3, 'City 3'); UPDATE users_cities SET city_id = 3 WHERE user_id = 2"
            )
            await eventually(lambda: _field(cache, name, 2, "city_name", "City 3"), what="move to a new city")
            await conn.execute(
                "UPDATE users_cities SET city_id = 1 WHERE user_id = 2; DELETE FROM cities WHERE city_id = 3"
            )
            await cache.sync()
            assert [r["user_id"] for r in await cache.query(name, "by_city", [1])] == [1, 2, 3]
            assert (await cache.query(name, "by_city", [3])).rows == []

            last = await cache.query(name, "by_user_name", descending=True, limit=2)
            assert [r["user_name"] for r in last] == ["Userina 1", "User 4"] and last.truncated
            truth = await conn.fetch(f"SELECT * FROM ({config.tables[0].query}) t ORDER BY user_id")
            assert await cache.batch_get(name, [1, 2, 3, 4]) == [dict(r) for r in truth]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("key_sql", "chunk_rows"),
    [
        ("p.grp", None),  # an integer key: the load streams COPY (copy_text.py)
        ("p.grp::text", None),  # any other key: a cursor, the rows of one chunk (db.py)
        ("p.grp::text", 1),  # rows of one key in different chunks (full.py)
    ],
)
async def test_a_relation_key_two_rows_share_is_an_error_not_a_missing_row(
    start_daemon, db, schema, monkeypatch, key_sql, chunk_rows
):
    if chunk_rows is not None:
        monkeypatch.setattr("sidecar.pg.db.LOAD_CHUNK_ROWS", chunk_rows)
    await db.execute(f"CREATE TABLE {schema}.people (id int PRIMARY KEY, grp int, tag text)")
    await db.execute(f"INSERT INTO {schema}.people VALUES (1, 1, 'a'), (2, 1, 'b'), (3, 2, 'c')")
    grouped = cfg.TableConfig(
        schema=schema,
        name="by_group",
        query=f"SELECT {key_sql} AS g, p.id, p.tag FROM {schema}.people p",
        key=("g",),
        sources=(cfg.RelationSource(schema, "people", (("id", "id"),)),),
    )
    sidecar = await start_daemon([grouped], wait=False)
    async with AsyncClient(sidecar.target) as cache:

        async def problem() -> str:
            (info,) = await cache.list_tables()
            return info.problem

        # (one reading: a rebuild may clear it for a moment before the load fails again)
        text = await eventually(problem, what="the relation marked not served")
        assert "1 row(s) have the key of another row" in text and f"{schema}.by_group" in text


@pytest.mark.parametrize(
    "value",
    [
        "pg_catalog.repeat('9', 5000)::numeric",  # (more digits than Python's int() reads)
        "(pg_catalog.repeat('[', 3000) || pg_catalog.repeat(']', 3000))::jsonb",  # (deeper than json recurses)
    ],
    ids=["huge-integer", "deep-nesting"],
)
async def test_a_relation_row_pythons_json_refuses_follows_its_sources(start_daemon, db, schema, value):
    await db.execute(f"CREATE TABLE {schema}.members (user_id int PRIMARY KEY, city_id int)")
    await db.execute(f"CREATE TABLE {schema}.places (city_id int PRIMARY KEY, odd {value.rsplit('::', 1)[1]})")
    await db.execute(f"INSERT INTO {schema}.members VALUES (1, 7), (2, 8)")
    await db.execute(f"INSERT INTO {schema}.places VALUES (7, {value}), (8, NULL)")
    joined = cfg.TableConfig(
        schema=schema,
        name="member_place",
        query=f"SELECT m.user_id, m.city_id, p.odd FROM {schema}.members m JOIN {schema}.places p USING (city_id)",
        key=("user_id",),
        sources=(
            cfg.RelationSource(schema, "members", (("user_id", "user_id"),)),
            cfg.RelationSource(schema, "places", (("city_id", "city_id"),)),  # (found by the rows' city_id)
        ),
    )
    sidecar = await start_daemon([joined])
    name = f"{schema}.member_place"
    async with AsyncClient(sidecar.target, decoder=lambda row: row) as cache:
        assert await cache.get(name, 1) is not None
        await db.execute(f"DELETE FROM {schema}.places WHERE city_id IN (7, 8)")
        await cache.sync()
        assert await cache.batch_get(name, [1, 2]) == [None, None]  # (the join yields neither now)

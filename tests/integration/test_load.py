"""A load's rows, byte by byte: what ``PgDatabase`` caches is exactly the protobuf
runtime's encoding of the row's ``row_to_json(t.*)::text`` as asyncpg hands it
over as text (what loads read before they read the JSON as bytea), for awkward
types and keys; and the planner's estimate of the rows, for progress."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest

from sidecar import config as cfg
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.core import wire
from sidecar.core.keys import normalize_stored
from sidecar.errors import Unavailable
from sidecar.pg.db import PINNED_SETTINGS, PgDatabase
from tests.integration.test_metrics import scrape, value
from tests.integration.test_types import VALUES
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

JSON_COLUMN = next(i for i, (sql_type, _, _) in enumerate(VALUES) if sql_type == "json")


async def reference(conn: asyncpg.Connection, schema: Any) -> dict[Any, bytes]:
    """The rows as the text path encodes them: key columns, then the JSON as text."""
    keys = ", ".join(f't."{c.name}"' for c in schema.key_columns)
    where = f" WHERE {schema.config.where}" if schema.config.where else ""
    records = await conn.fetch(f"SELECT {keys}, row_to_json(t.*)::text FROM {schema.source_sql}{where}")
    width = len(schema.key_columns)
    return {
        normalize_stored(schema.key_columns, tuple(r[:width])): protobuf_entry(r[width].encode())
        for r in records
        if None not in r[:width]
    }


def protobuf_entry(row_json: bytes) -> bytes:
    """The entry as the protobuf runtime encodes it (independent of wire.py's shortcuts)."""
    encoded: bytes = pb.BatchGetResponse(rows=[pb.RowResult(found=True, row=row_json)]).SerializeToString()
    return encoded


async def loaded(database: PgDatabase, schema: Any) -> dict[Any, bytes]:
    rows: dict[Any, bytes] = {}
    async for chunk in database.load(schema):
        assert not rows.keys() & chunk.keys()  # each row once
        rows.update(chunk)
    return rows


async def test_loaded_rows_are_byte_identical_to_the_text_encoding(postgres, db, schema):
    columns = ", ".join(f"c{i} {t}" for i, (t, _, _) in enumerate(VALUES))
    literals = ", ".join(lit for _, lit, _ in VALUES)
    await db.execute(f"CREATE TABLE {schema}.typed (id int8 PRIMARY KEY, {columns}, big text)")
    # Several rows: plain, non-ASCII and escapes, NULLs, sizes on both sides of the entry
    # prefixes made in advance (4096) and of the one- and two-byte varints.
    await db.execute(f"INSERT INTO {schema}.typed VALUES (1, {literals}, NULL)")
    await db.execute(
        f"INSERT INTO {schema}.typed (id, c8, big) SELECT g, 'é\"\\\\ ☃ \t', repeat('ж', g) FROM "
        "unnest(ARRAY[2, 60, 2000, 2030, 2040, 2100, 5000, 70000, 200000]) g"
    )
    # What COPY's text form escapes: backslashes, tabs, newlines (a json value keeps its raw
    # whitespace), and a lone backslash at the end.
    await db.execute(
        f"INSERT INTO {schema}.typed (id, c8, c{JSON_COLUMN}) VALUES "
        '(3, E\'tab\\there\\\\ \\n \\\\\', E\'{"a":\\n\\t1,\\r"b": "\\\\\\\\"}\'), '
        "(-4, E'\\\\', NULL)"
    )
    # A composite key with char(n) (trailing blanks are not part of the key) and a uuid.
    await db.execute(f"CREATE TABLE {schema}.composite (code char(6), id uuid, note text, PRIMARY KEY (code, id))")
    await db.execute(
        f"INSERT INTO {schema}.composite VALUES ('ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'x'), "
        "('abc   ', '00000000-0000-0000-0000-000000000000', NULL)"
    )
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2, server_settings=PINNED_SETTINGS)
    try:
        database = PgDatabase(pool)
        ref = await asyncpg.connect(postgres.dsn, server_settings=PINNED_SETTINGS)
        try:
            sizes: list[int] = []
            # (a relation with an integer key, some rows with a NULL key: those are left out)
            relation = cfg.TableConfig(
                schema=schema,
                name="rel",
                query=f"SELECT id, c8 FROM {schema}.typed UNION ALL SELECT NULL::int8, 'no key'",
                key=("id",),
            )
            for config in (*(cfg.TableConfig(schema=schema, name=n) for n in ("typed", "composite")), relation):
                table = await database.describe(config)
                name = config.name
                expected = await reference(ref, table)
                got = await loaded(database, table)
                assert got == expected, name
                assert await database.fetch(table, list(expected)) == expected, name  # (refetches too)
                sizes += [len(wire.row_json(e)) for e in got.values()]
            assert min(sizes) < 128 and any(4096 <= s <= 16384 for s in sizes) and max(sizes) > 16384
            assert len(sizes) == 12 + 2 + 12  # typed, composite, the relation (no NULL key)
        finally:
            await ref.close()
    finally:
        await pool.close()


async def test_a_load_reads_in_chunks_from_one_snapshot(postgres, db, schema):
    await db.execute(f"CREATE TABLE {schema}.many (id int PRIMARY KEY, v text)")
    await db.execute(f"INSERT INTO {schema}.many SELECT g, 'v' || g FROM generate_series(1, 25000) g")
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2, server_settings=PINNED_SETTINGS)
    try:
        database = PgDatabase(pool)
        table = await database.describe(cfg.TableConfig(schema=schema, name="many"))
        rows: dict[Any, bytes] = {}
        chunks = 0
        async for chunk in database.load(table):
            chunks += 1
            rows.update(chunk)
            if chunks == 1:  # a change committed mid-load is not seen by the rest of it
                await db.execute(f"DELETE FROM {schema}.many WHERE id > 20000")
        assert chunks > 1 and len(rows) == 25000
    finally:
        await pool.close()


async def test_the_estimate_is_the_planners(postgres, db, schema):
    await db.execute(f"CREATE TABLE {schema}.counted (id int PRIMARY KEY, v int)")
    await db.execute(f"INSERT INTO {schema}.counted SELECT g, g % 10 FROM generate_series(1, 5000) g")
    await db.execute(f"ANALYZE {schema}.counted")
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2, server_settings=PINNED_SETTINGS)
    try:
        database = PgDatabase(pool)
        whole = await database.describe(cfg.TableConfig(schema=schema, name="counted"))
        assert await database.estimate(whole) == 5000
        subset = await database.describe(cfg.TableConfig(schema=schema, name="counted", where="v = 3"))
        estimate = await database.estimate(subset)
        assert estimate is not None and 250 <= estimate <= 1000  # ~500: the filter is planned too
    finally:
        await pool.close()


async def test_list_tables_and_the_metrics_show_the_loads(start_daemon, db, schema, capture):
    await db.execute(f"CREATE TABLE {schema}.shown (id int PRIMARY KEY, v text)")
    await db.execute(f"INSERT INTO {schema}.shown SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    await db.execute(f"ANALYZE {schema}.shown")
    await db.execute(f"CREATE TABLE {schema}.lazy (id int PRIMARY KEY)")
    full, lazy = f"{schema}.shown", f"{schema}.lazy"
    sidecar = await start_daemon([full, f"{lazy}:lazy"], metrics_listen="127.0.0.1:0")
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.CacheStub(channel)

        async def listed() -> dict[str, Any]:
            return {t.name: t for t in (await stub.ListTables(pb.ListTablesRequest())).tables}

        info = (await listed())[full]
        assert info.HasField("load") and not (await listed())[lazy].HasField("load")
        assert (info.load.running, info.load.rows, info.load.expected_rows) == (False, 3000, 3000)
        assert info.load.completed == 1 and info.load.seconds > 0 and info.load.rows_per_second > 0
        if capture == "notify":
            await stub.Invalidate(pb.InvalidateRequest(table=full, all_rows=True))
        else:  # (an Invalidate of a table whose rows come from the stream drops nothing: no reload)
            sidecar.core.notices.reload_table(full, "the test asks")
        await eventually(lambda: sidecar.core.tables[full].load_progress.completed == 2, what="reloaded")
        assert (await listed())[full].load.completed == 2
    samples = await asyncio.to_thread(scrape, sidecar.daemon.metrics_address)
    assert value(samples, "cache_sidecar_load_rows", table=full) == 3000
    assert value(samples, "cache_sidecar_load_expected_rows", table=full) == 3000
    assert value(samples, "cache_sidecar_table_loading", table=full) == 0
    assert ("cache_sidecar_load_rows", (("table", lazy),)) not in samples


async def test_a_stalled_load_fails_within_its_timeout(postgres, db, schema):
    """A load streamed by COPY is bounded per chunk, as a cursor's fetches are: one that gets
    no rows (here: a lock holds it) gives up instead of hanging the table's readers."""
    await db.execute(f"CREATE TABLE {schema}.held (id int PRIMARY KEY)")
    await db.execute(f"INSERT INTO {schema}.held SELECT generate_series(1, 10)")
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2, server_settings=PINNED_SETTINGS)
    holder = await asyncpg.connect(postgres.dsn)
    try:
        database = PgDatabase(pool, timeout=0.5)
        table = await database.describe(cfg.TableConfig(schema=schema, name="held"))
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {schema}.held IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(Unavailable, match=r"no rows for 0\.5s"):
                await asyncio.wait_for(loaded(database, table), 20)
        assert len(await loaded(database, table)) == 10  # (its connection is fine for the next)
    finally:
        await holder.close()
        await pool.close()


async def test_an_abandoned_load_ends_its_copy_and_keeps_its_connection(postgres, db, schema):
    await db.execute(f"CREATE TABLE {schema}.left (id int PRIMARY KEY, v text)")
    await db.execute(f"INSERT INTO {schema}.left SELECT g, repeat('v', 100) FROM generate_series(1, 100000) g")
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=1, server_settings=PINNED_SETTINGS)
    try:
        database = PgDatabase(pool)
        table = await database.describe(cfg.TableConfig(schema=schema, name="left"))
        chunks = database.load(table)
        assert len(await anext(chunks)) >= 10_000
        await asyncio.wait_for(chunks.aclose(), 10)  # (a reload superseded, or the daemon stopping)
        running = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'COPY%' AND query LIKE $1",
            f"%{schema}%",
        )
        assert running == 0
        # The pool's one connection serves the next load: it was not left inside a COPY.
        assert len(await asyncio.wait_for(loaded(database, table), 20)) == 100_000
    finally:
        await asyncio.wait_for(pool.close(), 10)

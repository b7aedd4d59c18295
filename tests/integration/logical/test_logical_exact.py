"""The daemon in logical capture on a real server with ``wal_level = logical``: the rows it
builds from the stream are byte for byte what ``row_to_json`` (and so a NOTIFY-mode daemon)
serves, for every type of the README's table and more, after inserts, updates and deletes
made while it runs, with no query per committed change; the changes around it
(partitions, inheritance, big transactions, TRUNCATE, savepoints, replica-role writes,
unchanged TOASTed values, keys the replica identity does not name) come out right."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient

from sidecar import config as cfg
from sidecar.core.wire import row_json
from sidecar.pg import logical
from tests.conftest import RunningDaemon
from tests.integration.logical.test_rowjson_exact import ROWS, SCHEMA
from tests.support.logical import connect
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

Start = Callable[..., Awaitable[RunningDaemon]]


class RolledBack(Exception):
    """Raised in a savepoint (``conn.transaction()`` inside another) to roll it back."""


# ---------------------------------------------------------------- helpers


async def database_rows(conn: asyncpg.Connection, table: str, key: str = "id") -> dict[Any, bytes]:
    """Every row of ``table`` as the daemon's own queries read it (``conn`` pinned the same way)."""
    rows = await conn.fetch(f"SELECT {key} AS k, row_to_json(t.*)::text AS j FROM {table} t")
    return {r["k"]: str(r["j"]).encode() for r in rows}


def cached_rows(daemon: RunningDaemon, table: str) -> dict[Any, bytes]:
    """What the daemon holds of ``table``, by its single key column's value (while a reload
    writes over the rows, its mark among them is not a row)."""
    rows = daemon.core.tables[table].rows
    return {key[0]: row_json(entry) for key, entry in list(rows.items()) if entry}


async def served_rows(daemon: RunningDaemon, table: str, keys: list[Any]) -> dict[Any, bytes | None]:
    """The bytes the daemon serves over gRPC (BatchGet, STRONG) for ``keys``."""
    rows: list[Any] = []
    async with AsyncClient(daemon.target, decoder=bytes) as client:
        for start in range(0, len(keys), 1000):  # (server.max_batch_keys)
            rows += await client.batch_get(table, keys[start : start + 1000], consistency="strong")
    return dict(zip(keys, rows, strict=True))


async def assert_exact(daemon: RunningDaemon, conn: asyncpg.Connection, table: str) -> dict[Any, bytes]:
    """After a barrier, the daemon holds and serves exactly the database's rows (``id``: an
    integer key)."""
    await daemon.engine.sync()
    want = await database_rows(conn, table)
    held = cached_rows(daemon, table)
    assert sorted(held, key=repr) == sorted(want, key=repr), f"{table}: keys differ"
    for k, row in want.items():
        assert held[k] == row, f"{table} key {k!r}: held {held[k]!r}, database {row!r}"
    served = await served_rows(daemon, table, [*want, -1])
    for k, row in want.items():
        assert served[k] == row, f"{table} key {k!r}: served {served[k]!r}, database {row!r}"
    assert served[-1] is None
    return want


def assert_from_stream(daemon: RunningDaemon, table: str) -> None:
    """Every change of ``table`` so far was applied from the stream: no query per change."""
    full = daemon.core.tables[table]
    assert full.streamed, f"{table}: streaming stopped ({full.stream_stopped})"
    assert (full.refetches, full.reloads) == (0, 1), f"{table}: {full.queries()}"


# ---------------------------------------------------------------- 1. every type, exact bytes

# Values the shared type table (test_rowjson_exact) does not have: long and odd numerics,
# floats at their edges, deep and escaped JSON, domains over arrays and composites, more
# built-in types.
EXTRA_SCHEMA = r"""
CREATE TYPE {s}.inner AS (label text, at timestamptz, tags text[]);
CREATE TYPE {s}.outer AS (i {s}.inner, n numeric, "quo""ted" text, arr {s}.inner[]);
CREATE DOMAIN {s}.outerdom AS {s}.outer;
CREATE DOMAIN {s}.arrdom AS text[] CHECK (cardinality(VALUE) < 100);
CREATE DOMAIN {s}.numdom AS numeric(40, 10);
CREATE TABLE {s}.x (
    id integer PRIMARY KEY,
    n numeric, f4 real, f8 double precision, ts timestamp, tstz timestamptz, d date,
    tm time(3), ttz timetz, iv interval, j json, jb jsonb,
    o {s}.outer, od {s}.outerdom, ad {s}.arrdom, nd {s}.numdom,
    a3 integer[], ab bytea[], au uuid[], ainet inet[],
    m8 macaddr8, ln line, ci circle, pa path, pg polygon, ls lseg, tq tsquery,
    txt text, vc varchar, bits varbit, u uuid, ip inet, mo money
)
"""

DEEP_JSON = "[" * 60 + '{"k": "\\u00e9\\ud83d\\ude00\\u001fx", "n": 1.50}' + "]" * 60
LONG_NUMERIC = "9" * 1000 + "." + "0" * 15 + "1"
HOSTILE = "".join(chr(c) for c in range(1, 32)) + "\x7f\"\\/'\u00fc\u2028\u2029\U0001f600 {}(),NULL \u0080\uffff"

EXTRA_ROWS: list[dict[str, str]] = [
    {
        "n": f"'{LONG_NUMERIC}'",
        "f4": "'-0'",
        "f8": "'-0'",
        "ts": "'0001-01-01 00:00:00 BC'",
        "tstz": "'infinity'",
        "d": "'0001-01-01 BC'",
        "tm": "'23:59:59.999'",
        "ttz": "'12:00:00-12'",
        "iv": "'-1 days +03:00:00.000001'",
        "j": "$j$[" + DEEP_JSON + ', "\\u0000"]$j$',
        "jb": f"$j${DEEP_JSON}$j$",
        "o": "ROW(ROW('a \"b\" c', '2020-02-29 12:00+01', ARRAY['x', NULL, 'y,z']), 'NaN', 'q\"\"', "
        "ARRAY[ROW(NULL, NULL, NULL)::{s}.inner, NULL])",
        "od": "ROW(NULL, '-1e-30', E'\\\\', '{}')",
        "ad": "ARRAY[E'\\n', 'NULL', NULL, '\"', '']",
        "nd": "'-123456789012345678901234567890.0123456789'",
        "a3": "'[-1:0][2:2][0:1]={{{1,2}},{{NULL,4}}}'",
        "ab": "ARRAY['\\x'::bytea, NULL, '\\xdeadbeef']",
        "au": "ARRAY['00000000-0000-0000-0000-000000000000'::uuid, NULL]",
        "ainet": "ARRAY['::1/128'::inet, '10.1.2.3/8']",
        "m8": "'08:00:2b:01:02:03:04:05'",
        "ln": "'{1,-1,0.5}'",
        "ci": "'<(1.5,2),3>'",
        "pa": "'[(0,0),(1,1e-300)]'",
        "pg": "'((0,0),(1,1),(1,0))'",
        "ls": "'[(0,0),(1,1)]'",
        "tq": "'fat & (rat | cat)'",
        "txt": "$h$" + HOSTILE + "$h$",
        "vc": "repeat('é', 3000)",
        "bits": "B'1010101010101010101'",
        "u": "gen_random_uuid()",
        "ip": "'2001:db8::1/64'",
        "mo": "'-1.5'",
    },
    {
        "n": "'-Infinity'",
        "f4": "'1.4e-45'",
        "f8": "'2.2250738585072014e-308'",
        "ts": "'294276-12-31 23:59:59.999999'",
        "tstz": "'-infinity'",
        "d": "'5874897-12-31'",
        "tm": "'24:00:00'",
        "ttz": "'00:00:00.5+14:30'",
        "iv": "'178000000 years'",
        "j": """'{"a":1,"a":2, "s": "\\ud83d\\ude00 \\" \\\\ \\/"}'""",
        "jb": """'{"a": 1e-400, "b": -0, "c": 1.000000000000000000001, "d": [[], {}], "\\u0001": null}'""",
        "o": "ROW(ROW('', NULL, '{}'), '0', '', '{}')",
        "od": "ROW(ROW(E'(\\\\)', '0044-03-15 12:00:00+00 BC', ARRAY[E'\\\\x']), '1e20', NULL, NULL)",
        "ad": "'{}'",
        "nd": "'0'",
        "a3": "'{{1},{2}}'",
        "txt": "''",
        "vc": "E' \\t'",
        "bits": "B''",
        "mo": "'92233720368547758.07'",
    },
    {},  # everything NULL
]

UPDATES = [  # (statement, what it is for), run in order after the inserts
    ("UPDATE {s}.t SET t = coalesce(t, '') || E'\\u0001', p = ROW(id, 'u\"p') WHERE id <= 2", "texts, composites"),
    ("UPDATE {s}.t SET ai = a2, a2 = ai, af = ARRAY['-0', 'NaN']::float8[] WHERE id = 3", "arrays swapped"),
    ("UPDATE {s}.t SET id = 40 WHERE id = 4", "a key change"),
    ("""UPDATE {s}.x SET o = od, od = o, j = jb::json, jb = '[1, "\\u00e9", {"": 0.10}]' WHERE id IN (1, 2)""", "json"),
    ("UPDATE {s}.x SET n = n * 3, f8 = f8 / 3, tstz = '2024-06-01 12:00:00.000001+07' WHERE id = 1", "numbers"),
    ("UPDATE {s}.x SET id = 30, txt = 'moved' WHERE id = 3", "a key change"),
    ("DELETE FROM {s}.t WHERE id = 1", "a delete"),
    ("DELETE FROM {s}.x WHERE id = 2", "a delete"),
]


def _insert(table: str, number: int, row: dict[str, str], s: str) -> str:
    items = [(k, v.replace("{s}", s)) for k, v in row.items()]
    names = ", ".join(["id", *(k for k, _ in items)])
    values = ", ".join([str(number), *(v for _, v in items)])
    return f"INSERT INTO {s}.{table} ({names}) VALUES ({values})"


@pytest.fixture
async def any_lschema(any_logical_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """A fresh schema on each available PostgreSQL version: (dsn, schema)."""
    name = f"l_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(any_logical_dsn)
    await conn.execute(f"CREATE SCHEMA {name}")
    yield any_logical_dsn, name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


async def test_every_type_is_served_byte_exact_in_both_modes(
    any_lschema: tuple[str, str], start_logical: Start
) -> None:
    dsn, s = any_lschema
    conn = await connect(dsn)
    await conn.execute(SCHEMA.replace("{s}", s))
    await conn.execute(EXTRA_SCHEMA.replace("{s}", s))
    tables = [f"{s}.t", f"{s}.x"]
    # The NOTIFY daemon first: its triggers are in place before the logical daemon's start.
    notify = await start_logical(tables, capture="notify", dsn=dsn)
    streamed = await start_logical(tables, dsn=dsn)
    for table in tables:
        assert streamed.core.tables[table].streamed, table
        assert not notify.core.tables[table].streamed, table

    # Rows one transaction each, then several in one transaction: all built from the stream.
    await conn.execute(_insert("t", 1, ROWS[0], s))
    await conn.execute(_insert("x", 1, EXTRA_ROWS[0], s))
    async with conn.transaction():
        for number, row in enumerate(ROWS[1:], start=2):
            await conn.execute(_insert("t", number, row, s))
        for number, row in enumerate(EXTRA_ROWS[1:], start=2):
            await conn.execute(_insert("x", number, row, s))
    for table in tables:
        await assert_exact(streamed, conn, table)
    for statement, _ in UPDATES:
        await conn.execute(statement.replace("{s}", s))
    for table in tables:
        want = await assert_exact(streamed, conn, table)
        await assert_exact(notify, conn, table)
        assert len(want) == {f"{s}.t": len(ROWS) - 1, f"{s}.x": len(EXTRA_ROWS) - 1}[table]
        keys = [*want, 1, 2]
        assert await served_rows(streamed, table, keys) == await served_rows(notify, table, keys)
        assert_from_stream(streamed, table)
        assert notify.core.tables[table].refetches > 0  # (the comparison is with the other mode)
    await conn.close()


RANDOM_ROWS = """
INSERT INTO {t}
SELECT g,
    ((random() - 0.5) * power(10::float8, (random() * 600 - 300)::int)),
    ((random() - 0.5) * power(10::float8, (random() * 70 - 35)::int))::float4,
    round(((random() - 0.5) * power(10::numeric, (random() * 40 - 20)::int))::numeric, (random() * 30)::int),
    'epoch'::timestamptz + (random() - 0.5) * interval '2000000 days',
    'epoch'::timestamp + (random() - 0.5) * interval '2000000 days' + random() * interval '1 second',
    (SELECT string_agg(chr(c), '') FROM (
        SELECT CASE WHEN r < 0.3 THEN 1 + (random() * 126)::int
                    WHEN r < 0.6 THEN 128 + (random() * 55000)::int
                    ELSE 57344 + (random() * 1000000)::int END AS c
        FROM (SELECT random() AS r, g AS k FROM generate_series(1, 40)) x) y),
    jsonb_build_object('f', random() * 1e10, 'n', g, 's', md5(g::text), 'a', jsonb_build_array(random(), NULL)),
    ARRAY[random()::float4::float8, random() * 1e-300, -random()],
    interval '1 microsecond' * (random() * 1e12)::bigint
FROM generate_series({first}, {last}) g
"""


async def test_random_values_are_served_byte_exact(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    """Many random floats, numerics, timestamps, intervals and texts (any code point) built
    from the stream: each as row_to_json writes it."""
    s = lschema
    table = f"{s}.r"
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id integer PRIMARY KEY, f8 float8, f4 real, n numeric, tstz timestamptz,
            ts timestamp, t text, j jsonb, af float8[], iv interval)""")
    daemon = await start_logical([table])
    await conn.execute(RANDOM_ROWS.format(t=table, first=1, last=1000))
    await conn.execute(f"UPDATE {table} SET f8 = f8 * 3, f4 = f4 / 7, n = n * 1.1, t = t || id WHERE id % 2 = 0")
    await conn.execute(f"DELETE FROM {table} WHERE id % 5 = 0")
    want = await assert_exact(daemon, conn, table)
    assert len(want) == 800
    assert_from_stream(daemon, table)


# Types whose row_to_json text the stream cannot give exactly, so the table refetches its
# changed rows (as NOTIFY mode does): table -> (columns, a value for each row written).
REFETCHED = {
    "ranges": (
        "r int4range, mr int8multirange, ar tstzrange[], dr {s}.daterange_dom",
        [
            "'[1,5)', '{[1,2), [5,9)}', ARRAY['[2020-01-01 00:00+02,infinity)'::tstzrange], '[2024-01-01,2024-02-01)'",
            "'empty', '{}', '{}', NULL",
        ],
    ),
    "casts": (
        "f {s}.flag, fs {s}.flag[], df {s}.flag_dom",
        ["'on', NULL, 'off'", "NULL, '{on,off}', NULL"],
    ),
    "generated": (
        "v text, twice integer GENERATED ALWAYS AS (id * 2) STORED",
        ["'a'", "'b'"],
    ),
}


async def test_types_that_cannot_be_built_exactly_are_refetched_and_still_exact(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE DOMAIN {s}.daterange_dom AS daterange;
        CREATE TYPE {s}.flag AS ENUM ('on', 'off');
        CREATE FUNCTION {s}.flag_json({s}.flag) RETURNS json LANGUAGE sql IMMUTABLE
            AS $$ SELECT json_build_object('flag', $1::text) $$;
        CREATE CAST ({s}.flag AS json) WITH FUNCTION {s}.flag_json({s}.flag);
        CREATE DOMAIN {s}.flag_dom AS {s}.flag""")
    for table, (columns, _) in REFETCHED.items():
        await conn.execute(f"CREATE TABLE {s}.{table} (id integer PRIMARY KEY, {columns.replace('{s}', s)})")
    await conn.execute(f"CREATE TABLE {s}.plain (id integer PRIMARY KEY, v text)")
    names = [f"{s}.{t}" for t in [*REFETCHED, "plain"]]
    daemon = await start_logical(names)
    for table, (columns, values) in REFETCHED.items():
        assert not daemon.core.tables[f"{s}.{table}"].streamed, table
        column_names = ", ".join(c.split()[0] for c in columns.split(", ") if "GENERATED" not in c)
        for number, value in enumerate(values, start=1):
            await conn.execute(
                f"INSERT INTO {s}.{table} (id, {column_names}) VALUES ({number}, {value.replace('{s}', s)})"
            )
        await conn.execute(f"UPDATE {s}.{table} SET id = 10 WHERE id = 1")
        await conn.execute(f"DELETE FROM {s}.{table} WHERE id = 2")
        await conn.execute(f"INSERT INTO {s}.{table} (id, {column_names}) VALUES (3, {values[-1].replace('{s}', s)})")
    await conn.execute(f"INSERT INTO {s}.plain VALUES (1, 'p')")
    for table in names:
        await assert_exact(daemon, conn, table)
    for table in REFETCHED:
        full = daemon.core.tables[f"{s}.{table}"]
        assert full.refetches > 0 and full.reloads == 1, (table, full.queries())
    assert_from_stream(daemon, f"{s}.plain")  # (the others' refetching leaves it alone)
    # row_to_json calls the cast: what the enum's text alone would say is not what is served
    assert (await served_rows(daemon, f"{s}.casts", [3]))[
        3
    ] == b'{"id":3,"f":null,"fs":[{"flag" : "on"},{"flag" : "off"}],"df":null}'
    await conn.close()


async def test_vector_types_are_built_from_the_stream(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    """int2vector and oidvector are arrays to row_to_json (JSON arrays of their elements),
    but their text is not array text: "1 2 3"."""
    s = lschema
    table = f"{s}.vectors"
    conn = await connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, iv int2vector, ov oidvector)")
    daemon = await start_logical([table])
    await conn.execute(f"INSERT INTO {table} VALUES (1, '1 2 3', '4 5'), (2, '', NULL), (3, '-32768', '4294967295')")
    await conn.execute(f"UPDATE {table} SET iv = '-1', ov = '' WHERE id = 2")
    want = await assert_exact(daemon, conn, table)
    assert want[1] == b'{"id":1,"iv":[1,2,3],"ov":["4","5"]}'
    assert_from_stream(daemon, table)


async def test_hstore_is_refetched_and_exact(system_logical_dsn: str, start_logical: Start) -> None:
    """hstore (an extension type with a cast to json) on the machine's PostgreSQL, whose
    contrib modules are installed (the embedded server has none)."""
    s = f"h_{secrets.token_hex(4)}"
    conn = await connect(system_logical_dsn)
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'hstore')"):
            pytest.skip("hstore is not installed on the system PostgreSQL")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS hstore")
        await conn.execute(f"CREATE SCHEMA {s}")
        await conn.execute(f"CREATE TABLE {s}.h (id integer PRIMARY KEY, h hstore, hs hstore[])")
        daemon = await start_logical([f"{s}.h"], dsn=system_logical_dsn)
        assert not daemon.core.tables[f"{s}.h"].streamed
        await conn.execute(
            f"""INSERT INTO {s}.h VALUES (1, 'a=>1, "b c"=>NULL', ARRAY['x=>"y,z"'::hstore]), (2, '', NULL)"""
        )
        await conn.execute(f"UPDATE {s}.h SET h = h || 'd=>4' WHERE id = 1")
        await conn.execute(f"DELETE FROM {s}.h WHERE id = 2")
        want = await assert_exact(daemon, conn, f"{s}.h")
        assert want[1] == b'{"id":1,"h":{"a": "1", "d": "4", "b c": null},"hs":[{"x": "y,z"}]}'
        full = daemon.core.tables[f"{s}.h"]
        assert full.refetches > 0 and full.reloads == 1, full.queries()
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await conn.close()


# ---------------------------------------------------------------- 2. partitions, inheritance


async def _partitioned(conn: asyncpg.Connection, s: str) -> None:
    await conn.execute(f"""
        CREATE TABLE {s}.p (id integer PRIMARY KEY, v text, n numeric) PARTITION BY RANGE (id);
        CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);
        CREATE TABLE {s}.p2 PARTITION OF {s}.p FOR VALUES FROM (100) TO (200);
        INSERT INTO {s}.p SELECT g, 'v' || g, g / 7.0 FROM generate_series(1, 150, 10) g""")


async def test_writes_naming_partitions_reach_the_roots_cache(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"])
    root = f"{s}.p"
    await conn.execute(f"INSERT INTO {s}.p1 VALUES (2, 'in p1', 2)")
    await conn.execute(f"INSERT INTO {s}.p VALUES (102, 'via the root', 102)")
    await conn.execute(f"UPDATE {s}.p2 SET v = 'updated in p2' WHERE id = 111")
    await conn.execute(f"UPDATE {s}.p1 SET v = 'updated in p1', n = NULL WHERE id = 1")
    await conn.execute(f"UPDATE {s}.p SET id = 122, v = 'moved to p2' WHERE id = 21")  # p1 -> p2
    await conn.execute(f"UPDATE {s}.p SET id = 32, v = 'moved to p1' WHERE id = 131")  # p2 -> p1
    await conn.execute(f"DELETE FROM {s}.p2 WHERE id = 141")
    await conn.execute(f"DELETE FROM {s}.p1 WHERE id = 11")
    async with conn.transaction():  # several partitions in one transaction
        await conn.execute(f"UPDATE {s}.p SET n = -n WHERE id IN (31, 121)")
        await conn.execute(f"DELETE FROM {s}.p WHERE id IN (41, 101)")
    await assert_exact(daemon, conn, root)
    assert_from_stream(daemon, root)


async def test_a_partition_added_later_is_heard(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"])
    root = f"{s}.p"
    await conn.execute(f"CREATE TABLE {s}.p3 PARTITION OF {s}.p FOR VALUES FROM (200) TO (300)")
    # Another column order (and a dropped column) than the root's: rows come in the root's.
    await conn.execute(f"""
        CREATE TABLE {s}.p4 (gone integer, n numeric, v text, id integer NOT NULL);
        ALTER TABLE {s}.p4 DROP COLUMN gone;
        ALTER TABLE {s}.p ATTACH PARTITION {s}.p4 FOR VALUES FROM (300) TO (400)""")
    await conn.execute(f"INSERT INTO {s}.p3 VALUES (201, 'in p3', 1.5)")
    await conn.execute(f"INSERT INTO {s}.p4 (id, v, n) VALUES (301, 'in p4', 2.5), (302, 'in p4 too', NULL)")
    await conn.execute(f"UPDATE {s}.p4 SET v = 'updated in p4' WHERE id = 302")
    await conn.execute(f"UPDATE {s}.p SET id = 202 WHERE id = 301")  # p4 -> p3
    await conn.execute(f"UPDATE {s}.p SET id = 5 WHERE id = 201")  # p3 -> p1
    await conn.execute(f"DELETE FROM {s}.p4 WHERE id = 302")
    await assert_exact(daemon, conn, root)
    # (The catalog check reloads the table when its partitions change; its changes are
    # refetched from then on, until the next rebuild.)
    await conn.execute(f"UPDATE {s}.p4 SET v = 'after the reload' WHERE id = 302")
    await conn.execute(f"INSERT INTO {s}.p3 VALUES (203, 'after the reload', 3)")
    await assert_exact(daemon, conn, root)


@pytest.mark.parametrize(
    "capture",
    [
        "notify",
        "logical",
    ],
)
async def test_a_partition_cached_beside_its_root(
    logical_dsn: str, lschema: str, start_logical: Start, capture: str
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p", f"{s}.p1"], capture=capture)
    await conn.execute(f"INSERT INTO {s}.p1 VALUES (2, 'naming the partition', 1)")
    await conn.execute(f"UPDATE {s}.p SET v = 'naming the root' WHERE id = 1")
    await conn.execute(f"DELETE FROM {s}.p WHERE id = 11")
    await assert_exact(daemon, conn, f"{s}.p")
    await assert_exact(daemon, conn, f"{s}.p1")


@pytest.mark.parametrize("capture", ["notify", "logical"])
async def test_attaching_a_partition_with_rows(
    logical_dsn: str, lschema: str, start_logical: Start, capture: str
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"], capture=capture)
    await conn.execute(f"""
        CREATE TABLE {s}.p5 (id integer PRIMARY KEY, v text, n numeric);
        INSERT INTO {s}.p5 VALUES (501, 'there before the attach', 1);
        ALTER TABLE {s}.p ATTACH PARTITION {s}.p5 FOR VALUES FROM (500) TO (600)""")
    await assert_exact(daemon, conn, f"{s}.p")


@pytest.mark.parametrize("capture", ["notify", "logical"])
async def test_detaching_a_partition(logical_dsn: str, lschema: str, start_logical: Start, capture: str) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"], capture=capture)
    await conn.execute(f"ALTER TABLE {s}.p DETACH PARTITION {s}.p2")
    await assert_exact(daemon, conn, f"{s}.p")


@pytest.mark.parametrize("capture", ["notify", "logical"])
async def test_truncating_a_partition(logical_dsn: str, lschema: str, start_logical: Start, capture: str) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"], capture=capture)
    await conn.execute(f"TRUNCATE {s}.p2")
    await assert_exact(daemon, conn, f"{s}.p")


async def test_truncating_a_partition_is_heard_without_a_barrier(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await _partitioned(conn, s)
    daemon = await start_logical([f"{s}.p"])
    await conn.execute(f"TRUNCATE {s}.p2")
    await conn.execute(f"INSERT INTO {s}.p VALUES (3, 'after', 3)")  # (committed after the TRUNCATE)
    # (the TRUNCATE reloads the table: until that reload lands, the store holds its rows over
    # the old ones, 3 among them, and the truncated partition's rows not yet dropped)
    table = daemon.core.full[f"{s}.p"]
    await eventually(
        lambda: 3 in cached_rows(daemon, f"{s}.p") and not table.reloading and not table.mixed,
        what="the insert after the TRUNCATE",
    )
    assert cached_rows(daemon, f"{s}.p") == await database_rows(conn, f"{s}.p")


async def test_inheritance_children_changes_are_heard(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    """A cached parent's rows include its children's (the load reads ``FROM parent``), so
    their changes must be heard too."""
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {s}.parent (id integer PRIMARY KEY, v text);
        CREATE TABLE {s}.child (extra text, PRIMARY KEY (id)) INHERITS ({s}.parent);
        INSERT INTO {s}.parent VALUES (1, 'parent row');
        INSERT INTO {s}.child VALUES (2, 'child row', 'x'), (3, 'child row', 'y')""")
    daemon = await start_logical([f"{s}.parent"])
    assert len(cached_rows(daemon, f"{s}.parent")) == 3
    await conn.execute(f"INSERT INTO {s}.parent VALUES (4, 'parent row')")
    await conn.execute(f"INSERT INTO {s}.child VALUES (5, 'child row', 'z')")
    await conn.execute(f"UPDATE {s}.child SET v = 'child updated' WHERE id = 2")
    await conn.execute(f"DELETE FROM {s}.child WHERE id = 3")
    await assert_exact(daemon, conn, f"{s}.parent")
    await conn.execute(f"UPDATE {s}.child SET v = 'updated again' WHERE id = 2")
    await assert_exact(daemon, conn, f"{s}.parent")


async def test_truncate_only_the_parent_keeps_the_childrens_rows(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {s}.parent (id integer PRIMARY KEY, v text);
        CREATE TABLE {s}.child (PRIMARY KEY (id)) INHERITS ({s}.parent);
        INSERT INTO {s}.parent VALUES (1, 'parent row');
        INSERT INTO {s}.child VALUES (2, 'child row')""")
    daemon = await start_logical([f"{s}.parent"])
    await conn.execute(f"TRUNCATE ONLY {s}.parent")
    await conn.execute(f"INSERT INTO {s}.parent VALUES (3, 'after')")  # (applied after the TRUNCATE)
    # (the TRUNCATE reloads the table: until that reload lands, the store holds its rows over
    # the old ones, 3 among them, and the parent's own old row not yet dropped; a read meanwhile
    # is not served from them. The last fresh-clone CI run caught the store in between.)
    table = daemon.core.full[f"{s}.parent"]
    await eventually(
        lambda: 3 in cached_rows(daemon, f"{s}.parent") and not table.reloading and not table.mixed,
        what="the insert after the TRUNCATE, and the reload landed",
    )
    # (no read barrier: its catalog check would reload the table, the TRUNCATE gave it new storage)
    assert cached_rows(daemon, f"{s}.parent") == await database_rows(conn, f"{s}.parent")


async def test_an_inheritance_child_added_later_is_heard(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {s}.parent (id integer PRIMARY KEY, v text)")
    daemon = await start_logical([f"{s}.parent"])
    await conn.execute(f"""
        CREATE TABLE {s}.late (PRIMARY KEY (id)) INHERITS ({s}.parent);
        INSERT INTO {s}.late VALUES (1, 'late child row')""")
    await assert_exact(daemon, conn, f"{s}.parent")  # (the catalog check reloads: the child is new)
    await conn.execute(f"UPDATE {s}.late SET v = 'updated' WHERE id = 1")
    await conn.execute(f"INSERT INTO {s}.late VALUES (2, 'another')")
    await assert_exact(daemon, conn, f"{s}.parent")


async def test_an_inheritance_child_without_a_key_is_refused_and_writes_to_it_still_work(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    """The publication must not make the application's own writes fail: an inheritance
    child with no primary key has no replica identity, and a table in a publication that
    publishes updates and deletes refuses them then. So the start refuses, naming it, and
    publishes nothing."""
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {s}.parent (id integer PRIMARY KEY, v text);
        CREATE TABLE {s}.keyless () INHERITS ({s}.parent);
        INSERT INTO {s}.keyless VALUES (1, 'a')""")
    with pytest.raises(AssertionError, match="exited during start"):
        await start_logical([f"{s}.parent"])
    await conn.execute(f"UPDATE {s}.keyless SET v = 'b'")
    await conn.execute(f"DELETE FROM {s}.keyless")


async def test_a_rewrite_that_sends_no_row_changes_is_seen(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    """``ALTER COLUMN ... TYPE ... USING`` rewrites every row and decodes to no row change:
    the catalog check must stay on in logical mode (the read barrier asks it)."""
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {s}.w (id integer PRIMARY KEY, v text); INSERT INTO {s}.w VALUES (1, 'a')")
    daemon = await start_logical([f"{s}.w"])
    await conn.execute(f"ALTER TABLE {s}.w ALTER COLUMN v TYPE text USING upper(v)")
    await assert_exact(daemon, conn, f"{s}.w")


# ---------------------------------------------------------------- 3. big transactions


async def test_a_transaction_larger_than_logical_decoding_work_mem(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    assert await conn.fetchval("SHOW logical_decoding_work_mem") == "64kB"
    await conn.execute(f"""
        CREATE TABLE {s}.big (id integer PRIMARY KEY, v text, n integer);
        INSERT INTO {s}.big SELECT g, 'before ' || g, g FROM generate_series(1, 100) g""")
    daemon = await start_logical([f"{s}.big"])
    async with conn.transaction():  # about 1 MB of changes: spilled to disk while decoded
        await conn.execute(
            f"INSERT INTO {s}.big SELECT g, repeat(md5(g::text), 8), g FROM generate_series(101, 3100) AS g"
        )
        await conn.execute(f"UPDATE {s}.big SET v = v || ' updated', n = -n WHERE id % 3 = 0")
        await conn.execute(f"UPDATE {s}.big SET id = id + 10000 WHERE id BETWEEN 50 AND 80")  # key changes
        await conn.execute(f"DELETE FROM {s}.big WHERE id % 7 = 0")
        with contextlib.suppress(RolledBack):
            async with conn.transaction():  # a rolled-back savepoint inside it
                await conn.execute(f"INSERT INTO {s}.big SELECT g, 'no', g FROM generate_series(20001, 22000) g")
                await conn.execute(f"UPDATE {s}.big SET v = 'rolled back' WHERE id < 50")
                raise RolledBack
    want = await assert_exact(daemon, conn, f"{s}.big")
    assert len(want) > 2500
    assert_from_stream(daemon, f"{s}.big")


async def test_a_transaction_of_more_rows_than_are_held_reloads_once_and_is_never_stale(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    table = f"{s}.many"
    rows = logical.MAX_TRANSACTION_ROWS + 10
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id integer PRIMARY KEY, n integer NOT NULL);
        INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {rows}) g""")
    daemon = await start_logical([table])
    seen: list[int | None] = []
    stop = asyncio.Event()

    async def read_all_along(client: AsyncClient) -> None:
        while not stop.is_set():  # (EVENTUAL reads, as fast as they come)
            (first, last) = await client.batch_get(table, [1, rows])
            seen.extend((first and first["n"], last and last["n"]))

    async with AsyncClient(daemon.target) as client:
        reader = asyncio.create_task(read_all_along(client))
        await eventually(lambda: len(seen) > 10, what="reads before the change")
        await conn.execute(f"UPDATE {table} SET n = n + 1")  # one transaction, more rows than held
        # (the barrier's token comes after the whole transaction is decoded: give it time)
        (first,) = await client.batch_get(table, [1], consistency="strong", timeout=120)
        assert first == {"id": 1, "n": 1}
        count = len(seen)
        await eventually(lambda: len(seen) > count + 10, what="reads after the change")
        stop.set()
        await reader
    # Once a read saw the change, none saw the row before it again.
    assert None not in seen
    assert seen[-1] == 1 and seen == sorted(seen), "a read went back to the row before the change"
    full = daemon.core.tables[table]
    await eventually(lambda: full.reloads == 2, what="the one reload landed")  # (reads went to the database)
    assert (full.refetches, full.reloads) == (0, 2), full.queries()
    assert len(await assert_exact(daemon, conn, table)) == rows


# ---------------------------------------------------------------- 4-6. TRUNCATE, savepoints, replica role


async def until_held(daemon: RunningDaemon, conn: asyncpg.Connection, table: str) -> None:
    """Wait, with no read barrier (which asks the catalog too), until the daemon holds the
    database's rows of ``table``."""
    want = await database_rows(conn, table)
    await eventually(lambda: cached_rows(daemon, table) == want, what=f"{table} as in the database")


async def test_truncate_empties_the_cache_from_the_stream(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    names = [f"{s}.{t}" for t in ("a", "b", "c")]
    for name in names:
        await conn.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {name} SELECT g, 'row ' || g FROM generate_series(1, 20) g")
    # (no periodic catalog check: it would reload a truncated table, for its new storage)
    daemon = await start_logical(names, catalog_check_interval=3600)
    await daemon.engine.sync()  # (the barrier after the first load is done: none runs until the end)
    await conn.execute(f"TRUNCATE {s}.a")
    await until_held(daemon, conn, f"{s}.a")
    await conn.execute(f"TRUNCATE {s}.b, {s}.c")  # several tables in one statement
    for name in names:
        await until_held(daemon, conn, name)
    await conn.execute(f"INSERT INTO {s}.a VALUES (1, 'before'), (2, 'before')")
    async with conn.transaction():  # TRUNCATE, then rows, in one transaction
        await conn.execute(f"INSERT INTO {s}.b VALUES (1, 'gone with the truncate')")
        await conn.execute(f"TRUNCATE {s}.a, {s}.b")
        await conn.execute(f"INSERT INTO {s}.a VALUES (2, 'after'), (3, 'after')")
        await conn.execute(f"UPDATE {s}.a SET v = 'after, updated' WHERE id = 3")
        await conn.execute(f"INSERT INTO {s}.b VALUES (5, 'after')")
    for name in names:
        await until_held(daemon, conn, name)
    assert cached_rows(daemon, f"{s}.a") == {2: b'{"id":2,"v":"after"}', 3: b'{"id":3,"v":"after, updated"}'}
    for name in names:
        assert_from_stream(daemon, name)
    # A read barrier's catalog check sees the new storage a TRUNCATE gives a table (as a
    # rewrite's, which decodes to no change at all) and reloads it: still right.
    for name in names:
        await assert_exact(daemon, conn, name)


async def test_a_rolled_back_savepoint_is_not_applied(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(
        f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text); INSERT INTO {s}.t VALUES (1, 'a'), (2, 'b')"
    )
    daemon = await start_logical([f"{s}.t"])
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {s}.t VALUES (3, 'kept')")
        with contextlib.suppress(RolledBack):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {s}.t VALUES (4, 'rolled back')")
                await conn.execute(f"UPDATE {s}.t SET v = 'rolled back' WHERE id = 1")
                await conn.execute(f"DELETE FROM {s}.t WHERE id = 2")
                raise RolledBack
        async with conn.transaction():  # a released savepoint: kept
            await conn.execute(f"UPDATE {s}.t SET v = 'kept' WHERE id = 2")
        with contextlib.suppress(RolledBack):
            async with conn.transaction():
                await conn.execute(f"UPDATE {s}.t SET v = 'rolled back too' WHERE id = 3")
                raise RolledBack
    want = await assert_exact(daemon, conn, f"{s}.t")
    assert set(want) == {1, 2, 3}
    assert_from_stream(daemon, f"{s}.t")


async def test_writes_in_replica_sessions_are_seen(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    """``session_replication_role = replica`` (a bulk-load trick) fires no ordinary trigger;
    the WAL has the writes all the same."""
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text); INSERT INTO {s}.t VALUES (1, 'a')")
    daemon = await start_logical([f"{s}.t"])
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(f"INSERT INTO {s}.t SELECT g, 'bulk' FROM generate_series(2, 500) g")
    await conn.execute(f"UPDATE {s}.t SET v = 'replica' WHERE id = 1")
    await conn.execute(f"DELETE FROM {s}.t WHERE id = 2")
    await conn.execute("RESET session_replication_role")
    want = await assert_exact(daemon, conn, f"{s}.t")
    assert len(want) == 499
    assert_from_stream(daemon, f"{s}.t")


# ---------------------------------------------------------------- 7. unchanged TOASTed values

BIG = "(SELECT string_agg(md5(random()::text || g::text), '') FROM generate_series(1, 150) g)"  # 4800 bytes


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
async def test_unchanged_toasted_values_are_kept_from_the_cached_row(
    logical_dsn: str, lschema: str, start_logical: Start, identity: str
) -> None:
    s = lschema
    table = f"{s}.toasty"
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id integer PRIMARY KEY, big text, small text, n integer, bigb bytea);
        ALTER TABLE {table} ALTER COLUMN big SET STORAGE EXTERNAL, ALTER COLUMN bigb SET STORAGE EXTERNAL;
        ALTER TABLE {table} REPLICA IDENTITY {identity};
        INSERT INTO {table} SELECT g, {BIG}, 'loaded', g, convert_to({BIG}, 'UTF8') FROM generate_series(1, 5) g""")
    daemon = await start_logical([table])
    await conn.execute(f"INSERT INTO {table} SELECT g, {BIG}, 'streamed', g, NULL FROM generate_series(6, 8) g")
    # Stored out of line (the premise: else the stream would send the values whole).
    toast = await conn.fetchval(f"SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '{table}'::regclass")
    assert await conn.fetchval(f"SELECT count(DISTINCT chunk_id) FROM {toast}") == 13
    await conn.execute(f"UPDATE {table} SET small = 'updated' WHERE id IN (1, 6)")  # a loaded row, a streamed one
    await conn.execute(f"UPDATE {table} SET id = id + 100, small = 'moved' WHERE id IN (2, 7)")  # key changes
    async with conn.transaction():  # the same row twice (and a key change then an update) in one transaction
        await conn.execute(f"UPDATE {table} SET small = 'first' WHERE id = 3")
        await conn.execute(f"UPDATE {table} SET n = -n WHERE id = 3")
        await conn.execute(f"UPDATE {table} SET id = 204 WHERE id = 4")
        await conn.execute(f"UPDATE {table} SET n = 0 WHERE id = 204")
        await conn.execute(f"INSERT INTO {table} VALUES (9, {BIG}, 'inserted', 9, NULL)")
        await conn.execute(f"UPDATE {table} SET small = 'inserted, then updated' WHERE id = 9")
        await conn.execute(f"DELETE FROM {table} WHERE id = 5")
        await conn.execute(f"INSERT INTO {table} VALUES (5, 'small now', 'again', 5, NULL)")
        await conn.execute(f"UPDATE {table} SET n = 55 WHERE id = 5")
    await conn.execute(f"UPDATE {table} SET big = big || 'x' WHERE id = 8")  # a changed one is sent whole
    want = await assert_exact(daemon, conn, table)
    assert set(want) == {1, 3, 5, 6, 8, 9, 102, 107, 204}
    assert all(len(want[k]) > 4800 for k in (1, 3, 6, 8, 9, 102, 107, 204))
    assert_from_stream(daemon, table)


# ---------------------------------------------------------------- 8. keys the replica identity does not name


async def test_a_replica_identity_that_is_not_the_key_reloads_and_is_right(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    """REPLICA IDENTITY USING INDEX on a unique column that is not the primary key: updates
    and deletes name the row by that column, not by the cached key, so the table reloads."""
    s = lschema
    table = f"{s}.coded"
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id integer PRIMARY KEY, code text NOT NULL UNIQUE, v text);
        ALTER TABLE {table} REPLICA IDENTITY USING INDEX coded_code_key;
        INSERT INTO {table} SELECT g, 'c' || g, 'v' FROM generate_series(1, 10) g""")
    daemon = await start_logical([table])
    await conn.execute(f"INSERT INTO {table} VALUES (11, 'c11', 'inserted')")  # (an insert names the key)
    await until_held(daemon, conn, table)
    assert_from_stream(daemon, table)
    await conn.execute(f"UPDATE {table} SET v = 'updated' WHERE id = 1")
    await assert_exact(daemon, conn, table)
    await conn.execute(f"UPDATE {table} SET code = 'changed' WHERE id = 2")
    await assert_exact(daemon, conn, table)
    await conn.execute(f"UPDATE {table} SET id = 30 WHERE id = 3")  # the key changes, the identity does not
    await assert_exact(daemon, conn, table)
    await conn.execute(f"DELETE FROM {table} WHERE id = 4")
    want = await assert_exact(daemon, conn, table)
    assert set(want) == {1, 2, 5, 6, 7, 8, 9, 10, 11, 30}
    assert daemon.core.tables[table].reloads > 1


async def test_a_relation_keyed_by_a_unique_column(logical_dsn: str, lschema: str, start_logical: Start) -> None:
    """A relation whose configured key is a unique column, not its source's primary key
    (default replica identity): its source's updates and deletes refresh the right rows."""
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {s}.users (id integer PRIMARY KEY, email text NOT NULL UNIQUE, name text);
        INSERT INTO {s}.users SELECT g, 'u' || g || '@x', 'user ' || g FROM generate_series(1, 10) g""")
    by_email = cfg.TableConfig(
        schema=s,
        name="by_email",
        query=f"SELECT email, id, name FROM {s}.users",
        key=("email",),
        sources=(cfg.RelationSource(s, "users", (("id", "id"),)),),
    )
    daemon = await start_logical([by_email])
    relation = f"{s}.by_email"
    await conn.execute(f"UPDATE {s}.users SET name = 'renamed' WHERE id = 1")
    await conn.execute(f"UPDATE {s}.users SET email = 'new@x' WHERE id = 2")  # the relation's key changes
    await conn.execute(f"UPDATE {s}.users SET id = 30 WHERE id = 3")  # the source's key changes
    await conn.execute(f"DELETE FROM {s}.users WHERE id = 4")
    await conn.execute(f"INSERT INTO {s}.users VALUES (11, 'u11@x', 'inserted')")
    await daemon.engine.sync()
    want = {
        str(r["email"]): str(r["j"]).encode()
        for r in await conn.fetch(
            f"SELECT email, row_to_json(t.*)::text AS j FROM (SELECT email, id, name FROM {s}.users) t"
        )
    }
    assert cached_rows(daemon, relation) == want
    served = await served_rows(daemon, relation, [*want, "u2@x", "u4@x"])
    assert served == {**want, "u2@x": None, "u4@x": None}


# ---------------------------------------------------------------- keys read from the stream

# (key column type, SQL literals of rows loaded at start, of a row inserted while running)
STREAM_KEYS = [
    ("int2", ["-32768", "7"], "8"),
    ("int8", ["9007199254740993", "-9223372036854775808"], "9223372036854775807"),
    ("numeric", ["1.50", "'NaN'", "100", "1e-20"], "'-0.000'"),
    ("numeric(6,2)", ["1.5", "-0"], "2"),
    ("real", ["0.1", "'NaN'", "'-Infinity'", "'-0'"], "3.4028235e38"),
    ("float8", ["0.1", "'NaN'", "5e-324"], "'Infinity'"),
    ("text", ["'héllo'", "E'\\u0001\\t\"\\\\'", "''"], "'NULL'"),
    ("varchar(8)", ["'v'"], "'w w'"),
    ("char(4)", ["'ab'", "''"], "'x'"),
    ("uuid", ["'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'"], "gen_random_uuid()"),
    ("bool", ["true"], "false"),
    ("name", ["'pg'"], "'x y'"),
    ("oid", ["0", "4294967295"], "42"),
    ("date", ["'2024-02-29'", "'infinity'", "'0001-01-01'"], "'-infinity'"),
    ("timestamp", ["'2024-01-01 10:00:00.5'", "'infinity'", "'0001-01-01 00:00'"], "'9999-12-31 23:59:59.999999'"),
    ("timestamptz", ["'2024-01-01 10:00:00+05:30'", "'-infinity'", "'0001-01-01 00:00+00'"], "now()"),
    ("bytea", ["'\\x00ff'", "'\\x'"], "'\\x5c22'"),
    ("{s}.mood", ["'sad'", "'so \"so\"'"], "'happy'"),
    ("{s}.code", ["'a'"], "'b'"),
]


async def assert_same_rows(daemon: RunningDaemon, conn: asyncpg.Connection, table: str) -> None:
    """After a barrier the daemon holds the database's rows exactly, none twice (the keys
    the stream names are the keys the load stored)."""
    await daemon.engine.sync()
    rows = await conn.fetch(f"SELECT row_to_json(t.*)::text AS j FROM {table} t")
    want = sorted(str(r["j"]).encode() for r in rows)
    held = sorted(row_json(entry) for entry in daemon.core.tables[table].rows.values())
    assert held == want, table


async def test_keys_read_from_the_stream_are_the_keys_loaded(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TYPE {s}.mood AS ENUM ('sad', 'so "so"', 'happy');
        CREATE DOMAIN {s}.code AS text CHECK (VALUE <> '')""")
    names = []
    for number, (sql_type, loaded, _) in enumerate(STREAM_KEYS):
        name = f"{s}.k{number}"
        names.append(name)
        await conn.execute(
            f"CREATE TABLE {name} (id {sql_type.replace('{s}', s)}, n integer, tag text, PRIMARY KEY (id, n))"
        )
        for literal in loaded:
            await conn.execute(f"INSERT INTO {name} VALUES ({literal.replace('{s}', s)}, 1, 'loaded')")
    daemon = await start_logical(names)
    for name, (_, loaded, inserted) in zip(names, STREAM_KEYS, strict=True):
        assert len(daemon.core.tables[name].rows) == len(loaded), name
        await conn.execute(f"INSERT INTO {name} VALUES ({inserted.replace('{s}', s)}, 1, 'inserted')")
        await conn.execute(f"UPDATE {name} SET tag = 'updated'")  # every row, loaded or streamed
        await conn.execute(f"UPDATE {name} SET n = 2 WHERE tag = 'updated' AND ctid = (SELECT min(ctid) FROM {name})")
    for name in names:
        await assert_same_rows(daemon, conn, name)
        assert_from_stream(daemon, name)
    for name in names:
        await conn.execute(f"DELETE FROM {name}")
    for name in names:
        await assert_same_rows(daemon, conn, name)
        assert not daemon.core.tables[name].rows, name
        assert_from_stream(daemon, name)


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
async def test_an_unchanged_toasted_key_is_read_from_the_old_key(
    logical_dsn: str, lschema: str, start_logical: Start, identity: str
) -> None:
    """A key stored out of line and not changed by an UPDATE comes as "unchanged" in the new
    row; the old key (which PostgreSQL sends then) names the row: no reload."""
    s = lschema
    table = f"{s}.bigkey"
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id text PRIMARY KEY, v text);
        ALTER TABLE {table} ALTER COLUMN id SET STORAGE EXTERNAL;
        ALTER TABLE {table} REPLICA IDENTITY {identity};
        INSERT INTO {table} SELECT string_agg(md5(g::text || n::text), ''), 'loaded'
            FROM generate_series(1, 66) g, generate_series(1, 3) n GROUP BY n""")
    daemon = await start_logical([table])
    await conn.execute(f"UPDATE {table} SET v = 'updated'")
    await conn.execute(f"UPDATE {table} SET id = id || 'x' WHERE id = (SELECT min(id) FROM {table})")
    async with conn.transaction():
        await conn.execute(f"UPDATE {table} SET v = 'twice' WHERE id = (SELECT max(id) FROM {table})")
        await conn.execute(f"UPDATE {table} SET v = v || ', twice' WHERE id = (SELECT max(id) FROM {table})")
    await daemon.engine.sync()
    want = await database_rows(conn, table)
    assert len(want) == 3 and all(len(k) > 2000 for k in want)
    assert cached_rows(daemon, table) == want
    assert await served_rows(daemon, table, list(want)) == want
    assert_from_stream(daemon, table)


async def test_an_unchanged_toasted_json_keeps_its_own_whitespace(
    logical_dsn: str, lschema: str, start_logical: Start
) -> None:
    """``json`` keeps its text as written, spaces and newlines around the value included, and
    ``row_to_json`` embeds it as is: an unchanged one taken from the cached row must too."""
    s = lschema
    table = f"{s}.doc"
    conn = await connect(logical_dsn)
    await conn.execute(f"""
        CREATE TABLE {table} (id integer PRIMARY KEY, j json, jb jsonb, small text);
        ALTER TABLE {table} ALTER COLUMN j SET STORAGE EXTERNAL, ALTER COLUMN jb SET STORAGE EXTERNAL""")
    daemon = await start_logical([table])
    await conn.execute(f"""
        INSERT INTO {table} SELECT g, (E'\\n  {{"k": "' || {BIG} || E'"}}\\n\\t ')::json,
            ('{{"k": "' || {BIG} || '"}}')::jsonb, 'a'
        FROM generate_series(1, 2) g""")
    await conn.execute(f"UPDATE {table} SET small = 'b'")
    want = await assert_exact(daemon, conn, table)
    assert all(b'"j":\n  {' in row for row in want.values())
    assert_from_stream(daemon, table)


@pytest.mark.parametrize(
    "capture",
    [
        "notify",
        "logical",
    ],
)
async def test_a_table_dropped_and_created_again(
    logical_dsn: str, lschema: str, start_logical: Start, capture: str
) -> None:
    s = lschema
    conn = await connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text); INSERT INTO {s}.t VALUES (1, 'a')")
    daemon = await start_logical([f"{s}.t"], capture=capture)
    await conn.execute(f"""
        DROP TABLE {s}.t;
        CREATE TABLE {s}.t (id integer PRIMARY KEY, v text);
        INSERT INTO {s}.t VALUES (2, 'b')""")
    await assert_exact(daemon, conn, f"{s}.t")  # (the catalog check reloads it)
    await conn.execute(f"INSERT INTO {s}.t VALUES (3, 'c')")
    await assert_exact(daemon, conn, f"{s}.t")

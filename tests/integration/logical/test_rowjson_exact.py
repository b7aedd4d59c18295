"""sidecar.pg.rowjson builds, from pgoutput's text columns, the very bytes PostgreSQL's
``row_to_json(t)::text`` gives, for every type the README lists and more, with hostile values;
and refuses (so the caller refetches) where it cannot."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sidecar.pg import pgoutput, rowjson
from tests.support.logical import Slot, connect

# A table with a column of every kind; dropped columns (of the table and of a composite type)
# must not show. Column names that need escaping in JSON too.
SCHEMA = r'''
CREATE TYPE {s}.mood AS ENUM ('sad', 'so "so"', 'héllo wörld', 'back\slash');
CREATE DOMAIN {s}.posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN {s}.shorttext AS text;
CREATE DOMAIN {s}.intarr AS integer[];
CREATE DOMAIN {s}.tsdom AS timestamptz;
CREATE TYPE {s}.pair AS (a integer, gone text, b text);
ALTER TYPE {s}.pair DROP ATTRIBUTE gone;
CREATE TYPE {s}.nested AS (p {s}.pair, arr integer[], t timestamptz, n numeric, j jsonb, "odd ""name""" bool);
CREATE TYPE {s}.empty AS ();
CREATE TABLE {s}.t (
    id integer PRIMARY KEY,
    dropped_early text,
    i2 smallint, i4 integer, i8 bigint, n numeric, n2 numeric(10, 3), f4 real, f8 double precision,
    b boolean, t text, vc varchar(10), ch char(5), c1 "char", nm name,
    by bytea, j json, jb jsonb,
    ts timestamp, ts3 timestamp(3), tstz timestamptz, d date, tm time, ttz timetz, iv interval,
    u uuid, ip inet, cidr cidr, mac macaddr, money money, bits bit(4), vb varbit, lsn pg_lsn,
    tsv tsvector, o oid, bx box, pt point,
    m {s}.mood, dom {s}.posint, dtext {s}.shorttext, darr {s}.intarr, dts {s}.tsdom,
    p {s}.pair, nest {s}.nested, e {s}.empty,
    ai integer[], a2 integer[], an numeric[], af float8[], at text[], ab boolean[], ats timestamptz[],
    ats0 timestamp[], aj jsonb[], ajs json[], am {s}.mood[], ap {s}.pair[], abx box[], aby bytea[],
    adom {s}.posint[], ad date[],
    "we""ird col" text, "new
line\col" text, "ünï" integer
);
ALTER TABLE {s}.t DROP COLUMN dropped_early;
'''

CONTROL = "".join(chr(c) for c in range(1, 32)) + "\x7f"
HOSTILE_TEXT = CONTROL + "\"\\/'\u00fc\u2028\u2029\U0001f600 {}(),NULL"

# (column, SQL expression) for each row; unlisted columns are NULL.
ROWS: list[dict[str, str]] = [
    {
        "i2": "1",
        "i4": "2",
        "i8": "3",
        "n": "12345678901234567890.000000000000000001",
        "n2": "1.5",
        "f4": "0.1",
        "f8": "0.1",
        "b": "true",
        "t": "'héllo'",
        "vc": "'abc'",
        "ch": "'ab'",
        "c1": "'x'",
        "nm": "'name'",
        "by": "'\\x00ff10'",
        "j": """'{"a" : 1, "a": [1,  2.50]}'""",
        "jb": """'{"b": "\\u00e9\\n", "a": [1, 2.50, null]}'""",
        "ts": "'2024-01-02 03:04:05.123456'",
        "ts3": "'2024-01-02 03:04:05.1239'",
        "tstz": "'2024-01-02 03:04:05.1+05:30'",
        "d": "'2024-02-29'",
        "tm": "'03:04:05.5'",
        "ttz": "'03:04:05+02'",
        "iv": "'1 year 2 mons 3 days 04:05:06.7'",
        "u": "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'",
        "ip": "'192.168.0.1/24'",
        "cidr": "'10.0.0.0/8'",
        "mac": "'08:00:2b:01:02:03'",
        "money": "12.34",
        "bits": "B'1010'",
        "vb": "B'101'",
        "lsn": "'16/B374D848'",
        "tsv": "'a fat cat'",
        "o": "42",
        "bx": "'((1,2),(3,4))'",
        "pt": "'(1.5,-2)'",
        "m": "'so \"so\"'",
        "dom": "7",
        "dtext": "'dom'",
        "darr": "'{1,2}'",
        "dts": "'2024-01-01 00:00:00+00'",
        "p": "ROW(1, 'x,\"y\" (z)')",
        "nest": "ROW(ROW(2, 'in\"ner\\'), ARRAY[1, NULL], '2024-01-01 00:00:00+00', 'NaN', '{\"k\": [true]}', true)",
        "e": "ROW()",
        "ai": "'{1,2,3}'",
        "a2": "'{{1,NULL},{3,4}}'",
        "an": "ARRAY['NaN', '1.50', '-0', '1e-20']::numeric[]",
        "af": "ARRAY['NaN', 'Infinity', '-Infinity', '-0', '1e-7', '1e300', '0.1']::float8[]",
        "at": "ARRAY[NULL, 'NULL', 'null', '', 'a b', '\"\\', 'x,y', '{}', E'\\n', 'é']",
        "ab": "'{t,f,NULL}'",
        "ats": "ARRAY['infinity', '2024-01-01 00:00:00.5+00', NULL]::timestamptz[]",
        "ats0": "ARRAY['2024-01-01 10:00', '0044-03-15 12:00 BC']::timestamp[]",
        "aj": """ARRAY['{"a": 1}', 'null', '"s"', '[1, "x,y"]']::jsonb[]""",
        "ajs": """ARRAY['{"a" :  1}', '  [ ]  ']::json[]""",
        "am": "ARRAY['so \"so\"', 'héllo wörld', 'back\\slash']::{s}.mood[]",
        "ap": "ARRAY[ROW(1, 'x,\"y\"')::{s}.pair, NULL, ROW(NULL, NULL)::{s}.pair, ROW(2, '')::{s}.pair]",
        "abx": "ARRAY['((1,2),(3,4))', '((0,0),(-1,-1))']::box[]",
        "aby": "ARRAY['\\x00'::bytea, '\\x5c22'::bytea]",
        "adom": "ARRAY[1, 2]::{s}.posint[]",
        "ad": "ARRAY['2024-01-01', '4713-01-01 BC', 'infinity']::date[]",
        '"we""ird col"': "'w'",
        '"new\nline\\col"': "'n'",
        '"ünï"': "1",
    },
    {  # extremes
        "i2": "-32768",
        "i4": "2147483647",
        "i8": "-9223372036854775808",
        "n": "'-0.000000000000000000000000000001'",
        "n2": "'-0'",
        "f4": "'NaN'",
        "f8": "'-Infinity'",
        "b": "false",
        "t": "$h$" + HOSTILE_TEXT + "$h$",
        "vc": "''",
        "ch": "''",
        "c1": "'\"'",
        "by": "'\\x'",
        "j": """'"\\u0000 esc \\"q\\" \\\\"'""",
        "jb": """'{"": "", "\\\\": "\\"", "x": 1e400}'""",
        "ts": "'infinity'",
        "ts3": "'-infinity'",
        "tstz": "'-infinity'",
        "d": "'infinity'",
        "tm": "'24:00:00'",
        "ttz": "'23:59:59.999999-15:59'",
        "iv": "'-178000000 years -1 microsecond'",
        "money": "-92233720368547758.08",
        "m": "'héllo wörld'",
        "dom": "2147483647",
        "dtext": "$h$" + HOSTILE_TEXT + "$h$",
        "darr": "'{}'",
        "dts": "'infinity'",
        "p": "ROW(NULL, NULL)",
        "nest": "ROW(NULL, '{}', NULL, 'Infinity', 'null', NULL)",
        "ai": "'[0:1]={1,2}'",
        "a2": "'[-2:-1][3:4]={{1,2},{3,4}}'",
        "an": "'{}'",
        "af": "'{-0,5e-324}'",
        "at": "ARRAY[$h$" + HOSTILE_TEXT + "$h$]",
        "ab": "'{}'",
        "ats": "'{}'",
        "aj": "ARRAY[NULL]::jsonb[]",
        "am": "'{}'",
        "ap": "'{}'",
        '"we""ird col"': "''",
    },
    {  # BC, far future, odd zones
        "n": "'Infinity'",
        "n2": "'-9999999.999'",
        "f4": "'3.4028235e38'",
        "f8": "'1e-300'",
        "ts": "'0044-03-15 12:00:00 BC'",
        "ts3": "'294276-12-31 23:59:59.999'",
        "tstz": "'4713-01-01 00:00:00+00 BC'",
        "d": "'4713-11-24 BC'",
        "tm": "'00:00:00'",
        "ttz": "'00:00:00+15:59:59'",
        "iv": "'0'",
        "m": "'back\\slash'",
        "ai": "'{{{1}}}'",
        "a2": "'{{{{{{1}}}}}}'",
        "ats": "ARRAY['1901-12-13 20:45:52+00', '0001-01-01 00:00:00+00 BC']::timestamptz[]",
        "nest": "ROW(ROW(NULL, '\\'), ARRAY[]::integer[], '2000-01-01 00:00:00.000001+00', '-0.5', '[]', false)",
    },
    {},  # everything NULL
]


def _columns(row: dict[str, str], s: str) -> tuple[str, str]:
    items = [(k, v.replace("{s}", s)) for k, v in row.items() if v]
    names = ", ".join(["id", *(k for k, _ in items)])
    return names, "".join(f", {v}" for _, v in items)


@pytest.fixture
async def db(any_logical_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A pinned session and a schema of the test's own, on each PostgreSQL version."""
    connection = await connect(any_logical_dsn)
    schema = f"rj_{secrets.token_hex(4)}"
    await connection.execute(f"CREATE SCHEMA {schema}")
    yield connection, schema
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")
    await connection.execute(f"DROP PUBLICATION IF EXISTS {schema}_pub")
    await connection.execute(f"DROP SCHEMA {schema} CASCADE")
    await connection.close()


async def _slot(conn: asyncpg.Connection, s: str, tables: str) -> Slot:
    await conn.execute(f"CREATE PUBLICATION {s}_pub FOR TABLE {tables}")
    return await Slot(conn, f"{s}_pub").create()


async def _types(conn: asyncpg.Connection, relation: pgoutput.Relation) -> dict[int, rowjson.TypeInfo]:
    rows = await conn.fetch(rowjson.CATALOG_QUERY, [c.type_oid for c in relation.columns])
    return rowjson.types_from_catalog(rows)


def _decode(messages: list[bytes]) -> list[pgoutput.Message]:
    decoder = pgoutput.StreamDecoder()
    return [decoder.feed(m) for m in messages]


async def _expected(conn: asyncpg.Connection, table: str) -> list[bytes]:
    rows = await conn.fetch(f"SELECT row_to_json(t.*)::text AS j FROM {table} t ORDER BY id")  # as the daemon reads
    return [str(r["j"]).encode() for r in rows]


async def test_rows_of_every_type_are_built_byte_exact(db: tuple[asyncpg.Connection, str]) -> None:
    conn, s = db
    await conn.execute(SCHEMA.replace("{s}", s))
    slot = await _slot(conn, s, f"{s}.t")
    try:
        for number, row in enumerate(ROWS, start=1):
            names, values = _columns(row, s)
            await conn.execute(f"INSERT INTO {s}.t ({names}) VALUES ({number}{values})")
        expected_inserted = await _expected(conn, f"{s}.t")
        inserted = _decode(await slot.peek())
        # Updates send the new row the same way: change every row (a text column and a composite).
        await conn.execute(f"UPDATE {s}.t SET t = coalesce(t, '') || E'\\u0001', p = ROW(id, 'u\"p')")
        expected_updated = await _expected(conn, f"{s}.t")
        updated = _decode(await slot.peek())[len(inserted) :]
    finally:
        await slot.drop()

    (relation, *_) = [m for m in inserted if isinstance(m, pgoutput.Relation)]
    assert [c.name for c in relation.columns][:2] == ["id", "i2"]  # the dropped column is not sent
    types = await _types(conn, relation)
    built = [rowjson.row_from_tuple(relation, m.new, types) for m in inserted if isinstance(m, pgoutput.Insert)]
    assert len(built) == len(ROWS)
    for number, (mine, theirs) in enumerate(zip(built, expected_inserted, strict=True), start=1):
        assert mine == theirs, f"row {number}"
    rebuilt = [rowjson.row_from_tuple(relation, m.new, types) for m in updated if isinstance(m, pgoutput.Update)]
    assert len(rebuilt) == len(ROWS)
    for number, (mine, theirs) in enumerate(zip(rebuilt, expected_updated, strict=True), start=1):
        assert mine == theirs, f"row {number} after the update"


async def test_a_type_with_a_cast_to_json_is_refused(db: tuple[asyncpg.Connection, str]) -> None:
    conn, s = db
    await conn.execute(f"""
        CREATE TYPE {s}.flag AS ENUM ('on', 'off');
        CREATE FUNCTION {s}.flag_json({s}.flag) RETURNS json LANGUAGE sql IMMUTABLE
            AS $$ SELECT json_build_object('flag', $1::text) $$;
        CREATE CAST ({s}.flag AS json) WITH FUNCTION {s}.flag_json({s}.flag);
        CREATE TABLE {s}.c (id integer PRIMARY KEY, f {s}.flag, fs {s}.flag[])""")
    slot = await _slot(conn, s, f"{s}.c")
    try:
        await conn.execute(f"INSERT INTO {s}.c VALUES (1, 'on', NULL), (2, NULL, '{{on}}')")
        messages = _decode(await slot.peek())
    finally:
        await slot.drop()
    (relation,) = [m for m in messages if isinstance(m, pgoutput.Relation)]
    types = await _types(conn, relation)
    first, second = [m for m in messages if isinstance(m, pgoutput.Insert)]
    # row_to_json calls the cast: what the text alone would say ("on") is not what it serves
    assert (await _expected(conn, f"{s}.c"))[0] == b'{"id":1,"f":{"flag" : "on"},"fs":null}'
    with pytest.raises(rowjson.Unconvertible, match=r"f: type .* has a cast to json"):
        rowjson.row_from_tuple(relation, first.new, types)
    with pytest.raises(rowjson.Unconvertible, match=r"fs: type .* has a cast to json"):
        rowjson.row_from_tuple(relation, second.new, types)


async def test_settings_that_were_not_pinned_are_refused_not_served(db: tuple[asyncpg.Connection, str]) -> None:
    conn, s = db
    await conn.execute(f"CREATE TABLE {s}.d (id integer PRIMARY KEY, ts timestamp, tstz timestamptz)")
    slot = await _slot(conn, s, f"{s}.d")
    try:
        await conn.execute(f"INSERT INTO {s}.d VALUES (1, '2024-01-02 03:04:05', '2024-01-02 03:04:05+00')")
        await conn.execute("SET DateStyle = 'SQL, DMY'")  # the walsender's settings write the text
        messages = _decode(await slot.peek())
        await conn.execute("RESET DateStyle")
    finally:
        await slot.drop()
    (relation,) = [m for m in messages if isinstance(m, pgoutput.Relation)]
    (insert,) = [m for m in messages if isinstance(m, pgoutput.Insert)]
    assert insert.new[1] == pgoutput.Text(b"02/01/2024 03:04:05")
    with pytest.raises(rowjson.Unconvertible, match=r"ts: timestamp text .* is not ISO"):
        rowjson.row_from_tuple(relation, insert.new, {})


async def test_unchanged_toast_and_generated_columns_are_the_callers_to_fill(
    db: tuple[asyncpg.Connection, str],
) -> None:
    conn, s = db
    await conn.execute(f"""
        CREATE TABLE {s}.g (id integer PRIMARY KEY, big text, small text,
            twice integer GENERATED ALWAYS AS (id * 2) STORED);
        ALTER TABLE {s}.g ALTER COLUMN big SET STORAGE EXTERNAL""")
    slot = await _slot(conn, s, f"{s}.g")
    try:
        await conn.execute(f"INSERT INTO {s}.g VALUES (1, repeat('x', 5000), 'a')")
        await conn.execute(f"UPDATE {s}.g SET small = 'b'")
        messages = _decode(await slot.peek())
    finally:
        await slot.drop()
    (relation,) = [m for m in messages if isinstance(m, pgoutput.Relation)]
    assert [c.name for c in relation.columns] == ["id", "big", "small"]  # no generated column
    (update,) = [m for m in messages if isinstance(m, pgoutput.Update)]
    with pytest.raises(rowjson.Unconvertible, match="big: unchanged TOASTed value"):
        rowjson.row_from_tuple(relation, update.new, {})

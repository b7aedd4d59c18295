"""The documented type mapping, value by value: PostgreSQL value -> row JSON,
and client key -> the row it names, for every supported key type."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient

from sidecar import config as cfg
from sidecar.app import Daemon
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

# (column type, SQL literal, JSON value the row carries) -- the README's table.
VALUES = [
    ("int2", "-32768", -32768),
    ("int4", "2147483647", 2147483647),
    ("int8", "9223372036854775807", 9223372036854775807),
    (
        "numeric",
        "12345678901234567890.000000000000000001",
        decimal.Decimal("12345678901234567890.000000000000000001"),
    ),
    ("numeric", "'NaN'", "NaN"),
    ("float8", "0.1", 0.1),
    ("float8", "'Infinity'", "Infinity"),
    ("float4", "1.5", 1.5),
    ("text", "'héllo \"quoted\" \\n'", 'héllo "quoted" \\n'),
    ("bool", "true", True),
    ("uuid", "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("date", "'2024-02-29'", "2024-02-29"),
    ("timestamp", "'2024-01-01 10:00:00.123456'", "2024-01-01T10:00:00.123456"),
    ("timestamptz", "'2024-01-01 10:00:00+05:30'", "2024-01-01T04:30:00+00:00"),
    ("timestamptz", "'infinity'", "infinity"),
    ("bytea", "'\\x00ff10'", "\\x00ff10"),
    ("json", "'{\"b\": [1, 2.50]}'", {"b": [1, decimal.Decimal("2.50")]}),
    ("jsonb", '\'{"b": [1, 2.50], "a": null}\'', {"a": None, "b": [1, decimal.Decimal("2.50")]}),
    ("int4[]", "'{1,NULL,3}'", [1, None, 3]),
    ("text[]", "'{a,\"b c\"}'", ["a", "b c"]),
    ("int4", "NULL", None),
]


async def test_row_json_mapping_value_by_value(start_daemon, db, schema):
    columns = ", ".join(f"c{i} {t}" for i, (t, _, _) in enumerate(VALUES))
    literals = ", ".join(lit for _, lit, _ in VALUES)
    await db.execute(f"CREATE TABLE {schema}.typed (id int PRIMARY KEY, {columns})")
    await db.execute(f"INSERT INTO {schema}.typed VALUES (1, {literals})")
    sidecar = await start_daemon([f"{schema}.typed"])
    import json

    async with AsyncClient(sidecar.target, decoder=lambda b: json.loads(b, parse_float=decimal.Decimal)) as cache:
        row = await cache.get(f"{schema}.typed", 1)
    for i, (sql_type, literal, expected) in enumerate(VALUES):
        got = row[f"c{i}"]
        if isinstance(expected, float):
            assert float(got) == expected, sql_type
        else:
            assert got == expected, f"{sql_type} {literal}: {got!r}"


KEYS = [
    # (key column type, SQL literal, what a client passes)
    ("int2", "7", 7),
    ("int4", "7", "7"),
    ("int8", "9007199254740993", 9007199254740993),
    ("numeric", "1.50", decimal.Decimal("1.5")),
    ("numeric(6,2)", "1.50", "1.50"),
    ("text", "'héllo'", "héllo"),
    ("varchar(8)", "'v'", "v"),
    ("char(4)", "'ab'", "ab"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("bool", "true", True),
    ("date", "'2024-02-29'", dt.date(2024, 2, 29)),
    ("timestamp", "'2024-01-01 10:00:00'", "2024-01-01T10:00:00"),
    (
        "timestamptz",
        "'2024-01-01 10:00:00+00'",
        dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    ),
    ("bytea", "'\\x00ff'", b"\x00\xff"),
    ("float8", "0.5", 0.5),
]


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_every_key_type_finds_its_row(start_daemon, db, schema, mode):
    for i, (sql_type, literal, _) in enumerate(KEYS):
        await db.execute(f"CREATE TABLE {schema}.k{i} (id {sql_type} PRIMARY KEY, tag text)")
        await db.execute(f"INSERT INTO {schema}.k{i} VALUES ({literal}, 'found')")
    await db.execute(f"CREATE TYPE {schema}.mood AS ENUM ('happy', 'sad')")
    await db.execute(f"CREATE TABLE {schema}.kenum (id {schema}.mood, n int, tag text, PRIMARY KEY (id, n))")
    await db.execute(f"INSERT INTO {schema}.kenum VALUES ('sad', 3, 'found')")
    tables = [f"{schema}.k{i}:{mode}" for i in range(len(KEYS))] + [f"{schema}.kenum:{mode}"]
    sidecar = await start_daemon(tables)
    async with AsyncClient(sidecar.target) as cache:
        for i, (sql_type, _, key) in enumerate(KEYS):
            row = await cache.get(f"{schema}.k{i}", key)
            assert row is not None and row["tag"] == "found", sql_type
        assert (await cache.get(f"{schema}.kenum", ("sad", 3)))["tag"] == "found"
        assert await cache.get(f"{schema}.kenum", ("happy", 3)) is None


# Keys that PostgreSQL holds apart (or together) and that must round-trip exactly through
# load, Get, refetch, DELETE and the trigger's JSON: (column type, SQL literals of the rows,
# for each row what a client passes for it).
EXACT_KEYS = [
    ("real", ["0.1", "'NaN'", "'-Infinity'", "1.5"], [0.1, "NaN", float("-inf"), "1.5"]),
    ("float8", ["0.1", "'NaN'", "'-0'"], ["0.1", float("nan"), 0.0]),
    ("numeric", ["1.50", "'NaN'", "100"], ["1.5000", "NaN", decimal.Decimal("1E+2")]),
    (
        "date",
        ["'9999-12-31'", "'infinity'", "'-infinity'", "'0001-01-01'"],
        [
            dt.date(9999, 12, 31),
            "infinity",
            "-infinity",
            "0001-01-01",
        ],
    ),
    (
        "timestamp",
        ["'9999-12-31 23:59:59.999999'", "'infinity'", "'-infinity'"],
        [
            "9999-12-31T23:59:59.999999",
            "infinity",
            "-infinity",
        ],
    ),
    (
        "timestamptz",
        ["'9999-12-31 23:59:59+00'", "'infinity'", "'-infinity'", "'2024-06-01 12:00:00+02'"],
        [
            "9999-12-31T23:59:59+00:00",
            "infinity",
            "-infinity",
            "2024-06-01T10:00:00Z",
        ],
    ),
    ("text", ["'é'", "'e\u0301'", "'\U0001f600'", "'a '"], ["é", "e\u0301", "\U0001f600", "a "]),
    ("numeric", ["'Infinity'", "'-Infinity'", "0"], ["Infinity", "-Infinity", 0]),  # (PostgreSQL 14 on)
    # Types asyncpg already returns in one form: each round-trips through every path too.
    ("int8", ["-9223372036854775808", "0"], ["-9223372036854775808", 0.0]),
    ("uuid", ["'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'"], ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("bool", ["true", "false"], [True, "false"]),
    ("bytea", ["'\\x00ff'", "''"], [b"\x00\xff", b""]),
    ("char(4)", ["'ab'", "'ab c'"], ["ab  ", "ab c"]),
    ("varchar(3)", ["'é\t'"], ["é\t"]),
]


@pytest.mark.parametrize("mode", ["full", "lazy"])
@pytest.mark.parametrize("case", range(len(EXACT_KEYS)), ids=[f"{c[0]}-{n}" for n, c in enumerate(EXACT_KEYS)])
async def test_keys_round_trip_exactly(start_daemon, db, schema, postgres, mode, case):
    sql_type, literals, keys = EXACT_KEYS[case]
    if "'Infinity'" in literals and sql_type == "numeric" and int(postgres.version.split(".")[0]) < 14:
        pytest.skip("numeric has infinities from PostgreSQL 14 on")
    table = f"{schema}.x"
    await db.execute(f"CREATE TABLE {table} (id {sql_type} PRIMARY KEY, tag text)")
    for n, literal in enumerate(literals):
        await db.execute(f"INSERT INTO {table} VALUES ({literal}, 'row{n}')")
    sidecar = await start_daemon([f"{table}:{mode}"])
    expected = [f"row{n}" for n in range(len(keys))]
    async with AsyncClient(sidecar.target) as cache:
        if mode == "full":  # every row loaded under its own key: none collided or vanished
            (info,) = await cache.list_tables()
            assert (info.row_count, info.problem) == (len(literals), "")
        assert [row and row["tag"] for row in [await cache.get(table, key) for key in keys]] == expected
        assert [row and row["tag"] for row in await cache.batch_get(table, keys)] == expected
        # An UPDATE (a refetch by key) and a DELETE (the trigger's JSON of the key) of each row,
        # by a writer whose settings change how its session spells keys in JSON.
        await db.execute("SET TimeZone = 'Asia/Kolkata'; SET extra_float_digits = -15")
        for literal, key in zip(literals, keys, strict=True):
            assert await db.execute(f"UPDATE {table} SET tag = 'changed' WHERE id = ({literal})::{sql_type}") == (
                "UPDATE 1"
            )
            await cache.sync()
            assert (await cache.get(table, key))["tag"] == "changed", literal
            assert await db.execute(f"DELETE FROM {table} WHERE id = ({literal})::{sql_type}") == "DELETE 1"
            await cache.sync()
            assert await cache.get(table, key) is None, literal


async def test_a_key_the_sidecar_cannot_hold_fails_the_table_loudly(start_daemon, db, schema):
    # PostgreSQL's dates reach year 5874897; Python's stop at 9999: such a row cannot be
    # held, and a table without it would answer "not found" for a row that exists.
    await db.execute(f"CREATE TABLE {schema}.far (id date PRIMARY KEY, tag text)")
    await db.execute(f"INSERT INTO {schema}.far VALUES ('2024-01-01', 'near'), ('10000-01-01', 'far')")
    sidecar = await start_daemon([f"{schema}.far"], wait=False)
    async with AsyncClient(sidecar.target) as cache:

        async def problem() -> str:
            (info,) = await cache.list_tables()
            return info.problem

        # (one reading: a rebuild may clear it for a moment before the load fails again)
        text = await eventually(problem, what="the table marked not served")
        assert "beyond the years 1-9999" in text and f"{schema}.far" in text
        # (reads go to the database meanwhile, which holds both rows)
        assert (await cache.get(f"{schema}.far", "2024-01-01"))["tag"] == "near"


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ("text COLLATE {s}.nocase", "nondeterministic collation"),
        ("tsvector", "key column id has type tsvector"),
    ],
)
async def test_a_key_type_that_cannot_round_trip_stops_start_up(postgres, db, schema, caplog, column, message):
    if "COLLATE" in column:
        try:
            await db.execute(
                f"CREATE COLLATION {schema}.nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
            )
        except asyncpg.FeatureNotSupportedError:  # (only ICU collations can be nondeterministic)
            pytest.skip("this PostgreSQL has no ICU, so no nondeterministic collation")
    await db.execute(f"CREATE TABLE {schema}.nocase (id {column.format(s=schema)} PRIMARY KEY)")
    config = cfg.Config(
        dsn=postgres.dsn,
        listen=("127.0.0.1:0",),
        install_triggers=True,
        tables=(cfg.TableConfig(schema=schema, name="nocase"),),
    )
    assert await Daemon(config, handle_signals=False).run() == 2
    assert message in caplog.text and f"table {schema}.nocase" in caplog.text


async def test_composite_keys_of_every_canonical_form_round_trip(start_daemon, db, schema):
    # A domain over real, an enum, an infinite timestamp and a numeric with trailing zeros,
    # together in one primary key: each part is canonical on its own, the key as a whole.
    await db.execute(f"CREATE DOMAIN {schema}.price AS real CHECK (VALUE >= 0)")
    await db.execute(f"CREATE TYPE {schema}.mood AS ENUM ('happy', 'sad')")
    await db.execute(
        f"CREATE TABLE {schema}.combo (p {schema}.price, m {schema}.mood, t timestamptz, n numeric, tag text,"
        " PRIMARY KEY (p, m, t, n))"
    )
    rows = [
        ("0.1", "'sad'", "'infinity'", "1.50", (0.1, "sad", "infinity", "1.5")),
        ("0.1", "'sad'", "'9999-12-31 23:59:59.999999+00'", "1.50", (0.1, "sad", "9999-12-31T23:59:59.999999Z", 1.5)),
        ("0.1", "'happy'", "'-infinity'", "1", ("0.1", "happy", "-infinity", "1.000")),
    ]
    for n, (p, m, t, num, _) in enumerate(rows):
        await db.execute(f"INSERT INTO {schema}.combo VALUES ({p}, {m}, {t}, {num}, 'row{n}')")
    table = f"{schema}.combo"
    sidecar = await start_daemon([table])
    async with AsyncClient(sidecar.target) as cache:
        (info,) = await cache.list_tables()
        assert (info.row_count, info.problem) == (3, "")
        keys = [key for *_, key in rows]
        assert [row["tag"] for row in await cache.batch_get(table, keys)] == ["row0", "row1", "row2"]
        for n, (p, m, t, num, key) in enumerate(rows):
            condition = f"p = {p}::{schema}.price AND m = {m} AND t = {t}::timestamptz AND n = {num}"
            assert await db.execute(f"UPDATE {table} SET tag = 'changed' WHERE {condition}") == "UPDATE 1"
            await cache.sync()
            assert (await cache.get(table, key))["tag"] == "changed", n
            assert await db.execute(f"DELETE FROM {table} WHERE {condition}") == "DELETE 1"
            await cache.sync()
            assert await cache.get(table, key) is None, n

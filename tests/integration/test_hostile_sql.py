"""The trust boundary against a real PostgreSQL: catalog names are never SQL, the
trigger function cannot be hijacked through search_path, generated SQL cannot
collide with user columns, and session settings cannot change served values
(see DESIGN.md, "The trust boundary")."""

from __future__ import annotations

import json
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from sidecar.core.indexes import IndexQuery
from sidecar.core.wire import row_json
from sidecar.identifiers import quote_ident
from sidecar.pg import triggers
from sidecar.pg.db import PgDatabase, describe_table, query_sql
from tests.support.pg import Postgres
from tests.support.waiting import eventually


def as_user(dsn: str, user: str) -> str:
    """``dsn`` connecting as ``user`` (the test servers trust local connections)."""
    if "://" not in dsn:
        return f"{dsn} user={user}"
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{urllib.parse.quote(user)}@{host}"))


def spec(schema: str, table: str, mode: str = "full") -> str:
    """A table as a config string spells it (quoted parts are exact)."""
    return f"{quote_ident(schema)}.{quote_ident(table)}:{mode}"


async def served(running: Any, name: str, key: Sequence[Any]) -> str | None:
    stored = await running.engine.get(name, list(key))
    return None if stored is None else row_json(stored).decode()


async def truth(conn: asyncpg.Connection, source: str, where: str, *args: Any) -> str:
    """The row's JSON as a fresh session of the superuser sees it (served rows' zone: UTC)."""
    value = await conn.fetchval(f"SELECT pg_catalog.row_to_json(x.*)::text FROM {source} x WHERE {where}", *args)
    assert value is not None, (source, where, args)
    return str(value)


async def serves(running: Any, name: str, key: Sequence[Any], expected: str, what: str) -> None:
    async def matches() -> bool:
        return await served(running, name, key) == expected

    await eventually(matches, timeout=10, what=what)


@pytest.fixture
async def superuser(postgres: Postgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres.dsn, server_settings={"TimeZone": "UTC"})
    yield conn
    await conn.close()


# ---------------------------------------------------------------- (3) catalog text never becomes SQL


async def test_hostile_names_install_serve_and_uninstall_and_nothing_else_runs(superuser, schema, start_daemon):
    conn = superuser
    token = secrets.token_hex(4)
    canary_role = f"canary_{token}"
    pwned = [f"pwned_{kind}_{token}" for kind in ("c", "l", "d")]
    # Each of these, if it reached SQL raw, would create one of the pwned tables or
    # give the canary role a privilege: after a newline (ending a "--" comment), after a
    # backslash-escaped quote (standard_conforming_strings off), after a dollar tag.
    # (Under 64 bytes: PostgreSQL would cut longer names, and the SQL in them.)
    injected_comment = f"k\nCREATE TABLE {pwned[0]}();--"
    injected_role = f"k\nALTER ROLE {canary_role} CREATEDB;--"
    injected_literal = f"l\\'; CREATE TABLE {pwned[1]}(); --"
    injected_dollar = f"$cache_sidecar$;CREATE TABLE {pwned[2]}();--"
    assert all(len(n.encode()) < 64 for n in (injected_comment, injected_role, injected_literal, injected_dollar))
    namespace = f"h\n\"q'$cache_sidecar$ -- */ /* \\ é {token}"
    tables = [
        # (schema, table, columns DDL, a key); the first two in a plain schema, so that
        # nothing but their own names could go wrong
        (
            schema,
            "comment",
            f"{quote_ident(injected_comment)} int, {quote_ident(injected_role)} int, v text, "
            f"PRIMARY KEY ({quote_ident(injected_comment)}, {quote_ident(injected_role)})",
            (1, 1),
        ),
        (
            schema,
            injected_literal,
            '"$cache_sidecar$" text PRIMARY KEY, "*/" text, "/*" text, "--" text, v text',
            ("b\\'\n",),
        ),
        (
            namespace,
            'we"ird\nname',
            f"{quote_ident(injected_dollar)} text, {quote_ident(injected_comment)} int, v text, "
            f"PRIMARY KEY ({quote_ident(injected_dollar)}, {quote_ident(injected_comment)})",
            ("a", 2),
        ),
        (  # 63 bytes, the longest names PostgreSQL keeps
            namespace,
            "ü" * 31 + "x",
            f'{quote_ident("k" + "é" * 31)} int PRIMARY KEY, "\'" text, """" text, v text',
            (3,),
        ),
    ]
    await conn.execute(f"CREATE ROLE {canary_role} NOLOGIN")
    await conn.execute(f"CREATE SCHEMA {quote_ident(namespace)}")

    async def nothing_else_ran() -> None:
        assert await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[])", pwned) == 0
        assert not await conn.fetchval("SELECT rolcreatedb FROM pg_roles WHERE rolname = $1", canary_role)

    try:
        sets = []
        for namespace_name, table, columns, key in tables:
            sql_name = f"{quote_ident(namespace_name)}.{quote_ident(table)}"
            await conn.execute(f"CREATE TABLE {sql_name} ({columns})")
            width = await conn.fetchval(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0", sql_name
            )
            values = ", ".join(f"${i}" for i in range(1, width + 1))
            await conn.execute(f"INSERT INTO {sql_name} VALUES ({values})", *key, *(["old"] * (width - len(key))))
            described = await describe_table(conn, cfg.TableConfig(schema=namespace_name, name=table))
            sets.append(triggers.TriggerSet(described, f"cs_{token}", 1000))
            # A DBA runs the reviewed script in a session that reads backslashes in '' as escapes.
            await conn.execute("SET standard_conforming_strings = off")
            await conn.execute(triggers.script(sets[-1:]))
            await conn.execute("RESET standard_conforming_strings")
            await nothing_else_ran()
        assert [await triggers.installed_state(conn, s) for s in sets] == ["current"] * len(sets)

        # The daemon finds them from config strings, and serves and follows them.
        running = await start_daemon([spec(n, t) for n, t, _, _ in tables], channel=f"cs_{token}")
        for (namespace_name, table, _, key), trigger_set in zip(tables, sets, strict=True):
            name = cfg.TableConfig(schema=namespace_name, name=table).qualified
            columns = trigger_set.schema.key_columns
            key_sql = " AND ".join(f"x.{quote_ident(c.name)} = ${i}" for i, c in enumerate(columns, 1))
            source = trigger_set.schema.sql_name
            assert await served(running, name, key) == await truth(conn, source, key_sql, *key)
            await conn.execute(f"UPDATE {source} x SET v = 'new' WHERE {key_sql}", *key)
            changed = await truth(conn, source, key_sql, *key)
            assert '"new"' in changed
            await serves(running, name, key, changed, f"update of {name!r}")
        await running.stop()

        assert await triggers.uninstall(conn, sets) == [s.schema.qualified for s in sets]
        for namespace_name in (schema, namespace):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid "
                "WHERE c.relnamespace = $1::text::regnamespace AND NOT tg.tgisinternal",
                quote_ident(namespace_name),
            )
            functions = await conn.fetchval(
                "SELECT count(*) FROM pg_proc WHERE pronamespace = $1::text::regnamespace", quote_ident(namespace_name)
            )
            assert (left, functions) == (0, 0)
        await nothing_else_ran()
    finally:
        await conn.execute(f"DROP SCHEMA {quote_ident(namespace)} CASCADE")
        await conn.execute(f"DROP ROLE {canary_role}")
        for table in pwned:
            await conn.execute(f"DROP TABLE IF EXISTS {quote_ident(table)}")


# ---------------------------------------------------------------- (4) search_path cannot hijack the trigger


async def test_a_writer_cannot_swallow_notifications_through_search_path(postgres, superuser, schema, start_daemon):
    conn = superuser
    writer = f"writer_{secrets.token_hex(4)}"
    mal = f"mal_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE TABLE {schema}.items (id int PRIMARY KEY, v text)")
    await conn.execute(f"INSERT INTO {schema}.items VALUES (1, 'old')")
    await conn.execute(f"CREATE ROLE {writer} LOGIN")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {writer}")
    await conn.execute(f"GRANT SELECT, UPDATE ON {schema}.items TO {writer}")
    await conn.execute(f"CREATE SCHEMA {mal} AUTHORIZATION {writer}")
    try:
        running = await start_daemon([f"{schema}.items"])
        assert json.loads(await served(running, f"{schema}.items", [1]) or "null")["v"] == "old"
        hostile = await asyncpg.connect(as_user(postgres.dsn, writer))
        try:
            # The writer's own functions, earlier in its search_path than pg_catalog's.
            await hostile.execute(
                f"CREATE FUNCTION {mal}.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS 'BEGIN END';"
                f"CREATE FUNCTION {mal}.txid_current() RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint';"
                f"SET search_path = {mal}, pg_catalog"
            )
            assert await hostile.fetchval("SELECT txid_current()") == 0  # the trap is set
            await hostile.execute(f"UPDATE {schema}.items SET v = 'new' WHERE id = 1")
        finally:
            await hostile.close()
        expected = await truth(conn, f"{schema}.items", "x.id = 1")
        assert '"new"' in expected
        await serves(running, f"{schema}.items", [1], expected, "the writer's update")
        await running.stop()
    finally:
        await conn.execute(f"DROP SCHEMA {mal} CASCADE")
        await conn.execute(f"DROP OWNED BY {writer}")
        await conn.execute(f"DROP ROLE {writer}")


async def test_an_outdated_install_is_upgraded(superuser, schema):
    conn = superuser
    await conn.execute(f"CREATE TABLE {schema}.items (id int PRIMARY KEY)")
    described = await describe_table(conn, cfg.TableConfig(schema=schema, name="items"))
    trigger_set = triggers.TriggerSet(described, "c", 10)
    await triggers.install(conn, [trigger_set])
    # As an install from before search_path was pinned left it: same name, other definition.
    await conn.execute(f"ALTER FUNCTION {trigger_set.function_sql_name}() RESET search_path")
    await conn.execute(f"COMMENT ON FUNCTION {trigger_set.function_sql_name}() IS 'cache-sidecar change capture'")
    assert await triggers.installed_state(conn, trigger_set) == "outdated"
    assert await triggers.install(conn, [trigger_set]) == [described.qualified]
    config = await conn.fetchval(
        "SELECT proconfig FROM pg_proc WHERE oid = $1::text::regprocedure", trigger_set.function_sql_name + "()"
    )
    assert "search_path=pg_catalog, pg_temp" in config


# ---------------------------------------------------------------- (5) generated SQL cannot collide with columns

COLLIDING = ("t", "kind", "key", "n", "o", "run", "payload", "head", "s", "z", "m", "k", "moved", "sized", "keys")


@pytest.fixture
async def colliding(superuser: asyncpg.Connection, schema: str) -> str:
    conn = superuser
    others = [c for c in COLLIDING if c != "t"]
    pairs = [c for c in COLLIDING if c not in ("n", "key")]
    text_columns = ", ".join(f"{quote_ident(c)} text" for c in others)
    composite = ", ".join(f"{quote_ident(c)} {schema}.pair" for c in pairs)
    text_values = ", ".join(f"'{c}' || g" for c in others)
    pair_values = ", ".join(f"ROW(g, '{c}')::{schema}.pair" for c in pairs)
    await conn.execute(
        f"CREATE TABLE {schema}.plain (t text PRIMARY KEY, {text_columns});"
        f"CREATE TYPE {schema}.pair AS (a int, b text);"
        f"CREATE TABLE {schema}.composite (n int, key text, {composite}, PRIMARY KEY (n, key));"
        f"INSERT INTO {schema}.plain SELECT 'r' || g, {text_values} FROM generate_series(1, 5) g;"
        f"INSERT INTO {schema}.composite SELECT g, 'k' || g, {pair_values} FROM generate_series(1, 5) g;"
    )
    return schema


def collision_relations(schema: str, mode: str) -> list[cfg.TableConfig]:
    return [
        cfg.TableConfig(  # a query with a text column t as its key
            schema=schema,
            name="by_t",
            mode=mode,  # type: ignore[arg-type]
            query=f"SELECT p.t, p.kind, p.head AS n FROM {schema}.plain p",
            key=("t",),
            sources=(cfg.RelationSource(schema, "plain", (("t", "t"),)),),
        ),
        cfg.TableConfig(  # and one with a composite-typed column t
            schema=schema,
            name="with_t",
            mode=mode,  # type: ignore[arg-type]
            query=f"SELECT c.n AS id, c.key, c.t, c.run FROM {schema}.composite c",
            key=("id", "key"),
            sources=(cfg.RelationSource(schema, "composite", (("n", "id"), ("key", "key"))),),
        ),
    ]


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_columns_named_like_generated_aliases_are_served_exactly(superuser, colliding, start_daemon, mode):
    conn, s = superuser, colliding
    relations = collision_relations(s, mode)
    running = await start_daemon([f"{s}.plain:{mode}", f"{s}.composite:{mode}", *relations])
    by_t, with_t = (f"({r.query})" for r in relations)
    cases = [
        (f"{s}.plain", f"{s}.plain", "x.t = $1", ("r2",)),
        (f"{s}.composite", f"{s}.composite", "x.n = $1 AND x.key = $2", (2, "k2")),
        (f"{s}.by_t", by_t, "x.t = $1", ("r2",)),
        (f"{s}.with_t", with_t, "x.id = $1 AND x.key = $2", (2, "k2")),
    ]
    for name, source, where, key in cases:
        assert await served(running, name, key) == await truth(conn, source, where, *key), name
    await conn.execute(f"UPDATE {s}.plain SET kind = 'changed', head = 'changed' WHERE t = 'r2'")
    await conn.execute(f"UPDATE {s}.composite SET t = ROW(-1, 'changed') WHERE n = 2")
    await conn.execute(f"UPDATE {s}.composite SET n = 20, key = 'k20' WHERE n = 3")  # a key moves
    cases.append((f"{s}.composite", f"{s}.composite", "x.n = $1 AND x.key = $2", (20, "k20")))
    for name, source, where, key in cases:
        expected = await truth(conn, source, where, *key)
        await serves(running, name, key, expected, f"{name} {key} after the update")
    assert await served(running, f"{s}.composite", (3, "k3")) is None


async def test_index_and_matching_sql_with_colliding_columns(postgres, colliding):
    s = colliding
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=1)
    try:
        db = PgDatabase(pool)
        plain = await db.describe(cfg.TableConfig(s, "plain", indexes=(cfg.IndexConfig("by_kind", ("kind",)),)))
        composite = await db.describe(cfg.TableConfig(s, "composite"))
        expected = {
            ("r2",): await _json(pool, f"SELECT row_to_json(x.*)::text FROM {s}.plain x WHERE x.t = 'r2'"),
        }
        assert _decoded(await db.fetch(plain, [("r2",)])) == expected
        assert _decoded(await db.fetch_matching(plain, ["kind"], [("kind2",)])) == expected
        kind = plain.column("kind")
        rows = await db.query(plain, IndexQuery("by_kind", (kind,), [("kind2",)]))
        assert _decoded(rows) == expected
        ranged = await db.query(plain, IndexQuery("by_kind", (kind,), None, low="kind2", high="kind2"))
        assert _decoded(ranged) == expected
        assert query_sql(plain, IndexQuery("by_kind", (kind,), [("kind2",)]))[0].count("row_to_json(t.*)") == 1
        got = _decoded(await db.fetch(composite, [(2, "k2")]))
        sql = f"SELECT row_to_json(x.*)::text FROM {s}.composite x WHERE x.n = 2"
        assert got == {(2, "k2"): await _json(pool, sql)}
        assert set(json.loads(got[(2, "k2")])) == {"n", "key", *(c for c in COLLIDING if c not in ("n", "key"))}
    finally:
        await pool.close()


async def _json(pool: asyncpg.Pool, sql: str) -> str:
    async with pool.acquire() as conn:
        return str(await conn.fetchval(sql))


def _decoded(rows: dict[Any, bytes]) -> dict[Any, str]:
    return {key: row_json(value).decode() for key, value in rows.items()}


# ---------------------------------------------------------------- (9) session settings cannot change served values

TYPED_SQL = """
CREATE TABLE {s}.typed (
    id int PRIMARY KEY, f float8, r float4, i interval, d date, ts timestamp, tz timestamptz, b bytea,
    m money, a interval[], v text
);
INSERT INTO {s}.typed VALUES (
    1, 0.1::float8 + 0.2::float8, 1.1::float4, '1 year 2 mons 3 days 04:05:06.5', '2024-02-29',
    '2024-02-29 10:11:12.5', '2024-02-29 10:11:12.5+00', '\\x00ff5c27', 1234.56,
    ARRAY['1 day'::interval, '-2 hours'], 'v'
);
"""
# A relation whose query reads literals the way the session's settings say.
TYPED_QUERY = (
    "SELECT t.id, t.v, '03/04/2024'::date AS parsed_date, 'a\\\\b' AS backslash, 2::float8 / 3 AS third, "
    "'2024-01-01 12:00 EST'::timestamptz AS abbreviated, pg_catalog.to_char(1234.5, '9G999D9') AS formatted "
    "FROM {s}.typed t"
)


async def test_role_settings_do_not_change_served_values(postgres, superuser, schema, start_daemon):
    conn, s = superuser, schema
    role = f"odd_{secrets.token_hex(4)}"
    await conn.execute(TYPED_SQL.format(s=s))
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {s} TO {role}")
    await conn.execute(f"GRANT SELECT, TRIGGER ON {s}.typed TO {role}")
    for setting, value in [
        ("extra_float_digits", "0"),
        ("IntervalStyle", "sql_standard"),
        ("DateStyle", "SQL, DMY"),
        ("lc_monetary", "C.utf8"),  # the only other locale the test machines have; same money text as C
        ("TimeZone", "Asia/Kathmandu"),
        ("bytea_output", "escape"),
        ("standard_conforming_strings", "off"),
        ("xmloption", "document"),
        ("quote_all_identifiers", "on"),
        ("timezone_abbreviations", "Australia"),
    ]:
        await conn.execute(f"ALTER ROLE {role} SET {setting} = '{value}'")
    try:
        odd = await asyncpg.connect(as_user(postgres.dsn, role))
        try:  # the trap is set: the role's own sessions do see other values
            assert await odd.fetchval("SELECT (0.1::float8 + 0.2::float8)::text") == "0.3"
        finally:
            await odd.close()
        relation = cfg.TableConfig(
            schema=s,
            name="typed_view",
            query=TYPED_QUERY.format(s=s),
            key=("id",),
            sources=(cfg.RelationSource(s, "typed", (("id", "id"),)),),
        )
        running = await start_daemon([f"{s}.typed", relation], dsn=as_user(postgres.dsn, role))
        expected = await truth(conn, f"{s}.typed", "x.id = 1")
        assert json.loads(expected)["f"] == 0.30000000000000004
        assert await served(running, f"{s}.typed", [1]) == expected
        # The clean session reads the relation's literals with the server's defaults.
        view = await truth(conn, f"({TYPED_QUERY.format(s=s)})", "x.id = 1")
        assert json.loads(view)["parsed_date"] == "2024-03-04" and json.loads(view)["backslash"] == "a\\\\b"
        assert await served(running, f"{s}.typed_view", [1]) == view
        await conn.execute(f"UPDATE {s}.typed SET f = 0.1::float8 * 3, v = 'changed' WHERE id = 1")
        await serves(running, f"{s}.typed", [1], await truth(conn, f"{s}.typed", "x.id = 1"), "update, exactly")
        await serves(
            running, f"{s}.typed_view", [1], await truth(conn, f"({TYPED_QUERY.format(s=s)})", "x.id = 1"), "view"
        )
        await running.stop()
    finally:
        await conn.execute(f"DROP OWNED BY {role} CASCADE")
        await conn.execute(f"DROP ROLE {role}")

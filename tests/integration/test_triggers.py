"""The change-capture triggers on a real PostgreSQL (every available version)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sidecar.config import TableConfig
from sidecar.core import events
from sidecar.core.keys import coerce_key, normalize_stored
from sidecar.errors import SchemaError
from sidecar.pg import triggers
from sidecar.pg.db import describe_table
from tests.support.pg import Postgres

CHANNEL = "trigger_test"


class Capture:
    """LISTENs on a channel; ``drain`` returns everything sent before it was called."""

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.payloads: list[str] = []
        self._marker: asyncio.Future[None] | None = None

    def _on(self, _c: object, _pid: int, _ch: str, payload: str) -> None:
        if payload.startswith("marker:"):
            if self._marker is not None and not self._marker.done():
                self._marker.set_result(None)
            return
        self.payloads.append(payload)

    async def drain(self, writer: asyncpg.Connection) -> list[str]:
        # Notifications arrive in commit order: once our marker is back,
        # everything committed before it has arrived too.
        self._marker = asyncio.get_running_loop().create_future()
        await writer.execute("SELECT pg_notify($1, $2)", self.channel, f"marker:{secrets.token_hex(4)}")
        await asyncio.wait_for(self._marker, 10)
        taken, self.payloads = self.payloads, []
        return taken


@pytest.fixture
async def pg(any_postgres: Postgres) -> AsyncIterator[tuple[asyncpg.Connection, Capture]]:
    writer = await asyncpg.connect(any_postgres.dsn)
    listener = await asyncpg.connect(any_postgres.dsn)
    capture = Capture(listener, CHANNEL)
    await listener.add_listener(CHANNEL, capture._on)
    name = f"t_{secrets.token_hex(4)}"
    await writer.execute(f"CREATE SCHEMA {name}")
    await writer.execute(f"SET search_path = {name}")
    yield writer, capture
    await writer.execute(f"DROP SCHEMA {name} CASCADE")
    await listener.close()
    await writer.close()


async def install(conn: asyncpg.Connection, table: str, bulk: int = 1000) -> triggers.TriggerSet:
    schema = await conn.fetchval("SELECT current_schema()")
    described = await describe_table(conn, TableConfig(schema=schema, name=table))
    trigger_set = triggers.TriggerSet(described, CHANNEL, bulk)
    await triggers.install(conn, [trigger_set])
    return trigger_set


def parsed(payloads: list[str]) -> list[events.Event]:
    return [events.parse(p) for p in payloads]


async def test_install_is_idempotent_and_uninstall_removes_exactly_what_it_made(pg):
    conn, _ = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    await conn.execute("CREATE FUNCTION keep_me() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
    await conn.execute("CREATE TRIGGER user_trigger AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION keep_me()")

    async def objects() -> tuple[int, int]:
        functions = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace"
        )
        trigger_count = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal"
        )
        return functions, trigger_count

    before = await objects()
    trigger_set = await install(conn, "items")
    assert await objects() == (before[0] + 1, before[1] + 4)
    assert await triggers.installed_state(conn, trigger_set) == "current"
    assert await triggers.install(conn, [trigger_set]) == []  # nothing to do the second time
    assert await triggers.uninstall(conn, [trigger_set]) != []
    assert await objects() == before  # the user's own function and trigger are untouched
    assert await triggers.installed_state(conn, trigger_set) == "missing"
    assert await triggers.uninstall(conn, [trigger_set]) == []


async def test_another_configuration_installs_beside_the_first_not_over_it(pg):
    # Two sidecars (another bulk threshold, another channel: a rolling upgrade, two teams)
    # must not replace each other's triggers: each replacement locks the table, and the
    # one replaced would miss every change.
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    first = await install(conn, "items", bulk=10)
    second = triggers.TriggerSet(first.schema, CHANNEL, 20)
    elsewhere = triggers.TriggerSet(first.schema, "another_channel", 10)
    assert await triggers.installed_state(conn, second) == "missing"
    assert await triggers.install(conn, [second, elsewhere]) == [first.schema.qualified] * 2
    assert [await triggers.installed_state(conn, s) for s in (first, second, elsewhere)] == ["current"] * 3
    assert await triggers.install(conn, [first, second, elsewhere]) == []  # and nobody fights
    other = Capture(capture.conn, "another_channel")
    await capture.conn.add_listener(other.channel, other._on)
    await conn.execute("INSERT INTO items VALUES (1)")
    # (PostgreSQL folds the two same notifications on this channel into one)
    assert [e.keys for e in parsed(await capture.drain(conn))] == [((1,),)]
    assert [e.keys for e in parsed(await other.drain(conn))] == [((1,),)]
    assert await triggers.uninstall(conn, [second]) == [first.schema.qualified]
    assert [await triggers.installed_state(conn, s) for s in (first, second, elsewhere)] == [
        "current",
        "missing",
        "current",
    ]


async def test_a_newer_definition_is_never_replaced(pg):
    conn, _ = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    trigger_set = await install(conn, "items")
    newer = trigger_set.comment().replace(
        f"definition {triggers.DEFINITION},", f"definition {triggers.DEFINITION + 1},"
    )
    await conn.execute(f"COMMENT ON FUNCTION {trigger_set.function_sql_name}() IS {triggers._literal(newer)}")
    found = await triggers.inspect(conn, trigger_set)
    assert found.status == "outdated" and found.newer == triggers.DEFINITION + 1
    with pytest.raises(SchemaError, match="newer cache-sidecar"):
        await triggers.install(conn, [trigger_set])


async def test_an_install_from_before_per_configuration_names_is_replaced(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    schema = await conn.fetchval("SELECT current_schema()")
    described = await describe_table(conn, TableConfig(schema=schema, name="items"))
    trigger_set = triggers.TriggerSet(described, CHANNEL, 1000)
    legacy = f"{schema}.{trigger_set.legacy_function_name}"
    comment = (
        f"cache-sidecar change capture for {described.qualified} "
        f"(channel {CHANNEL}, bulk_threshold 1000, fingerprint 0123456789abcdef)"
    )
    await conn.execute(
        f"CREATE FUNCTION {legacy}() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;"
        f"COMMENT ON FUNCTION {legacy}() IS '{comment}';"
        + "".join(
            f"CREATE TRIGGER {name} AFTER {op} ON items FOR EACH STATEMENT EXECUTE FUNCTION {legacy}();"
            for name, op in zip(triggers.LEGACY_TRIGGERS, ("INSERT", "UPDATE", "DELETE", "TRUNCATE"), strict=True)
        )
    )
    assert await triggers.install(conn, [trigger_set]) == [described.qualified]
    assert await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass") == 4
    assert await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = $1", trigger_set.legacy_function_name) == 0
    await conn.execute("INSERT INTO items VALUES (1)")
    assert len(parsed(await capture.drain(conn))) == 1


async def test_insert_update_delete_truncate_payloads(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
    await install(conn, "items")
    await conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
    await conn.execute("UPDATE items SET v = 'c' WHERE id = 1")
    await conn.execute("UPDATE items SET id = 3 WHERE id = 2")  # a primary-key change
    await conn.execute("DELETE FROM items WHERE id = 1")
    await conn.execute("UPDATE items SET v = 'none' WHERE false")  # no rows: no notification
    await conn.execute("TRUNCATE items")
    got = parsed(await capture.drain(conn))
    schema = await conn.fetchval("SELECT current_schema()")
    assert [(type(e).__name__, e.op) for e in got] == [
        ("RowChange", events.Op.INSERT),
        ("RowChange", events.Op.UPDATE),
        ("RowChange", events.Op.UPDATE),
        ("RowChange", events.Op.DELETE),
        ("TableChange", events.Op.TRUNCATE),
    ]
    assert all((e.schema, e.table) == (schema, "items") for e in got)
    assert sorted(got[0].keys) == [(1,), (2,)]
    assert got[1].keys == ((1,),) and got[1].old_keys == ()
    assert got[2].keys == ((3,),) and got[2].old_keys == ((2,),)
    assert got[3].keys == ((1,),)
    assert len({e.xid for e in got}) == 5  # each statement committed on its own


async def test_one_transaction_shares_one_xid(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    await install(conn, "items")
    async with conn.transaction():
        await conn.execute("INSERT INTO items VALUES (1)")
        await conn.execute("INSERT INTO items VALUES (2)")
    got = parsed(await capture.drain(conn))
    assert len(got) == 2 and got[0].xid == got[1].xid


async def test_many_rows_are_sent_in_chunks_under_the_payload_limit(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
    await install(conn, "items", bulk=5000)
    await conn.execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1000000000000, 1000000004999) g")
    payloads = await capture.drain(conn)
    assert 10 < len(payloads) < 100  # chunks, not one notification per row
    assert max(len(p.encode()) for p in payloads) < 8000
    keys = [k for e in parsed(payloads) for k in e.keys]
    assert sorted(keys) == [(i,) for i in range(1000000000000, 1000000005000)]


async def test_update_of_100000_rows_is_one_whole_table_event(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY, v int)")
    await conn.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, 100000) g")
    await install(conn, "items")
    await conn.execute("UPDATE items SET v = v + 1")
    got = parsed(await capture.drain(conn))
    assert len(got) == 1
    assert isinstance(got[0], events.TableChange) and got[0].reason == "bulk"


async def test_oversized_key_degrades_to_whole_table(pg):
    conn, capture = pg
    await conn.execute("CREATE TABLE docs (k text PRIMARY KEY)")
    await install(conn, "docs")
    await conn.execute("INSERT INTO docs VALUES (repeat('x', 2000)), ('short')")
    got = parsed(await capture.drain(conn))
    assert len(got) == 1 and isinstance(got[0], events.TableChange) and got[0].reason == "oversized key"


async def test_quoted_identifiers_and_schemas(pg):
    conn, capture = pg
    await conn.execute('CREATE SCHEMA "My Schema"')
    try:
        await conn.execute('CREATE TABLE "My Schema"."Odd ""Name""" ("Key Col" int PRIMARY KEY, v text)')
        described = await describe_table(conn, TableConfig(schema="My Schema", name='Odd "Name"'))
        trigger_set = triggers.TriggerSet(described, CHANNEL, 1000)
        await triggers.install(conn, [trigger_set])
        await conn.execute('INSERT INTO "My Schema"."Odd ""Name""" VALUES (7, \'x\')')
        (event,) = parsed(await capture.drain(conn))
        assert (event.schema, event.table, event.keys) == ("My Schema", 'Odd "Name"', ((7,),))
        assert described.qualified == '"My Schema"."Odd ""Name"""'
        await triggers.uninstall(conn, [trigger_set])
    finally:
        await conn.execute('DROP SCHEMA "My Schema" CASCADE')


KEY_TYPES = [
    ("int2", "12"),
    ("int8", "9007199254740993"),
    ("numeric", "12.50"),
    ("text", "'héllo \"q\"'"),
    ("varchar(10)", "'v'"),
    ("char(4)", "'ab'"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("bool", "true"),
    ("date", "'2024-02-29'"),
    ("timestamp", "'2024-01-01 10:00:00.123456'"),
    ("timestamptz", "'2024-01-01 10:00:00+05:30'"),
    ("bytea", "'\\x00ff10'"),
    ("float8", "0.1"),
]


@pytest.mark.parametrize(("sql_type", "literal"), KEY_TYPES, ids=[t for t, _ in KEY_TYPES])
async def test_payload_keys_coerce_back_to_the_stored_key(pg, sql_type, literal):
    conn, capture = pg
    await conn.execute(f"CREATE TABLE k (id {sql_type}, n int, PRIMARY KEY (id, n))")
    trigger_set = await install(conn, "k")
    await conn.execute("SET TimeZone = 'America/New_York'; SET bytea_output = 'escape'")  # a writer's odd session
    await conn.execute(f"INSERT INTO k VALUES ({literal}, 1)")
    (event,) = parsed(await capture.drain(conn))
    stored = await conn.fetchrow("SELECT id, n FROM k")
    columns = trigger_set.schema.key_columns
    assert coerce_key(columns, event.keys[0]) == normalize_stored(columns, tuple(stored))
    json.dumps(event.keys[0], default=str)  # and nothing exotic slipped into the payload


async def test_partitions_children_and_parents_carry_the_triggers_and_name_the_cached_table(pg):
    conn, capture = pg
    await conn.execute(
        "CREATE TABLE p (id int, r text, PRIMARY KEY (id, r)) PARTITION BY LIST (r);"
        "CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');"
        "CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us') PARTITION BY RANGE (id);"
        "CREATE TABLE p_us_low PARTITION OF p_us FOR VALUES FROM (0) TO (100)"
    )
    parent = await install(conn, "p")
    assert [name for _, name in (await triggers.inspect(conn, parent)).relatives] == ["p_eu", "p_us", "p_us_low"]
    await conn.execute("INSERT INTO p_eu VALUES (1, 'eu')")
    await conn.execute("INSERT INTO p_us_low VALUES (2, 'us')")
    await conn.execute("INSERT INTO p VALUES (3, 'eu')")  # (the parent's triggers only: one event)
    got = parsed(await capture.drain(conn))
    assert [(e.table, e.keys) for e in got] == [("p", ((1, "eu"),)), ("p", ((2, "us"),)), ("p", ((3, "eu"),))]
    partition = await install(conn, "p_eu")  # cached on its own too: on its parents as well
    assert [name for _, name in (await triggers.inspect(conn, partition)).relatives] == ["p"]
    await conn.execute("UPDATE p SET id = id WHERE r = 'eu'")
    got = parsed(await capture.drain(conn))
    assert sorted((e.table, sorted(e.keys)) for e in got) == [
        ("p", [(1, "eu"), (3, "eu")]),
        ("p_eu", [(1, "eu"), (3, "eu")]),
    ]
    await conn.execute("CREATE TABLE p_as PARTITION OF p FOR VALUES IN ('as')")  # attached after the install
    found = await triggers.inspect(conn, parent)
    assert found.status == "outdated" and any("p_as" in problem and "lacks" in problem for problem in found.problems)
    assert await triggers.install(conn, [parent]) == [parent.schema.qualified]
    await conn.execute("ALTER TABLE p DETACH PARTITION p_as")
    found = await triggers.inspect(conn, parent)
    assert found.status == "current" and [name for _, name in found.strays] == ["p_as"]
    await triggers.install(conn, [parent])  # drops the detached table's triggers
    assert not await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'p_as'::regclass")
    assert await triggers.uninstall(conn, [parent, partition]) == [parent.schema.qualified, partition.schema.qualified]
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE c.relname LIKE 'p%' AND c.relnamespace = current_schema()::regnamespace"
    )


async def test_triggers_that_would_not_fire_are_not_current_and_always_is(pg):
    conn, _ = pg
    await conn.execute("CREATE TABLE items (id int PRIMARY KEY)")
    trigger_set = await install(conn, "items")
    update = trigger_set.trigger_names["UPDATE"]
    await conn.execute(f"ALTER TABLE items ENABLE ALWAYS TRIGGER {update}")  # fires in every session
    assert await triggers.installed_state(conn, trigger_set) == "current"
    for sql, words in (
        (f"ALTER TABLE items DISABLE TRIGGER {update}", "is disabled"),
        (f"ALTER TABLE items ENABLE REPLICA TRIGGER {update}", "only in replica sessions"),
    ):
        await conn.execute(sql)
        found = await triggers.inspect(conn, trigger_set)
        assert found.status == "outdated" and words in found.describe() and update in found.describe()
    assert await triggers.install(conn, [trigger_set]) == [trigger_set.schema.qualified]
    assert await triggers.installed_state(conn, trigger_set) == "current"

"""Schema changes of cached tables, and triggers that are not this sidecar's.

DDL fires no trigger: the catalog check (every ``cache.catalog_check_interval``
and after each reconnect) must notice ALTER TABLE and DROP + CREATE, reload
or stop serving that table, and leave the other tables alone. DDL that keeps
every column's type (a rewrite, an enum label, a composite's attributes, a
partition) is noticed too, and a STRONG read or Sync that begins after a DDL
committed never sees the old shape: each barrier round checks the catalog."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient

from sidecar import config as cfg
from sidecar.errors import QueryFailed
from sidecar.pg import publication, triggers
from sidecar.pg.db import describe_table
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
async def two(db, schema) -> tuple[str, str]:
    await db.execute(
        f"CREATE TABLE {schema}.a (id int PRIMARY KEY, v text NOT NULL);"
        f"CREATE TABLE {schema}.b (id int PRIMARY KEY, v text NOT NULL);"
        f"INSERT INTO {schema}.a VALUES (1, 'one'); INSERT INTO {schema}.b VALUES (1, 'uno')"
    )
    return f"{schema}.a", f"{schema}.b"


async def still_serves(sidecar, db, name: str, value: str) -> None:
    """A commit to ``name`` is seen through a STRONG read: the table is served and followed."""
    await db.execute(f"UPDATE {name} SET v = $1 WHERE id = 1", value)
    await sidecar.engine.prepare_read(True, None)
    assert value.encode() in (await sidecar.engine.get(name, [1]) or b"")


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE {t} ADD COLUMN extra int NOT NULL DEFAULT 7",
        "ALTER TABLE {t} ALTER COLUMN v TYPE varchar(20)",
        "ALTER TABLE {t} RENAME COLUMN v TO w",
    ],
)
async def test_altered_columns_reload_the_table(start_daemon, db, two, ddl):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    await db.execute(ddl.format(t=a))
    expected = (await db.fetchval(f"SELECT row_to_json(x.*)::text FROM {a} x WHERE id = 1")).encode()
    await eventually(lambda: sidecar.core.tables[a].loaded and sidecar.core.tables[a].reloads >= 2, 10)
    row = await sidecar.engine.get(a, [1])
    assert row is not None and row.endswith(expected)  # the new shape, not the loaded one
    await still_serves(sidecar, db, b, "dos")
    assert sidecar.engine.ready


async def test_dropped_table_is_not_served_and_the_others_are(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    await db.execute(f"DROP TABLE {a}")
    await eventually(lambda: sidecar.core.tables[a].problem is not None, 10, what="a marked not served")
    assert "does not exist" in sidecar.core.tables[a].problem
    with pytest.raises(QueryFailed, match="not served from memory"):  # (FAILED_PRECONDITION: not retried)
        await sidecar.engine.get(a, [1])
    await still_serves(sidecar, db, b, "dos")
    assert sidecar.engine.ready  # health: the daemon still serves its other tables
    async with AsyncClient(sidecar.target, timeout=10) as cache:  # and ListTables says why
        listed = {t.name: t for t in await cache.list_tables()}
        assert "does not exist" in listed[a].problem and not listed[a].loaded and listed[b].problem == ""
        assert b in [n for n, t in listed.items() if t.loaded]
    # Created again, without triggers: never silently unchanging. Installed here (install_triggers).
    await db.execute(f"CREATE TABLE {a} (id int PRIMARY KEY, v text NOT NULL); INSERT INTO {a} VALUES (1, 'again')")
    await eventually(lambda: sidecar.core.tables[a].problem is None and sidecar.core.tables[a].loaded, 10)
    assert b"again" in (await sidecar.engine.get(a, [1]) or b"")
    await still_serves(sidecar, db, a, "followed")


@pytest.mark.captures("notify")  # (triggers; the publication's counterpart belongs with the publication's tests)
async def test_recreated_table_without_triggers_is_not_served_when_not_installing(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    sidecar.daemon.catalog._install = False  # (as a sidecar started without --install-triggers)
    await db.execute(f"DROP TABLE {a}; CREATE TABLE {a} (id int PRIMARY KEY, v text NOT NULL)")
    await eventually(lambda: "triggers" in (sidecar.core.tables[a].problem or ""), 10, what="a not served")
    assert "triggers install" in sidecar.core.tables[a].problem
    await still_serves(sidecar, db, b, "dos")


async def test_changed_primary_key_is_not_served(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    await db.execute(f"ALTER TABLE {a} DROP CONSTRAINT a_pkey, ADD PRIMARY KEY (id, v)")
    await eventually(lambda: "key" in (sidecar.core.tables[a].problem or ""), 10, what="a not served")
    await still_serves(sidecar, db, b, "dos")


async def test_drop_then_reconnect_keeps_the_daemon_serving(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=3600)  # only the reconnect checks
    history = sidecar.history
    await db.execute(f"DROP TABLE {a}")
    assert await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
    await eventually(lambda: sidecar.history != history and sidecar.engine.ready, 15, what="rebuilt")
    await eventually(lambda: sidecar.core.tables[a].problem is not None, 10)
    await still_serves(sidecar, db, b, "dos")


@pytest.mark.captures("notify")  # (the triggers' channel)
async def test_triggers_for_another_channel_refuse_the_start(start_daemon, db, two, postgres):
    a, _ = two
    first = await start_daemon([a])  # installs triggers for its own channel
    await first.stop()
    from sidecar import config as cfg
    from sidecar.app import Daemon

    config = cfg.Config(
        dsn=postgres.dsn, listen=("127.0.0.1:0",), channel="another_channel", tables=(cfg.parse_table_spec(a, "t"),)
    )
    code = await Daemon(config, handle_signals=False).run()
    assert code == 2  # refused: it would never hear a commit (a problem only a change fixes: 2)


async def test_row_level_role_settings_cannot_hide_ddl(db, two):
    # (the catalog query needs nothing but the catalog: any role can run it)
    a, _ = two
    role = "catalog_reader_probe"
    await db.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role}")
    try:
        await db.execute(f"SET ROLE {role}")
        from sidecar.pg.catalog import STATE_SQL, contents, dependencies

        schema_name, table = a.split(".")
        row = await db.fetchrow(STATE_SQL, schema_name, table)
        assert row is not None and row["key"] == ["id"]
        depends = await dependencies(db, row["oid"])  # (what the barrier reads, too)
        assert depends.storage == (row["oid"],) and depends.attributes == (row["oid"],)
        assert any(kind == "storage" for kind, _ in await contents(db, depends))
    except asyncpg.PostgresError as exc:  # pragma: no cover - would be the failure
        raise AssertionError(exc) from None
    finally:
        await db.execute("RESET ROLE")
        await db.execute(f"DROP ROLE {role}")


# ---------------------------------------------------------------- DDL before a STRONG read or Sync
#
# Tables owned by a role that is not the sidecar's (which may only read them; the owner
# installed the triggers), and DDL that keeps every column's type or fires no trigger.

DEPENDENT_SQL = """
CREATE TYPE {s}.mood AS ENUM ('happy', 'sad');
CREATE DOMAIN {s}.dmood AS {s}.mood;
CREATE TYPE {s}.pair AS (x int, m {s}.mood);
CREATE TABLE {s}.items (id int PRIMARY KEY, v text NOT NULL, m {s}.mood, d {s}.dmood, p {s}.pair, ms {s}.mood[]);
INSERT INTO {s}.items VALUES (1, 'one', 'happy', 'happy', ROW(1, 'happy'), '{{happy}}'),
                             (2, 'two', 'sad', 'sad', ROW(2, 'sad'), '{{sad,happy}}');
CREATE TABLE {s}.parts (id int PRIMARY KEY, v text NOT NULL) PARTITION BY RANGE (id);
CREATE TABLE {s}.parts_low PARTITION OF {s}.parts FOR VALUES FROM (0) TO (100);
INSERT INTO {s}.parts VALUES (1, 'one');
CREATE TABLE {s}.other (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO {s}.other VALUES (1, 'uno');
"""

RELATION_QUERY = "SELECT i.id, i.v, i.m, i.p FROM {s}.items i"

# name: (DDL run by the owner, the cached table or relation it concerns, keys to compare)
DDLS = {
    "add column with default": ("ALTER TABLE {s}.items ADD COLUMN c text DEFAULT 'x'", "items", [1, 2]),
    "same type, new values": ("ALTER TABLE {s}.items ALTER COLUMN v TYPE text USING upper(v)", "items", [1, 2]),
    "same type, new values (relation)": (
        "ALTER TABLE {s}.items ALTER COLUMN v TYPE text USING upper(v)",
        "items_rel",
        [1, 2],
    ),
    "same key type, new keys": ("ALTER TABLE {s}.items ALTER COLUMN id TYPE int USING id + 100", "items", [1, 101]),
    "same key type, new keys (relation)": (
        "ALTER TABLE {s}.items ALTER COLUMN id TYPE int USING id + 100",
        "items_rel",
        [1, 101],
    ),
    "enum label renamed": ("ALTER TYPE {s}.mood RENAME VALUE 'happy' TO 'glad'", "items", [1, 2]),
    "enum label renamed (relation)": ("ALTER TYPE {s}.mood RENAME VALUE 'happy' TO 'glad'", "items_rel", [1, 2]),
    "composite attribute renamed": ("ALTER TYPE {s}.pair RENAME ATTRIBUTE x TO y CASCADE", "items", [1, 2]),
    "partitions rewritten": ("ALTER TABLE {s}.parts ALTER COLUMN v TYPE text USING upper(v)", "parts", [1]),
    "partition attached": (
        "CREATE TABLE {s}.parts_high (id int NOT NULL, v text NOT NULL);"
        "INSERT INTO {s}.parts_high VALUES (150, 'attached');"
        "ALTER TABLE {s}.parts ATTACH PARTITION {s}.parts_high FOR VALUES FROM (100) TO (200)",
        "parts",
        [1, 150],
    ),
}


def as_user(dsn: str, user: str) -> str:
    """``dsn`` connecting as ``user`` (the test servers trust local connections)."""
    if "://" not in dsn:
        return f"{dsn} user={user}"
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{urllib.parse.quote(user)}@{host}"))


@dataclasses.dataclass
class Owned:
    schema: str
    owner: asyncpg.Connection  # the tables' owner: runs the DDL
    sidecar_dsn: str  # the sidecar's role: may read the tables, owns nothing
    channel: str

    def tables(self) -> list[cfg.TableConfig]:
        s = self.schema
        relation = cfg.TableConfig(
            schema=s,
            name="items_rel",
            query=RELATION_QUERY.format(s=s),
            key=("id",),
            sources=(cfg.RelationSource(s, "items", (("id", "id"),)),),
        )
        return [*(cfg.TableConfig(schema=s, name=n) for n in ("items", "parts", "other")), relation]

    async def truth(self, name: str, key: int) -> dict[str, Any] | None:
        source = f"({RELATION_QUERY.format(s=self.schema)})" if name == "items_rel" else f"{self.schema}.{name}"
        text = await self.owner.fetchval(f"SELECT row_to_json(x.*)::text FROM {source} x WHERE x.id = $1", key)
        return None if text is None else json.loads(text)


@pytest.fixture
async def owned(postgres, db, schema, capture) -> AsyncIterator[Owned]:
    suffix = secrets.token_hex(3)
    owner, reader = f"ddl_owner_{suffix}", f"ddl_sidecar_{suffix}"
    await db.execute(
        f"CREATE ROLE {owner} LOGIN; CREATE ROLE {reader} LOGIN;"
        f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {owner}; GRANT USAGE ON SCHEMA {schema} TO {reader}"
    )
    conn = await asyncpg.connect(as_user(postgres.dsn, owner))
    try:
        await conn.execute(DEPENDENT_SQL.format(s=schema))
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {reader}")
        owned = Owned(schema, conn, as_user(postgres.dsn, reader), f"cs_{suffix}")
        schemas = [await describe_table(conn, t) for t in owned.tables()]
        if capture == "notify":
            # The owner installs the triggers (as a DBA would run 'cache-sidecar triggers sql').
            sets = triggers.trigger_sets(schemas, owned.channel, cfg.Config().bulk_threshold)
            await conn.execute(triggers.script(await triggers.resolve(conn, sets)))  # (partitions included)
        else:
            # The owner creates the publication, and the sidecar's role may replicate.
            await db.execute(f"ALTER ROLE {reader} REPLICATION")
            await db.execute(f"GRANT CREATE ON DATABASE {await db.fetchval('SELECT current_database()')} TO {owner}")
            # (as a DBA would run 'cache-sidecar capture sql --capture logical')
            await publication.install(conn, publication.for_schemas(schemas))
        yield owned
    finally:
        await conn.close()
        await db.execute(f"DROP SCHEMA {schema} CASCADE; DROP OWNED BY {owner}, {reader}; DROP ROLE {owner}, {reader}")
        await db.execute(f"CREATE SCHEMA {schema}")  # (the schema fixture drops it)


async def start_owned(start_daemon, owned: Owned, interval: float, **settings: Any) -> Any:
    sidecar = await start_daemon(
        owned.tables(),
        dsn=owned.sidecar_dsn,
        install_triggers=False,
        channel=owned.channel,
        catalog_check_interval=interval,
        **settings,
    )
    assert await sidecar.daemon.db.pool.fetchval("SELECT current_user") != await owned.owner.fetchval(
        "SELECT current_user"
    )
    return sidecar


def record_reloads(notices: Any) -> list[int]:
    """The batches of the reloads for schema changes from now on, in order."""
    made: list[int] = []
    notices.on_reload(lambda name: made.append(notices._schema_batch))
    return made


async def served(cache: AsyncClient, owned: Owned, name: str, keys: list[int], strong: bool) -> list[Any]:
    table = f"{owned.schema}.{name}"
    return [await cache.get(table, key, consistency="strong" if strong else "eventual") for key in keys]


@pytest.mark.parametrize("read", ["strong", "sync"])
@pytest.mark.parametrize("case", list(DDLS))
async def test_ddl_committed_before_a_strong_read_or_sync_is_reflected(start_daemon, owned, case, read, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.pg.catalog")
    ddl, name, keys = DDLS[case]
    sidecar = await start_owned(start_daemon, owned, interval=3600)  # no periodic check would help
    async with AsyncClient(sidecar.target, timeout=20) as cache:
        before = await served(cache, owned, name, keys, strong=True)
        assert before == [await owned.truth(name, key) for key in keys]
        checks = sidecar.daemon.catalog.checks
        await owned.owner.execute(ddl.format(s=owned.schema))
        expected = [await owned.truth(name, key) for key in keys]
        assert expected != before  # (the DDL changes what is served)
        if read == "sync":
            made = record_reloads(sidecar.core.notices)
            revision = await cache.sync()
            # The revision Sync answered covers the reload (a watcher had its TABLE_CHANGED by
            # then). (In logical mode the stream's source reloads the table once more after it
            # has described the new columns, possibly after Sync answered: the first is the DDL's.)
            first = made[0] if made else sidecar.core.notices._schema_batch  # (or a failure's batch)
            assert revision.number >= first > 0
            assert await served(cache, owned, name, keys, strong=False) == expected
        else:
            assert await served(cache, owned, name, keys, strong=True) == expected
        # Every other table is served as before, from memory.
        await owned.owner.execute(f"UPDATE {owned.schema}.other SET v = 'dos' WHERE id = 1")
        assert (await cache.get(f"{owned.schema}.other", 1, consistency="strong"))["v"] == "dos"
        # One full check, called for by the barrier's query; later rounds found nothing new.
        assert sidecar.daemon.catalog.checks == checks + 1
    assert [r for r in caplog.records if "changed in the catalog" in r.getMessage()]  # and it says what changed
    problem = sidecar.core.tables[f"{owned.schema}.{name}"].problem
    if case == "partition attached" and sidecar.capture == "notify":
        # (without triggers, which this sidecar may not install: not served; a publication
        # of the partitioned table publishes every partition, through the root, attached later too)
        assert problem is not None and "parts_high" in problem and "lacks the triggers" in problem
    else:
        assert problem is None


@pytest.mark.parametrize("case", list(DDLS))
async def test_eventual_reads_converge_within_the_check_interval(start_daemon, owned, case):
    ddl, name, keys = DDLS[case]
    sidecar = await start_owned(start_daemon, owned, interval=0.5)
    async with AsyncClient(sidecar.target, timeout=20) as cache:
        await owned.owner.execute(ddl.format(s=owned.schema))
        expected = [await owned.truth(name, key) for key in keys]

        async def converged() -> bool:
            return await served(cache, owned, name, keys, strong=False) == expected

        await eventually(converged, 15, what=f"{case}: EVENTUAL reads show the new shape")


async def test_concurrent_barriers_share_one_catalog_query(start_daemon, owned):
    sidecar = await start_owned(start_daemon, owned, interval=3600)
    engine, catalog = sidecar.engine, sidecar.daemon.catalog
    rounds, verified = sidecar.core.trust.barrier.rounds, catalog.verified
    await asyncio.gather(*(engine.sync() for _ in range(50)))
    assert catalog.verified - verified == sidecar.core.trust.barrier.rounds - rounds < 50


async def test_a_schema_change_reaches_a_strong_read_with_a_pool_of_one_connection(start_daemon, owned):
    # (the check describes the table again: with the catalog's connection still held, that
    # waited for a second one until the barrier timed out)
    sidecar = await start_owned(start_daemon, owned, interval=3600, pool_min_size=1, pool_max_size=1)
    async with AsyncClient(sidecar.target, timeout=20) as cache:
        await owned.owner.execute(f"ALTER TABLE {owned.schema}.items ADD COLUMN c text DEFAULT 'x'")
        assert (await cache.get(f"{owned.schema}.items", 1, consistency="strong"))["c"] == "x"

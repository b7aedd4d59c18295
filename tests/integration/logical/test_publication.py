"""Logical capture's database side against real servers: the publication (install, update,
uninstall, races, check at start) and the preflight that refuses a server, a role or a table
logical capture cannot work with."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from sidecar import config as cfg
from sidecar.core.schema import TableSchema
from sidecar.errors import ConfigError, SchemaError
from sidecar.pg import preflight, publication
from sidecar.pg.db import describe_table
from tests.support.pg import LocalCluster, pgserver_bindir
from tests.support.waiting import eventually


@dataclasses.dataclass
class Place:
    """A fresh schema on one cluster, and a superuser connection to it."""

    dsn: str
    conn: asyncpg.Connection
    schema: str

    async def describe(self, *names: str) -> list[TableSchema]:
        return [await describe_table(self.conn, cfg.parse_table_spec(f"{self.schema}.{n}", "test")) for n in names]

    async def publication(self, *names: str) -> publication.Publication:
        return publication.for_schemas(await self.describe(*names))

    def dsn_as(self, role: str) -> str:
        assert "//postgres@" in self.dsn
        return self.dsn.replace("//postgres@", f"//{role}@")


PUBLICATIONS_OF_SCHEMA_SQL = """
SELECT p.pubname FROM pg_publication p
 WHERE p.pubname LIKE 'cache_sidecar_%' AND (p.puballtables OR EXISTS (
   SELECT FROM pg_publication_tables t WHERE t.pubname = p.pubname AND t.schemaname = $1))
"""


async def _place(dsn: str) -> AsyncIterator[Place]:
    conn = await asyncpg.connect(dsn)
    schema = f"p_{secrets.token_hex(4)}"
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield Place(dsn, conn, schema)
    finally:
        # (this test's publications only: other tests of the session may have their own)
        for row in await conn.fetch(PUBLICATIONS_OF_SCHEMA_SQL, schema):
            await conn.execute(f'DROP PUBLICATION "{row["pubname"]}"')
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.fixture
async def place(logical_dsn: str) -> AsyncIterator[Place]:
    """On a cluster with wal_level = logical."""
    async for made in _place(logical_dsn):
        yield made


@pytest.fixture
async def any_place(any_logical_dsn: str) -> AsyncIterator[Place]:
    """On each available PostgreSQL version with wal_level = logical in turn."""
    async for made in _place(any_logical_dsn):
        yield made


@pytest.fixture(scope="module")
def replica_dsn() -> Iterator[str]:
    """A cluster of its own with the default wal_level = replica (the session's runs with logical)."""
    cluster = LocalCluster(pgserver_bindir(), run_as="pgserver")
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture
async def replica_place(replica_dsn: str) -> AsyncIterator[Place]:
    """On a server with wal_level = replica."""
    async for made in _place(replica_dsn):
        yield made


async def published(conn: asyncpg.Connection, name: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS t FROM pg_publication_tables WHERE pubname = $1", name
    )
    return {r["t"] for r in rows}


# ------------------------------------------------------------------ the publication


async def test_install_creates_it_once_and_repairs_what_was_changed(any_place: Place) -> None:
    p = any_place
    s = p.schema
    await p.conn.execute(f"""
        CREATE TABLE {s}.a (id int PRIMARY KEY, v text);
        CREATE TABLE {s}.b (id int PRIMARY KEY);
        CREATE TABLE {s}.other (id int PRIMARY KEY)""")
    wanted = await p.publication("a", "b")
    assert (await publication.inspect(p.conn, wanted)).status == "missing"
    assert await publication.install(p.conn, wanted) is True
    assert await publication.install(p.conn, wanted) is False  # the second time: nothing to do
    row = await p.conn.fetchrow(
        "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate AS every, pubviaroot, puballtables "
        "FROM pg_publication WHERE pubname = $1",
        wanted.name,
    )
    assert (row["every"], row["pubviaroot"], row["puballtables"]) == (True, False, False)
    assert await published(p.conn, wanted.name) == {f"{s}.a", f"{s}.b"}
    version = int(await p.conn.fetchval("SHOW server_version_num"))

    changes = {
        # a table dropped and created again leaves the publication without it
        "lacks": f"DROP TABLE {s}.b; CREATE TABLE {s}.b (id int PRIMARY KEY)",
        "also publishes": f"ALTER PUBLICATION {wanted.sql_name} ADD TABLE {s}.other",
        "every operation": f"ALTER PUBLICATION {wanted.sql_name} SET (publish = 'insert')",
        "publish_via_partition_root": f"ALTER PUBLICATION {wanted.sql_name} SET (publish_via_partition_root = true)",
    }
    if version >= 150000:
        changes["only some rows"] = f"ALTER PUBLICATION {wanted.sql_name} SET TABLE {s}.a WHERE (id > 0), {s}.b"
        changes["only some columns"] = f"ALTER PUBLICATION {wanted.sql_name} SET TABLE {s}.a (id), {s}.b"
        changes["every table of the schemas"] = f"ALTER PUBLICATION {wanted.sql_name} ADD TABLES IN SCHEMA {s}"
    for problem, sql in changes.items():
        await p.conn.execute(sql)
        found = await publication.inspect(p.conn, wanted)
        assert found.status == "outdated" and problem in found.description, (problem, found)
        assert await publication.install(p.conn, wanted) is True, problem
        assert (await publication.inspect(p.conn, wanted)).status == "ok", problem
        assert await published(p.conn, wanted.name) == {f"{s}.a", f"{s}.b"}, problem


async def test_one_made_for_all_tables_is_replaced(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    wanted = await place.publication("a")
    await place.conn.execute(f"CREATE PUBLICATION {wanted.sql_name} FOR ALL TABLES")
    found = await publication.inspect(place.conn, wanted)
    assert found.status == "outdated" and found.all_tables and "FOR ALL TABLES" in found.description
    assert await publication.install(place.conn, wanted) is True
    assert (await publication.inspect(place.conn, wanted)).status == "ok"
    assert await published(place.conn, wanted.name) == {f"{place.schema}.a"}


async def test_another_configuration_has_its_own_and_uninstall_drops_exactly_this_one(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    await place.conn.execute(f"CREATE TABLE {place.schema}.b (id int PRIMARY KEY)")
    mine, theirs = await place.publication("a"), await place.publication("a", "b")
    assert mine.name != theirs.name
    assert await publication.install(place.conn, mine) and await publication.install(place.conn, theirs)
    assert await publication.uninstall(place.conn, mine) is True
    assert await publication.uninstall(place.conn, mine) is False
    assert (await publication.inspect(place.conn, mine)).status == "missing"
    assert (await publication.inspect(place.conn, theirs)).status == "ok"


async def test_an_odd_table_name_is_published(place: Place) -> None:
    odd = 'We"ird, name; --'
    quoted = '"We""ird, name; --"'
    await place.conn.execute(f"CREATE TABLE {place.schema}.{quoted} (id int PRIMARY KEY)")
    wanted = publication.for_schemas(await place.describe(quoted))
    assert await publication.install(place.conn, wanted)
    assert await published(place.conn, wanted.name) == {f"{place.schema}.{odd}"}


async def test_sidecars_of_one_configuration_installing_at_once(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    wanted = await place.publication("a")
    conns = [await asyncpg.connect(place.dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(publication.install(c, wanted) for c in conns))
        assert sorted(results) == [False, False, True]
        # One that takes no lock (a DBA's own CREATE) commits while install's CREATE waits for it:
        await publication.uninstall(place.conn, wanted)
        other = conns[0]
        transaction = other.transaction()
        await transaction.start()
        await other.execute(wanted.install_sql())
        installing = asyncio.create_task(publication.install(conns[1], wanted))
        pid = conns[1].get_server_pid()
        await eventually(
            lambda: place.conn.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid),
            what="install waiting for the other CREATE",
        )
        await transaction.commit()
        assert await installing is False  # the other's is as needed: nothing changed, no error
        assert (await publication.inspect(place.conn, wanted)).status == "ok"
    finally:
        for c in conns:
            await c.close()


async def test_install_refuses_a_table_whose_updates_it_would_break(place: Place) -> None:
    await place.conn.execute(f"""
        CREATE TABLE {place.schema}.a (id int PRIMARY KEY, code text NOT NULL UNIQUE);
        ALTER TABLE {place.schema}.a REPLICA IDENTITY NOTHING""")
    wanted = await place.publication("a")
    with pytest.raises(SchemaError) as info:
        await publication.install(place.conn, wanted)
    message = str(info.value)
    assert f"table {place.schema}.a has REPLICA IDENTITY NOTHING" in message
    assert f'ALTER TABLE "{place.schema}"."a" REPLICA IDENTITY USING INDEX "a_code_key"' in message
    assert (await publication.inspect(place.conn, wanted)).status == "missing"
    # (what it protects: the application's own UPDATE fails once the table is published)
    await place.conn.execute(f"CREATE PUBLICATION {wanted.sql_name} FOR TABLE {place.schema}.a")
    await place.conn.execute(f"INSERT INTO {place.schema}.a VALUES (1, 'x')")
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="replica identity"):
        await place.conn.execute(f"UPDATE {place.schema}.a SET code = 'y'")


async def test_at_start_it_is_installed_or_required(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    schemas = await place.describe("a")
    config = cfg.Config(capture="logical")
    with pytest.raises(SchemaError) as info:
        await publication.check_or_install(place.conn, config, schemas)
    assert "does not exist" in str(info.value) and "cache-sidecar capture install --capture logical" in str(info.value)
    assert "--install-capture" in str(info.value)
    installed = await publication.check_or_install(
        place.conn, dataclasses.replace(config, install_triggers=True), schemas
    )
    assert installed == publication.for_schemas(schemas)
    assert await publication.check_or_install(place.conn, config, schemas) == installed
    await place.conn.execute(f"ALTER PUBLICATION {installed.sql_name} SET (publish = 'insert, update')")
    with pytest.raises(SchemaError, match="is not as this sidecar needs it: it does not publish every operation"):
        await publication.check_or_install(place.conn, config, schemas)


async def test_install_without_ownership_says_what_is_needed(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    role = f"r_{secrets.token_hex(4)}"
    await place.conn.execute(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE postgres TO {role}")
    conn = await asyncpg.connect(place.dsn_as(role))
    try:
        with pytest.raises(SchemaError) as info:
            await publication.install(conn, await place.publication("a"))
    finally:
        await conn.close()
        await place.conn.execute(f"REVOKE CREATE ON DATABASE postgres FROM {role}; DROP ROLE {role}")
    message = str(info.value)
    assert "ownership of every table it publishes" in message and "capture sql --capture logical" in message


# ------------------------------------------------------------------ preflight


async def test_preflight_refuses_a_server_without_logical_wal(replica_place: Place) -> None:
    p = replica_place
    assert await p.conn.fetchval("SHOW wal_level") == "replica"
    await p.conn.execute(f"CREATE TABLE {p.schema}.a (id int PRIMARY KEY)")
    with pytest.raises(ConfigError) as info:
        await preflight.check_logical(p.conn, await p.describe("a"))
    assert info.value.key == "database.capture"
    for fix in (
        "wal_level is replica",
        "ALTER SYSTEM SET wal_level = logical",
        "rds.logical_replication = 1",
        "cloudsql.logical_decoding = on",
        "Azure",
        "Supabase",
        "Neon",
    ):
        assert fix in info.value.problem, fix


async def test_preflight_passes_a_good_setup_and_refuses_a_role_without_replication(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    schemas = await place.describe("a")
    await preflight.check_logical(place.conn, schemas)  # a superuser: nothing missing
    role = f"r_{secrets.token_hex(4)}"
    await place.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        conn = await asyncpg.connect(place.dsn_as(role))
        try:
            with pytest.raises(ConfigError) as info:
                await preflight.check_logical(conn, schemas)
            assert f"the role {role} lacks the REPLICATION attribute" in info.value.problem
            assert f'ALTER ROLE "{role}" WITH REPLICATION' in info.value.problem
            assert f'GRANT rds_replication TO "{role}"' in info.value.problem
            assert "wal_level" not in info.value.problem  # (only what is wrong)
            await place.conn.execute(f"ALTER ROLE {role} WITH REPLICATION")
            await preflight.check_logical(conn, schemas)
            # Amazon RDS grants it by membership in rds_replication instead
            await place.conn.execute(f"ALTER ROLE {role} WITH NOREPLICATION")
            await place.conn.execute("CREATE ROLE rds_replication")
            try:
                with pytest.raises(ConfigError, match="lacks the REPLICATION attribute"):
                    await preflight.check_logical(conn, schemas)
                await place.conn.execute(f"GRANT rds_replication TO {role}")
                await preflight.check_logical(conn, schemas)
            finally:
                await place.conn.execute("DROP ROLE rds_replication")
        finally:
            await conn.close()
    finally:
        await place.conn.execute(f"DROP ROLE {role}")


async def test_preflight_refuses_tables_and_partitions_without_replica_identity(place: Place) -> None:
    s = place.schema
    await place.conn.execute(f"""
        CREATE TABLE {s}.plain (id int PRIMARY KEY);
        CREATE TABLE {s}.parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
        CREATE TABLE {s}.parted_low PARTITION OF {s}.parted FOR VALUES FROM (0) TO (100);
        CREATE TABLE {s}.parted_high PARTITION OF {s}.parted FOR VALUES FROM (100) TO (200);
        CREATE TABLE {s}.parent (id int PRIMARY KEY);
        CREATE TABLE {s}.child (extra int) INHERITS ({s}.parent)""")
    schemas = await place.describe("plain", "parted", "parent")
    good = f"ALTER TABLE {s}.child ADD PRIMARY KEY (id)"
    for sabotage, named in (
        (f"ALTER TABLE {s}.plain REPLICA IDENTITY NOTHING", f"table {s}.plain has REPLICA IDENTITY NOTHING"),
        # the identity is per partition
        (f"ALTER TABLE {s}.parted_high REPLICA IDENTITY NOTHING", f"table {s}.parted_high has REPLICA IDENTITY"),
        # an inheritance child has no primary key of its parent's
        ("SELECT 1", f"table {s}.child has no primary key"),
    ):
        await place.conn.execute(sabotage)
        with pytest.raises(ConfigError) as info:
            await preflight.check_logical(place.conn, schemas)
        assert named in info.value.problem and "USING INDEX" in info.value.problem, info.value.problem
        assert "the application's writes fail" in info.value.problem
        await place.conn.execute(sabotage.replace("NOTHING", "DEFAULT") if "NOTHING" in sabotage else good)
    await preflight.check_logical(place.conn, schemas)


async def test_a_key_outside_the_replica_identity_is_a_warning_only(place: Place, caplog) -> None:
    await place.conn.execute(f"""
        CREATE TABLE {place.schema}.a (id int PRIMARY KEY, code text NOT NULL UNIQUE);
        ALTER TABLE {place.schema}.a REPLICA IDENTITY USING INDEX a_code_key""")
    with caplog.at_level(logging.WARNING, logger="sidecar.pg.preflight"):
        await preflight.check_logical(place.conn, await place.describe("a"))
    assert f"the cache's key of {place.schema}.a (id) is not all in its replica identity (code)" in caplog.text


async def test_preflight_refuses_when_no_replication_slot_is_free(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    schemas = await place.describe("a")
    free = await place.conn.fetchval(
        "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)"
    )
    names = [f"fill_{secrets.token_hex(4)}" for _ in range(free)]
    try:
        for name in names:  # (physical slots count as well, and cost nothing to make)
            await place.conn.execute("SELECT pg_create_physical_replication_slot($1)", name)
        with pytest.raises(ConfigError, match="max_replication_slots is 20 and 20 slots exist"):
            await preflight.check_logical(place.conn, schemas)
    finally:
        for name in names:
            await place.conn.execute("SELECT pg_drop_replication_slot($1)", name)
    await preflight.check_logical(place.conn, schemas)


async def test_preflight_refuses_when_no_wal_sender_is_free(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    schemas = await place.describe("a")
    in_use = await place.conn.fetchval("SELECT count(*) FROM pg_stat_replication")
    free = int(await place.conn.fetchval("SHOW max_wal_senders")) - in_use
    senders = []
    try:
        for _ in range(free):  # (a replication connection is a WAL sender from its start)
            senders.append(await asyncpg.connect(place.dsn, server_settings={"replication": "database"}))
        with pytest.raises(ConfigError, match="max_wal_senders is 10 and 10 are in use"):
            await preflight.check_logical(place.conn, schemas)
    finally:
        for sender in senders:
            await sender.close()
    await eventually(
        lambda: place.conn.fetchval("SELECT count(*) = $1 FROM pg_stat_replication", in_use), what="the senders gone"
    )
    await preflight.check_logical(place.conn, schemas)


async def test_a_newer_sidecars_publication_is_never_replaced(place: Place) -> None:
    await place.conn.execute(f"CREATE TABLE {place.schema}.a (id int PRIMARY KEY)")
    wanted = await place.publication("a")
    await place.conn.execute(
        f"CREATE PUBLICATION {wanted.sql_name} FOR TABLE {place.schema}.a WITH (publish = 'insert')"
    )
    await place.conn.execute(
        f"COMMENT ON PUBLICATION {wanted.sql_name} IS 'cache-sidecar logical capture (definition 99): the tables'"
    )
    with pytest.raises(SchemaError, match=r"made by a newer cache-sidecar \(definition 99; this one has 1\)"):
        await publication.install(place.conn, wanted)
    assert not await place.conn.fetchval("SELECT pubupdate FROM pg_publication WHERE pubname = $1", wanted.name)

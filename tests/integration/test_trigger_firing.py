"""Triggers that are there but do not tell of every change: partitions and inheritance
children (a statement naming one fires only its own triggers), triggers disabled, made
replica-only, re-pointed or given another body, and two sidecars configured differently.

As in production, the tables belong to a role that is not the sidecar's: ``installer``
may install (a member of the owner role), ``reader`` may only read. A sidecar that may
install puts things right and reloads; one that may not stops serving the table from
memory (reads go to PostgreSQL) and says NOT_SERVING, naming the table and the fault,
until the owner installs again."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.config import TableConfig
from sidecar.pg import triggers
from sidecar.pg.db import describe_table
from tests.support.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Roles:
    schema: str
    owner: asyncpg.Connection  # a session acting as the tables' owner
    installer_dsn: str  # a member of the owner role: may install triggers
    reader_dsn: str  # may only read the tables


def _dsn(base: str, role: str, password: str) -> str:
    parts = urllib.parse.urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
async def roles(postgres, db, schema) -> AsyncIterator[Roles]:
    if urllib.parse.urlsplit(postgres.dsn).scheme not in ("postgresql", "postgres"):
        pytest.skip("needs a URI DSN to derive other roles'")
    token = secrets.token_hex(4)
    owner, installer, reader = f"owner_{token}", f"installer_{token}", f"reader_{token}"
    password = secrets.token_hex(8)
    await db.execute(
        f"CREATE ROLE {owner}; ALTER SCHEMA {schema} OWNER TO {owner};"
        f"CREATE ROLE {installer} LOGIN PASSWORD '{password}' IN ROLE {owner};"
        f"CREATE ROLE {reader} LOGIN PASSWORD '{password}';"
        f"GRANT USAGE ON SCHEMA {schema} TO {reader};"
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT SELECT ON TABLES TO {reader}"
    )
    conn = await asyncpg.connect(postgres.dsn)
    await conn.execute(f"SET ROLE {owner}; SET search_path = {schema}")
    try:
        yield Roles(schema, conn, _dsn(postgres.dsn, installer, password), _dsn(postgres.dsn, reader, password))
    finally:
        await conn.close()
        for role in (reader, installer, owner):
            await db.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; DROP ROLE {role}")


async def make_tables(roles: Roles) -> None:
    """``p``: partitioned by region (``p_us`` itself partitioned); ``q``: an inheritance parent."""
    await roles.owner.execute(
        "CREATE TABLE p (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);"
        "CREATE TABLE p_eu PARTITION OF p FOR VALUES IN ('eu');"
        "CREATE TABLE p_us PARTITION OF p FOR VALUES IN ('us') PARTITION BY RANGE (id);"
        "CREATE TABLE p_us_low PARTITION OF p_us FOR VALUES FROM (0) TO (1000);"
        "INSERT INTO p VALUES (1, 'eu', 'old'), (2, 'us', 'old');"
        "CREATE TABLE q (id int PRIMARY KEY, v text);"
        "CREATE TABLE q_child (extra int, PRIMARY KEY (id)) INHERITS (q);"
        "INSERT INTO q VALUES (1, 'old'); INSERT INTO q_child VALUES (2, 'old', 0)"
    )


async def owner_installs(roles: Roles, tables: list[str], channel: str) -> None:
    schemas = [await describe_table(roles.owner, TableConfig(schema=roles.schema, name=t)) for t in tables]
    await triggers.install(roles.owner, triggers.trigger_sets(schemas, channel, 1000))


async def health(sidecar: Any) -> int:
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        return int((await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status)


async def strong(sidecar: Any, table: str, key: Any) -> str | None:
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        row = await cache.get(table, key, consistency="strong")
    return None if row is None else str(row["v"])


async def start(start_daemon: Any, roles: Roles, names: list[str], dsn: str, **settings: Any) -> Any:
    tables = [f"{roles.schema}.{name}" for name in names]
    return await start_daemon(tables, dsn=dsn, catalog_check_interval=0.2, **settings)


# ------------------------------------------------------------------ item 2: partitions and children


async def test_writes_naming_a_partition_or_a_child_are_seen(roles, start_daemon):
    await make_tables(roles)
    sidecar = await start(start_daemon, roles, ["p", "q"], roles.installer_dsn)
    p, q = f"{roles.schema}.p", f"{roles.schema}.q"
    assert await strong(sidecar, p, (1, "eu")) == "old"
    await roles.owner.execute("UPDATE p_eu SET v = 'eu new' WHERE id = 1")
    assert await strong(sidecar, p, (1, "eu")) == "eu new"
    await roles.owner.execute("UPDATE p_us_low SET v = 'deep' WHERE id = 2")  # a partition's partition
    assert await strong(sidecar, p, (2, "us")) == "deep"
    await roles.owner.execute("INSERT INTO p_us VALUES (3, 'us', 'inserted')")
    assert await strong(sidecar, p, (3, "us")) == "inserted"
    await roles.owner.execute("DELETE FROM p_eu")
    assert await strong(sidecar, p, (1, "eu")) is None
    await roles.owner.execute("UPDATE q_child SET v = 'child new' WHERE id = 2")
    assert await strong(sidecar, q, 2) == "child new"
    await roles.owner.execute("TRUNCATE q_child")
    assert await strong(sidecar, q, 2) is None
    assert await strong(sidecar, q, 1) == "old"
    assert await health(sidecar) == SERVING


async def test_writes_naming_the_parent_of_a_cached_partition_or_child_are_seen(roles, start_daemon):
    await make_tables(roles)
    sidecar = await start(start_daemon, roles, ["p_eu", "q_child"], roles.installer_dsn)
    p_eu, q_child = f"{roles.schema}.p_eu", f"{roles.schema}.q_child"
    assert await strong(sidecar, p_eu, (1, "eu")) == "old"
    await roles.owner.execute("UPDATE p SET v = 'via parent'")  # (p_us's row too: refetched, found absent)
    assert await strong(sidecar, p_eu, (1, "eu")) == "via parent"
    assert await strong(sidecar, p_eu, (2, "us")) is None
    await roles.owner.execute("INSERT INTO p VALUES (7, 'eu', 'routed')")
    assert await strong(sidecar, p_eu, (7, "eu")) == "routed"
    await roles.owner.execute("UPDATE q SET v = 'via parent' WHERE id = 2")
    assert await strong(sidecar, q_child, 2) == "via parent"
    await roles.owner.execute("DELETE FROM q")
    assert await strong(sidecar, q_child, 2) is None
    assert await health(sidecar) == SERVING


async def test_a_partition_attached_later_gets_the_triggers(roles, start_daemon, caplog):
    caplog.set_level(logging.INFO)
    await make_tables(roles)
    sidecar = await start(start_daemon, roles, ["p"], roles.installer_dsn)
    p = f"{roles.schema}.p"
    reloads = sidecar.core.tables[p].reloads
    await roles.owner.execute(
        "CREATE TABLE p_as (id int, region text, v text, PRIMARY KEY (id, region));"
        "INSERT INTO p_as VALUES (5, 'as', 'attached');"
        "ALTER TABLE p ATTACH PARTITION p_as FOR VALUES IN ('as')"
    )
    await eventually(
        lambda: any("reinstalled the triggers" in r.getMessage() and "p_as" in r.getMessage() for r in caplog.records),
        15,
        what="the new partition noticed and given the triggers",
    )
    await eventually(lambda: sidecar.core.tables[p].reloads > reloads and sidecar.core.tables[p].loaded, 10)
    assert await strong(sidecar, p, (5, "as")) == "attached"
    await roles.owner.execute("UPDATE p_as SET v = 'followed' WHERE id = 5")
    assert await strong(sidecar, p, (5, "as")) == "followed"
    assert await health(sidecar) == SERVING


async def test_a_new_partition_the_sidecar_cannot_install_on_is_not_served_until_fixed(roles, start_daemon):
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    await owner_installs(roles, ["p"], channel)
    sidecar = await start(start_daemon, roles, ["p"], roles.reader_dsn, install_triggers=False, channel=channel)
    p = f"{roles.schema}.p"
    assert await health(sidecar) == SERVING
    await roles.owner.execute(
        "CREATE TABLE p_as PARTITION OF p FOR VALUES IN ('as'); INSERT INTO p_as VALUES (5, 'as', 'x')"
    )
    await eventually(lambda: "p_as" in (sidecar.core.tables[p].problem or ""), 15, what="p not served")
    assert "lacks the triggers" in sidecar.core.tables[p].problem
    await eventually(_is(health, sidecar, NOT_SERVING), 10, what="health NOT_SERVING")
    assert await strong(sidecar, p, (5, "as")) == "x"  # from PostgreSQL, not from memory
    await owner_installs(roles, ["p"], channel)
    await eventually(_is(health, sidecar, SERVING), 15, what="served again")
    assert sidecar.core.tables[p].problem is None
    await roles.owner.execute("UPDATE p_as SET v = 'followed' WHERE id = 5")
    assert await strong(sidecar, p, (5, "as")) == "followed"


def _is(probe: Any, sidecar: Any, expected: int) -> Any:
    async def check() -> bool:
        return bool(await probe(sidecar) == expected)

    return check


# ------------------------------------------------------------------ item 3: present but not firing

SABOTAGE = {
    "disabled": ("ALTER TABLE q DISABLE TRIGGER {update}", "disabled"),
    "replica_only": ("ALTER TABLE q ENABLE REPLICA TRIGGER {update}", "replica sessions"),
    "re_pointed": (
        "CREATE FUNCTION quiet() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;"
        "DROP TRIGGER {update} ON q;"
        "CREATE TRIGGER {update} AFTER UPDATE ON q FOR EACH STATEMENT EXECUTE FUNCTION quiet()",
        "calls another function",
    ),
    "body_replaced": (
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
        "body",
    ),
    "child_disabled": ("ALTER TABLE q_child DISABLE TRIGGER {update}", "disabled"),
}


async def sabotage_sql(kind: str, conn: asyncpg.Connection) -> str:
    """The sabotage, aimed at the UPDATE trigger the sidecar installed on ``q`` (found in the catalog)."""
    update, function = await conn.fetchrow(
        "SELECT tgname, tgfoid::regproc::text FROM pg_trigger"
        " WHERE tgrelid = 'q'::regclass AND tgtype = 16 AND tgname LIKE 'cache_sidecar%'"
    )
    sql, _ = SABOTAGE[kind]
    return sql.format(update=update, function=function)


async def q_trigger_set(roles: Roles, channel: str) -> triggers.TriggerSet:
    described = await describe_table(roles.owner, TableConfig(schema=roles.schema, name="q"))
    return triggers.TriggerSet(described, channel, 1000)


@pytest.mark.parametrize("kind", list(SABOTAGE))
async def test_triggers_that_do_not_fire_are_reinstalled(roles, start_daemon, caplog, kind):
    caplog.set_level(logging.INFO)
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    sidecar = await start(start_daemon, roles, ["q"], roles.installer_dsn, channel=channel)
    q = f"{roles.schema}.q"
    reloads = sidecar.core.tables[q].reloads
    sql = await sabotage_sql(kind, roles.owner)
    if kind == "body_replaced":  # (by the function's owner: the role that installed it)
        installer = await asyncpg.connect(roles.installer_dsn)
        await installer.execute(f"SET search_path = {roles.schema}; {sql}")
        await installer.close()
    else:
        await roles.owner.execute(sql)
    await roles.owner.execute("UPDATE q SET v = 'unseen' WHERE id IN (1, 2)")  # fires nothing of ours
    await eventually(
        lambda: any("reinstalled the triggers" in r.getMessage() for r in caplog.records), 15, what="reinstalled"
    )
    messages = [r.getMessage() for r in caplog.records if "reinstalled the triggers" in r.getMessage()]
    assert all(q in message for message in messages) and SABOTAGE[kind][1] in messages[0]
    # (what was written before the triggers were put right is read by the reload that follows)
    await eventually(lambda: sidecar.core.tables[q].reloads > reloads and sidecar.core.tables[q].loaded, 10)
    assert await strong(sidecar, q, 1) == "unseen" and await strong(sidecar, q, 2) == "unseen"
    await roles.owner.execute("UPDATE q SET v = 'seen' WHERE id IN (1, 2)")
    assert await strong(sidecar, q, 1) == "seen" and await strong(sidecar, q, 2) == "seen"
    assert await triggers.installed_state(roles.owner, await q_trigger_set(roles, channel)) == "current"


@pytest.mark.parametrize("kind", list(SABOTAGE))
async def test_triggers_that_do_not_fire_stop_the_table_being_served(roles, start_daemon, kind):
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    await owner_installs(roles, ["q"], channel)
    sidecar = await start(start_daemon, roles, ["q"], roles.reader_dsn, install_triggers=False, channel=channel)
    q = f"{roles.schema}.q"
    assert await health(sidecar) == SERVING
    await roles.owner.execute(await sabotage_sql(kind, roles.owner))
    await roles.owner.execute("UPDATE q SET v = 'unseen' WHERE id IN (1, 2)")
    await eventually(lambda: sidecar.core.tables[q].problem is not None, 15, what="q not served")
    assert SABOTAGE[kind][1] in sidecar.core.tables[q].problem
    await eventually(_is(health, sidecar, NOT_SERVING), 10, what="health NOT_SERVING")
    assert await strong(sidecar, q, 1) == "unseen" and await strong(sidecar, q, 2) == "unseen"  # from PostgreSQL
    await roles.owner.execute("DROP FUNCTION IF EXISTS quiet() CASCADE")
    await owner_installs(roles, ["q"], channel)
    await eventually(_is(health, sidecar, SERVING), 15, what="served again")
    await roles.owner.execute("UPDATE q SET v = 'seen' WHERE id IN (1, 2)")
    assert await strong(sidecar, q, 1) == "seen" and await strong(sidecar, q, 2) == "seen"


async def test_a_sidecar_that_may_not_install_refuses_to_start_on_triggers_that_do_not_fire(
    roles, start_daemon, postgres
):
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    await owner_installs(roles, ["q"], channel)
    await roles.owner.execute(await sabotage_sql("replica_only", roles.owner))
    from sidecar import config as cfg
    from sidecar.app import Daemon

    config = cfg.Config(
        dsn=roles.reader_dsn,
        listen=("127.0.0.1:0",),
        channel=channel,
        tables=(cfg.parse_table_spec(f"{roles.schema}.q", "t"),),
    )
    daemon = Daemon(config, handle_signals=False)
    running = asyncio.create_task(daemon.run())
    done, _ = await asyncio.wait({running}, timeout=30)
    if not done:  # it started serving a table whose changes it would not hear
        daemon.stop_event.set()
        await running
        raise AssertionError("the sidecar started although the triggers on q fire only in replica sessions")
    assert running.result() == 2  # (a start-up problem the operator must fix: exit 2)


# ------------------------------------------------------------------ item 5: two configurations


async def test_two_sidecars_with_other_channels_do_not_fight(roles, start_daemon, caplog):
    caplog.set_level(logging.INFO)
    await make_tables(roles)
    first = await start(start_daemon, roles, ["q"], roles.installer_dsn)
    second = await start(start_daemon, roles, ["q"], roles.installer_dsn, bulk_threshold=50)
    q = f"{roles.schema}.q"
    checks = (first.daemon.catalog.checks, second.daemon.catalog.checks)
    await eventually(
        lambda: first.daemon.catalog.checks > checks[0] + 3 and second.daemon.catalog.checks > checks[1] + 3,
        15,
        what="both checked their triggers a few times",
    )
    for round_ in range(10):
        await roles.owner.execute("UPDATE q SET v = $1 WHERE id = 1", f"v{round_}")
        assert (await strong(first, q, 1), await strong(second, q, 1)) == (f"v{round_}", f"v{round_}")
    assert not [r for r in caplog.records if "reinstalled the triggers" in r.getMessage()]
    assert await roles.owner.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'q'::regclass") == 8


# ------------------------------------------------------------------ item 13: two-phase commit


async def test_the_triggers_command_says_prepared_transactions_fail_on_these_tables(roles):
    # (PREPARE TRANSACTION after a NOTIFY fails: "cannot PREPARE a transaction that has executed
    # LISTEN, UNLISTEN, or NOTIFY"; the test server has max_prepared_transactions = 0, so the
    # behaviour itself is PostgreSQL's, documented, and only the telling is tested here)
    await make_tables(roles)
    cli = str(Path(sys.executable).parent / "cache-sidecar")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}

    async def run(*args: str) -> str:
        base = [cli, "triggers", *args, "--dsn", roles.installer_dsn, "--table", f"{roles.schema}.q"]
        done = await asyncio.to_thread(subprocess.run, base, capture_output=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()

    script = await run("sql")
    assert "-- Note: " in script and "PREPARE TRANSACTION" in script
    for first_line in ("installed: ", "already installed"):
        printed = await run("install")
        assert printed.startswith(first_line) and "PREPARE TRANSACTION (two-phase commit) fails" in printed


async def test_health_comes_back_when_triggers_are_fixed_across_a_reconnect(roles, start_daemon, db):
    # The reconnect's rebuild clears the table's problem; the check after it must still see
    # that the capture problem it recorded is gone, or health would stay NOT_SERVING.
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    await owner_installs(roles, ["q"], channel)
    sidecar = await start_daemon(
        [f"{roles.schema}.q"],
        dsn=roles.reader_dsn,
        install_triggers=False,
        channel=channel,
        catalog_check_interval=3600,
    )
    await roles.owner.execute(await sabotage_sql("disabled", roles.owner))
    sidecar.daemon.catalog.poke()
    await eventually(_is(health, sidecar, NOT_SERVING), 10, what="health NOT_SERVING")
    await owner_installs(roles, ["q"], channel)
    epoch = sidecar.core.revisions.epoch
    assert await db.fetchval("SELECT pg_terminate_backend($1)", sidecar.daemon.listener.backend_pid)
    await eventually(lambda: sidecar.core.revisions.epoch != epoch, 15, what="reconnected")
    await eventually(_is(health, sidecar, SERVING), 15, what="served again")
    await roles.owner.execute("UPDATE q SET v = 'seen' WHERE id = 1")
    assert await strong(sidecar, f"{roles.schema}.q", 1) == "seen"


@pytest.mark.parametrize("install", [True, False], ids=["may_install", "may_not_install"])
@pytest.mark.parametrize("kind", list(SABOTAGE))
async def test_a_strong_read_after_the_triggers_stopped_firing_is_not_stale(roles, start_daemon, kind, install):
    """The read barrier's catalog query finds triggers that would not fire, as it finds DDL:
    the STRONG read that follows is not answered from memory that missed a change, though
    the periodic catalog check is an hour away."""
    await make_tables(roles)
    channel = f"cs_{secrets.token_hex(4)}"
    if not install:
        await owner_installs(roles, ["q"], channel)
    sidecar = await start_daemon(
        [f"{roles.schema}.q"],
        dsn=roles.installer_dsn if install else roles.reader_dsn,
        catalog_check_interval=3600,
        install_triggers=install,
        channel=channel,
    )
    q = f"{roles.schema}.q"
    assert await strong(sidecar, q, 1) == "old" and await strong(sidecar, q, 2) == "old"
    sql = await sabotage_sql(kind, roles.owner)
    if install and kind == "body_replaced":  # (by the function's owner: the role that installed it)
        installer = await asyncpg.connect(roles.installer_dsn)
        await installer.execute(f"SET search_path = {roles.schema}; {sql}")
        await installer.close()
    else:
        await roles.owner.execute(sql)
    written = "q_child" if kind == "child_disabled" else "q"  # (the parent's own trigger still fires)
    await roles.owner.execute(f"UPDATE {written} SET v = 'unseen' WHERE id IN (1, 2)")  # fires nothing of ours
    assert await strong(sidecar, q, 2) == "unseen"

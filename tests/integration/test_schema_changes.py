"""Schema changes of cached tables, and triggers that are not this sidecar's.

DDL fires no trigger: the catalog check (every ``cache.catalog_check_interval``
and after each reconnect) must notice ALTER TABLE and DROP + CREATE, reload
or stop serving that table, and leave the other tables alone."""

from __future__ import annotations

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient

from sidecar.errors import QueryFailed
from tests.support.waiting import eventually


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
    await eventually(lambda: sidecar.engine.tables[a].loaded and sidecar.engine.tables[a].reloads >= 2, 10)
    row = await sidecar.engine.get(a, [1])
    assert row is not None and row.endswith(expected)  # the new shape, not the loaded one
    await still_serves(sidecar, db, b, "dos")
    assert sidecar.engine.ready


async def test_dropped_table_is_not_served_and_the_others_are(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    await db.execute(f"DROP TABLE {a}")
    await eventually(lambda: sidecar.engine.tables[a].problem is not None, 10, what="a marked not served")
    assert "does not exist" in sidecar.engine.tables[a].problem
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
    await eventually(lambda: sidecar.engine.tables[a].problem is None and sidecar.engine.tables[a].loaded, 10)
    assert b"again" in (await sidecar.engine.get(a, [1]) or b"")
    await still_serves(sidecar, db, a, "followed")


async def test_recreated_table_without_triggers_is_not_served_when_not_installing(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    sidecar.daemon.catalog._install = False  # (as a sidecar started without --install-triggers)
    await db.execute(f"DROP TABLE {a}; CREATE TABLE {a} (id int PRIMARY KEY, v text NOT NULL)")
    await eventually(lambda: "triggers" in (sidecar.engine.tables[a].problem or ""), 10, what="a not served")
    assert "triggers install" in sidecar.engine.tables[a].problem
    await still_serves(sidecar, db, b, "dos")


async def test_changed_primary_key_is_not_served(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=0.1)
    await db.execute(f"ALTER TABLE {a} DROP CONSTRAINT a_pkey, ADD PRIMARY KEY (id, v)")
    await eventually(lambda: "key" in (sidecar.engine.tables[a].problem or ""), 10, what="a not served")
    await still_serves(sidecar, db, b, "dos")


async def test_drop_then_reconnect_keeps_the_daemon_serving(start_daemon, db, two):
    a, b = two
    sidecar = await start_daemon([a, b], catalog_check_interval=3600)  # only the reconnect checks
    epoch = sidecar.engine.epoch
    await db.execute(f"DROP TABLE {a}")
    assert await db.fetchval("SELECT pg_terminate_backend($1)", sidecar.daemon.listener.backend_pid)
    await eventually(lambda: sidecar.engine.epoch != epoch and sidecar.engine.ready, 15, what="rebuilt")
    await eventually(lambda: sidecar.engine.tables[a].problem is not None, 10)
    await still_serves(sidecar, db, b, "dos")


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
        from sidecar.catalog import STATE_SQL

        schema_name, table = a.split(".")
        row = await db.fetchrow(STATE_SQL, schema_name, table)
        assert row is not None and row["key"] == ["id"]
    except asyncpg.PostgresError as exc:  # pragma: no cover - would be the failure
        raise AssertionError(exc) from None
    finally:
        await db.execute("RESET ROLE")
        await db.execute(f"DROP ROLE {role}")

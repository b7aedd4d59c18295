"""Every DSN form against a real PostgreSQL: key=value (quoted values too), URLs,
pg_service.conf; failures that name what was tried; misspelt tables."""

from __future__ import annotations

import asyncpg
import pytest

from sidecar import config as cfg
from sidecar.app import Daemon, call_with_db
from sidecar.errors import ConfigError, Unavailable
from sidecar.pg.db import PgDatabase, connect_kwargs
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

PG_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE", "PGSERVICEFILE", "PGSYSCONFDIR")


@pytest.fixture(autouse=True)
def no_pg_environment(monkeypatch):
    for name in PG_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def socket_dir(postgres) -> str:
    if "host=/" not in postgres.dsn:
        pytest.skip("needs the embedded server's Unix socket")
    return str(postgres.dsn.split("host=")[-1])


async def session(config: cfg.Config) -> tuple[str, str, str, str]:
    conn = await asyncpg.connect(**connect_kwargs(config, "cache-sidecar-test"))
    try:
        row = await conn.fetchrow(
            "SELECT current_user, current_database(), current_setting('application_name'), "
            "current_setting('search_path')"
        )
        return tuple(row)  # type: ignore[return-value]
    finally:
        await conn.close()


async def test_key_value_dsns_connect(socket_dir):
    plain = cfg.load(env={}, flags={"database.dsn": f"host={socket_dir} user=postgres dbname=postgres"})
    assert (await session(plain))[:2] == ("postgres", "postgres")

    # spaces around "=", quoted values, \' and \\ escapes, options reaching the server
    quoted = (
        f"host = '{socket_dir}' user= 'postgres' dbname ='postgres' "
        "application_name='o\\'brien \\\\ shop' options='-c search_path=shop,public'"
    )
    assert await session(cfg.load(env={}, flags={"database.dsn": quoted})) == (
        "postgres",
        "postgres",
        "o'brien \\ shop",
        "shop,public",
    )


async def test_url_dsn_still_connects(postgres):
    assert (await session(cfg.Config(dsn=postgres.dsn)))[2] == "cache-sidecar-test"


async def test_pg_service_file_is_honoured(socket_dir, tmp_path, monkeypatch):
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[elsewhere]\nhost=/nonexistent\n\n[sidecar_test]\nhost={socket_dir}\nuser=postgres\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    monkeypatch.setenv("PGSERVICE", "sidecar_test")
    assert (await session(cfg.Config()))[:2] == ("postgres", "postgres")
    monkeypatch.delenv("PGSERVICE")
    assert (await session(cfg.Config(dsn="service=sidecar_test dbname=postgres")))[:2] == ("postgres", "postgres")
    url = "postgresql:///postgres?service=sidecar_test&application_name=via-url"
    assert await session(cfg.Config(dsn=url)) == ("postgres", "postgres", "via-url", '"$user", public')


async def test_every_connection_of_the_daemon_uses_the_dsn(start_daemon, db, schema, socket_dir, tmp_path):
    await db.execute(f"CREATE TABLE {schema}.item (id int PRIMARY KEY, name text)")
    await db.execute(f"INSERT INTO {schema}.item VALUES (1, 'one')")
    # pool, listener (or replication stream) and catalog check all on a key=value DSN
    sidecar = await start_daemon([f"{schema}.item"], dsn=f"host={socket_dir} user=postgres dbname=postgres")
    if sidecar.capture == "notify":
        assert sidecar.daemon.listener is not None and sidecar.daemon.listener.connected
    else:
        await eventually(lambda: sidecar.daemon.source.slot.streaming, what="streaming")
    await sidecar.stop()

    async def work(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT 7"))

    assert await call_with_db(cfg.Config(dsn=f"host='{socket_dir}' user=postgres dbname=postgres"), work) == 7


async def test_a_refused_connection_names_the_address_tried(tmp_path):
    missing = tmp_path / "no-server-here"
    config = cfg.Config(dsn=f"postgresql://postgres@/postgres?host={missing}", connect_timeout=2)
    with pytest.raises(Unavailable) as info:
        await PgDatabase.connect(config)
    assert f"{missing}/.s.PGSQL.5432" in str(info.value)
    with pytest.raises(Unavailable, match=r"cannot connect to 127\.0\.0\.1:1 "):
        await call_with_db(cfg.Config(dsn="postgresql://x@127.0.0.1:1/x", connect_timeout=2), _never)


async def _never(conn: asyncpg.Connection) -> int:
    raise AssertionError("connected")


async def test_a_wrong_password_is_not_retried_and_not_shown(postgres, socket_dir):
    if postgres.kind != "embedded":
        pytest.skip("needs a server whose authentication we know")
    config = cfg.Config(dsn=f"host={socket_dir} user=nobody_here password='hunter 2' dbname=postgres")
    with pytest.raises(ConfigError) as info:
        await PgDatabase.connect(config)
    assert info.value.key == "database.dsn" and "hunter" not in str(info.value) and "password=***" in str(info.value)


@pytest.mark.parametrize(
    ("asked", "suggested"),
    [
        ("{s}.prodcut", "did you mean {s}.product?"),
        ("public.product", "did you mean {s}.product?"),  # the same name in another schema
    ],
)
async def test_a_misspelt_table_exits_2_with_a_suggestion(postgres, db, schema, caplog, asked, suggested):
    await db.execute(f"CREATE TABLE {schema}.product (id int PRIMARY KEY)")
    config = cfg.Config(
        dsn=postgres.dsn,
        listen=("127.0.0.1:0",),
        install_triggers=True,
        tables=(cfg.parse_table_spec(asked.format(s=schema), "test"),),
    )
    assert await Daemon(config, handle_signals=False).run() == 2
    assert suggested.format(s=schema) in caplog.text

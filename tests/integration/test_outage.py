"""The listener down for real: the database unreachable (a blocked proxy) and
a PostgreSQL restart. Reads stay correct or fail clearly; health follows;
the cache is rebuilt afterwards (a new epoch; in logical capture a new start of the same one)."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, Unavailable
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
async def proxy(postgres):
    if postgres.socket_path is None:
        pytest.skip("the proxy fronts a server this session started")
    proxy = Proxy(unix_path=postgres.socket_path)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def items(db, schema) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 1 FROM generate_series(1, 10) g"
    )
    return f"{schema}.items"


async def serving(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_database_unreachable_then_back(start_daemon, db, items, proxy, mode):
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    sidecar = await start_daemon([f"{items}:{mode}"], dsn=dsn, query_timeout=1.0, connect_timeout=1.0)
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        assert (await cache.get(items, 1))["version"] == 1
        history = sidecar.history
        proxy.block()
        await eventually(lambda: not sidecar.core.trust.up, what="listener down")
        assert await serving(sidecar.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(Unavailable, match="database unreachable"):
            await cache.get(items, 1)
        stale = await cache.get(items, 1, allow_stale=True)  # memory, knowingly
        assert stale == {"id": 1, "version": 1}
        await db.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")  # nobody hears this NOTIFY
        proxy.unblock()
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != history,
            timeout=20,
            what="reconnected and rebuilt",
        )
        assert await serving(sidecar.target) == health_pb2.HealthCheckResponse.SERVING
        assert (await cache.get(items, 1))["version"] == 2
        assert sidecar.history != history


async def test_reads_during_listener_outage_go_to_the_database(start_daemon, db, items, proxy):
    """Only the listener is cut off: reads are answered from PostgreSQL, fresh, and not cached."""
    sidecar = await start_daemon([items])
    proxied = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    # The next connections of the change source go through the proxy (the LISTEN
    # connection's connect function, or the replication connection's DSN).
    if sidecar.capture == "notify":
        listener = sidecar.daemon.listener
        real_connect = listener._connect

        async def through_proxy() -> asyncpg.Connection:
            return await asyncpg.connect(proxied)

        listener._connect = through_proxy
    else:
        source = sidecar.daemon.source
        real_conninfo, source._conninfo = source._conninfo, proxied
    await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
    # (ready: the rebuild's loads landed too -- in logical mode they read under the snapshot
    # the connection through the proxy exported)
    await eventually(lambda: sidecar.engine.ready and proxy.connections > 0, what="listening via proxy")
    proxy.block()
    await eventually(lambda: not sidecar.core.trust.up, what="listener down")
    async with AsyncClient(sidecar.target) as cache:
        await db.execute(f"UPDATE {items} SET version = 9 WHERE id = 3")
        assert (await cache.get(items, 3))["version"] == 9  # from the database
        assert (await cache.get(items, 3, consistency="strong"))["version"] == 9
        held = sidecar.core.tables[items].rows[(3,)]
        assert b'"version":1' in held  # memory was not updated by those reads
        assert sidecar.core.reads.stats.passthrough_reads >= 2
    if sidecar.capture == "notify":
        listener._connect = real_connect
    else:
        source._conninfo = real_conninfo
    proxy.unblock()
    await eventually(lambda: sidecar.engine.ready, timeout=20, what="back")


async def test_postgresql_restart(start_daemon, postgres, db, schema, items):
    if not postgres.can_restart:
        pytest.skip("not allowed to restart an external server")
    await db.execute(f"CREATE TABLE {schema}.lazy_items AS SELECT * FROM {items}")
    await db.execute(f"ALTER TABLE {schema}.lazy_items ADD PRIMARY KEY (id)")
    lazy = f"{schema}.lazy_items"
    sidecar = await start_daemon([items, f"{lazy}:lazy"])
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        assert (await cache.get(lazy, 2))["version"] == 1
        history = sidecar.history
        # (in a thread: the daemon under test shares this event loop, and a logical
        # capture's walsender waits for the client at shutdown)
        await asyncio.to_thread(postgres.restart)
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"UPDATE {items} SET version = 4 WHERE id = 2; UPDATE {lazy} SET version = 4 WHERE id = 2")
        await conn.close()
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != history,
            timeout=30,
            what="rebuilt after restart",
        )
        # STRONG: the rebuild may have finished before the UPDATE committed, and then an
        # EVENTUAL read may still race the UPDATE's refetch (it is fresh after notify only).
        assert (await cache.get(items, 2, consistency="strong"))["version"] == 4
        assert (await cache.get(lazy, 2, consistency="strong"))["version"] == 4
        assert (await cache.sync()).epoch == sidecar.core.revisions.epoch

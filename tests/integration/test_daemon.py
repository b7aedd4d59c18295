"""The daemon in-process against a real PostgreSQL, driven over gRPC by the client."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, InvalidArgument, TableNotFound
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar import config as cfg
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.app import Daemon
from tests.support.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
async def patrons(db: asyncpg.Connection, schema: str) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text NOT NULL, fav_dish text);"
        f"INSERT INTO {schema}.patron SELECT g, 'p' || g, 'dish' FROM generate_series(1, 100) g"
    )
    return f"{schema}.patron"


async def test_full_table_follows_every_kind_of_change(start_daemon, db, patrons):
    sidecar = await start_daemon([patrons])
    async with AsyncClient(sidecar.target) as cache:
        assert await cache.get(patrons, 1) == {"id": 1, "name": "p1", "fav_dish": "dish"}
        assert await cache.get(patrons, 1000) is None

        await db.execute(f"UPDATE {patrons} SET name = 'Ada' WHERE id = 1")
        await eventually(lambda: _name(cache, patrons, 1, "Ada"), what="update visible")
        await db.execute(f"INSERT INTO {patrons} VALUES (1000, 'new', NULL)")
        await eventually(lambda: _name(cache, patrons, 1000, "new"), what="insert visible")
        await db.execute(f"DELETE FROM {patrons} WHERE id = 2")
        await eventually(lambda: _missing(cache, patrons, 2), what="delete visible")
        await db.execute(f"UPDATE {patrons} SET id = 2000 WHERE id = 3")
        await eventually(lambda: _missing(cache, patrons, 3), what="old key gone")
        assert (await cache.get(patrons, 2000))["name"] == "p3"
        await db.execute(f"TRUNCATE {patrons}")
        await eventually(lambda: _missing(cache, patrons, 4), what="truncate visible")
        # Reads went to PostgreSQL at once; ListTables says so until the reload lands
        # (a reload due or running), and never shows the old rows as current.
        listed = await _listed(sidecar.target, patrons)
        assert listed.load.running or listed.row_count == 0, listed
        assert listed.loaded  # (health does not flip on a reload)
        await cache.sync()  # every change received is applied: the reload landed
        (info,) = await cache.list_tables()
        assert (info.name, info.mode, info.row_count, info.loaded) == (patrons, "full", 0, True)
        assert not (await _listed(sidecar.target, patrons)).load.running


async def _listed(target: str, name: str) -> pb.TableInfo:
    """ListTables' entry for ``name``, as the wire has it (the client's TableInfo has no ``load``)."""
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest())
    (info,) = [t for t in answer.tables if t.name == name]
    return info


async def test_lazy_table_reads_through_and_follows_changes(start_daemon, db, patrons):
    sidecar = await start_daemon(
        [cfg.TableConfig(schema=patrons.split(".")[0], name="patron", mode="lazy", max_rows=3)]
    )
    async with AsyncClient(sidecar.target) as cache:
        assert [r["id"] for r in await cache.batch_get(patrons, [1, 2, 3, 4, 5])] == [1, 2, 3, 4, 5]
        table = sidecar.core.tables[patrons]
        assert table.row_count == 3  # the LRU bound
        assert (await cache.get(patrons, 5))["name"] == "p5"
        await db.execute(f"UPDATE {patrons} SET name = 'changed' WHERE id = 5")
        await eventually(lambda: _name(cache, patrons, 5, "changed"), what="lazy update visible")
        await db.execute(f"DELETE FROM {patrons} WHERE id = 5")
        await eventually(lambda: _missing(cache, patrons, 5), what="lazy delete visible")
        assert table.fills >= 2


async def test_batch_get_keeps_request_order_and_flags_missing(start_daemon, patrons):
    sidecar = await start_daemon([patrons])
    async with AsyncClient(sidecar.target) as cache:
        rows = await cache.batch_get(patrons, [5, 999, 1, 5])
        assert [r and r["id"] for r in rows] == [5, None, 1, 5]


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_listener_killed_then_rows_changed_meanwhile_are_served_fresh(start_daemon, db, patrons, mode):
    sidecar = await start_daemon([f"{patrons}:{mode}"])
    async with AsyncClient(sidecar.target) as cache:
        assert (await cache.get(patrons, 7))["name"] == "p7"
        history = sidecar.history
        assert await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
        # Committed while the listener may be gone: this change can be lost.
        await db.execute(f"UPDATE {patrons} SET name = 'while deaf' WHERE id = 7")
        await eventually(lambda: sidecar.engine.ready and sidecar.history != history, what="reconnected")
        assert (await cache.get(patrons, 7))["name"] == "while deaf"
        assert sidecar.capture_losses >= 1
        # and it keeps following changes on the new connection
        await db.execute(f"UPDATE {patrons} SET name = 'after' WHERE id = 7")
        await eventually(lambda: _name(cache, patrons, 7, "after"), what="change after reconnect")


async def test_health_follows_the_listener(start_daemon, db, patrons):
    sidecar = await start_daemon([patrons])
    channel = grpc.aio.insecure_channel(sidecar.target)
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
    assert (await health.Check(health_pb2.HealthCheckRequest(service="cachesidecar.v1.Cache"))).status == SERVING
    seen: list[int] = []

    async def watch() -> None:
        async for reply in health.Watch(health_pb2.HealthCheckRequest()):
            seen.append(reply.status)

    watcher = asyncio.create_task(watch())
    await eventually(lambda: seen == [SERVING], what="watch started")
    await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
    await eventually(lambda: seen[-3:] == [SERVING, NOT_SERVING, SERVING], what="health went down and up")
    watcher.cancel()
    await channel.close()


async def test_bad_requests_get_clear_statuses_and_disturb_nothing(start_daemon, patrons):
    sidecar = await start_daemon([patrons], max_batch_keys=10)
    async with AsyncClient(sidecar.target) as cache:
        with pytest.raises(TableNotFound, match="not cached here"):
            await cache.get("public.nope", 1)
        with pytest.raises(InvalidArgument, match=r"key column id \(integer\): 'abc' is not an integer"):
            await cache.get(patrons, "abc")
        with pytest.raises(InvalidArgument, match="out of range for int4"):
            await cache.get(patrons, 2**40)
        with pytest.raises(InvalidArgument, match=r"2 part\(s\)"):
            await cache.get(patrons, (1, 2))
        with pytest.raises(InvalidArgument, match="empty"):
            await cache.get(patrons, ())
        with pytest.raises(InvalidArgument, match="at most 10"):
            await cache.batch_get(patrons, range(11))
        with pytest.raises(InvalidArgument, match="nothing to invalidate"):
            await cache.invalidate(patrons, [])
        with pytest.raises(InvalidArgument, match="not a table name"):
            await cache.get("a.b.c", 1)
        # bad and good requests interleaved: the good ones all succeed
        good = [cache.get(patrons, i) for i in range(1, 21)]
        bad = [cache.get(patrons, "x") for _ in range(20)]
        results = await asyncio.gather(*good, *bad, return_exceptions=True)
        assert [r["id"] for r in results[:20]] == list(range(1, 21))
        assert all(isinstance(r, InvalidArgument) for r in results[20:])


async def test_malformed_messages_get_clear_statuses(start_daemon, db, schema, patrons):
    await db.execute(f"CREATE TABLE {schema}.pair (a int, b text, PRIMARY KEY (a, b))")
    sidecar = await start_daemon([patrons, f"{schema}.pair"])
    one = pb.Key(parts=[pb.KeyPart(int_value=1)])
    cases = [
        ("Get", pb.GetRequest(table=patrons, key=pb.Key(parts=[pb.KeyPart()])), "has no value"),
        (
            "Get",
            pb.GetRequest(table=patrons, key=one, options=pb.ReadOptions(min_revision=pb.Revision(number=3))),
            "min_revision needs the epoch",
        ),
        ("BatchGet", pb.BatchGetRequest(table=patrons, keys=[one], int_keys=[1]), "give one of keys"),
        ("BatchGet", pb.BatchGetRequest(table=f"{schema}.pair", int_keys=[1]), "primary key is (a, b)"),
        ("BatchGet", pb.BatchGetRequest(table=patrons, string_keys=["x"]), "'x' is not an integer"),
        ("Invalidate", pb.InvalidateRequest(table=patrons, keys=[one], all_rows=True), "not both"),
    ]
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.CacheStub(channel)
        for method, request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, method)(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            assert message in info.value.details()
        # a revision the cache has not reached: bounded by the caller's deadline
        future = pb.Revision(epoch=sidecar.core.revisions.epoch, number=sidecar.core.revisions.applied + 1000)
        request = pb.GetRequest(table=patrons, key=one, options=pb.ReadOptions(min_revision=future))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(request, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await stub.Get(pb.GetRequest(table=patrons, key=one), timeout=5)).found  # still serving


async def test_invalidate_sync_and_strong_reads(start_daemon, db, patrons):
    sidecar = await start_daemon([patrons])
    async with AsyncClient(sidecar.target) as cache:
        # A change the triggers cannot see (session_replication_role skips triggers; the
        # WAL has it all the same: logical capture sees it, and Invalidate must still work).
        await db.execute("SET session_replication_role = replica")
        await db.execute(f"UPDATE {patrons} SET name = 'silent' WHERE id = 9")
        await db.execute("SET session_replication_role = origin")
        if sidecar.capture == "notify":
            assert (await cache.get(patrons, 9))["name"] == "p9"
        revision = await cache.invalidate(patrons, [9], refresh=True)
        assert (await cache.get(patrons, 9))["name"] == "silent"
        assert revision.epoch == sidecar.core.revisions.epoch
        # Strong read: sees a commit that completed just before it, no waiting on our side.
        await db.execute(f"UPDATE {patrons} SET name = 'strong' WHERE id = 9")
        assert (await cache.get(patrons, 9, consistency="strong"))["name"] == "strong"
        synced = await cache.sync()
        assert synced.number >= revision.number


async def test_concurrent_barriers_share_round_trips(start_daemon, patrons):
    sidecar = await start_daemon([patrons])
    barrier = sidecar.core.trust.barrier
    async with AsyncClient(sidecar.target) as cache:
        await cache.sync()
        before = barrier.rounds
        results = await asyncio.gather(
            *(cache.sync() for _ in range(30)),
            *(cache.get(patrons, i, consistency="strong") for i in range(1, 31)),
        )
        assert all(r is not None for r in results)
        # One NOTIFY in flight at a time; callers arriving meanwhile share the next one, so
        # the database sees at most one token per round trip, not one per caller.
        assert barrier.rounds - before < 60


async def test_reflection_lists_the_services(start_daemon, patrons):
    sidecar = await start_daemon([patrons])
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"cachesidecar.v1.Cache", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("ddl", "install", "message", "code"),
    [
        # Each the user's to fix, so each exits 2 (README: one exit-code rule at start).
        ("CREATE TABLE {s}.nokey (v int)", True, "has no primary key", 2),
        ("", True, "does not exist", 2),  # (a misspelt name, like a misspelt key)
        ("CREATE TABLE {s}.nokey (id int PRIMARY KEY)", False, "has no cache-sidecar triggers", 2),
        ("CREATE TABLE {s}.nokey (id interval PRIMARY KEY)", True, "nokey: key column id has type interval", 2),
    ],
)
async def test_start_up_errors_are_clear(postgres, db, schema, caplog, ddl, install, message, code):
    if ddl:
        await db.execute(ddl.format(s=schema))
    config = cfg.Config(
        dsn=postgres.dsn,
        listen=("127.0.0.1:0",),
        install_triggers=install,
        tables=(cfg.TableConfig(schema=schema, name="nokey"),),
    )
    assert await Daemon(config, handle_signals=False).run() == code
    assert message in caplog.text


async def test_wrong_password_is_a_config_error_without_the_password(postgres, caplog):
    if postgres.kind != "embedded":
        pytest.skip("needs a server whose authentication we know")
    dsn = postgres.dsn.replace("postgres:@", "nobody_here:hunter2@")
    config = cfg.Config(dsn=dsn, listen=("127.0.0.1:0",), tables=(cfg.TableConfig(schema="public", name="x"),))
    assert await Daemon(config, handle_signals=False).run() == 2
    assert "database.dsn" in caplog.text and "hunter2" not in caplog.text


async def _name(cache: AsyncClient, table: str, key: int, name: str) -> bool:
    row = await cache.get(table, key)
    return row is not None and row["name"] == name


async def _missing(cache: AsyncClient, table: str, key: int) -> bool:
    return await cache.get(table, key) is None

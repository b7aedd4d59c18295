"""Faults under logical capture, on a real server of its own (restarted, reconfigured):
the walsender terminated, PostgreSQL restarted, the stream stalled, the slot invalidated
by ``max_slot_wal_keep_size``; no slot left behind after a stop, a SIGKILL or a lost
connection; two-phase commit.

The rule each fault must keep (issue 21, item 3): the loss is noticed at once, memory
stops being trusted (reads go to the database, or fail; never stale), the next
connection rebuilds every table (in the same epoch, the database's history, from a
new start), a Watch gets a RESET, and what was written meanwhile is served after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, Reset, Unavailable
from cache_sidecar_client.errors import DeadlineExceeded
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import config as cfg
from sidecar.pg import logical
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support.logical import start_logical_cluster
from tests.support.pg import LocalCluster
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

APPLICATION_NAME = "cache-sidecar replication"  # the replication connection's (LogicalSource)
PING = 1.0  # ping_interval = ping_timeout of the daemons here (seconds)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A cluster of this module's own: the tests restart it and change its settings."""
    cluster = start_logical_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def pg(cluster: LocalCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.dsn)
    yield conn
    if not conn.is_closed():
        conn.terminate()


@pytest.fixture
async def tables(cluster: LocalCluster) -> AsyncIterator[tuple[str, str]]:
    """Two cached tables (``items``, ``others``) of ten rows at version 1, in a fresh schema."""
    schema = f"f_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(cluster.dsn)
    await conn.execute(
        f"CREATE SCHEMA {schema};"
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 1 FROM generate_series(1, 10) g;"
        f"CREATE TABLE {schema}.others (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.others SELECT g, 1 FROM generate_series(1, 10) g"
    )
    await conn.close()
    yield f"{schema}.items", f"{schema}.others"
    conn = await asyncpg.connect(cluster.dsn)  # (a new one: the test may have restarted the server)
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()


@pytest.fixture
async def start(cluster: LocalCluster) -> AsyncIterator[Callable[..., Any]]:
    """Start an in-process daemon in logical mode on the module's cluster."""
    running: list[RunningDaemon] = []

    async def start(names: list[str], **settings: Any) -> RunningDaemon:
        values: dict[str, Any] = {
            "dsn": cluster.dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "capture": "logical",
            "ping_interval": PING,
            "ping_timeout": PING,
            "query_timeout": 5.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "grace_period": 2.0,
            "tables": tuple(cfg.parse_table_spec(name, "test") for name in names),
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, True, "logical daemon")

    yield start
    await stop_all(running)


@pytest.fixture
async def proxy(cluster: LocalCluster) -> AsyncIterator[Proxy]:
    proxy = Proxy(unix_path=cluster.socket_path)
    await proxy.start()
    yield proxy
    await proxy.close()


# ---------------------------------------------------------------- helpers


async def sidecar_slots(pg: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    """The sidecars' slots on the server, by name."""
    rows = await pg.fetch(
        "SELECT slot_name, active, active_pid, temporary, wal_status, confirmed_flush_lsn"
        " FROM pg_replication_slots WHERE slot_name LIKE 'cache\\_sidecar\\_%'"
    )
    return {row["slot_name"]: row for row in rows}


async def walsender(pg: asyncpg.Connection, sidecar: RunningDaemon) -> int:
    """The process id of the daemon's walsender: the backend of type walsender, with the
    sidecar's application name, holding the daemon's current slot."""
    slot = sidecar.daemon.source.slot.name
    pid = await pg.fetchval(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_replication_slots s ON s.active_pid = a.pid"
        " WHERE a.backend_type = 'walsender' AND a.application_name = $1 AND s.slot_name = $2",
        APPLICATION_NAME,
        slot,
    )
    assert isinstance(pid, int), f"no walsender holds slot {slot}"
    return pid


async def collect(stream: Any, until: Callable[[list[Any]], bool], timeout: float = 60.0) -> list[Any]:
    """Read a Watch stream until ``until(items)`` holds."""
    got: list[Any] = []
    async with asyncio.timeout(timeout):
        async for item in stream:
            got.append(item)
            if until(got):
                return got
    return got


def reset_then_version(table: str, version: int) -> Callable[[list[Any]], bool]:
    """A Watch has seen a RESET, then row 1 of ``table`` at ``version``."""

    def done(got: list[Any]) -> bool:
        resets = [n for n, item in enumerate(got) if isinstance(item, Reset)]
        return bool(resets) and any(
            isinstance(item, ChangeBatch)
            and any(c.table == table and c.row is not None and c.row.get("version") == version for c in item.changes)
            for item in got[resets[0] :]
        )

    return done


def check_reset(got: list[Any], history: tuple[str, int]) -> None:
    """A RESET to the new history: the same epoch (the database's), a later start."""
    reset = next(item for item in got if isinstance(item, Reset))
    assert reset.revision.epoch == history[0] and reset.revision.number > history[1] and "rebuilt" in reset.reason


def reloads(sidecar: RunningDaemon, names: tuple[str, ...]) -> dict[str, int]:
    return {name: sidecar.core.tables[name].reloads for name in names}


def held(sidecar: RunningDaemon, table: str, key: int) -> bytes:
    """The row as memory holds it (to show that reads during an outage did not touch it)."""
    return bytes(sidecar.core.tables[table].rows[(key,)])


def through(proxy: Proxy) -> str:
    return f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"


# ---------------------------------------------------------------- the walsender terminated


async def test_walsender_terminated(cluster, pg, tables, start):
    """Noticed at once; while the new slot cannot be made (a transaction holding an xid
    delays a logical slot's creation, as a long transaction does in production) reads go
    to the database; then a new slot, a new history start, every table rebuilt, a RESET, the
    write of the outage served from memory; the old slot is gone, none left inactive."""
    items, others = tables
    sidecar = await start([items, others])
    source = sidecar.daemon.source
    history, loaded, old_slot = sidecar.history, reloads(sidecar, tables), source.slot.name
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        stream = cache.watch([items])
        reading = asyncio.create_task(collect(stream, reset_then_version(items, 3)))
        await eventually(lambda: sidecar.core.fanout.subscribers == 1, what="the watcher subscribed")
        blocker = await asyncpg.connect(cluster.dsn)
        transaction = blocker.transaction()
        await transaction.start()
        try:
            await blocker.fetchval("SELECT pg_current_xact_id()")  # (an xid: slot creation waits for it)
            await pg.fetchval("SELECT pg_terminate_backend($1)", await walsender(pg, sidecar))
            await eventually(lambda: not sidecar.core.trust.up, timeout=3, what="the loss noticed at once")
            await pg.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")
            passthrough = sidecar.core.reads.stats.passthrough_reads
            assert (await cache.get(items, 1))["version"] == 2  # from the database
            assert (await cache.get(items, 1, consistency="strong"))["version"] == 2
            assert sidecar.core.reads.stats.passthrough_reads == passthrough + 2
            assert b'"version":1' in held(sidecar, items, 1)  # memory not trusted, not touched
            assert sidecar.history == history and not sidecar.engine.ready  # (still down)
        finally:
            await transaction.rollback()
            await blocker.close()
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != history,
            timeout=30,
            what="a new slot and a rebuild",
        )
        assert all(sidecar.core.tables[name].reloads > loaded[name] for name in tables), "every table rebuilt"
        passthrough = sidecar.core.reads.stats.passthrough_reads
        assert (await cache.get(items, 1))["version"] == 2  # the outage's write, now from memory
        assert sidecar.core.reads.stats.passthrough_reads == passthrough
        await pg.execute(f"UPDATE {items} SET version = 3 WHERE id = 1")
        got = await reading
        await stream.aclose()
    check_reset(got, history)
    assert source.losses == 1
    slots = await sidecar_slots(pg)
    assert old_slot not in slots and source.slot.name != old_slot
    assert list(slots) == [source.slot.name] and slots[source.slot.name]["active"]


async def test_a_stop_while_the_new_slot_waits(cluster, pg, tables, start):
    """SIGTERM while the reconnect's slot creation waits for an old transaction (which may
    last hours): the daemon stops at once, and no slot is left. (The creation runs in a
    thread on the replication connection; closing that connection from the event loop
    waited for the command, freezing the loop -- gRPC, health, the stop itself.) A timer
    ends the old transaction after 30 s so that the test ends either way."""
    items, _ = tables
    sidecar = await start([items])
    blocker = await asyncpg.connect(cluster.dsn)
    transaction = blocker.transaction()
    await transaction.start()
    blocker_pid = blocker.get_server_pid()
    safety = threading.Timer(30, _terminate_backend, (cluster.dsn, blocker_pid))
    safety.start()
    try:
        await blocker.fetchval("SELECT pg_current_xact_id()")
        await pg.fetchval("SELECT pg_terminate_backend($1)", await walsender(pg, sidecar))
        await eventually(lambda: not sidecar.core.trust.up, timeout=3, what="the loss noticed")
        await eventually(lambda: _creating_slot(pg), timeout=10, what="the new slot waiting for the old transaction")
        started = time.monotonic()
        assert await sidecar.stop() == 0
        took = time.monotonic() - started
        assert took < 10, f"the stop waited {took:.1f}s for the old transaction"
        assert await blocker.fetchval("SELECT 1") == 1, "(the old transaction was still open)"
        await eventually(lambda: _none_of(pg, "cache_sidecar_"), timeout=10, what="no slot left")
    finally:
        safety.cancel()
        if not blocker.is_closed():
            blocker.terminate()


def _terminate_backend(dsn: str, pid: int) -> None:
    import psycopg2  # type: ignore[import-untyped]

    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _creating_slot(pg: asyncpg.Connection) -> bool:
    return bool(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND application_name = $1"
            " AND query LIKE 'CREATE_REPLICATION_SLOT%' AND state = 'active'",
            APPLICATION_NAME,
        )
    )


# ---------------------------------------------------------------- PostgreSQL restarted


async def test_postgresql_restart(cluster, pg, tables, start, proxy):
    """PostgreSQL restarts under the daemon, and for a while the replication connection
    cannot come back (its way goes through a proxy that refuses new connections; the
    pool's does not), so the outage lasts until the test says: the loss is noticed while
    the server is down; the database answers reads meanwhile (fresh, memory untouched);
    then a new history start, every table rebuilt, a RESET, the outage's write served after."""
    items, others = tables
    sidecar = await start([items, others])
    await stream_through(sidecar, pg, proxy)
    source = sidecar.daemon.source
    history, loaded, losses = sidecar.history, reloads(sidecar, tables), source.losses
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        stream = cache.watch([items])
        reading = asyncio.create_task(collect(stream, reset_then_version(items, 3)))
        await eventually(lambda: sidecar.core.fanout.subscribers == 1, what="the watcher subscribed")
        proxy.refuse()
        restarting = asyncio.create_task(asyncio.to_thread(cluster.restart))
        await eventually(lambda: not sidecar.core.trust.up, timeout=10, what="the loss noticed")
        await restarting
        assert source.losses == losses + 1
        conn = await asyncpg.connect(cluster.dsn)  # (``pg`` died with the restart)
        await conn.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")
        passthrough = sidecar.core.reads.stats.passthrough_reads
        read = await eventually(
            lambda: _answered(cache.get(items, 1, consistency="strong")),
            timeout=20,
            what="the database answering reads again",
        )
        assert read["version"] == 2
        assert (await cache.get(items, 1))["version"] == 2
        assert sidecar.core.reads.stats.passthrough_reads >= passthrough + 2
        assert b'"version":1' in held(sidecar, items, 1)
        assert sidecar.history == history and not sidecar.core.trust.up  # (refused)
        proxy.unblock()
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != history,
            timeout=30,
            what="reconnected and rebuilt",
        )
        assert all(sidecar.core.tables[name].reloads > loaded[name] for name in tables), "every table rebuilt"
        passthrough = sidecar.core.reads.stats.passthrough_reads
        assert (await cache.get(items, 1))["version"] == 2
        assert sidecar.core.reads.stats.passthrough_reads == passthrough
        await conn.execute(f"UPDATE {items} SET version = 3 WHERE id = 1")
        got = await reading
        await stream.aclose()
        assert list(await sidecar_slots(conn)) == [source.slot.name]
        await conn.close()
    check_reset(got, history)


async def _answered(read: Any) -> Any:
    """A read's answer, or None when it failed (the database unreachable: the daemon said
    so, or the client's retries of that ran out of time)."""
    try:
        return await read
    except (Unavailable, DeadlineExceeded):
        return None


# ---------------------------------------------------------------- the stream stalled


@pytest.mark.parametrize("path", ["everything", "the stream"])
async def test_stalled_stream(cluster, pg, tables, start, proxy, path):
    """The proxy stops moving bytes (no FIN, no reset: a dead network). Only the server's
    silence after a status request tells: the daemon must notice within about
    ping_interval + ping_timeout, serve nothing stale meanwhile (a STRONG read or a Sync
    fails or asks the database), then rebuild when the bytes flow again. ``path``: what
    goes through the proxy -- the daemon's whole dsn, or only the replication connection
    (then reads go to the database, which answers)."""
    items, others = tables
    if path == "everything":
        sidecar = await start([items, others], dsn=through(proxy), query_timeout=2.0, connect_timeout=2.0)
    else:
        sidecar = await start([items, others], query_timeout=2.0, connect_timeout=2.0)
        first = sidecar.history
        sidecar.daemon.source._conninfo = through(proxy)  # the next replication connection goes through it
        await pg.fetchval("SELECT pg_terminate_backend($1)", await walsender(pg, sidecar))
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != first and proxy.connections == 1,
            timeout=30,
            what="streaming through the proxy",
        )
    source = sidecar.daemon.source
    history, loaded, losses = sidecar.history, reloads(sidecar, tables), source.losses
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        stream = cache.watch([items])
        reading = asyncio.create_task(collect(stream, reset_then_version(items, 3)))
        await eventually(lambda: sidecar.core.fanout.subscribers == 1, what="the watcher subscribed")
        proxy.stall()
        stalled_at = time.monotonic()
        noticed: list[float] = []

        def down() -> bool:
            if sidecar.core.trust.up:
                return False
            noticed.append(time.monotonic() - stalled_at)
            return True

        noticing = asyncio.create_task(eventually(down, timeout=4 * PING + 4, what="the stall noticed"))
        await pg.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")  # the stream cannot bring it
        strong = await _answered(cache.get(items, 1, consistency="strong", timeout=5))  # (before or after the notice)
        assert strong is None or strong["version"] == 2, "a STRONG read served a stale row"
        await noticing
        with pytest.raises(Unavailable):
            await cache.sync()
        eventual = await _answered(cache.get(items, 1, timeout=5))
        strong = await _answered(cache.get(items, 1, consistency="strong", timeout=5))
        if path == "everything":  # (the database is behind the stalled proxy too)
            assert eventual is None or eventual["version"] == 2
            assert strong is None or strong["version"] == 2
        else:
            assert eventual is not None and eventual["version"] == 2
            assert strong is not None and strong["version"] == 2
        assert b'"version":1' in held(sidecar, items, 1)
        proxy.resume()
        await eventually(
            lambda: sidecar.engine.ready and sidecar.history != history,
            timeout=30,
            what="streaming again, rebuilt",
        )
        assert all(sidecar.core.tables[name].reloads > loaded[name] for name in tables), "every table rebuilt"
        assert (await cache.get(items, 1))["version"] == 2
        await pg.execute(f"UPDATE {items} SET version = 3 WHERE id = 1")
        got = await reading
        await stream.aclose()
    check_reset(got, history)
    assert source.losses == losses + 1
    await eventually(
        lambda: _only(pg, source.slot.name), timeout=10, what="the stalled connection's slot gone with its walsender"
    )
    print(f"stall noticed after {noticed[0]:.2f}s (ping_interval = ping_timeout = {PING:g}s)")


async def _only(pg: asyncpg.Connection, name: str) -> bool:
    return list(await sidecar_slots(pg)) == [name]


# ---------------------------------------------------------------- the slot and max_slot_wal_keep_size


@contextlib.asynccontextmanager
async def wal_keep_size(pg: asyncpg.Connection, size: str) -> AsyncIterator[None]:
    """``max_slot_wal_keep_size`` set for the cluster (it takes a reload, no restart)."""
    await pg.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{size}'")
    await pg.fetchval("SELECT pg_reload_conf()")
    await eventually(lambda: _setting_is(pg, "max_slot_wal_keep_size", size), what="the setting reloaded")
    try:
        yield
    finally:
        await pg.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        await pg.fetchval("SELECT pg_reload_conf()")


async def _setting_is(pg: asyncpg.Connection, name: str, value: str) -> bool:
    return bool(await pg.fetchval("SELECT current_setting($1) = $2", name, value))


async def generate_wal(pg: asyncpg.Connection, schema: str, segments: int) -> None:
    """Move the server ``segments`` WAL segments on, by writes to a table no sidecar caches
    (the stream has nothing to send for them)."""
    await pg.execute(f"CREATE TABLE IF NOT EXISTS {schema}.filler (n int)")
    for n in range(segments):
        await pg.execute(f"INSERT INTO {schema}.filler VALUES ({n})")
        await pg.fetchval("SELECT pg_switch_wal()")


async def stream_through(sidecar: RunningDaemon, pg: asyncpg.Connection, proxy: Proxy) -> None:
    """Move the daemon's replication connection (only) behind ``proxy``."""
    history = sidecar.history
    sidecar.daemon.source._conninfo = through(proxy)
    await pg.fetchval("SELECT pg_terminate_backend($1)", await walsender(pg, sidecar))
    await eventually(
        lambda: sidecar.engine.ready and sidecar.history != history and proxy.connections == 1,
        timeout=30,
        what="streaming through the proxy",
    )


async def test_a_flowing_stream_keeps_its_slot(pg, tables, start):
    """Writes to tables nobody caches move the WAL on; the stream has nothing to send for
    them, yet the daemon's feedback must let the slot follow (else the slot retains all
    that WAL and ``max_slot_wal_keep_size`` invalidates it): after a checkpoint the slot
    is still the daemon's, reserved, and no rebuild happened."""
    items, others = tables
    schema = items.split(".")[0]
    async with wal_keep_size(pg, "1MB"):
        sidecar = await start([items, others])
        source = sidecar.daemon.source
        history, slot = sidecar.history, source.slot.name
        await generate_wal(pg, schema, 4)
        await pg.fetchval("SELECT pg_log_standby_snapshot()")  # (a point the slot's restart may move to)
        end = await pg.fetchval("SELECT pg_current_wal_lsn()")
        await eventually(
            lambda: _slot_reached(pg, slot, end), timeout=15, what="the slot confirmed past the unrelated WAL"
        )
        await pg.execute("CHECKPOINT", timeout=60)
        slots = await sidecar_slots(pg)
        assert slots[slot]["active"] and slots[slot]["wal_status"] in ("reserved", "extended"), slots[slot]
        assert sidecar.history == history and source.losses == 0


async def _slot_reached(pg: asyncpg.Connection, slot: str, lsn: Any) -> bool:
    return bool(
        await pg.fetchval(
            "SELECT confirmed_flush_lsn >= $2 AND restart_lsn >= $2 - 1048576 FROM pg_replication_slots"
            " WHERE slot_name = $1",
            slot,
            lsn,
        )
    )


async def test_slot_invalidated_by_max_slot_wal_keep_size(cluster, pg, tables, start, proxy, caplog):
    """The stream stalls (pings far apart, so the daemon does not notice by itself) while
    the server writes more WAL than ``max_slot_wal_keep_size``: the checkpoint invalidates
    the slot and ends its walsender. STRONG reads meanwhile fail, never stale; when the
    bytes flow again the daemon finds its stream gone, logs it, and rebuilds from a new
    slot (a new history start), serving the write it missed."""
    items, others = tables
    schema = items.split(".")[0]
    async with wal_keep_size(pg, "1MB"):
        sidecar = await start([items, others], ping_interval=60.0, ping_timeout=60.0, query_timeout=2.0)
        await stream_through(sidecar, pg, proxy)
        source = sidecar.daemon.source
        source.slot_check_interval = 0.2  # (read again before each check)
        history, loaded, slot = sidecar.history, reloads(sidecar, tables), source.slot.name
        async with AsyncClient(sidecar.target, timeout=10) as cache:
            proxy.stall()
            await pg.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")
            strong = await _answered(cache.get(items, 1, consistency="strong", timeout=5))
            assert strong is None or strong["version"] == 2, "a STRONG read served a stale row"
            await generate_wal(pg, schema, 4)
            await eventually(
                lambda: source.slot.wal_status == "unreserved",
                timeout=6 * logical.SLOT_CHECK_INTERVAL,  # (read every interval; a busy machine is late)
                what="the daemon seeing its slot unreserved",
            )
            await pg.execute("CHECKPOINT", timeout=60)
            await eventually(lambda: _invalidated(pg, slot), timeout=30, what="the slot invalidated")
            server_log = (Path(cluster.base) / "log").read_text()
            assert f'to release replication slot "{slot}"' in server_log  # (the server says why)
            assert sidecar.history == history  # (nothing told the daemon yet: the proxy holds it)
            strong = await _answered(cache.get(items, 1, consistency="strong", timeout=5))
            assert strong is None or strong["version"] == 2, "a STRONG read served a stale row"
            proxy.refuse()  # (no new stream for now: the outage lasts until the test says)
            proxy.resume()  # (the invalidated slot's connection ends: its walsender is gone)
            await eventually(lambda: not sidecar.core.trust.up, timeout=10, what="the end of the stream noticed")
            assert (await cache.get(items, 1))["version"] == 2  # from the database
            assert (await cache.get(items, 1, consistency="strong"))["version"] == 2
            # (memory may hold version 2 by now: the walsender had sent that transaction
            # into the proxy before the slot was invalidated, and the resume delivered it)
            proxy.unblock()
            await eventually(
                lambda: sidecar.engine.ready and sidecar.history != history,
                timeout=30,
                what="a new slot and a rebuild",
            )
            assert all(sidecar.core.tables[name].reloads > loaded[name] for name in tables), "every table rebuilt"
            assert source.slot.name != slot
            assert (await cache.get(items, 1))["version"] == 2
    said = [r.getMessage() for r in caplog.records if r.name == "sidecar.pg.logical"]
    assert any(f"slot {slot} retains more WAL than max_slot_wal_keep_size" in m for m in said), said
    assert any("stream lost" in m and f"slot {slot} had passed max_slot_wal_keep_size: invalidated" in m for m in said)


async def _invalidated(pg: asyncpg.Connection, slot: str) -> bool:
    """The slot is lost, or gone (a temporary slot goes with its walsender, which the
    invalidation ends)."""
    row = (await sidecar_slots(pg)).get(slot)
    return row is None or row["wal_status"] == "lost"


# ---------------------------------------------------------------- no slot left behind


async def test_no_slot_left_after_a_stop(pg, tables, start):
    items, _ = tables
    sidecar = await start([items])
    slot = sidecar.daemon.source.slot.name
    row = (await sidecar_slots(pg))[slot]
    assert row["active"] and row["temporary"]
    assert await sidecar.stop() == 0
    await eventually(lambda: _none_of(pg, slot), timeout=10, what="the slot gone after a stop")


async def _none_of(pg: asyncpg.Connection, prefix: str) -> bool:
    """No slot of that name (prefix), active or not, and no walsender of the sidecar's."""
    slots = [name for name in await sidecar_slots(pg) if name.startswith(prefix)]
    walsenders = await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND application_name = $1",
        APPLICATION_NAME,
    )
    return not slots and walsenders == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_no_slot_left_after_a_sigkill(cluster, pg, tables, tmp_path):
    """The daemon as a process of its own, killed with SIGKILL (no clean-up of any kind):
    its temporary slot goes with the server session the kill closes."""
    items, _ = tables
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    log = (tmp_path / "daemon.log").open("w")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--capture",
        "logical",
        "--dsn",
        cluster.dsn,
        "--table",
        items,
        "--install-triggers",
        "--listen",
        f"127.0.0.1:{port}",
        env=env,
        stderr=log,
    )
    try:

        async def serving() -> bool:
            assert process.returncode is None, f"daemon exited: {(tmp_path / 'daemon.log').read_text()}"
            return await _serving(f"127.0.0.1:{port}")

        await eventually(serving, timeout=60, interval=0.1, what="the daemon serving")
        prefix = f"cache_sidecar_{process.pid}_"
        slots = [row for name, row in (await sidecar_slots(pg)).items() if name.startswith(prefix)]
        assert len(slots) == 1 and slots[0]["active"] and slots[0]["temporary"]
        process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
        await eventually(lambda: _none_of(pg, prefix), timeout=10, what="the slot gone after a SIGKILL")
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), 10)
        log.close()


# ---------------------------------------------------------------- two-phase commit


async def test_two_phase_commit(pg, tables, start):
    """PREPARE TRANSACTION on a cached table works in logical mode (a trigger's NOTIFY
    forbids it in notify mode); COMMIT PREPARED is seen, with its row from the stream;
    ROLLBACK PREPARED is not."""
    items, others = tables
    sidecar = await start([items])
    table = sidecar.core.tables[items]
    gid = f"g_{secrets.token_hex(4)}"
    async with AsyncClient(sidecar.target, timeout=10) as cache:
        await pg.execute(f"BEGIN; UPDATE {items} SET version = 2 WHERE id = 1; PREPARE TRANSACTION '{gid}_a'")
        await cache.sync()
        assert (await cache.get(items, 1))["version"] == 1  # prepared, not committed
        await pg.execute(f"COMMIT PREPARED '{gid}_a'")
        await cache.sync()
        assert (await cache.get(items, 1))["version"] == 2
        await pg.execute(f"BEGIN; UPDATE {items} SET version = 3 WHERE id = 1; PREPARE TRANSACTION '{gid}_b'")
        await pg.execute(f"ROLLBACK PREPARED '{gid}_b'")
        await cache.sync()
        assert (await cache.get(items, 1))["version"] == 2
        assert table.streamed and table.refetches == 0  # (the committed row came from the stream)
    notify = await start([others], capture="notify", channel=f"cs_{secrets.token_hex(4)}")
    assert notify.engine.ready
    with pytest.raises(asyncpg.PostgresError, match="cannot PREPARE a transaction that has executed"):
        await pg.execute(f"BEGIN; UPDATE {others} SET version = 2 WHERE id = 1; PREPARE TRANSACTION '{gid}_c'")
    await pg.execute("ROLLBACK")

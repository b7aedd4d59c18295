"""A hub whose database.dsn is a hot standby (issue 23, item 2): it decodes there, loads
there, and the primary sees only its barriers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient

from sidecar import config as cfg
from sidecar import remote
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.app import Daemon
from sidecar.core.wire import row_json
from sidecar.errors import Unavailable
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.integration.logical.test_slot_metrics import scrape
from tests.support.proxy import Proxy
from tests.support.standby import StandbyPair, start_standby_pair
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio


async def _rows(conn: asyncpg.Connection, table: str) -> dict[int, str]:
    rows = await conn.fetch(f"SELECT id, row_to_json(t.*)::text AS j FROM {table} t")
    return {r["id"]: r["j"] for r in rows}


def _cached(daemon: Any, table: str) -> dict[int, str]:
    return {k[0]: row_json(v).decode() for k, v in daemon.core.tables[table].rows.items()}


async def test_rows_served_are_the_primarys(standby_pair: StandbyPair, sschema: str, start_on_standby: Any) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await primary.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 100) g")
    daemon = await start_on_standby([table])
    assert daemon.daemon.primary is not None
    await daemon.engine.sync()
    assert _cached(daemon, table) == await _rows(primary, table)
    await primary.execute(f"UPDATE {table} SET v = 'new' WHERE id = 7")
    await primary.execute(f"DELETE FROM {table} WHERE id = 8")
    await daemon.engine.sync()  # (a barrier: covers every commit made on the primary before it)
    assert _cached(daemon, table) == await _rows(primary, table)
    assert daemon.core.tables[table].refetches == 0
    await primary.close()


async def test_cache_sidecar_tables_shows_the_standby(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    await primary.execute(f"CREATE TABLE {sschema}.t (id int PRIMARY KEY)")
    await primary.close()
    daemon = await start_on_standby([f"{sschema}.t"])
    await eventually(lambda: daemon.daemon.standby_watch.sample is not None, what="a standby sample")
    assert await asyncio.to_thread(remote.tables, daemon.target) == 0
    assert "database: a standby, receiving, behind by 0 bytes of WAL, 0.0s" in capsys.readouterr().out


async def test_the_primary_runs_nothing_per_change_and_one_statement_per_barrier(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any
) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    daemon = await start_on_standby([table])
    await daemon.engine.sync()
    before = standby_pair.statements("cache-sidecar")
    for i in range(50):  # (50 transactions)
        await primary.execute(f"INSERT INTO {table} VALUES ($1, 'x')", i)
    await eventually(lambda: len(daemon.core.tables[table].rows) == 50, timeout=30, what="the writes decoded")
    assert standby_pair.statements("cache-sidecar") == before, "the primary ran statements for changes"
    for _ in range(3):
        await daemon.engine.sync()
    new = standby_pair.statements("cache-sidecar")[len(before) :]
    assert len(new) == 3, new
    assert all("pg_logical_emit_message(true" in statement for statement in new), new
    await primary.close()


async def _list_tables(target: str) -> pb.ListTablesResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        return await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest())


def _config(standby_pair: StandbyPair, table: str, **settings: Any) -> cfg.Config:
    values: dict[str, Any] = {
        "dsn": standby_pair.standby.dsn,
        "listen": ("127.0.0.1:0",),
        "install_triggers": True,
        "capture": "logical",
        "tables": (cfg.parse_table_spec(table, "test"),),
    }
    values.update(settings)
    return cfg.Config(**values)


async def _table_on_both(standby_pair: StandbyPair, sschema: str) -> None:
    """Table ``t`` made on the primary, and replayed on the standby."""
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    await primary.execute(f"CREATE TABLE {sschema}.t (id int PRIMARY KEY)")
    await primary.close()
    await eventually(standby_pair.caught_up, what="the standby caught up")


async def test_logical_on_a_standby_without_primary_dsn_is_refused(
    standby_pair: StandbyPair, sschema: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _table_on_both(standby_pair, sschema)
    assert await Daemon(_config(standby_pair, f"{sschema}.t"), handle_signals=False).run() == 2
    assert "database.primary_dsn" in caplog.text and "hot standby" in caplog.text


async def test_notify_on_a_standby_is_refused(
    standby_pair: StandbyPair, sschema: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _table_on_both(standby_pair, sschema)
    config = _config(standby_pair, f"{sschema}.t", capture="notify")
    assert await Daemon(config, handle_signals=False).run() == 2
    assert "database.capture" in caplog.text and "hot standby" in caplog.text
    # (and nothing was installed: a standby is read-only, and the check comes first)
    assert "read-only transaction" not in caplog.text


async def test_primary_dsn_that_is_the_standby_is_refused(
    standby_pair: StandbyPair, sschema: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _table_on_both(standby_pair, sschema)
    config = _config(standby_pair, f"{sschema}.t", primary_dsn=standby_pair.standby.dsn)
    assert await Daemon(config, handle_signals=False).run() == 2
    assert "database.primary_dsn is a standby too" in caplog.text


@contextlib.asynccontextmanager
async def _link_through_proxy(standby_pair: StandbyPair) -> AsyncIterator[Proxy]:
    """The standby's primary_conninfo through a TCP proxy (a link the test can stall);
    the walreceiver restarts on the reload. Put back as it was after."""
    proxy = Proxy(unix_path=standby_pair.primary.socket_path)
    port = await proxy.start()
    standby = await asyncpg.connect(standby_pair.standby.dsn)
    original = await standby.fetchval("SHOW primary_conninfo")
    slot = standby_pair.standby.standby_slot
    conninfo = f"host=127.0.0.1 port={port} user=postgres application_name=standby_via_proxy"
    await standby.execute(f"ALTER SYSTEM SET primary_conninfo = '{conninfo}'")
    await standby.execute("SELECT pg_reload_conf()")

    async def through_proxy() -> bool:
        row = await standby.fetchrow("SELECT status, sender_port, slot_name FROM pg_stat_wal_receiver")
        return row is not None and row["status"] == "streaming" and row["sender_port"] == port

    try:
        await eventually(through_proxy, timeout=30, what="the standby streaming through the proxy")
        assert slot  # (the physical slot keeps the WAL the standby misses meanwhile)
        yield proxy
    finally:
        proxy.resume()
        quoted = original.replace("'", "''")
        await standby.execute(f"ALTER SYSTEM SET primary_conninfo = '{quoted}'")
        await standby.execute("SELECT pg_reload_conf()")
        await eventually(
            lambda: standby.fetchval(
                "SELECT status = 'streaming' AND sender_port <> $1 FROM pg_stat_wal_receiver", port
            ),
            timeout=30,
            what="the standby streaming directly again",
        )
        await standby.close()
        await proxy.close()


async def test_a_standby_that_falls_behind_makes_strong_reads_wait_never_stale(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any
) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await primary.execute(f"INSERT INTO {table} VALUES (1, 'old')")
    daemon = await start_on_standby([table], query_timeout=30.0, metrics_listen="127.0.0.1:0")
    lag, pool = daemon.daemon.standby_watch, daemon.daemon.db.pool
    assert lag is not None
    async with _link_through_proxy(standby_pair) as proxy, AsyncClient(daemon.target) as cache:
        assert (await cache.get(table, 1, consistency="strong"))["v"] == "old"
        await lag.sample_once(pool)
        assert lag.sample is not None and lag.sample.behind_bytes == 0 and lag.sample.receiving
        proxy.stall()
        await primary.execute(f"UPDATE {table} SET v = 'new' WHERE id = 1")  # (committed on the primary)
        read = asyncio.create_task(cache.get(table, 1, consistency="strong"))
        done, _ = await asyncio.wait({read}, timeout=2.0)
        assert not done, f"a STRONG read answered while the standby could not have the commit: {read.result()}"
        assert (await cache.get(table, 1))["v"] == "old"  # (an EVENTUAL read: the standby's state, as it is)
        # The lag shows (the barrier's token is on the primary, past what the standby replayed).
        await lag.sample_once(pool)
        assert lag.sample is not None and lag.sample.behind_bytes > 0 and lag.sample.behind_seconds > 0
        metrics = await asyncio.to_thread(scrape, daemon.daemon.metrics_address)
        assert metrics["cache_sidecar_standby_replay_lag_bytes"] == lag.sample.behind_bytes
        listing = await _list_tables(daemon.target)
        assert listing.HasField("standby") and listing.standby.replay_lag_bytes == lag.sample.behind_bytes
        proxy.resume()
        assert (await read)["v"] == "new"
        await lag.sample_once(pool)
        assert lag.sample is not None and lag.sample.behind_bytes == 0 and lag.sample.behind_seconds == 0
    await primary.close()


async def _synced_and_equal(daemon: Any, primary: asyncpg.Connection, table: str) -> bool:
    """A barrier passed (covering every commit on the primary so far) and the rows are the primary's."""
    try:
        await daemon.engine.sync()
    except Unavailable:
        return False
    return _cached(daemon, table) == await _rows(primary, table)


async def test_the_hub_rebuilds_after_its_walsender_ends_and_after_the_standby_restarts(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any
) -> None:
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await primary.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 200) g")
    daemon = await start_on_standby([table])
    source = daemon.daemon.source
    await daemon.engine.sync()

    # The standby's walsender serving the hub ends: a new slot there, a rebuild.
    standby = await asyncpg.connect(standby_pair.standby.dsn)
    connects = source.connects
    await standby.execute("SELECT pg_terminate_backend($1)", await daemon.capture_pid(standby))
    await standby.close()
    for i in range(1, 21):  # (writes while the hub rebuilds)
        await primary.execute(f"UPDATE {table} SET v = 'a{i}' WHERE id = $1", i)
    await eventually(lambda: source.connects > connects and source.slot.streaming, timeout=60, what="a new stream")
    await eventually(lambda: _synced_and_equal(daemon, primary, table), timeout=60, what="the rows after a new stream")

    # The standby restarts: every connection to it ends; the hub comes back when it does.
    connects = source.connects
    await asyncio.to_thread(standby_pair.standby.restart)
    for i in range(21, 41):
        await primary.execute(f"UPDATE {table} SET v = 'b{i}' WHERE id = $1", i)
    await primary.execute(f"DELETE FROM {table} WHERE id > 190")
    await eventually(lambda: source.connects > connects and source.slot.streaming, timeout=90, what="a stream again")
    await eventually(lambda: _synced_and_equal(daemon, primary, table), timeout=60, what="the rows after a restart")
    assert daemon.core.tables[table].refetches == 0
    await primary.close()


async def test_after_a_promotion_the_hub_serves_the_promoted_server(caplog: pytest.LogCaptureFixture) -> None:
    """A pair of its own (promotion ends it): the hub's stream goes on or rebuilds, and its
    barriers go to the promoted server (a token written on the former primary would never
    reach the stream: barriers would time out)."""
    pair = await asyncio.to_thread(start_standby_pair)
    running: list[RunningDaemon] = []
    try:
        primary = await asyncpg.connect(pair.primary.dsn)
        await primary.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'before')")
        await primary.close()
        await eventually(pair.caught_up, what="the standby caught up")
        config = _config(pair, "public.t", primary_dsn=pair.primary.dsn, query_timeout=5.0)
        daemon = await start_in_process(config, running, True, "hub on a standby")
        await daemon.engine.sync()
        connects = daemon.daemon.source.connects
        promoted = await asyncpg.connect(pair.standby.dsn)
        assert await promoted.fetchval("SELECT pg_promote()")
        await promoted.execute("UPDATE t SET v = 'after' WHERE id = 1")
        watch = daemon.daemon.standby_watch
        assert watch is not None
        await watch.sample_once(daemon.daemon.db.pool)
        assert "database.dsn was promoted" in caplog.text
        await eventually(lambda: _synced_and_equal(daemon, promoted, "public.t"), timeout=60, what="the promoted rows")
        assert _cached(daemon, "public.t")[1] == '{"id":1,"v":"after"}'
        print("stream connects across the promotion:", connects, "->", daemon.daemon.source.connects)
        await promoted.close()
    finally:
        await stop_all(running)
        await asyncio.to_thread(pair.stop)


async def test_strong_reads_while_the_stream_is_down_wait_for_the_standby_to_replay(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any
) -> None:
    """While the stream is down reads go to the database: on a primary that is fresh, on a
    standby it may be behind the primary's commits -- a STRONG read must then wait until the
    standby has replayed what the primary had when the read began (found by the checker)."""
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await primary.execute(f"INSERT INTO {table} VALUES (1, 'old')")
    daemon = await start_on_standby([table], query_timeout=30.0)
    source = daemon.daemon.source
    async with _link_through_proxy(standby_pair) as proxy, AsyncClient(daemon.target) as cache:
        assert (await cache.get(table, 1, consistency="strong"))["v"] == "old"
        proxy.stall()
        await primary.execute(f"UPDATE {table} SET v = 'new' WHERE id = 1")  # (committed on the primary)
        standby = await asyncpg.connect(standby_pair.standby.dsn)
        await standby.execute("SELECT pg_terminate_backend($1)", await daemon.capture_pid(standby))
        await standby.close()
        # (a new slot on the standby waits for the primary's running-transactions record: the
        # stalled link holds it back, so the stream stays down and reads go to the database)
        await eventually(lambda: not source.up, what="the stream down")
        read = asyncio.create_task(cache.get(table, 1, consistency="strong"))
        done, _ = await asyncio.wait({read}, timeout=2.0)
        assert not done, f"a STRONG read answered while the standby could not have the commit: {read.result()}"
        proxy.resume()
        assert (await read)["v"] == "new"
    await primary.close()


async def test_a_dropped_publication_is_reinstalled_on_the_primary(
    standby_pair: StandbyPair, sschema: str, start_on_standby: Any
) -> None:
    """The catalog check reads the publication on the standby and installs it where it can
    be installed: the primary (the standby is read-only)."""
    primary = await asyncpg.connect(standby_pair.primary.dsn)
    table = f"{sschema}.t"
    await primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    daemon = await start_on_standby([table], catalog_check_interval=0.2)
    name = daemon.daemon.source.publication
    await primary.execute(f"DROP PUBLICATION {name}")
    await eventually(
        lambda: primary.fetchval("SELECT count(*) = 0 FROM pg_publication WHERE pubname = $1", name),
        what="the drop seen",
    )
    await eventually(
        lambda: primary.fetchval("SELECT count(*) = 1 FROM pg_publication WHERE pubname = $1", name),
        timeout=30,
        what="the publication reinstalled on the primary",
    )
    await primary.execute(f"INSERT INTO {table} VALUES (1, 'after')")
    await eventually(lambda: _synced_and_equal(daemon, primary, table), timeout=60, what="the rows after")
    assert _cached(daemon, table) == {1: '{"id":1,"v":"after"}'}
    await primary.close()

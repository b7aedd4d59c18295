"""Follower mode in one process against a real PostgreSQL: a hub (a sidecar with a
database) and followers whose change source is the hub -- rows, relations,
indexes and lazy tables served by followers, the hub's revisions on every
follower, STRONG and Sync through the hub, Invalidate forwarded, and the
stream's loss (a cut link is resumed without a reset; a stall is noticed;
another epoch is a rebuild with a reset)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, Reset

from sidecar import config as cfg
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.app import Daemon
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support import gate as gating
from tests.support.certs import Authority
from tests.support.gate import LOADS
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

StartFollower = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_follower() -> AsyncIterator[StartFollower]:
    """An in-process follower of ``upstream``: ``await start_follower(target, **settings)``."""
    running: list[RunningDaemon] = []

    async def start(upstream: str, tables: tuple[str, ...] = (), wait: bool = True, **settings: Any) -> RunningDaemon:
        values: dict[str, Any] = {
            "upstream_target": upstream,
            "listen": ("127.0.0.1:0",),
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.3,
            "upstream_progress_interval": 0.2,
            "upstream_stall_timeout": 1.0,
            "grace_period": 1.0,
            "tables": tuple(cfg.parse_table_spec(t, "test") for t in tables),
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, wait, "follower")

    yield start
    await stop_all(running)


async def link_to(hub: RunningDaemon) -> Proxy:
    """A TCP proxy in front of ``hub``, started: the link a test stalls or cuts."""
    proxy = Proxy(host="127.0.0.1", port=int(hub.target.rsplit(":", 1)[1]))
    await proxy.start()
    return proxy


@pytest.fixture
async def shop(db: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """A full table with an index, a lazy table, and a relation over two tables."""
    await db.execute(
        f"""
        CREATE TABLE {schema}.item (id int PRIMARY KEY, name text NOT NULL, price int NOT NULL);
        INSERT INTO {schema}.item SELECT g, 'item ' || g, g * 10 FROM generate_series(1, 20) g;
        CREATE TABLE {schema}.note (id int PRIMARY KEY, body text);
        INSERT INTO {schema}.note VALUES (1, 'one'), (2, 'two');
        CREATE TABLE {schema}.owner (id int PRIMARY KEY, name text);
        INSERT INTO {schema}.owner VALUES (1, 'Ada'), (2, 'Grace');
        CREATE TABLE {schema}.pet (id int PRIMARY KEY, owner_id int REFERENCES {schema}.owner, name text);
        INSERT INTO {schema}.pet VALUES (10, 1, 'Rex'), (11, 2, 'Tom');
        """
    )
    item = cfg.TableConfig(
        schema=schema,
        name="item",
        indexes=(cfg.IndexConfig("by_price", ("price",), range=True), cfg.IndexConfig("by_name", ("name",))),
    )
    note = cfg.TableConfig(schema=schema, name="note", mode="lazy", max_rows=100)
    pets = cfg.TableConfig(
        schema=schema,
        name="pets",
        query=(
            f"SELECT p.id, p.name, p.owner_id, o.name AS owner "
            f"FROM {schema}.pet p JOIN {schema}.owner o ON o.id = p.owner_id"
        ),
        key=("id",),
        sources=(
            cfg.RelationSource(schema, "pet", (("id", "id"),)),
            cfg.RelationSource(schema, "owner", (("id", "owner_id"),)),
        ),
    )
    return {"schema": schema, "tables": [item, note, pets], "item": item.qualified, "note": note.qualified}


async def test_a_follower_serves_what_its_hub_serves(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    assert follower.daemon.db is None and follower.daemon.listener is None  # no database at all
    async with AsyncClient(follower.target) as cache:
        tables = {t.name: t for t in await cache.list_tables()}
        assert set(tables) == {shop["item"], shop["note"], f"{schema}.pets"}
        assert tables[shop["note"]].mode == "lazy"
        assert await cache.get(shop["item"], 3) == {"id": 3, "name": "item 3", "price": 30}
        assert await cache.get(f"{schema}.pets", 10) == {"id": 10, "name": "Rex", "owner_id": 1, "owner": "Ada"}
        assert await cache.get(shop["note"], 1) == {"id": 1, "body": "one"}
        result = await cache.query(shop["item"], "by_price", lower=50, upper=70)
        assert [r["id"] for r in result.rows] == [5, 6, 7]
        assert [r["id"] for r in (await cache.query(shop["item"], "by_name", ["item 4"])).rows] == [4]
        # Served from the follower's memory, not the hub's: no read reached the hub.
        assert hub.core.reads.stats.passthrough_reads == 0

        # A committed change reaches the follower with its rows, relations and index included.
        await db.execute(f"UPDATE {schema}.item SET price = 55 WHERE id = 2")
        await db.execute(f"UPDATE {schema}.owner SET name = 'Ada L.' WHERE id = 1")
        await db.execute(f"UPDATE {schema}.note SET body = 'uno' WHERE id = 1")
        await db.execute(f"DELETE FROM {schema}.item WHERE id = 3")
        revision = (await AsyncClient(hub.target).sync()).number
        await eventually(
            lambda: follower.core.revisions.applied >= revision, what="the follower applied the hub's revision"
        )
        assert await cache.get(f"{schema}.pets", 10) == {"id": 10, "name": "Rex", "owner_id": 1, "owner": "Ada L."}
        assert await cache.get(shop["item"], 3) is None
        assert await cache.get(shop["note"], 1) == {"id": 1, "body": "uno"}  # the lazy key was dropped
        result = await cache.query(shop["item"], "by_price", lower=50, upper=70)
        assert [r["id"] for r in result.rows] == [5, 2, 6, 7]  # (55 sorts after 50)
    # Rows came with the stream: the follower's memory equals the hub's.
    for name in (shop["item"], f"{schema}.pets"):
        assert follower.core.tables[name].authoritative_rows() == hub.core.tables[name].authoritative_rows()


async def test_revisions_are_the_hubs_on_every_follower(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    a = await start_follower(hub.target)
    b = await start_follower(hub.target)
    assert a.core.revisions.epoch == b.core.revisions.epoch == hub.core.revisions.epoch
    async with AsyncClient(a.target) as on_a, AsyncClient(b.target) as on_b:
        await db.execute(f"UPDATE {schema}.item SET name = 'written' WHERE id = 1")
        written = await on_a.sync()  # the service that wrote asks its own pod's follower
        assert written.epoch == hub.core.revisions.epoch and written.number >= hub.core.revisions.applied - 1
        # ... and passes the revision on: another pod's follower honours it.
        row = await on_b.get(shop["item"], 1, min_revision=written)
        assert row is not None and row["name"] == "written"
        assert b.core.revisions.applied >= written.number


async def test_min_revision_waits_on_a_follower_behind(start_daemon, start_follower, db, shop):
    """The protection: B waits for A's revision rather than answering what it holds."""
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    a = await start_follower(hub.target)
    proxy = await link_to(hub)
    b = await start_follower(f"127.0.0.1:{proxy.port}", upstream_stall_timeout=30.0)
    try:
        proxy.stall()  # B hears nothing more (its stream is not cut: it cannot tell yet)
        async with AsyncClient(a.target) as on_a, AsyncClient(b.target) as on_b:
            await db.execute(f"UPDATE {schema}.item SET name = 'late' WHERE id = 1")
            written = await on_a.sync()
            read = asyncio.create_task(on_b.get(shop["item"], 1, min_revision=written, timeout=20))
            await eventually(lambda: b.core.revisions.waiting >= 1 or read.done(), what="B waiting")
            assert not read.done()  # B waits for the revision rather than answer what it holds
            proxy.resume()
            row = await read
            assert row is not None and row["name"] == "late"
    finally:
        await proxy.close()


async def test_strong_reads_and_sync_go_through_the_hub(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    async with AsyncClient(follower.target) as cache:
        for n in range(5):
            await db.execute(f"UPDATE {schema}.item SET name = $1 WHERE id = 1", f"v{n}")
            row = await cache.get(shop["item"], 1, consistency="strong")
            assert row is not None and row["name"] == f"v{n}"
    rounds = hub.core.trust.barrier.rounds
    await asyncio.gather(*(follower.engine.sync() for _ in range(20)))
    # Concurrent callers share the upstream's round trips (two: the first caller's, and one for
    # those who came while it was being sent).
    assert hub.core.trust.barrier.rounds - rounds <= 2


async def test_invalidate_on_a_follower_goes_to_the_hub(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    other = await start_follower(hub.target)
    async with AsyncClient(follower.target) as cache, AsyncClient(other.target) as on_other:
        assert await cache.get(shop["note"], 2) == {"id": 2, "body": "two"}
        assert await on_other.get(shop["note"], 2) == {"id": 2, "body": "two"}
        # A change no trigger reports (triggers off for the session), then invalidated on one follower.
        await db.execute("SET session_replication_role = replica")
        await db.execute(f"UPDATE {schema}.note SET body = 'deux' WHERE id = 2")
        await db.execute(f"UPDATE {schema}.item SET name = 'quiet' WHERE id = 4")
        await db.execute(f"DELETE FROM {schema}.item WHERE id = 5")
        await db.execute("SET session_replication_role = origin")
        await cache.invalidate(shop["note"], [2])
        assert await cache.get(shop["note"], 2) == {"id": 2, "body": "deux"}
        sent_again = other.core.tables[shop["item"]].reloads
        revision = await cache.invalidate(shop["item"], [4, 5], refresh=True)
        row = await on_other.get(shop["item"], 4, min_revision=revision)
        assert row is not None and row["name"] == "quiet"  # every follower heard of it
        assert await on_other.get(shop["item"], 5, min_revision=revision) is None
        await eventually(lambda: other.core.revisions.applied >= revision.number, what="other follower applied")
        # the keyed INVALIDATE brought the keys' rows: the table was not sent again
        assert other.core.tables[shop["item"]].reloads == sent_again
        assert await on_other.get(shop["note"], 2) == {"id": 2, "body": "deux"}


async def test_whole_table_changes_send_the_table_again(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"], bulk_threshold=5)
    follower = await start_follower(hub.target)
    async with AsyncClient(follower.target) as cache:
        await db.execute(f"UPDATE {schema}.item SET price = price + 1")  # above the bulk threshold
        revision = await AsyncClient(hub.target).sync()
        assert (await cache.get(shop["item"], 20, min_revision=revision))["price"] == 201
        await db.execute(f"TRUNCATE {schema}.item CASCADE")
        await db.execute(f"INSERT INTO {schema}.item VALUES (99, 'new', 1)")
        revision = await AsyncClient(hub.target).sync()
        assert await cache.get(shop["item"], 1, min_revision=revision) is None
        assert await cache.get(shop["item"], 99) == {"id": 99, "name": "new", "price": 1}
    assert follower.core.tables[shop["item"]].authoritative_rows() == hub.core.tables[shop["item"]].authoritative_rows()


async def test_narrowed_follower_and_unknown_table(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target, tables=(shop["item"],))
    assert list(follower.core.tables) == [shop["item"]]
    async with AsyncClient(follower.target) as cache:
        seen, reader = await watching(cache, follower, shop["item"])
        # The hub's revisions of other tables never reach this follower: its own have gaps.
        for n in range(3):
            await db.execute(f"UPDATE {schema}.owner SET name = $1 WHERE id = 2", f"other {n}")
            await db.execute(f"UPDATE {schema}.item SET name = $1 WHERE id = 12", f"narrow {n}")
        revision = await AsyncClient(hub.target).sync()
        assert (await cache.get(shop["item"], 12, min_revision=revision))["name"] == "narrow 2"
        mine = await eventually(
            lambda: len(batches := [b for b in seen if isinstance(b, ChangeBatch)]) >= 3 and batches,
            what="its watcher saw its batches",
        )
        numbers = [b.revision.number for b in mine]
        assert len(mine) == 3 and numbers == sorted(set(numbers))  # each once, in order (with gaps)
        assert mine[-1].changes[0].row["name"] == "narrow 2"
        reader.cancel()
    values = {
        "upstream_target": hub.target,
        "listen": ("127.0.0.1:0",),
        "tables": (cfg.parse_table_spec(f"{shop['schema']}.nope", "test"),),
    }
    code = await Daemon(cfg.Config(**values), handle_signals=False).run()
    assert code == 2  # a configuration error (the log names the table)


async def watching(cache: AsyncClient, sidecar: RunningDaemon, table: str) -> tuple[list[Any], asyncio.Task[None]]:
    seen: list[Any] = []
    before = sidecar.core.fanout.subscribers

    async def read() -> None:
        async for item in cache.watch([table]):
            seen.append(item)

    reader = asyncio.create_task(read())
    await eventually(lambda: sidecar.core.fanout.subscribers > before, what="subscribed")
    return seen, reader


async def test_history_too_short_to_resume_rebuilds_and_resets(start_daemon, start_follower, db, shop):
    """In the same epoch too: the follower's watchers must not skip what it missed."""
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"], watch_history_batches=2)
    proxy = await link_to(hub)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    try:
        async with AsyncClient(follower.target) as cache:
            seen, reader = await watching(cache, follower, shop["item"])
            proxy.block()
            await eventually(lambda: not follower.core.trust.up, what="the follower noticed")
            for n in range(5):  # more batches than the hub keeps
                await db.execute(f"UPDATE {schema}.item SET name = $1 WHERE id = 13", f"missed {n}")
            proxy.unblock()
            await eventually(lambda: follower.engine.ready, timeout=15, what="following again")
            assert follower.core.revisions.epoch == hub.core.revisions.epoch
            assert follower.daemon.source.rebuilds == 1
            await eventually(lambda: any(isinstance(i, Reset) for i in seen), what="its watcher was reset")
            reader.cancel()
            assert (await cache.get(shop["item"], 13))["name"] == "missed 4"
    finally:
        await proxy.close()


async def test_a_cut_link_resumes_without_reset(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    proxy = await link_to(hub)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    try:
        epoch = follower.core.revisions.epoch
        async with AsyncClient(follower.target) as cache:
            stream = cache.watch([shop["item"]])
            seen: list[Any] = []

            async def read() -> None:
                async for item in stream:
                    seen.append(item)

            reader = asyncio.create_task(read())
            await eventually(lambda: follower.core.fanout.subscribers >= 1, what="subscribed")
            proxy.block()
            await eventually(lambda: not follower.core.trust.up, what="the follower noticed")
            await db.execute(f"UPDATE {schema}.item SET name = 'while cut' WHERE id = 5")
            proxy.unblock()
            await eventually(lambda: follower.engine.ready, timeout=15, what="following again")
            revision = await AsyncClient(hub.target).sync()
            row = await cache.get(shop["item"], 5, min_revision=revision)
            assert row is not None and row["name"] == "while cut"
            await eventually(
                lambda: any(isinstance(i, ChangeBatch) and i.revision.number >= revision.number for i in seen),
                what="the watcher got the change",
            )
            reader.cancel()
        assert follower.core.revisions.epoch == epoch
        assert follower.daemon.source.resumes >= 1 and follower.daemon.source.rebuilds == 0
        assert not any(isinstance(i, Reset) for i in seen)
    finally:
        await proxy.close()


async def test_a_stalled_link_is_noticed_and_resumed(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    proxy = await link_to(hub)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    try:
        proxy.stall()  # no FIN, no reset: only the missing progress marks tell
        await eventually(lambda: not follower.core.trust.up, timeout=10, what="the stall noticed")
        proxy.resume()
        proxy.cut()  # (the stalled connection's bytes are stale: start a clean one)
        await eventually(lambda: follower.engine.ready, timeout=15, what="following again")
        await db.execute(f"UPDATE {schema}.item SET name = 'after stall' WHERE id = 6")
        revision = await AsyncClient(hub.target).sync()
        async with AsyncClient(follower.target) as cache:
            row = await cache.get(shop["item"], 6, min_revision=revision)
            assert row is not None and row["name"] == "after stall"
        assert follower.daemon.source.rebuilds == 0
    finally:
        await proxy.close()


async def test_another_epoch_rebuilds_and_resets_watchers(start_daemon, start_follower, postgres, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    async with AsyncClient(follower.target) as cache:
        stream = cache.watch([shop["item"]])
        seen: list[Any] = []

        async def read() -> None:
            async for item in stream:
                seen.append(item)

        reader = asyncio.create_task(read())
        await eventually(lambda: follower.core.fanout.subscribers >= 1, what="subscribed")
        # The hub's LISTEN connection (or stream) dies: it rebuilds in a new epoch, and so must the follower.
        assert await db.fetchval("SELECT pg_terminate_backend($1)", await hub.capture_pid(db))
        await eventually(
            lambda: (
                follower.core.revisions.epoch == hub.core.revisions.epoch and follower.engine.ready and hub.engine.ready
            ),
            timeout=20,
            what="the follower rebuilt in the hub's new epoch",
        )
        await eventually(lambda: any(isinstance(i, Reset) for i in seen), what="its watchers were reset")
        reader.cancel()
        assert follower.daemon.source.rebuilds >= 1
        await db.execute(f"UPDATE {schema}.item SET name = 'new epoch' WHERE id = 7")
        row = await cache.get(shop["item"], 7, consistency="strong")
        assert row is not None and row["name"] == "new epoch"


async def test_reads_pass_through_while_not_following(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    proxy = await link_to(hub)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    try:
        async with AsyncClient(follower.target, retries=0) as cache:
            # The hub ends every Watch stream (as when shutting down) but still answers reads.
            hub.core.fanout.shutdown()
            await eventually(lambda: not follower.engine.ready, what="the follower stopped following")
            await db.execute(f"UPDATE {schema}.item SET name = 'fresh' WHERE id = 8")
            before = hub.core.trust.barrier.rounds
            row = await cache.get(shop["item"], 8)
            assert row is not None and row["name"] == "fresh"  # from the hub, behind its barrier
            assert hub.core.trust.barrier.rounds > before
            result = await cache.query(shop["item"], "by_price", lower=80, upper=80)
            assert [r["id"] for r in result.rows] == [8]
            assert await cache.get(shop["note"], 2) == {"id": 2, "body": "two"}
            assert follower.core.tables[shop["item"]].stale_get((8,)) is not None  # (memory kept, unused)
            # Upstream unreachable too: UNAVAILABLE, unless stale reads are allowed.
            proxy.block()
            with pytest.raises(Exception) as failed:
                await cache.get(shop["item"], 9)
            assert "UNAVAILABLE" in repr(failed.value) or "navailable" in str(failed.value)
            assert (await cache.get(shop["item"], 9, allow_stale=True))["id"] == 9
            proxy.unblock()
            hub.core.fanout.closing = False  # streams accepted again: the follower resumes
            await eventually(lambda: follower.engine.ready, timeout=15, what="following again")
            assert follower.daemon.source.rebuilds == 0
            row = await cache.get(shop["item"], 8)
            assert row is not None and row["name"] == "fresh"
    finally:
        await proxy.close()


async def test_list_tables_shows_the_upstream(start_daemon, start_follower, shop):
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    async with grpc.aio.insecure_channel(follower.target) as channel:
        answer = await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest())
    assert answer.upstream.target == hub.target and answer.upstream.following
    assert answer.upstream.upstream_revision.epoch == hub.core.revisions.epoch
    assert answer.upstream.behind_revisions == 0
    async with grpc.aio.insecure_channel(hub.target) as channel:
        assert not (await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest())).HasField("upstream")


async def test_a_follower_of_a_follower(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    middle = await start_follower(hub.target)
    leaf = await start_follower(middle.target)
    assert leaf.core.revisions.epoch == hub.core.revisions.epoch
    async with AsyncClient(leaf.target) as cache:
        await db.execute(f"UPDATE {schema}.item SET name = 'chained' WHERE id = 10")
        row = await cache.get(shop["item"], 10, consistency="strong")
        assert row is not None and row["name"] == "chained"
        assert (await cache.query(shop["item"], "by_price", [100])).rows[0]["id"] == 10
        assert await cache.get(shop["note"], 2) == {"id": 2, "body": "two"}


async def test_after_a_resume_it_serves_only_once_caught_up(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    proxy = await link_to(hub)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    try:
        proxy.block()
        await eventually(lambda: not follower.core.trust.up, what="the follower noticed")
        for n in range(200):  # a backlog the resumed stream brings
            await db.execute(f"UPDATE {schema}.item SET price = $1 WHERE id = 14", n)
        head = (await AsyncClient(hub.target).sync()).number
        ready_at: list[int] = []
        engine = follower.engine
        revisions = follower.core.revisions
        engine.on_state_change(lambda: ready_at.append(revisions.applied) if engine.ready else None)
        proxy.unblock()
        await eventually(lambda: ready_at, timeout=15, what="ready again")
        assert ready_at[0] >= head  # not one moment of serving memory that lacks the backlog
        assert follower.daemon.source.rebuilds == 0
    finally:
        await proxy.close()


async def test_a_near_cache_works_through_a_follower(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    follower = await start_follower(hub.target)
    async with AsyncClient(follower.target, near_cache={shop["item"]: 100, shop["note"]: 100}) as cache:
        near = cache.near_cache
        await eventually(lambda: near.connected, what="near-cache stream up")
        assert (await cache.get(shop["item"], 15))["name"] == "item 15"
        assert (await cache.get(shop["item"], 15))["name"] == "item 15"
        assert (await cache.get(shop["note"], 1))["body"] == "one"
        assert near.stats.hits >= 1
        await db.execute(f"UPDATE {schema}.item SET name = 'near' WHERE id = 15")
        await db.execute(f"UPDATE {schema}.note SET body = 'near' WHERE id = 1")

        async def followed() -> bool:
            item = await cache.get(shop["item"], 15)
            note = await cache.get(shop["note"], 1)
            return item["name"] == "near" and note["body"] == "near"

        await eventually(followed, what="the near-cache followed the follower")


async def test_metrics_show_the_upstream(start_daemon, start_follower, shop):
    from tests.integration.test_metrics import scrape, value

    hub = await start_daemon(shop["tables"])
    proxy = await link_to(hub)
    target = f"127.0.0.1:{proxy.port}"
    follower = await start_follower(target, metrics_listen="127.0.0.1:0")
    try:
        address = follower.daemon.metrics_address
        samples = await asyncio.to_thread(scrape, address)
        assert value(samples, "cache_sidecar_upstream_info", target=target) == 1
        assert value(samples, "cache_sidecar_upstream_stream_up") == 1
        assert value(samples, "cache_sidecar_upstream_following") == 1
        assert value(samples, "cache_sidecar_upstream_behind_revisions") == 0
        assert value(samples, "cache_sidecar_upstream_behind_seconds") == 0
        assert value(samples, "cache_sidecar_revision") == hub.core.revisions.applied
        proxy.block()
        await eventually(lambda: not follower.core.trust.up, what="the follower noticed")
        samples = await eventually(lambda: asyncio.to_thread(scrape, address), what="a scrape")
        assert value(samples, "cache_sidecar_upstream_following") == 0

        async def behind() -> bool:
            return value(await asyncio.to_thread(scrape, address), "cache_sidecar_upstream_behind_seconds") > 0

        await eventually(behind, what="seconds behind counted")
        proxy.unblock()
        await eventually(lambda: follower.engine.ready, timeout=15, what="following again")
        samples = await asyncio.to_thread(scrape, address)
        assert value(samples, "cache_sidecar_upstream_resumes_total") == 1
        assert value(samples, "cache_sidecar_upstream_rebuilds_total") == 0
    finally:
        await proxy.close()


async def test_a_watch_resumes_on_another_follower_of_the_hub(start_daemon, start_follower, db, shop):
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"])
    a = await start_follower(hub.target)
    b = await start_follower(hub.target)
    async with AsyncClient(a.target) as on_a:
        seen, reader = await watching(on_a, a, shop["item"])
        for n in range(3):
            await db.execute(f"UPDATE {schema}.item SET name = $1 WHERE id = 16", f"moved {n}")
        batches = await eventually(
            lambda: len(got := [i for i in seen if isinstance(i, ChangeBatch)]) >= 3 and got, what="three batches"
        )
        reader.cancel()
    first = batches[0].revision
    await eventually(lambda: b.core.revisions.applied >= batches[-1].revision.number, what="B has them too")
    # The watcher's pod moved: it resumes on B from the revision A gave it, and misses nothing.
    request = pb.WatchRequest(
        tables=[shop["item"]], start_revision=pb.Revision(epoch=first.epoch, number=first.number - 1)
    )
    async with grpc.aio.insecure_channel(b.target) as channel:
        call = pb_grpc.CacheStub(channel).Watch(request)
        resumed = [await call.read() for _ in range(3)]
        call.cancel()
    assert [m.changes.revision.number for m in resumed] == [x.revision.number for x in batches]
    assert [m.changes.events[0].key.parts[0].int_value for m in resumed] == [16, 16, 16]


def _replace(target: Path, source: Path) -> None:
    """Rotate a file the way Kubernetes or cert-manager does: a new file renamed over it."""
    staged = target.with_suffix(".new")
    staged.write_bytes(source.read_bytes())
    os.replace(staged, target)


async def test_a_follower_reaches_a_hub_over_mutual_tls_with_a_token_and_follows_a_rotation(
    start_daemon, start_follower, db, shop, tmp_path, caplog
):
    """The hub requires TLS, a client certificate and a token; the follower brings all
    three from its upstream.* files. Then every certificate rotates to a new CA and the
    link breaks: the follower reconnects with the new files, without a restart."""
    schema = shop["schema"]
    first, second = Authority(tmp_path / "ca1", "first CA"), Authority(tmp_path / "ca2", "second CA")
    hub_cert, hub_key, client_ca = tmp_path / "hub.crt", tmp_path / "hub.key", tmp_path / "client-ca.pem"
    issued = first.issue("hub")
    for target, source in ((hub_cert, issued.cert), (hub_key, issued.key), (client_ca, first.cert_file)):
        _replace(target, source)
    token = "follower-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"# followers\n{token}\n")
    hub = await start_daemon(
        shop["tables"],
        tls_cert_file=str(hub_cert),
        tls_key_file=str(hub_key),
        tls_client_ca_file=str(client_ca),
        auth_token_file=str(tmp_path / "tokens"),
    )
    proxy = await link_to(hub)
    ca, cert, key, token_file = (tmp_path / n for n in ("ca.pem", "client.crt", "client.key", "token"))
    client = first.issue("follower", server=False)
    for target, source in ((ca, first.cert_file), (cert, client.cert), (key, client.key)):
        _replace(target, source)
    token_file.write_text(token + "\n")
    security = {
        "upstream_tls_ca_file": str(ca),
        "upstream_tls_cert_file": str(cert),
        "upstream_tls_key_file": str(key),
    }
    try:
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token-0123456789\n")
        refused = await start_follower(
            f"127.0.0.1:{proxy.port}", wait=False, upstream_token_file=str(wrong), **security
        )
        await eventually(
            lambda: "refused the token" in caplog.text, what="the cause of the refusal in the follower's log"
        )
        assert not refused.engine or not refused.engine.ready
        await refused.stop()

        follower = await start_follower(f"127.0.0.1:{proxy.port}", upstream_token_file=str(token_file), **security)
        async with AsyncClient(follower.target) as cache:
            assert (await cache.get(shop["item"], 3))["name"] == "item 3"
            await db.execute(f"UPDATE {schema}.item SET name = 'before the rotation' WHERE id = 3")
            assert (await cache.get(shop["item"], 3, consistency="strong"))["name"] == "before the rotation"

            renewed = second.issue("hub")
            for target, source in ((hub_cert, renewed.cert), (hub_key, renewed.key), (client_ca, second.cert_file)):
                _replace(target, source)
            client = second.issue("follower", server=False)
            for target, source in ((ca, second.cert_file), (cert, client.cert), (key, client.key)):
                _replace(target, source)
            proxy.cut()  # the open connection keeps its old certificates: a new one must use the new
            await eventually(lambda: not follower.core.trust.up, what="the follower noticed the cut")
            await db.execute(f"UPDATE {schema}.item SET name = 'after the rotation' WHERE id = 3")
            await eventually(lambda: follower.engine.ready, timeout=15, what="following again, on the new CA")
            assert (await cache.get(shop["item"], 3, consistency="strong"))["name"] == "after the rotation"
    finally:
        await proxy.close()


# (bulk_threshold is the triggers' whole-table switch; a logical stream sends every row)
@pytest.mark.captures("notify")
async def test_a_follower_stays_serving_while_its_hub_reloads_the_table_it_reads_again(
    start_daemon, start_follower, db, shop, monkeypatch
):
    """A whole-table change sends a follower to read the table again (a second Watch, with
    its initial state); while the hub is still reloading it, that stream is silent. The
    follower waits -- the hub answers -- instead of counting it as a stalled link (which made
    it NOT_SERVING, resume, and ask again, for as long as the hub reloaded)."""
    monkeypatch.setattr("sidecar.app.PgDatabase", gating.GatedPgDatabase)
    LOADS.open()
    schema = shop["schema"]
    hub = await start_daemon(shop["tables"], bulk_threshold=5)
    follower = await start_follower(hub.target)  # (a stall timeout of 1 s)
    flips: list[bool] = []
    follower.engine.on_state_change(lambda: flips.append(follower.engine.ready))
    item = hub.core.tables[shop["item"]]
    try:
        LOADS.close()
        await db.execute(f"UPDATE {schema}.item SET price = price + 1")  # a bulk statement: whole-table
        await LOADS.held()  # its reload read the table and waits
        await db.execute(f"UPDATE {schema}.item SET price = price + 1")  # another, due behind it
        await hub.core.trust.barrier.wait(applied=False)  # (received)
        reloads = item.reloads
        LOADS.open()  # the first lands: the follower hears of it and reads the table again ...
        LOADS.close()  # ... while the second is held
        await eventually(lambda: item.reloads > reloads, what="the first reload landed")
        await LOADS.held()
        await eventually(lambda: hub.core.fanout.subscribers == 2, what="the follower reading the table again")
        await asyncio.sleep(3.0)  # the hub's reload lasts three stall timeouts
        assert follower.engine.ready and not follower.engine.stalled
    finally:
        LOADS.open()
    revision = await AsyncClient(hub.target).sync()
    async with AsyncClient(follower.target) as cache:
        assert (await cache.get(shop["item"], 20, min_revision=revision))["price"] == 202
    assert flips == [], "the follower stopped serving while its hub reloaded"
    assert follower.daemon.source.resumes == 0 and follower.daemon.source.rebuilds == 0

"""Hubs of one database in logical capture number revisions alike (commit LSNs, one epoch
for the database's history): a follower switched between two hubs under write load
resumes on the other from its last revision -- no rebuild, no RESET to its watchers, no
stale read, no revision going back. A hub restarted keeps the epoch but its history
starts later than the follower's position: the follower rebuilds, once."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, Reset

from sidecar import config as cfg
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

ROWS = 50
SWITCHES = 20

StartFollower = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_follower() -> AsyncIterator[StartFollower]:
    running: list[RunningDaemon] = []

    async def start(upstream: str) -> RunningDaemon:
        config = cfg.Config(
            upstream_target=upstream,
            listen=("127.0.0.1:0",),
            reconnect_min_delay=0.05,
            reconnect_max_delay=0.3,
            upstream_progress_interval=0.2,
            upstream_stall_timeout=2.0,
            grace_period=1.0,
        )
        return await start_in_process(config, running, True, "follower")

    yield start
    await stop_all(running)


@pytest.fixture
async def accounts(logical_dsn: str, lschema: str) -> AsyncIterator[str]:
    """``<schema>.acct``: rows 1..ROWS the writer changes; row 0 the test's own counter."""
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(
        f"CREATE TABLE {lschema}.acct (id int PRIMARY KEY, v bigint NOT NULL);"
        f"INSERT INTO {lschema}.acct SELECT g, 0 FROM generate_series(0, {ROWS}) g"
    )
    await conn.close()
    yield f"{lschema}.acct"


class Writer:
    """Write load: one UPDATE per transaction, back to back, until stopped."""

    def __init__(self, dsn: str, table: str) -> None:
        self.dsn, self.table = dsn, table
        self.commits = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Writer:
        self._task = asyncio.create_task(self._run(), name="writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while True:
                key = 1 + self.commits % ROWS
                await conn.execute(f"UPDATE {self.table} SET v = v + 1 WHERE id = $1", key)
                self.commits += 1
                await asyncio.sleep(0.005)  # (a steady rate the small machine can decode, not a condition)
        finally:
            await conn.close()


def watch_on(cache: AsyncClient, table: str) -> tuple[list[Any], asyncio.Task[None]]:
    seen: list[Any] = []

    async def read() -> None:
        async for item in cache.watch([table]):
            seen.append(item)

    return seen, asyncio.create_task(read(), name="watcher")


async def port_of(hub: RunningDaemon) -> int:
    return int(hub.target.rsplit(":", 1)[1])


async def test_a_follower_switched_between_two_hubs_resumes_without_a_rebuild(
    start_logical, start_follower, logical_dsn, accounts
):
    a = await start_logical([accounts])
    b = await start_logical([accounts])  # (its own slot; the publication is installed once)
    assert a.core.revisions.epoch == b.core.revisions.epoch
    assert a.daemon.source.slot.name != b.daemon.source.slot.name
    proxy = Proxy(host="127.0.0.1", port=await port_of(a))
    await proxy.start()
    db = await asyncpg.connect(logical_dsn)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    source = follower.daemon.source
    epoch = follower.core.revisions.epoch
    assert epoch == a.core.revisions.epoch
    took: list[float] = []
    stale: list[str] = []
    applied_seen: list[int] = []
    try:
        async with (
            AsyncClient(follower.target) as cache,
            AsyncClient(a.target) as on_a,
            AsyncClient(b.target) as on_b,
            Writer(logical_dsn, accounts) as writer,
        ):
            seen, watcher = watch_on(cache, accounts)
            await eventually(lambda: follower.core.fanout.subscribers >= 1, what="the watcher subscribed")
            # B's history starts where it connected (later than A's): the follower's position
            # must be in it before a switch can resume there, as with hubs that run for long.
            await eventually(
                lambda: follower.core.revisions.applied >= b.core.fanout.oldest,
                timeout=30,
                what="the follower past B's first revision",
            )
            hubs = [a, b]
            for switch in range(1, SWITCHES + 1):
                to = hubs[switch % 2]
                other = on_a if to is b else on_b  # (revisions of the hub not followed mean the same)
                resumes, rebuilds = source.resumes, source.rebuilds
                applied_seen.append(follower.core.revisions.applied)
                began = time.monotonic()
                proxy.retarget("127.0.0.1", await port_of(to))
                await eventually(
                    lambda r=resumes, rb=rebuilds: (source.resumes > r or source.rebuilds > rb) and source.following,  # type: ignore[misc]
                    timeout=30,
                    what=f"following again after switch {switch}",
                )
                took.append(time.monotonic() - began)
                applied_seen.append(follower.core.revisions.applied)
                # Reads that must not be stale, compared with the database.
                await db.execute(f"UPDATE {accounts} SET v = $1 WHERE id = 0", switch * 2)
                revision = await other.sync()
                row = await cache.get(accounts, 0, min_revision=revision, timeout=30)
                if row is None or row["v"] != switch * 2:
                    stale.append(f"min_revision {revision} after switch {switch}: {row}")
                await db.execute(f"UPDATE {accounts} SET v = $1 WHERE id = 0", switch * 2 + 1)
                row = await cache.get(accounts, 0, consistency="strong", timeout=30)
                if row is None or row["v"] != switch * 2 + 1:
                    stale.append(f"STRONG after switch {switch}: {row}")
                before = writer.commits
                await eventually(lambda n=before: writer.commits > n + 5, what="writes between switches")  # type: ignore[misc]
            # Everything the database holds, the follower holds (after a barrier through its hub).
            await writer.stop()
            await cache.sync()
            expected = {r["id"]: r["v"] for r in await db.fetch(f"SELECT id, v FROM {accounts}")}
            got = await cache.batch_get(accounts, list(expected))
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        writes = writer.commits
    finally:
        await proxy.close()
        await db.close()
    print(
        f"\nfailover: {SWITCHES} switches, {writes} writes, following again after "  # (the README's figures)
        f"median {statistics.median(took):.3f} s, max {max(took):.3f} s"
    )
    assert source.rebuilds == 0, f"{source.rebuilds} rebuilds"
    assert source.resumes >= SWITCHES
    assert source.reconciled == 0, "a table was read again: the hubs listed different definitions of it"
    assert follower.core.revisions.epoch == epoch
    assert not [i for i in seen if isinstance(i, Reset)], "the follower's watcher was reset"
    numbers = [i.revision.number for i in seen if isinstance(i, ChangeBatch)]
    assert len(numbers) > SWITCHES and numbers == sorted(set(numbers)), "the watcher's revisions went back or repeated"
    assert applied_seen == sorted(applied_seen), "the follower's revision went back"
    assert stale == []
    assert [row["v"] if row else None for row in got] == list(expected.values())


async def test_a_hub_restarted_with_a_later_history_makes_the_follower_rebuild_once(
    start_logical, start_follower, logical_dsn, accounts
):
    a = await start_logical([accounts])
    proxy = Proxy(host="127.0.0.1", port=await port_of(a))
    await proxy.start()
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    source = follower.daemon.source
    try:
        async with AsyncClient(follower.target) as cache, Writer(logical_dsn, accounts) as writer:
            seen, watcher = watch_on(cache, accounts)
            await eventually(lambda: follower.core.fanout.subscribers >= 1, what="the watcher subscribed")
            await eventually(lambda: writer.commits > 20, what="writes")
            position = follower.core.revisions.applied
            await a.stop()  # (its history goes with it)
            restarted = await start_logical([accounts])
            assert restarted.core.fanout.oldest > position  # its history starts after the follower's position
            proxy.retarget("127.0.0.1", await port_of(restarted))
            await eventually(lambda: source.rebuilds >= 1 and source.following, timeout=30, what="rebuilt")
            await eventually(lambda: any(isinstance(i, Reset) for i in seen), what="the watcher was reset")
            before = writer.commits
            await eventually(lambda: writer.commits > before + 20, what="more writes")
            await cache.sync()  # (still following: nothing more to rebuild)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await proxy.close()
    assert source.rebuilds == 1
    assert len([i for i in seen if isinstance(i, Reset)]) == 1
    assert follower.core.revisions.epoch == restarted.core.revisions.epoch


def socket_of(dsn: str) -> str:
    """The Unix socket of a ``LocalCluster``'s DSN (``...?host=<dir>&port=<port>``)."""
    query = dict(part.split("=", 1) for part in dsn.split("?", 1)[1].split("&"))
    return f"{query['host']}/.s.PGSQL.{query['port']}"


async def test_a_hub_behind_the_follower_makes_its_resume_wait_not_rebuild(
    start_logical, start_follower, logical_dsn, accounts
):
    """Hub B's link to PostgreSQL stalls while A goes on: the follower, switched from A to B,
    is ahead of B. B holds the resume until it has applied the follower's revision (never
    streaming anything older, never OUT_OF_RANGE); the follower does not rebuild."""
    a = await start_logical([accounts])
    database_link = Proxy(unix_path=socket_of(logical_dsn))
    await database_link.start()
    # (its liveness checks far off: the stall must not end its stream, which would be a rebuild)
    b = await start_logical(
        [accounts], dsn=f"postgresql://postgres@127.0.0.1:{database_link.port}/postgres", ping_interval=30.0
    )
    proxy = Proxy(host="127.0.0.1", port=await port_of(a))
    await proxy.start()
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    source = follower.daemon.source
    try:
        async with AsyncClient(follower.target) as cache, Writer(logical_dsn, accounts):
            seen, watcher = watch_on(cache, accounts)
            await eventually(lambda: follower.core.fanout.subscribers >= 1, what="the watcher subscribed")
            await eventually(
                lambda: follower.core.revisions.applied >= b.core.fanout.oldest,
                timeout=30,
                what="the follower past B's first revision",
            )
            database_link.stall()
            stalled_at = b.core.fanout.published
            await eventually(
                lambda: follower.core.revisions.applied > b.core.fanout.published,
                timeout=30,
                what="the follower ahead of B",
            )
            position = follower.core.revisions.applied
            proxy.retarget("127.0.0.1", await port_of(b))
            await eventually(lambda: b.core.revisions.waiting >= 1, timeout=15, what="B holding the resume")
            assert b.core.fanout.published == stalled_at < position  # (B is still behind)
            assert source.rebuilds == 0 and not source.following
            database_link.resume()
            await eventually(lambda: source.following, timeout=30, what="following B")
            assert source.rebuilds == 0 and source.resumes >= 1
            assert follower.core.revisions.applied >= position
            await cache.sync()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await proxy.close()
        await database_link.close()
    assert not [i for i in seen if isinstance(i, Reset)], "the follower's watcher was reset"
    numbers = [i.revision.number for i in seen if isinstance(i, ChangeBatch)]
    assert numbers == sorted(set(numbers)), "the watcher's revisions went back or repeated"


# ---------------------------------------------------------------- batches only one hub made


@pytest.fixture
async def others(logical_dsn: str, lschema: str) -> AsyncIterator[str]:
    """``<schema>.other``: a second table, whose commits move the follower on."""
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {lschema}.other (id int PRIMARY KEY, v bigint NOT NULL)")
    await conn.close()
    yield f"{lschema}.other"


async def past_a_batch_only_b_made(
    db: asyncpg.Connection, b: RunningDaemon, follower: RunningDaemon, others: str, ddl: str
) -> int:
    """Run ``ddl`` and a Sync on B only (the catalog checks are hours apart: B's barrier is
    what finds it and makes a batch of its own; A knows nothing of it), then commit to the
    other table until the follower, on A, is past B's batch. Returns B's batch number."""
    await db.execute(ddl)
    async with AsyncClient(b.target) as on_b:
        await on_b.sync()  # (B's barrier round checks the catalog and acts)
    made = b.core.revisions.seq
    n = 0
    while follower.core.revisions.applied <= made:
        n += 1
        before = follower.core.revisions.applied
        await db.execute(f"INSERT INTO {others} VALUES ($1, 0) ON CONFLICT (id) DO UPDATE SET v = {others}.v + 1", n)
        await eventually(
            lambda before=before: follower.core.revisions.applied > before,  # type: ignore[misc]
            timeout=30,
            what="the commit applied on the follower",
        )
    return made


async def test_a_follower_resumed_on_a_hub_that_reloaded_a_table_its_old_hub_did_not_reads_it_again(
    start_logical, start_follower, logical_dsn, accounts, others
):
    """A column added to ``acct``: hub B's catalog check (a Sync on B) reloads it at a number of
    B's own; A has not checked. The follower, on A, applies commits of another table past that
    number, then is switched to B and resumes after it: the stream never brings B's reload.
    Resuming, it reads ``acct`` again (B lists another definition of it): it serves the rows
    with the new column, as the database has them, without a rebuild and without a RESET."""
    slow = {"catalog_check_interval": 3600.0}
    a = await start_logical([accounts, others], **slow)
    b = await start_logical([accounts, others], **slow)
    proxy = Proxy(host="127.0.0.1", port=await port_of(a))
    await proxy.start()
    db = await asyncpg.connect(logical_dsn)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    source = follower.daemon.source
    try:
        async with AsyncClient(follower.target) as cache, AsyncClient(a.target) as on_a:
            seen, watcher = watch_on(cache, accounts)
            await eventually(lambda: follower.core.fanout.subscribers >= 1, what="the watcher subscribed")
            await db.execute(f"INSERT INTO {others} VALUES (0, 0)")
            await eventually(
                lambda: follower.core.revisions.applied >= b.core.fanout.oldest,
                timeout=30,
                what="the follower past B's first revision",
            )
            made = await past_a_batch_only_b_made(
                db, b, follower, others, f"ALTER TABLE {accounts} ADD COLUMN extra int NOT NULL DEFAULT 7"
            )
            assert "extra" not in (await on_a.get(accounts, 1) or {})  # (A has not noticed)
            assert "extra" not in (await cache.get(accounts, 1) or {})
            resumes = source.resumes
            position = follower.core.revisions.applied
            assert position > made
            proxy.retarget("127.0.0.1", await port_of(b))
            await eventually(
                lambda: source.resumes > resumes and source.following, timeout=30, what="following B again"
            )
            expected = {r["id"]: dict(r) for r in await db.fetch(f"SELECT id, v, extra FROM {accounts}")}
            await eventually(lambda: follower.core.engine.ready, what="memory trusted again")
            got = await cache.batch_get(accounts, list(expected))  # (EVENTUAL: from memory)
            assert got == list(expected.values())
            # Its watchers hear of it with B's next revision: the table changed as a whole.
            await db.execute(f"UPDATE {others} SET v = v + 1 WHERE id = 0")
            await eventually(
                lambda: any(
                    isinstance(i, ChangeBatch)
                    and i.revision.number > position
                    and any(c.operation == "table_changed" for c in i.changes)
                    for i in seen
                ),
                timeout=30,
                what="the watcher told of the table read again",
            )
            # Back to A, which has still not checked its catalog: its listing says the old
            # definition. The follower's Sync on A makes A act on the DDL before the listing
            # counts, so nothing is read again from A's rows without the column (A's own
            # reload comes by the stream), and memory holds the column throughout.
            resumes = source.resumes
            proxy.retarget("127.0.0.1", await port_of(a))
            await eventually(
                lambda: source.resumes > resumes and source.following, timeout=30, what="following A again"
            )
            await eventually(lambda: follower.core.engine.ready, what="memory trusted again")
            assert await cache.batch_get(accounts, list(expected)) == list(expected.values())
            assert "extra" in (await on_a.get(accounts, 1) or {})
            assert source.reconciled == 1
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await proxy.close()
        await db.close()
    assert source.rebuilds == 0 and source.reconciled == 1
    assert not [i for i in seen if isinstance(i, Reset)], "the follower's watcher was reset"


async def test_a_follower_resumed_on_a_hub_that_stopped_serving_a_table_stops_serving_it_too(
    start_logical, start_follower, logical_dsn, accounts, others
):
    """``acct`` dropped: hub B's catalog check stops serving it, at a number of its own; A has
    not checked (a DROP sends nothing down the stream). The follower, switched to B past that
    number, must not go on serving ``acct``'s rows from memory, with no end."""
    slow = {"catalog_check_interval": 3600.0}
    a = await start_logical([accounts, others], **slow)
    b = await start_logical([accounts, others], **slow)
    proxy = Proxy(host="127.0.0.1", port=await port_of(a))
    await proxy.start()
    db = await asyncpg.connect(logical_dsn)
    follower = await start_follower(f"127.0.0.1:{proxy.port}")
    source = follower.daemon.source
    try:
        async with AsyncClient(follower.target) as cache:
            await db.execute(f"INSERT INTO {others} VALUES (0, 0)")
            await eventually(
                lambda: follower.core.revisions.applied >= b.core.fanout.oldest,
                timeout=30,
                what="the follower past B's first revision",
            )
            assert await cache.get(accounts, 1) is not None
            await past_a_batch_only_b_made(db, b, follower, others, f"DROP TABLE {accounts}")
            assert b.core.tables[accounts].problem is not None and a.core.tables[accounts].problem is None
            assert follower.core.tables[accounts].problem is None  # (A's stream said nothing)
            resumes = source.resumes
            proxy.retarget("127.0.0.1", await port_of(b))
            await eventually(
                lambda: source.resumes > resumes and source.following, timeout=30, what="following B again"
            )
            problem = follower.core.tables[accounts].problem
            assert problem is not None and "does not exist" in problem
            listed = {t.name: t for t in await cache.list_tables()}
            assert listed[accounts].problem and listed[others].problem == ""
            await db.execute(f"UPDATE {others} SET v = 5 WHERE id = 0")
            assert (await cache.get(others, 0, consistency="strong"))["v"] == 5  # (the other table: served)
    finally:
        await proxy.close()
        await db.close()
    assert source.rebuilds == 0 and source.reconciled == 1

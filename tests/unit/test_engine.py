"""The core against the in-memory database: batching, revisions, the read
path while the listener is down, the barrier, invalidation, bad input."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.assembly import Direct, Options, direct
from sidecar.core.barrier import Barrier
from sidecar.core.engine import Revision
from sidecar.core.events import Op, RowChange, SyncToken, TableChange
from sidecar.core.full import FullTable
from sidecar.core.wire import entry
from sidecar.errors import InvalidKey, InvalidRequest, QueryFailed, Unavailable, UnknownTable
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

FULL = "public.items"
LAZY = "public.lazy"


def row(value: str) -> bytes:
    return entry(('{"name":"' + value + '"}').encode())


def change(table: str, xid: int, *ids: int, op: Op = Op.UPDATE) -> RowChange:
    schema, _, name = table.partition(".")
    return RowChange(schema, name, op, xid, tuple((i,) for i in ids))


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(int_key_schema(FULL), int_key_schema(LAZY, mode="lazy", max_rows=10))
    for i in range(1, 4):
        db.put(FULL, (i,), name=f"v{i}")
        db.put(LAZY, (i,), name=f"v{i}")
    return db


@pytest.fixture
async def core(db: MemoryDatabase):
    source = MemoryChangeSource(db)
    core = direct(source.database, list(db.schemas.values()), Options(max_batch_keys=5))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))  # connects: the tables load
    await eventually(lambda: core.engine.ready)
    yield core
    following.cancel()
    await core.close()


async def test_ready_after_connect_and_load(core: Direct):
    assert core.engine.ready
    assert core.engine.revision.number == core.revisions.seq


async def test_events_of_one_transaction_form_one_batch(core: Direct, db: MemoryDatabase):
    start = core.revisions.seq
    db.put(FULL, (1,), name="x")
    db.put(FULL, (2,), name="y")
    core.notices.handle(change(FULL, 500, 1))
    core.notices.handle(change(FULL, 500, 2))  # same transaction, same burst
    core.notices.handle(change(FULL, 501, 3))  # next transaction
    assert core.revisions.seq == start + 2
    assert core.revisions.applied < core.revisions.seq
    assert await core.engine.get_many(FULL, [[1], [2]]) == [row("x"), row("y")]
    await eventually(lambda: core.revisions.applied == core.revisions.seq)


async def test_revision_never_goes_backwards_and_epoch_changes_on_reconnect(core: Direct):
    before = core.engine.revision
    core.notices.handle(change(FULL, 9, 1))
    await eventually(lambda: core.revisions.applied == core.revisions.seq)
    assert core.engine.revision.number > before.number and core.engine.revision.epoch == before.epoch
    core.notices.source_lost("test")
    core.notices.source_connected()
    await eventually(lambda: core.engine.ready)
    assert core.engine.revision.epoch != before.epoch


async def test_unknown_tables_events_are_ignored(core: Direct):
    seq = core.revisions.seq
    core.notices.handle(change("public.other", 1, 1))
    assert core.notices.stats.ignored == 1 and core.revisions.seq == seq


async def test_unreadable_key_in_notification_reloads_the_table(core: Direct, db: MemoryDatabase):
    loads = len(db.loads)
    core.notices.handle(RowChange("public", "items", Op.UPDATE, 7, (("not-a-number",),)))
    assert core.notices.stats.bad_keys == 1
    await eventually(lambda: len(db.loads) == loads + 1 and core.revisions.applied == core.revisions.seq)


async def test_truncate_reloads_full_and_clears_lazy(core: Direct, db: MemoryDatabase):
    assert await core.engine.get(LAZY, [1]) == row("v1")
    db.data[FULL].clear()
    db.data[LAZY].clear()
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 8, "truncate"))
    core.notices.handle(TableChange("public", "lazy", Op.TRUNCATE, 8, "truncate"))
    assert await core.engine.get(FULL, [1]) is None
    assert await core.engine.get(LAZY, [1]) is None


async def test_reads_go_to_the_database_while_the_listener_is_down(core: Direct, db: MemoryDatabase):
    core.notices.source_lost("test")
    assert not core.engine.ready
    db.put(FULL, (1,), name="changed while deaf")
    assert await core.engine.get(FULL, [1]) == row("changed while deaf")  # not the stale memory
    assert core.tables[FULL].rows[(1,)] == row("v1")  # and not cached
    assert core.reads.stats.passthrough_reads == 1


async def test_database_unreachable_too_is_unavailable_unless_stale_allowed(core: Direct, db: MemoryDatabase):
    core.notices.source_lost("test")
    db.error = Unavailable("connection refused")
    with pytest.raises(Unavailable):
        await core.engine.get(FULL, [1])
    assert await core.engine.get(FULL, [1], allow_stale=True) == row("v1")
    assert await core.engine.get_many(FULL, [[1], [9]], allow_stale=True) == [row("v1"), None]


async def test_table_names_and_bad_keys(core: Direct):
    assert await core.engine.get("items", [1]) == row("v1")  # schema defaults to public
    with pytest.raises(UnknownTable, match="not cached here"):
        await core.engine.get("public.nope", [1])
    with pytest.raises(InvalidRequest):
        await core.engine.get("a.b.c", [1])
    with pytest.raises(InvalidKey, match="id"):
        await core.engine.get(FULL, ["abc"])
    with pytest.raises(InvalidKey, match=r"2 part\(s\) but the primary key is \(id\)"):
        await core.engine.get(FULL, [1, 2])
    with pytest.raises(InvalidRequest, match="max_batch_keys"):
        await core.engine.get_many(FULL, [[i] for i in range(6)])


async def test_invalidate(core: Direct, db: MemoryDatabase):
    await core.engine.get(LAZY, [1])
    db.put(LAZY, (1,), name="manual")
    await core.engine.invalidate(LAZY, [[1]], refresh=True)
    assert core.tables[LAZY].cache[(1,)] == row("manual")
    db.put(FULL, (2,), name="manual")
    await core.engine.invalidate(FULL, None, refresh=False)
    assert await core.engine.get(FULL, [2]) == row("manual")


async def test_sync_waits_for_refetches_and_shares_rounds(core: Direct, db: MemoryDatabase):
    barrier = core.trust.barrier
    assert barrier is not None
    await eventually(lambda: barrier._current is None, what="the round after the load (its fence) done")
    rounds = barrier.rounds
    db.hold()
    core.notices.handle(change(FULL, 20, 1))
    syncs = [asyncio.create_task(core.engine.sync()) for _ in range(20)]
    await db.held(1)
    await eventually(lambda: barrier.landing == 1, what="the token back")
    assert not any(s.done() for s in syncs)  # the token is back, but the refetch before it is not applied yet
    db.release()
    revisions = await asyncio.wait_for(asyncio.gather(*syncs), 5)
    assert {r for r in revisions} == {core.engine.revision}
    assert barrier.rounds == rounds + 1


async def test_sync_fails_fast_while_listener_down(core: Direct):
    core.notices.source_lost("test")
    with pytest.raises(Unavailable, match="listener"):
        await core.engine.sync()


async def test_min_revision_waits_within_epoch_and_passes_old_epochs(core: Direct):
    target = core.engine.revision.number + 1
    waiter = asyncio.create_task(core.engine.wait_revision(core.revisions.epoch, target))
    await eventually(lambda: core.revisions.waiting == 1, what="the reader waiting")
    assert not waiter.done()
    core.notices.handle(change(FULL, 30, 1))
    await asyncio.wait_for(waiter, 5)
    old = core.revisions.epoch
    core.notices.source_lost("test")
    core.notices.source_connected()
    await core.engine.wait_revision(old, 10**9)  # rebuilt since: newer than anything of that epoch
    await core.engine.prepare_read(strong=False, min_revision=Revision("someone-else", 5))  # proves via barrier


# ------------------------------------------------------------------ found in review


async def test_read_through_never_joins_a_query_sent_before_it_began(db: MemoryDatabase):
    """While a full table first loads, reads go to the database; a read that
    starts after a notification must not share a query sent before it."""
    core = direct(db, list(db.schemas.values()))
    db.hold()
    core.notices.source_connected()
    await db.held(1)  # the initial load is in flight: reads pass through
    first = asyncio.create_task(core.engine.get(FULL, [1]))
    await db.held(2)  # its query read "v1"
    db.put(FULL, (1,), name="new")
    core.notices.handle(change(FULL, 77, 1))
    second = asyncio.create_task(core.engine.get(FULL, [1]))
    await db.held(3)  # a query of its own
    db.release()
    assert await asyncio.wait_for(first, 5) == row("v1")
    assert await asyncio.wait_for(second, 5) == row("new")
    await core.close()


async def test_sync_recovers_after_a_notify_that_hung(core: Direct):
    stuck = asyncio.Event()
    sends = 0

    async def send(token: str) -> None:
        nonlocal sends
        sends += 1
        if sends == 1:
            await stuck.wait()  # the first NOTIFY hangs (a stalled pool connection)
        asyncio.get_running_loop().call_soon(core.notices.handle, SyncToken(token))

    core.trust.barrier = Barrier(send, timeout=30)
    first = asyncio.create_task(core.engine.sync())
    await eventually(lambda: sends == 1, what="the first NOTIFY hanging")
    core.notices.source_lost("stalled")
    with pytest.raises(Unavailable):
        await asyncio.wait_for(first, 5)
    core.notices.source_connected()
    await eventually(lambda: core.engine.ready)
    # Not queued behind the hung round (which would only give up after 30 s).
    assert await asyncio.wait_for(core.engine.sync(), 2) == core.engine.revision
    stuck.set()


async def test_unexpected_query_errors_never_wedge_keys(core: Direct, db: MemoryDatabase):
    real_fetch = db.fetch

    async def broken(schema, keys):
        raise RuntimeError("a driver bug")

    db.fetch = broken  # type: ignore[method-assign]
    db.put(FULL, (1,), name="changed")
    core.notices.handle(change(FULL, 5, 1))
    # A keyed refetch that would fail again becomes a reload of the table (which works;
    # reads meanwhile go to the database, whose every fetch fails here).
    full = core.tables[FULL]
    assert isinstance(full, FullTable)
    await eventually(lambda: full.degraded == 1 and not full.reloading, what="the reload instead")
    assert await asyncio.wait_for(core.engine.get(FULL, [1]), 5) == row("changed")
    with pytest.raises(Unavailable, match="RuntimeError"):
        await asyncio.wait_for(core.engine.get(LAZY, [1]), 5)
    db.fetch = real_fetch  # type: ignore[method-assign]
    db.put(FULL, (1,), name="healed")
    core.notices.handle(change(FULL, 6, 1))
    assert await asyncio.wait_for(core.engine.get(FULL, [1]), 5) == row("healed")
    assert await asyncio.wait_for(core.engine.get(LAZY, [1]), 5) == row("v1")
    await eventually(lambda: core.revisions.applied == core.revisions.seq)


async def test_a_refetch_that_would_fail_again_is_not_retried_forever(core: Direct, db: MemoryDatabase):
    """A key that PostgreSQL refuses (say, from a hostile NOTIFY) must not stop the revision."""
    real_fetch = db.fetch
    calls = 0

    async def refuses(schema, keys):
        nonlocal calls
        calls += 1
        raise QueryFailed("NumericValueOutOfRangeError: value overflows numeric format")

    db.fetch = refuses  # type: ignore[method-assign]
    core.notices.handle(change(FULL, 5, 1))
    await eventually(lambda: core.revisions.applied == core.revisions.seq, 5, what="the revision advanced")
    assert calls == 1 and core.tables[FULL].loaded and core.engine.ready
    db.fetch = real_fetch  # type: ignore[method-assign]


async def test_a_table_that_cannot_load_stops_holding_the_others(core: Direct, db: MemoryDatabase):
    db.error = QueryFailed('UndefinedTableError: relation "public.items" does not exist')
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 7, "truncate"))
    table = core.tables[FULL]
    await eventually(lambda: table.problem is not None, 5, what="the table marked as not served")
    assert "UndefinedTableError" in str(table.problem) and not table.loaded
    db.error = None
    core.notices.handle(change(LAZY, 8, 1))  # the other tables' revision goes on
    await eventually(lambda: core.revisions.applied == core.revisions.seq, 5)
    assert core.engine.ready and not core.engine.stalled  # (health: the rest is served)
    db.put(FULL, (2,), name="from the database")
    assert await core.engine.get(FULL, [2]) == row("from the database")  # read through, not from memory
    core.notices.handle(change(FULL, 9, 2))  # ignored while not served: nothing waits for it
    await eventually(lambda: core.revisions.applied == core.revisions.seq, 5)
    table.rebuild(core.revisions.seq)  # (the catalog check does this when the table is back)
    await eventually(lambda: table.loaded and table.problem is None, 5)


async def test_a_revision_that_stands_still_is_reported(core: Direct, db: MemoryDatabase):
    core.revisions.stall_after = 0.05
    db.error = Unavailable("database away")  # refetches fail and are retried: the revision waits
    core.notices.handle(change(FULL, 5, 1))
    await eventually(lambda: core.engine.stalled, 5, what="stalled")
    assert core.engine.ready and core.engine.stalled_seconds > 0.05
    db.error = None
    await eventually(
        lambda: core.revisions.applied == core.revisions.seq and not core.engine.stalled,
        10,
        what="recovered",
    )
    assert core.engine.stalled_seconds == 0


async def test_applied_never_claims_a_whole_table_change_still_loading(core: Direct, db: MemoryDatabase):
    db.hold()
    first = core.revisions.seq + 1
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 10, "truncate"))
    await db.held(1)  # reload for the first change in flight
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 11, "truncate"))
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 12, "truncate"))
    await eventually(lambda: not core.revisions.batch_open, what="the batch closed")  # (progress computed)
    assert core.revisions.applied < first
    db.release()
    await eventually(lambda: core.revisions.applied == core.revisions.seq)


async def test_readers_waiting_on_memory_go_to_the_database_when_the_listener_drops(core: Direct, db: MemoryDatabase):
    db.hold()
    db.put(FULL, (1,), name="committed")
    core.notices.handle(change(FULL, 40, 1))
    reader = asyncio.create_task(core.engine.get(FULL, [1]))
    await db.held(1)  # its refetch hangs
    core.notices.source_lost("test")
    await db.held(2)  # the reader now asks the database itself
    db.release()
    assert await asyncio.wait_for(reader, 5) == row("committed")
    waiter = asyncio.create_task(core.engine.wait_revision(core.revisions.epoch, core.revisions.applied + 100))
    await asyncio.wait_for(waiter, 5)  # nothing to wait for while reads go to the database


async def test_a_revision_of_an_unknown_epoch_is_proven_with_a_barrier(core: Direct):
    barrier = core.trust.barrier
    assert barrier is not None
    rounds = barrier.rounds
    await asyncio.wait_for(core.engine.prepare_read(False, Revision("another-process", 10**9)), 5)
    assert barrier.rounds == rounds + 1  # not waited for (it would never come), and not trusted blindly
    await asyncio.wait_for(core.engine.prepare_read(False, Revision(core.revisions.epoch, core.revisions.applied)), 5)
    assert barrier.rounds == rounds + 1  # our own, reached: nothing to prove


async def test_an_initial_state_waits_for_the_reload_writing_not_for_every_one_due(core: Direct, db: MemoryDatabase):
    """Under a steady stream of whole-table changes a reload is always due; an initial state
    (a follower's re-read of the table) is taken the moment one lands, not never."""
    table = core.tables[FULL]
    db.hold()
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 900, "truncate"))
    await db.held(1)  # a reload writing
    initial = asyncio.create_task(core.engine.snapshot(frozenset({FULL})))
    for xid in range(901, 905):
        core.notices.handle(TableChange("public", "items", Op.TRUNCATE, xid, "truncate"))  # the next one is due
        reloads = table.reloads
        db.release()  # the reload in flight lands ...
        db.hold()
        await eventually(lambda: table.reloads > reloads, what="a reload landed")  # noqa: B023
        await db.held(1)  # ... and the one due is writing
        if initial.done():
            break
    db.release()
    assert initial.done(), "the initial state waited through every reload"
    await initial


async def test_an_initial_state_waits_after_a_reload_that_stopped_half_way(core: Direct, db: MemoryDatabase):
    """A reload that failed leaves old and new rows mixed until the retry lands."""
    table = core.tables[FULL]
    db.hold()
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 900, "truncate"))
    await db.held(1)
    db.error = Unavailable("the database went away")
    db.release()
    await eventually(lambda: not table._reloading, what="the reload failed")  # (a retry is scheduled)
    db.hold()  # (the retry waits here)
    initial = asyncio.create_task(core.engine.snapshot(frozenset({FULL})))
    db.error = None
    await db.held(1)
    assert not initial.done(), "an initial state of half-reloaded rows"
    db.release()
    await asyncio.wait_for(initial, 5)

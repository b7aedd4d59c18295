"""Watch initial states through the core, with fakes: streamed lazily from one
shared store snapshot, exact as of the revision they announce while the table
changes and reloads under them."""

from __future__ import annotations

import asyncio
import gc

import pytest

from sidecar.core.assembly import Direct, direct
from sidecar.core.events import Op, RowChange, TableChange
from sidecar.core.fanout import SNAPSHOT, Batch, FellBehind, Filter, InitialState, InitialStateDone
from sidecar.core.full import FullTable
from sidecar.core.wire import row_json
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

T = "public.items"
ROWS = 2_000  # four initial-state messages of 500


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(int_key_schema(T))
    for i in range(1, ROWS + 1):
        db.put(T, (i,), version=1)
    return db


@pytest.fixture
async def core(db: MemoryDatabase):
    source = MemoryChangeSource(db)
    core = direct(source.database, list(db.schemas.values()))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    yield core
    following.cancel()
    await core.close()


def table_of(core: Direct) -> FullTable:
    table = core.tables[T]
    assert isinstance(table, FullTable)
    return table


def rows_json(db: MemoryDatabase) -> dict:
    return {key: row_json(stored) for key, stored in db.data[T].items()}


async def next_message(stream):
    return await asyncio.wait_for(anext(stream), 5)


async def rest_of_snapshot(stream, first: InitialState) -> tuple[dict, InitialStateDone]:
    """The rows of an initial state whose first message was ``first``, and its end."""
    rows: dict = {}
    message = first
    while isinstance(message, InitialState):
        for change in message.changes:
            assert change.op == SNAPSHOT and change.key not in rows
            rows[change.key] = change.row
        message = await next_message(stream)
    assert isinstance(message, InitialStateDone)
    return rows, message


def change_keys(core: Direct, xid: int, op: Op, keys) -> None:
    core.notices.handle(RowChange("public", "items", op, xid, tuple((k,) for k in keys)))


async def test_an_initial_state_stays_exact_while_the_table_changes_and_reloads_under_it(core, db):
    table = table_of(core)
    then, revision = rows_json(db), core.engine.revision.number
    stream = core.engine.subscribe(Filter(frozenset({T})), initial_state=True).messages(core.engine.until_ready)
    first = await next_message(stream)  # the snapshot is taken; one chunk of it is out
    assert isinstance(first, InitialState) and len(first.changes) == 500
    assert table.store.snapshots == 1
    # keyed changes of rows the stream has not sent yet: updates, deletes, inserts
    for key in range(1500, 1600):
        db.put(T, (key,), version=2)
    change_keys(core, 900, Op.UPDATE, range(1500, 1600))
    for key in range(1900, 2000):
        db.delete(T, (key,))
    change_keys(core, 901, Op.DELETE, range(1900, 2000))
    for key in range(5000, 5010):
        db.put(T, (key,), version=2)
    change_keys(core, 902, Op.INSERT, range(5000, 5010))
    await eventually(lambda: core.revisions.applied == core.revisions.seq, what="the keyed changes applied")
    # ... and a whole-table change: the reload rewrites the rows in place under the snapshot
    for key in range(1, 1800):
        db.put(T, (key,), version=3)
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 903, "bulk"))
    await eventually(
        lambda: not table.reloading and core.revisions.applied == core.revisions.seq,
        what="the reload landed",
    )
    assert table.reloads == 2 and table.rows[(1700,)] == db.data[T][(1700,)]
    rows, done = await rest_of_snapshot(stream, first)
    assert rows == then  # exactly the rows as of the revision it announces
    assert done.revision == revision
    after = await next_message(stream)  # then the batches after that revision, in order
    assert isinstance(after, Batch) and after.revision == revision + 1
    await stream.aclose()
    gc.collect()
    assert table.store.snapshots == 0  # a finished stream holds nothing


async def test_concurrent_initial_states_share_one_snapshot(core, db):
    table = table_of(core)
    streams = [core.engine.subscribe(Filter(frozenset()), initial_state=True).messages() for _ in range(10)]
    firsts = [await next_message(stream) for stream in streams]
    assert table.store.snapshots == 1  # one key list for all ten, no rows copied
    (shared,) = core.engine._initial_states.values()
    db.put(T, (1,), version=2)
    change_keys(core, 900, Op.UPDATE, [1])
    await eventually(lambda: core.revisions.applied == core.revisions.seq)
    late = core.engine.subscribe(Filter(frozenset()), initial_state=True).messages()
    late_first = await next_message(late)
    assert table.store.snapshots == 2  # the store changed: a newer one
    results = [await rest_of_snapshot(stream, first) for stream, first in zip(streams, firsts, strict=True)]
    assert all(rows == results[0][0] for rows, _ in results) and len(results[0][0]) == ROWS
    assert shared.made == shared.count == 4  # each message made once for the ten streams
    late_rows, late_done = await rest_of_snapshot(late, late_first)
    assert late_rows == rows_json(db) and late_done.revision > results[0][1].revision
    for stream in [*streams, late]:
        await stream.aclose()
    del shared
    gc.collect()
    assert not core.engine._initial_states and table.store.snapshots == 0


async def test_an_initial_state_asked_for_during_a_reload_waits_for_it(core, db):
    table = table_of(core)
    db.hold()
    for key in range(1, ROWS + 1, 2):
        db.delete(T, (key,))
    core.notices.handle(TableChange("public", "items", Op.TRUNCATE, 900, "bulk"))
    await db.held(1)  # the reload read the table and waits
    changed = core.revisions.seq
    stream = core.engine.subscribe(Filter(frozenset()), initial_state=True).messages(core.engine.until_ready)
    first = asyncio.create_task(next_message(stream))
    await eventually(lambda: len(table._reload_waiters) == 1, what="the initial state waiting for the reload")
    assert not first.done()
    db.release()
    rows, done = await rest_of_snapshot(stream, await first)
    assert rows == rows_json(db)  # the reloaded table, not a mix of old and new rows
    assert done.revision >= changed
    await stream.aclose()


async def test_an_initial_state_lets_other_work_run_between_its_messages(core, db):
    ticks = 0  # the probe: loop iterations another task got (the property measured)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    try:
        stream = core.engine.subscribe(Filter(frozenset()), initial_state=True).messages()
        seen = []
        message = await anext(stream)  # (no wait_for: it would yield to the loop itself)
        while isinstance(message, InitialState):
            seen.append(ticks)
            message = await anext(stream)
        assert len(seen) == 4 and len(set(seen)) == 4  # the ticker ran between every two messages
        await stream.aclose()
    finally:
        running.cancel()


async def test_an_initial_state_whose_client_takes_a_message_while_more_than_max_lag_batches_are_published_is_ended(
    core, db
):
    core.fanout.max_lag = 5
    table = table_of(core)
    stream = core.engine.subscribe(Filter(frozenset({T})), initial_state=True).messages(core.engine.until_ready)
    first = await next_message(stream)  # one message handed over; the client is slow to take it
    assert isinstance(first, InitialState) and table.store.snapshots == 1
    for xid in range(900, 906):  # six batches while it waited: more than max_lag
        db.put(T, (xid - 899,), version=xid)
        change_keys(core, xid, Op.UPDATE, [xid - 899])
    await eventually(lambda: core.revisions.applied == core.revisions.seq, what="the batches published")
    with pytest.raises(FellBehind, match=r"during its initial state .* start over"):
        await next_message(stream)
    assert core.fanout.dropped == 1
    del first
    gc.collect()
    assert table.store.snapshots == 0  # the snapshot it pinned (and the old rows it kept) is gone


async def test_an_initial_state_whose_client_keeps_up_is_not_ended_however_busy_the_table(core, db):
    core.fanout.max_lag = 5
    stream = core.engine.subscribe(Filter(frozenset({T})), initial_state=True).messages(core.engine.until_ready)
    message = await next_message(stream)
    rows = 0
    xid = 900
    while isinstance(message, InitialState):  # a few batches per message taken: each within max_lag
        rows += len(message.changes)
        for _ in range(3):
            xid += 1
            db.put(T, (1,), version=xid)
            change_keys(core, xid, Op.UPDATE, [1])
        await eventually(lambda: core.revisions.applied == core.revisions.seq)
        message = await next_message(stream)
    assert isinstance(message, InitialStateDone) and rows == ROWS and core.fanout.dropped == 0
    await stream.aclose()


async def test_snapshots_that_keep_too_many_old_rows_alive_are_given_up_oldest_first(core, db):
    table = table_of(core)
    old = core.engine.subscribe(Filter(frozenset({T})), initial_state=True).messages(core.engine.until_ready)
    old_first = await next_message(old)
    for key in range(1, 1001):  # rewritten under it: it keeps their old entries
        db.put(T, (key,), version=2)
    change_keys(core, 900, Op.UPDATE, range(1, 1001))
    await eventually(lambda: core.revisions.applied == core.revisions.seq)
    held = core.retention.held
    assert held > 1000 * 64
    new = core.engine.subscribe(Filter(frozenset({T})), initial_state=True).messages(core.engine.until_ready)
    new_first = await next_message(new)  # (a newer snapshot: it keeps nothing yet)
    assert table.store.snapshots == 2
    core.retention.limit = held + 50 * 64
    for key in range(1001, 1101):  # both keep these: over the limit, the oldest is given up
        db.put(T, (key,), version=2)
    change_keys(core, 901, Op.UPDATE, range(1001, 1101))
    await eventually(lambda: core.revisions.applied == core.revisions.seq)
    assert core.retention.given_up == 1 and core.retention.held <= core.retention.limit
    with pytest.raises(FellBehind, match=r"watch\.snapshot_max_bytes = .* start over"):
        await rest_of_snapshot(old, old_first)
    assert core.fanout.dropped == 1
    rows, _done = await rest_of_snapshot(new, new_first)  # the newer one goes on, exact
    assert len(rows) == ROWS and rows[(1,)] == row_json(db.data[T][(1,)])
    await new.aclose()

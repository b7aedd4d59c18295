"""Table caches against the in-memory database: freshness, batching, no stale fill."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.full import FullTable, Reloading
from sidecar.core.lazy import LazyTable
from sidecar.core.wire import entry
from sidecar.errors import Unavailable
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually, quiescent

T = "public.items"


class Seq:
    """Stands in for the batch numbering (``Revisions``)."""

    def __init__(self) -> None:
        self.value = 0
        self.progress = 0
        self.low: int | None = None

    def __call__(self) -> int:
        return self.value

    def next(self) -> int:
        self.value += 1
        return self.value

    @property
    def seq(self) -> int:
        return self.value

    def low_water(self, table: str, low: int | None) -> None:
        self.progress += 1
        self.low = low


def row(value: str) -> bytes:
    return entry(('{"name":"' + value + '"}').encode())


async def within(awaitable, timeout: float = 5.0):
    """Await with a deadline: a broken wait fails the test instead of hanging it."""
    return await asyncio.wait_for(awaitable, timeout)


@pytest.fixture
def seq() -> Seq:
    return Seq()


@pytest.fixture
def db() -> MemoryDatabase:
    db = MemoryDatabase(int_key_schema(T), int_key_schema("public.lazy", mode="lazy"))
    for i in range(1, 6):
        db.put(T, (i,), name=f"v{i}")
        db.put("public.lazy", (i,), name=f"v{i}")
    return db


async def full_table(db: MemoryDatabase, seq: Seq, **kwargs) -> FullTable:
    table = FullTable(db.schemas[T], db, numbering=seq, **kwargs)
    table.rebuild(seq.next())
    await eventually(lambda: table.loaded)
    return table


# ------------------------------------------------------------------ full


async def test_full_load_serves_hits_and_definite_misses_without_queries(db, seq):
    table = await full_table(db, seq)
    assert await table.get_many([(1,), (99,)]) == [row("v1"), None]
    assert table.row_count == 5
    assert db.fetches == []  # a miss in a full table asks nobody
    assert table.low_water() is None


async def test_full_change_is_refetched_and_reads_wait_for_it(db, seq):
    table = await full_table(db, seq)
    db.hold()
    db.put(T, (1,), name="new")
    table.changed([(1,)], seq.next())
    reader = asyncio.create_task(table.get_many([(1,)]))
    await db.held(1)
    assert not reader.done()  # must not answer the old row
    assert table.peek((1,)) == (False, None)
    assert table.peek((2,)) == (True, row("v2"))  # other keys answer at once
    db.release()
    assert await within(reader) == [row("new")]
    assert table.low_water() is None


async def test_full_burst_of_changes_is_one_batched_query(db, seq):
    table = await full_table(db, seq)
    s = seq.next()
    for i in range(1, 6):
        db.put(T, (i,), name=f"w{i}")
        table.changed([(i,)], s)
    assert await table.get_many([(i,) for i in range(1, 6)]) == [row(f"w{i}") for i in range(1, 6)]
    assert len(db.fetches) == 1
    assert sorted(db.fetches[0][1]) == [(i,) for i in range(1, 6)]


async def test_full_delete_and_insert(db, seq):
    table = await full_table(db, seq)
    db.delete(T, (1,))
    db.put(T, (10,), name="ten")
    table.changed([(1,), (10,)], seq.next())
    assert await table.get_many([(1,), (10,)]) == [None, row("ten")]


async def test_full_one_refetch_per_key_in_flight_and_newest_value_wins(db, seq):
    table = await full_table(db, seq)
    db.hold()
    db.put(T, (1,), name="a")
    table.changed([(1,)], seq.next())
    await db.held(1)  # refetch A holds snapshot "a"
    db.put(T, (1,), name="b")
    table.changed([(1,)], seq.next())
    reader = asyncio.create_task(table.get_many([(1,)]))
    await eventually(lambda: len(table._waiters.get((1,), ())) == 1, what="the reader waiting on the key")
    assert len(db.fetches) == 1  # no second refetch of the same key while one is in flight
    db.release()
    assert await within(reader) == [row("b")]  # "a" landed first but cannot satisfy the newer change
    assert table.rows[(1,)] == row("b")
    assert len(db.fetches) == 2


async def test_full_whole_table_change_reloads_and_keeps_newer_key_changes(db, seq):
    table = await full_table(db, seq)
    db.hold()
    db.data[T].clear()
    table.changed_all(seq.next())
    await db.held(1)  # reload holds an empty snapshot
    db.put(T, (7,), name="late")
    table.changed([(7,)], seq.next())  # arrives during the reload
    with pytest.raises(Reloading):  # memory answers nothing meanwhile: the read path asks the database
        await within(table.get_many([(1,), (7,)]))
    with pytest.raises(Reloading):
        await within(table.settle())
    db.release()
    await eventually(lambda: not table.reloading, what="the reload landed")
    assert await within(table.get_many([(1,), (7,)])) == [None, row("late")]
    assert table.row_count == 1


async def test_full_reader_waiting_on_a_refetch_is_sent_to_the_database_by_a_whole_table_change(db, seq):
    table = await full_table(db, seq)
    db.hold()
    table.changed([(1,)], seq.next())
    await db.held(1)  # the refetch of key 1 is in flight
    reader = asyncio.create_task(table.get_many([(1,)]))
    await eventually(lambda: (1,) in table._waiters, what="the reader waiting on the refetch")
    table.changed_all(seq.next())  # the reload waits for that refetch to land first
    with pytest.raises(Reloading):  # ... and the reader does not wait for either
        await within(reader)
    db.release()
    await eventually(lambda: not table.reloading and table.low_water() is None, what="the reload landed")


async def test_full_whole_table_changes_coalesce_into_one_reload_in_flight_and_one_queued(db, seq):
    table = await full_table(db, seq)
    assert db.loads == [T]
    db.hold()
    table.changed_all(seq.next())
    await db.held(1)  # reload 2 in flight
    for version in range(5):  # reads meanwhile must not wait for any of them
        db.put(T, (1,), name=f"burst{version}")
        table.changed_all(seq.next())
    last = seq.value
    assert table.reloading and table.low_water() is not None
    db.release()
    await eventually(lambda: not table.reloading, what="the reloads landed")
    assert db.loads == [T, T, T]  # the burst became one more reload, at its newest level
    assert table._reload_done == last and table.rows[(1,)] == row("burst4")
    assert table.coalesced == 4  # (the burst's first made the queued reload; the others folded into it)


async def test_a_reload_due_but_not_begun_already_shows_as_running(db, seq):
    """After a whole-table change reads go to the database at once; what ListTables and the
    metrics show says so from then on, not only once the load's query has begun."""
    table = await full_table(db, seq)
    assert not table.load_progress.state().running
    db.hold()
    table.changed([(1,)], seq.next())
    await db.held(1)  # a refetch in flight: the reload waits for it
    table.changed_all(seq.next())
    await quiescent()
    assert db.loads == [T] and table.reloading  # due, not begun
    assert table.load_progress.state().running
    db.release()
    await eventually(lambda: not table.reloading, what="the reload landed")
    state = table.load_progress.state()
    assert not state.running and state.completed == 2


async def test_full_keyed_refetch_never_lands_older_than_a_reload(db, seq):
    """A refetch sent before a whole-table change lands before the reload starts; one sent
    after it is newer than the reload: the key's row never goes back."""
    table = await full_table(db, seq)
    db.hold()
    db.put(T, (1,), name="a")
    table.changed([(1,)], seq.next())
    await db.held(1)  # refetch A read "a"
    db.put(T, (1,), name="b")
    table.changed_all(seq.next())
    await quiescent()
    assert db.loads == [T]  # the reload waits for A to land (it would have started by now)
    db.release()
    await eventually(lambda: len(db.loads) == 2 and not table.reloading, what="the reload after the refetch")
    assert table.rows[(1,)] == row("b")
    db.put(T, (1,), name="c")
    table.changed([(1,)], seq.next())
    await eventually(lambda: table.low_water() is None)
    assert table.rows[(1,)] == row("c")


async def test_full_refetch_failure_fails_waiters_then_retries(db, seq):
    table = await full_table(db, seq)
    db.error = Unavailable("connection refused")
    db.put(T, (1,), name="new")
    table.changed([(1,)], seq.next())
    with pytest.raises(Unavailable, match="refetch"):
        await table.get_many([(1,)])
    db.error = None
    await eventually(lambda: table.low_water() is None)
    assert table.rows[(1,)] == row("new")


async def test_full_low_water_tracks_oldest_unapplied_batch(db, seq):
    table = await full_table(db, seq)
    db.hold()
    first = seq.next()
    table.changed([(1,)], first)
    table.changed([(2,)], seq.next())
    assert table.low_water() == first
    db.release()
    await eventually(lambda: table.low_water() is None)


# ------------------------------------------------------------------ lazy


def lazy_table(db: MemoryDatabase, **kwargs) -> LazyTable:
    kwargs.setdefault("max_rows", 100)
    table = LazyTable(db.schemas["public.lazy"], db, **kwargs)
    table.rebuild(0)
    return table


async def test_lazy_reads_through_once_then_hits():
    db = MemoryDatabase(int_key_schema("public.lazy", mode="lazy"))
    db.put("public.lazy", (1,), name="v1")
    table = lazy_table(db)
    assert await table.get_many([(1,), (2,)]) == [row("v1"), None]
    assert await table.get_many([(1,), (2,)]) == [row("v1"), None]  # "not found" is cached too
    assert len(db.fetches) == 1
    assert table.reads == {"hit": 1, "not_found": 1, "miss": 2}


async def test_lazy_concurrent_misses_share_one_query(db):
    table = lazy_table(db)
    db.hold()
    readers = [asyncio.create_task(table.get_many([(1,)])) for _ in range(10)]
    await db.held(1)
    db.release()
    assert [await r for r in readers] == [[row("v1")]] * 10
    assert len(db.fetches) == 1


async def test_lazy_fill_started_before_invalidation_is_never_stored(db):
    table = lazy_table(db)
    db.hold()
    reader = asyncio.create_task(table.get_many([(1,)]))
    await db.held(1)  # the fill read "v1"
    db.put("public.lazy", (1,), name="new")  # commit ...
    table.changed([(1,)], 1)  # ... and its notification arrive during the fill
    db.release()
    assert await within(reader) == [row("v1")]  # concurrent with the commit: either value is fair
    assert (1,) not in table.cache  # but the pre-notification value is not kept
    assert await table.get_many([(1,)]) == [row("new")]
    assert table.cache[(1,)] == row("new")


async def test_lazy_fill_racing_whole_table_change_is_not_stored(db):
    table = lazy_table(db)
    db.hold()
    reader = asyncio.create_task(table.get_many([(1,)]))
    await db.held(1)
    table.changed_all(1)
    db.release()
    await within(reader)
    assert (1,) not in table.cache


async def test_lazy_lru_bound(db):
    table = lazy_table(db, max_rows=3)
    for i in range(1, 6):
        await table.get_many([(i,)])
    assert table.row_count == 3
    assert (5,) in table.cache and (1,) not in table.cache


async def test_lazy_ttl_expires_entries(db):
    now = [0.0]
    table = lazy_table(db, ttl_seconds=10, timer=lambda: now[0])
    await table.get_many([(1,)])
    db.put("public.lazy", (1,), name="later")
    assert await table.get_many([(1,)]) == [row("v1")]
    now[0] = 11.0
    assert await table.get_many([(1,)]) == [row("later")]


async def test_lazy_fill_failure_is_unavailable_and_not_cached(db):
    table = lazy_table(db)
    db.error = Unavailable("down")
    with pytest.raises(Unavailable):
        await table.get_many([(1,)])
    db.error = None
    assert await table.get_many([(1,)]) == [row("v1")]


async def test_lazy_cancelled_reader_does_not_cancel_the_shared_fill(db):
    table = lazy_table(db)
    db.hold()
    first = asyncio.create_task(table.get_many([(1,)]))
    await db.held(1)
    second = asyncio.create_task(table.get_many([(1,)]))
    await quiescent()  # the second reader waits on the fill the first started
    first.cancel()
    db.release()
    assert await within(second) == [row("v1")]
    assert len(db.fetches) == 1  # (one fill, shared: not one per reader)
    with pytest.raises(asyncio.CancelledError):
        await first

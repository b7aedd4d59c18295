"""The Watch fan-out without gRPC or PostgreSQL: ordering, history bounds,
resume, filters, resets, slow subscribers, progress, initial state."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core import wire
from sidecar.core.fanout import (
    DELETE,
    INSERT,
    TRUNCATE,
    UPDATE,
    Batch,
    Batches,
    Change,
    FanOut,
    FellBehind,
    Filter,
    InitialState,
    InitialStateDone,
    OutOfRange,
    Progress,
    Reset,
    TooManyStreams,
    snapshot_chunks,
)
from tests.support.waiting import eventually, quiescent

T = "public.items"
ROWS: dict[tuple[int], bytes] = {}


def make_fanout(**kwargs) -> FanOut:
    ROWS.clear()
    fanout = FanOut(rows_of=lambda table: ROWS if table == T else None, row_json=lambda e: e, **kwargs)
    fanout.start("e1", 0)
    return fanout


def commit(fanout: FanOut, revision: int, *keys: int, op: int = UPDATE, table: str = T) -> None:
    for key in keys:
        ROWS[(key,)] = f"row{key}@{revision}".encode()
        fanout.record(revision, 1000 + revision, Change(table, op, (key,)))
    fanout.publish(revision)


async def take(stream, count: int, timeout: float = 2.0) -> list:
    got = []
    async with asyncio.timeout(timeout):
        async for message in stream:
            got.append(message)
            if len(got) == count:
                return got
    return got


async def test_batches_in_revision_order_with_rows_attached_at_publish():
    fanout = make_fanout()
    subscriber = fanout.subscribe(Filter(frozenset()))
    stream = subscriber.messages()
    commit(fanout, 1, 1, 2)
    commit(fanout, 2, 1)
    got = await take(stream, 2)
    assert [b.revision for b in got] == [1, 2]
    # rows are the ones held when the batch was published
    assert [(c.key, c.row, c.has_row) for c in got[0].changes] == [((1,), b"row1@1", True), ((2,), b"row2@1", True)]
    assert got[0].xid == 1001


async def test_unapplied_batches_wait_and_deleted_rows_say_so():
    fanout = make_fanout()
    stream = fanout.subscribe(Filter(frozenset())).messages()
    ROWS[(7,)] = b"x"
    fanout.record(1, 1, Change(T, INSERT, (7,)))
    fanout.record(2, 2, Change(T, DELETE, (7,)))
    fanout.publish(0)  # nothing applied yet
    del ROWS[(7,)]
    fanout.publish(2)
    first, second = await take(stream, 2)
    assert (first.changes[0].has_row, second.changes[0].has_row) == (False, False)


async def test_resume_replays_exactly_the_batches_after_the_revision():
    fanout = make_fanout()
    for revision in range(1, 6):
        commit(fanout, revision, revision)
    got = await take(fanout.subscribe(Filter(frozenset()), start=("e1", 2)).messages(), 3)
    assert [b.revision for b in got] == [3, 4, 5]


async def test_resume_beyond_the_history_or_from_another_epoch_is_out_of_range():
    fanout = make_fanout(max_batches=3)
    for revision in range(1, 7):
        commit(fanout, revision, revision)
    assert fanout.oldest == 3
    with pytest.raises(OutOfRange, match="oldest available e1/3"):
        fanout.subscribe(Filter(frozenset()), start=("e1", 2))
    with pytest.raises(OutOfRange, match="another epoch"):
        fanout.subscribe(Filter(frozenset()), start=("e0", 6))
    got = await take(fanout.subscribe(Filter(frozenset()), start=("e1", 3)).messages(), 3)
    assert [b.revision for b in got] == [4, 5, 6]


async def test_history_is_bounded_by_bytes_too():
    fanout = make_fanout(max_bytes=600)
    for revision in range(1, 20):
        commit(fanout, revision, revision)
    assert 1 < fanout.oldest < 18 and fanout.next_after(18).revision == 19
    huge = make_fanout(max_bytes=10)
    commit(huge, 1, 1)
    commit(huge, 2, 2)
    assert huge.oldest == 1 and huge.next_after(1).revision == 2  # the newest batch always stays


async def test_filters_keep_table_wide_events_and_skip_empty_batches():
    fanout = make_fanout()
    by_key = fanout.subscribe(Filter(frozenset({T}), keys=frozenset({(2,)}))).messages()
    by_op = fanout.subscribe(Filter(frozenset(), ops=frozenset({INSERT}))).messages()
    commit(fanout, 1, 1)
    commit(fanout, 2, 2, op=INSERT)
    commit(fanout, 3, 3, table="public.other")
    fanout.record(4, 4, Change(T, TRUNCATE))
    fanout.publish(4)
    got = await take(by_key, 2)
    assert [(b.revision, [c.op for c in b.changes]) for b in got] == [(2, [INSERT]), (4, [TRUNCATE])]
    got = await take(by_op, 2)
    assert [b.revision for b in got] == [2, 4]


async def test_an_unfiltered_batch_is_the_same_object_for_every_subscriber():
    fanout = make_fanout()
    streams = [fanout.subscribe(Filter(frozenset({T}))).messages() for _ in range(3)]
    commit(fanout, 1, 1)
    firsts = [(await take(stream, 1))[0] for stream in streams]
    assert all(first is firsts[0] for first in firsts)  # encoded once, sent to all


async def test_reset_reaches_every_subscriber_and_the_stream_goes_on():
    fanout = make_fanout()
    stream = fanout.subscribe(Filter(frozenset())).messages()
    commit(fanout, 1, 1)
    (first,) = await take(stream, 1)
    fanout.start("e2", 2, "rebuilt")
    commit(fanout, 3, 3)
    got = await take(stream, 2)
    assert isinstance(first, Batch) and isinstance(got[0], Reset) and got[0].epoch == "e2"
    assert got[1].revision == 3 and got[1].epoch == "e2"


async def test_a_subscriber_that_falls_behind_is_ended_with_its_last_revision():
    fanout = make_fanout(max_lag=5)
    slow_stream = fanout.subscribe(Filter(frozenset())).messages()
    fast_stream = fanout.subscribe(Filter(frozenset())).messages()
    read: list = []

    async def read_fast() -> None:
        async for message in fast_stream:
            read.append(message)
            if len(read) == 19:
                return

    fast = asyncio.create_task(read_fast())
    commit(fanout, 1, 1)
    assert (await take(slow_stream, 1))[0].revision == 1
    for revision in range(2, 20):
        commit(fanout, revision, revision)  # publishing never waits for the slow one
        await eventually(lambda r=revision: len(read) == r, what=f"the fast one read {revision}")  # (as it comes)
    await asyncio.wait_for(fast, 2)
    assert [b.revision for b in read] == list(range(1, 20))
    with pytest.raises(FellBehind, match="last delivered revision e1/1"):
        await take(slow_stream, 1)
    assert fanout.dropped == 1


async def test_lag_counts_batches_not_revision_numbers():
    # Logical capture numbers revisions by commit LSN: consecutive batches are WAL bytes
    # apart. A subscriber that held one message while 3 batches were published is not
    # behind (max_lag 5), however far the revision numbers moved.
    fanout = make_fanout(max_lag=5)
    stream = fanout.subscribe(Filter(frozenset())).messages()
    commit(fanout, 1000, 1)
    assert (await take(stream, 1))[0].revision == 1000
    for revision in (2000, 3000, 4000):
        commit(fanout, revision, revision)
    assert [b.revision for b in await take(stream, 3)] == [2000, 3000, 4000]
    assert fanout.dropped == 0
    for revision in range(5000, 12000, 1000):  # 7 batches while it holds one: behind
        commit(fanout, revision, revision)
    with pytest.raises(FellBehind, match="7 batches published while one waited"):
        await take(stream, 1)


async def test_an_initial_state_lag_counts_batches_not_revision_numbers():
    fanout = make_fanout(max_lag=5)
    commit(fanout, 1000, 1, 2)

    async def snapshot():
        return snapshot_chunks(fanout.epoch, fanout.published, [(T, [list(ROWS.items())])], bytes)

    stream = fanout.subscribe(Filter(frozenset()), snapshot=snapshot).messages()
    (first,) = await take(stream, 1)
    for revision in (2000, 3000):
        commit(fanout, revision, revision)
    done, *live = await take(stream, 3)
    assert isinstance(first, InitialState) and isinstance(done, InitialStateDone)
    assert [b.revision for b in live] == [2000, 3000]


async def test_a_resume_far_behind_catches_up_and_is_not_ended():
    fanout = make_fanout(max_lag=3)
    for revision in range(1, 30):
        commit(fanout, revision, revision)
    got = await take(fanout.subscribe(Filter(frozenset()), start=("e1", 2)).messages(), 27)
    assert [b.revision for b in got] == list(range(3, 30))


async def test_resume_ahead_of_the_cache_is_out_of_range():
    fanout = make_fanout()
    commit(fanout, 1, 1)
    with pytest.raises(OutOfRange, match="ahead"):
        fanout.subscribe(Filter(frozenset()), start=("e1", 5))


async def test_subscribers_from_before_the_first_epoch_get_a_reset():
    fanout = FanOut(rows_of=lambda table: None, row_json=bytes)
    stream = fanout.subscribe(Filter(frozenset())).messages()
    fanout.start("e1", 1)
    (reset,) = await take(stream, 1)
    assert isinstance(reset, Reset) and reset.epoch == "e1"


async def test_progress_marks_when_idle():
    fanout = make_fanout()
    commit(fanout, 1, 1)
    stream = fanout.subscribe(Filter(frozenset({T}), keys=frozenset({(9,)})), progress_interval=0.05).messages()
    commit(fanout, 2, 2)  # filtered out
    (mark,) = await take(stream, 1)
    assert isinstance(mark, Progress) and mark.revision == 2


async def test_initial_state_then_done_then_changes_after_it():
    fanout = make_fanout()
    commit(fanout, 1, 1, 2)

    async def snapshot():
        return snapshot_chunks(fanout.epoch, fanout.published, [(T, [list(ROWS.items())])], bytes)

    subscriber = fanout.subscribe(Filter(frozenset()), snapshot=snapshot)
    stream = subscriber.messages()
    first = await take(stream, 1)
    commit(fanout, 2, 3)
    rest = await take(stream, 2)
    snapshot, done, live = first[0], rest[0], rest[1]
    assert isinstance(snapshot, InitialState) and sorted(c.key for c in snapshot.changes) == [(1,), (2,)]
    assert isinstance(done, InitialStateDone) and done.revision == 1
    assert live.revision == 2


async def test_streams_beyond_the_limits_are_refused_and_those_below_are_unaffected():
    fanout = make_fanout(max_streams=3, max_streams_per_connection=2)
    first = fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.1:5000")
    fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.1:5000")
    per_connection = r"one connection \(ipv4:10.0.0.1:5000\): 2 are open.*max_streams_per_connection = 2"
    with pytest.raises(TooManyStreams, match=per_connection):
        fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.1:5000")
    other = fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.2:6000")  # another connection
    with pytest.raises(TooManyStreams, match=r"3 are open.*watch.max_streams = 3"):
        fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.3:7000")
    with pytest.raises(TooManyStreams, match=r"watch\.max_streams = 3"):
        fanout.subscribe(Filter(frozenset()))  # (a Unix-socket client: only the total bounds it)
    assert (fanout.subscribers, fanout.refused) == (3, 3)
    stream = first.messages()
    commit(fanout, 1, 1)
    assert [b.revision for b in await take(stream, 1)] == [1]  # the open ones go on
    fanout.unsubscribe(other)
    fanout.unsubscribe(other)  # (twice: counted once)
    fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.3:7000")  # a slot is free again
    fanout.unsubscribe(first)
    fanout.subscribe(Filter(frozenset()), connection="ipv4:10.0.0.1:5000")


async def test_equal_filters_share_one_view_and_different_filters_never_mix():
    fanout = make_fanout()
    filters = {
        "key 1": Filter(frozenset({T}), keys=frozenset({(1,)})),
        "key 1 again": Filter(frozenset({T}), keys=frozenset({(1,)})),  # equal, another object
        "key 2": Filter(frozenset({T}), keys=frozenset({(2,)})),
        "inserts": Filter(frozenset(), ops=frozenset({INSERT})),
        "key 1, inserts": Filter(frozenset({T}), keys=frozenset({(1,)}), ops=frozenset({INSERT})),
    }
    sees_nothing = filters.pop("key 1, inserts")
    streams = {name: fanout.subscribe(f).messages() for name, f in filters.items()}
    ROWS[(1,)], ROWS[(2,)] = b"one", b"two"
    fanout.record(1, 1, Change(T, UPDATE, (1,)))
    fanout.record(1, 1, Change(T, INSERT, (2,)))
    fanout.publish(1)
    got = {name: (await take(stream, 1))[0] for name, stream in streams.items()}
    assert got["key 1"] is got["key 1 again"]  # made (and so encoded) once
    assert wire.watch_messages(got["key 1"], 1 << 20) == wire.watch_messages(got["key 1 again"], 1 << 20)
    assert len({id(v) for v in got.values()}) == 3
    seen = {name: [(c.key, c.op) for c in view.changes] for name, view in got.items()}
    assert seen == {
        "key 1": [((1,), UPDATE)],
        "key 1 again": [((1,), UPDATE)],
        "key 2": [((2,), INSERT)],
        "inserts": [((2,), INSERT)],
    }
    batch = fanout.next_after(0)
    assert sees_nothing.apply(batch) is None and batch.views[sees_nothing] is None
    assert {f: v for f, v in batch.views.items() if v is not None} == {
        filters["key 1"]: got["key 1"],
        filters["key 2"]: got["key 2"],
        filters["inserts"]: got["inserts"],
    }


async def test_views_are_kept_for_the_newest_batches_only():
    fanout = make_fanout()
    fanout.view_window = 2
    only_3 = Filter(frozenset({T}), keys=frozenset({(3,)}))
    for revision in range(1, 5):
        commit(fanout, revision, revision)
    # batches 1 and 2 left the window: their views are gone, each subscriber filters itself
    assert fanout.next_after(0).views is None and fanout.next_after(3).views == {}
    late = fanout.subscribe(only_3, start=("e1", 0)).messages()
    (view,) = await take(late, 1)
    assert view.revision == 3 and [c.key for c in view.changes] == [(3,)]
    assert fanout.next_after(2).views == {only_3: view}  # batch 3 is still in the window
    assert only_3.apply(fanout.next_after(3)) is None and fanout.next_after(3).views == {only_3: None}


async def test_a_subscriber_behind_gets_every_batch_it_may_have_in_one_message():
    fanout = make_fanout()
    fanout.max_group = 4
    several = fanout.subscribe(Filter(frozenset()), several=True).messages()
    one_by_one = fanout.subscribe(Filter(frozenset())).messages()
    filtered = fanout.subscribe(Filter(frozenset({T}), keys=frozenset({(2,), (5,)})), several=True).messages()
    for revision in range(1, 7):
        commit(fanout, revision, revision)
    first, second = await take(several, 2)
    assert isinstance(first, Batches) and [b.revision for b in first.batches] == [1, 2, 3, 4]
    assert isinstance(second, Batches) and [b.revision for b in second.batches] == [5, 6]
    assert [b.revision for b in await take(one_by_one, 6)] == [1, 2, 3, 4, 5, 6]
    (group,) = await take(filtered, 1)
    assert [b.revision for b in group.batches] == [2, 5]  # the batches it sees nothing of left out
    commit(fanout, 7, 7)
    (alone,) = await take(several, 1)
    assert isinstance(alone, Batch) and alone.revision == 7  # one batch goes as one


async def test_progress_marks_come_from_one_shared_ticker_and_stop_when_not_idle():
    fanout = make_fanout()
    fanout.progress_tick = 0.01
    commit(fanout, 1, 1)
    quiet = fanout.subscribe(Filter(frozenset({T}), keys=frozenset({(9,)})), progress_interval=0.03).messages()
    busy = fanout.subscribe(Filter(frozenset()), progress_interval=0.03).messages()
    marks = await take(quiet, 2)
    assert all(isinstance(m, Progress) and m.revision == 1 for m in marks)
    commit(fanout, 2, 2)
    (batch,) = await take(busy, 1)
    assert isinstance(batch, Batch)
    assert fanout._ticker is not None  # one timer for all of them


async def test_subscribers_are_woken_a_slice_at_a_time_and_the_last_take_what_came_meanwhile():
    fanout = make_fanout()
    fanout.wake_slice = 2
    subscriptions = [fanout.subscribe(Filter(frozenset()), several=True) for _ in range(6)]
    readers = [asyncio.create_task(take(s.messages(), 1)) for s in subscriptions]
    await eventually(lambda: all(s.waiting for s in subscriptions), what="every reader waits")
    commit(fanout, 1, 1)
    # How many had their message after each event-loop iteration: the property measured
    # (a slice per iteration), so this loop counts iterations on purpose.
    woken: list[int] = []
    async with asyncio.timeout(2):
        while not all(r.done() for r in readers):
            await asyncio.sleep(0)
            woken.append(sum(r.done() for r in readers))
            if woken[-1] == 2 and fanout.published == 1:
                commit(fanout, 2, 2)  # published while the others still wait for their turn
    steps = [b - a for a, b in zip([0, *woken], woken, strict=False)]
    assert max(steps) <= 2  # never more than a slice at once
    first = [(await r)[0] for r in readers]
    assert [m.revision for m in first[:2]] == [1, 1]
    assert [[b.revision for b in m.batches] for m in first[2:]] == [[1, 2]] * 4


async def test_idle_subscribers_are_not_woken_again_and_again_after_a_publish():
    """Subscribers with nothing left to send wait for the next publish; the paced wake-up
    round is for those waiting for their turn to send (it once woke idle ones in a
    ``call_soon`` chain for ever: a loop at 100 % CPU after a single publish)."""
    fanout = make_fanout()
    subscribers = [fanout.subscribe(Filter(frozenset())) for _ in range(3)]
    received = [0] * len(subscribers)
    wakes = [0] * len(subscribers)
    for index, subscriber in enumerate(subscribers):
        wake = subscriber.wake

        def counted(index: int = index, wake=wake) -> None:
            wakes[index] += 1
            wake()

        subscriber.wake = counted  # type: ignore[method-assign]

    async def read(index: int) -> None:
        async for _ in subscribers[index].messages():
            received[index] += 1

    readers = [asyncio.create_task(read(i)) for i in range(len(subscribers))]
    try:
        await eventually(lambda: all(s.waiting for s in subscribers), what="every subscriber idle")
        commit(fanout, 1, 1)
        await eventually(lambda: received == [1, 1, 1], what="the batch sent to each")
        await quiescent()  # (fails if the loop never goes idle)
        woken = list(wakes)
        await quiescent()
        assert wakes == woken and all(s.waiting for s in subscribers)
        commit(fanout, 2, 2)  # (and the next publish still wakes them)
        await eventually(lambda: received == [2, 2, 2], what="the next batch sent to each")
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_max_lag_counts_batches_not_revision_numbers():
    """Revisions that are commit LSNs (logical capture) lie far apart: a subscriber that
    took one message while three batches were published is not behind, one that took it
    while six were (more than max_lag) is."""
    fanout = make_fanout(max_lag=5)
    stream = fanout.subscribe(Filter(frozenset())).messages()
    commit(fanout, 1000, 1)
    assert (await take(stream, 1))[0].revision == 1000
    for revision in (2000, 3000, 4000):
        commit(fanout, revision, 1)
    assert [b.revision for b in await take(stream, 3)] == [2000, 3000, 4000]
    for revision in range(5000, 11000, 1000):
        commit(fanout, revision, 1)
    with pytest.raises(FellBehind, match=r"6 batches published while one waited\); last delivered revision e1/4000"):
        await take(stream, 1)
    assert fanout.dropped == 1

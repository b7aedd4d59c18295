"""Watch against a real PostgreSQL: order and gap-freedom under concurrent
writers, resume mid-burst, the snapshot/live seam, slow subscribers, RESET,
many subscribers, bad requests, and the Python client's automatic resume."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, InitialStateDone, Progress, Reset, Revision
from cache_sidecar_client.errors import CacheSidecarError

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.support.proxy import Proxy
from tests.support.revisions import one_per_commit
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
async def items(db, schema) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 0 FROM generate_series(1, 50) g"
    )
    return f"{schema}.items"


async def collect(stream, until, timeout: float = 20.0) -> list:
    """Read ``stream`` until ``until(items)`` holds."""
    got: list = []
    async with asyncio.timeout(timeout):
        async for item in stream:
            got.append(item)
            if until(got):
                return got
    return got


def batches(got: list) -> int:
    return sum(isinstance(i, ChangeBatch) for i in got)


async def write_versions(postgres, table: str, writers: int, per_writer: int, keys: range, pace: float = 0) -> None:
    async def writer(seed: int) -> None:
        conn = await asyncpg.connect(postgres.dsn)
        rng = random.Random(seed)
        for _ in range(per_writer):
            await conn.execute(f"UPDATE {table} SET version = version + 1 WHERE id = $1", rng.choice(keys))
            if pace:
                await asyncio.sleep(pace)  # a steady write rate, not a synchronisation
        await conn.close()

    await asyncio.gather(*(writer(s) for s in range(writers)))


async def test_batches_are_ordered_gap_free_one_per_transaction(start_daemon, postgres, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        stream = cache.watch([items])
        start = sidecar.engine.revision.number
        total = 4 * 60
        collecting = asyncio.create_task(
            collect(stream, lambda got: sum(isinstance(i, ChangeBatch) for i in got) >= total)
        )
        await eventually(lambda: sidecar.core.fanout.subscribers >= 1, what="subscribed")
        await write_versions(postgres, items, writers=4, per_writer=60, keys=range(1, 4))
        batches = [b for b in await collecting if isinstance(b, ChangeBatch)]
        await stream.aclose()
    revisions = [b.revision.number for b in batches]
    assert len(revisions) == total and one_per_commit(revisions, start, sidecar.capture)  # none lost or twice
    assert len({b.xid for b in batches}) == total  # one batch per transaction
    for key in (1, 2, 3):  # each row's versions only move forward, ending at the database's
        versions = [c.row["version"] for b in batches for c in b.changes if c.key == key]
        assert versions == sorted(versions)
        assert versions[-1] == await db.fetchval(f"SELECT version FROM {items} WHERE id = $1", key)
    assert sum(len(b.changes) for b in batches) == total


async def test_resume_after_disconnect_mid_burst(start_daemon, postgres, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        start = sidecar.engine.revision.number
        first_stream = cache.watch([items], resume=False)
        reading = asyncio.create_task(collect(first_stream, lambda got: len(got) >= 40))
        await eventually(lambda: sidecar.core.fanout.subscribers >= 1, what="subscribed")
        burst = asyncio.create_task(write_versions(postgres, items, writers=2, per_writer=100, keys=range(1, 51)))
        first = await reading
        await first_stream.aclose()  # the client goes away mid-burst
        last = first[-1].revision
        await burst
        rest = await collect(
            cache.watch([items], start_revision=last), lambda got: batches(first) + batches(got) >= 200
        )
    numbers = [b.revision.number for b in first + rest if isinstance(b, ChangeBatch)]
    assert len(numbers) == 200 and one_per_commit(numbers, start, sidecar.capture)


async def test_initial_state_then_live_has_no_seam(start_daemon, postgres, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        writing = asyncio.create_task(write_versions(postgres, items, writers=3, per_writer=80, keys=range(1, 51)))
        await eventually(lambda: sidecar.core.fanout.published_batches >= 5, what="writes under way")
        mirror: dict[int, int] = {}
        done = asyncio.Event()
        target: list = []

        async def follow() -> None:
            async for item in cache.watch([items], initial_state=True, progress_interval=0.05):
                if isinstance(item, ChangeBatch):
                    for change in item.changes:
                        if change.has_row:
                            mirror[change.key] = change.row["version"]
                        else:
                            mirror.pop(change.key, None)
                elif isinstance(item, InitialStateDone):
                    done.set()
                if target and item.revision and item.revision.number >= target[0]:
                    return

        following = asyncio.create_task(follow())
        await writing
        target.append((await cache.sync()).number)
        await asyncio.wait_for(following, 20)
        assert done.is_set()
    truth = {r["id"]: r["version"] for r in await db.fetch(f"SELECT id, version FROM {items}")}
    assert mirror == truth


async def test_a_slow_subscriber_is_ended_while_a_fast_one_keeps_up(start_daemon, postgres, db, schema):
    # Rows big enough that the slow client's transport buffers fill up and the
    # sidecar really holds batches it cannot deliver.
    await db.execute(
        f"CREATE TABLE {schema}.wide (id int PRIMARY KEY, version int NOT NULL, pad text NOT NULL);"
        f"INSERT INTO {schema}.wide SELECT g, 0, repeat('x', 20000) FROM generate_series(1, 50) g"
    )
    wide = f"{schema}.wide"
    sidecar = await start_daemon([wide], watch_max_lag=50)
    async with AsyncClient(sidecar.target) as fast_client, AsyncClient(sidecar.target) as slow_client:
        start = sidecar.engine.revision.number
        fast = asyncio.create_task(collect(fast_client.watch([wide]), lambda got: batches(got) >= 400, timeout=60))
        slow_stream = slow_client.watch([wide], resume=False)
        first = asyncio.create_task(anext(slow_stream))  # subscribes, reads one batch, then stalls
        await eventually(lambda: sidecar.core.fanout.subscribers == 2)
        await write_versions(postgres, wide, writers=1, per_writer=400, keys=range(1, 51), pace=0.004)
        await first
        delivered = await fast
        assert len(delivered) == 400 and one_per_commit([b.revision.number for b in delivered], start, sidecar.capture)
        # (every batch, none dropped, while the slow one lagged)
        with pytest.raises(CacheSidecarError) as info:  # the slow one starts reading only now
            async with asyncio.timeout(60):
                async for _ in slow_stream:
                    pass
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "last delivered revision" in str(info.value)
        assert sidecar.core.fanout.dropped == 1
        # ... and resuming from there catches up, at its own pace, without being ended again
        epoch, number = str(info.value).split("last delivered revision ")[1].split(";")[0].split("/")
        rest = await collect(
            slow_client.watch([wide], start_revision=Revision(epoch, int(number)), resume=False),
            lambda got: got[-1].revision.number >= delivered[-1].revision.number,
            timeout=60,
        )
        assert [b.revision.number for b in rest] == [
            b.revision.number for b in delivered if b.revision.number > int(number)
        ]
        assert sidecar.core.fanout.dropped == 1


async def test_an_initial_state_whose_client_stops_reading_is_ended_and_its_snapshot_released(start_daemon, db, schema):
    # Rows big enough that the client's transport buffers fill and a send really waits.
    await db.execute(
        f"CREATE TABLE {schema}.wide (id int PRIMARY KEY, pad text NOT NULL);"
        f"INSERT INTO {schema}.wide SELECT g, repeat(md5(g::text), 625) FROM generate_series(1, 1500) g"
    )
    wide = f"{schema}.wide"
    sidecar = await start_daemon([wide], watch_send_timeout=1.0)
    table = sidecar.core.tables[wide]
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(sidecar.target, options=options) as channel:
        call = pb_grpc.CacheStub(channel).Watch(pb.WatchRequest(tables=[wide], initial_state=True))
        await asyncio.wait_for(call.initial_metadata(), 10)  # subscribed; it reads nothing from now on
        await eventually(lambda: sidecar.core.fanout.stalled == 1, timeout=30, what="the stalled stream ended")
        await eventually(lambda: sidecar.core.fanout.subscribers == 0, what="unsubscribed")
        await eventually(lambda: table.store.snapshots == 0, what="the snapshot it held released")
        # Reading at last, the client gets what was sent, then why the stream ended.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async with asyncio.timeout(30):
                async for _ in call:
                    pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "took no message for 1 s, watch.send_timeout" in info.value.details()
    assert sidecar.core.fanout.dropped == 1


async def test_reset_on_listener_loss_then_the_stream_goes_on(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        stream = cache.watch([items])
        reading = asyncio.create_task(
            collect(
                stream,
                lambda got: any(
                    isinstance(i, ChangeBatch) and any(isinstance(r, Reset) for r in got[:n]) for n, i in enumerate(got)
                ),
            )
        )
        # (subscribed first: a change published before would not be streamed to it)
        await eventually(lambda: sidecar.core.fanout.subscribers >= 1, what="subscribed")
        await db.execute(f"UPDATE {items} SET version = 1 WHERE id = 1")
        await eventually(lambda: sidecar.core.fanout.published_batches >= 1)
        history = sidecar.history
        await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
        await eventually(lambda: sidecar.engine.ready and sidecar.history != history, what="rebuilt")
        await db.execute(f"UPDATE {items} SET version = 2 WHERE id = 1")
        got = await reading
        await stream.aclose()
    kinds = [type(i).__name__ for i in got]
    assert kinds[0] == "ChangeBatch" and "Reset" in kinds
    reset = next(i for i in got if isinstance(i, Reset))
    # (a new epoch; in logical capture the same one, the database's history, from a later revision)
    first = got[0].revision
    assert reset.revision.epoch != first.epoch or reset.revision.number > first.number
    assert "rebuilt" in reset.reason
    assert got[-1].changes[0].row["version"] == 2


async def test_a_hundred_subscribers(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        start = sidecar.engine.revision.number
        streams = [cache.watch([items]) for _ in range(100)]
        readers = [asyncio.create_task(collect(s, lambda got: batches(got) >= 20, timeout=30)) for s in streams]
        await eventually(lambda: sidecar.core.fanout.subscribers == 100, what="100 subscribed")
        for version in range(20):
            await db.execute(f"UPDATE {items} SET version = $1 WHERE id = 1", version + 100)
        results = await asyncio.gather(*readers)
        for stream in streams:
            await stream.aclose()
    numbers = [[b.revision.number for b in r] for r in results]
    assert len(numbers[0]) == 20 and one_per_commit(numbers[0], start, sidecar.capture)
    assert all(n == numbers[0] for n in numbers)
    await eventually(lambda: sidecar.core.fanout.subscribers == 0, what="cancellation frees subscribers")


async def test_filtered_subscriber_gets_progress_and_table_wide_events(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        stream = cache.watch([items], keys=[7], progress_interval=0.1)
        got: list = []
        reading = asyncio.create_task(
            collect(
                stream,
                lambda seen: (
                    got.extend(seen[len(got) :])
                    or any(isinstance(i, ChangeBatch) and i.changes[0].operation == "truncate" for i in seen)
                ),
            )
        )
        await db.execute(f"UPDATE {items} SET version = 5 WHERE id = 8")  # filtered out
        await eventually(
            lambda: any(isinstance(i, Progress) and i.revision.number >= 1 for i in got),
            what="a progress mark while nothing matched",
        )
        await db.execute(f"UPDATE {items} SET version = 5 WHERE id = 7")
        await db.execute(f"TRUNCATE {items}")
        got = await reading
        await stream.aclose()
    assert any(isinstance(i, Progress) for i in got)
    batches = [i for i in got if isinstance(i, ChangeBatch)]
    assert [c.key for c in batches[0].changes] == [7]
    assert batches[-1].changes[0].key is None


async def test_bad_watch_requests(start_daemon, schema, items):
    sidecar = await start_daemon([items])
    good_revision = pb.Revision(epoch=sidecar.core.revisions.epoch, number=sidecar.core.revisions.applied)
    cases = [
        (pb.WatchRequest(tables=["public.nope"]), grpc.StatusCode.NOT_FOUND, "not cached here"),
        (
            pb.WatchRequest(keys=[pb.Key(parts=[pb.KeyPart(int_value=1)])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exactly one table",
        ),
        (
            pb.WatchRequest(tables=[items], keys=[pb.Key(parts=[pb.KeyPart(string_value="x")])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not an integer",
        ),
        (pb.WatchRequest(start_revision=pb.Revision(number=5)), grpc.StatusCode.INVALID_ARGUMENT, "needs the epoch"),
        (
            pb.WatchRequest(start_revision=good_revision, initial_state=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
        (pb.WatchRequest(operations=[pb.SNAPSHOT]), grpc.StatusCode.INVALID_ARGUMENT, "operations"),
        (
            pb.WatchRequest(start_revision=pb.Revision(epoch="gone", number=5)),
            grpc.StatusCode.OUT_OF_RANGE,
            "another epoch",
        ),
    ]
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.CacheStub(channel)
        for request, code, message in cases:
            call = stub.Watch(request)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == code, (request, info.value.details())
            assert message in info.value.details()
        call = stub.Watch(pb.WatchRequest(start_revision=pb.Revision(epoch="gone", number=1)))
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        metadata = dict(await call.trailing_metadata())
        assert metadata["cachesidecar-oldest-revision"].startswith(sidecar.core.revisions.epoch)


async def test_client_resumes_through_a_cut_connection_without_gap_or_duplicate(start_daemon, postgres, items):
    sidecar = await start_daemon([items])
    host, port = sidecar.target.rsplit(":", 1)
    proxy = Proxy(host=host, port=int(port))
    await proxy.start()
    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}") as cache:
            start = sidecar.engine.revision.number
            published = sidecar.core.fanout.published_batches
            stream = cache.watch([items])
            reading = asyncio.create_task(collect(stream, lambda got: batches(got) >= 120, timeout=30))
            await eventually(lambda: sidecar.core.fanout.subscribers >= 1, what="subscribed")
            burst = asyncio.create_task(write_versions(postgres, items, writers=1, per_writer=120, keys=range(1, 51)))
            await eventually(lambda: sidecar.core.fanout.published_batches > published + 30)
            proxy.cut()  # the network drops mid-burst; the client reconnects and resumes
            await burst
            got = await reading
            await stream.aclose()
    finally:
        await proxy.close()
    assert proxy.connections >= 2
    numbers = [b.revision.number for b in got if isinstance(b, ChangeBatch)]
    assert len(numbers) == 120 and one_per_commit(numbers, start, sidecar.capture)


async def test_streams_beyond_the_caps_are_refused_and_the_open_ones_go_on(start_daemon, db, items):
    sidecar = await start_daemon([items], watch_max_streams=3, watch_max_streams_per_connection=2)
    request = pb.WatchRequest(tables=[items])
    # separate subchannel pools: each channel is its own TCP connection
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(sidecar.target, options=options) as one,
        grpc.aio.insecure_channel(sidecar.target, options=options) as two,
        grpc.aio.insecure_channel(sidecar.target, options=options) as three,
    ):
        open_calls = [pb_grpc.CacheStub(one).Watch(request) for _ in range(2)]
        for call in open_calls:
            await call.initial_metadata()
        refused = pb_grpc.CacheStub(one).Watch(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(refused.read(), 10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch.max_streams_per_connection = 2" in info.value.details()
        open_calls.append(pb_grpc.CacheStub(two).Watch(request))  # another connection may
        await open_calls[-1].initial_metadata()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(pb_grpc.CacheStub(three).Watch(request).read(), 10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "watch.max_streams = 3" in info.value.details()
        assert (sidecar.core.fanout.subscribers, sidecar.core.fanout.refused) == (3, 2)
        # the Python client raises it (no headers yet: not a subscriber that fell behind)
        async with AsyncClient(sidecar.target) as cache:
            with pytest.raises(CacheSidecarError) as refusal:
                async with asyncio.timeout(10):
                    await anext(cache.watch([items]))
            assert refusal.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await db.execute(f"UPDATE {items} SET version = 7 WHERE id = 3")
        for call in open_calls:  # the streams below the caps are unaffected
            message = await asyncio.wait_for(call.read(), 10)
            assert message.changes.events[0].key.parts[0].int_value == 3
        open_calls.pop().cancel()
        await eventually(lambda: sidecar.core.fanout.subscribers == 2, what="a slot freed")
        replacement = pb_grpc.CacheStub(three).Watch(request)
        await replacement.initial_metadata()
        replacement.cancel()
        for call in open_calls:
            call.cancel()


async def test_a_stream_behind_gets_several_batches_in_one_message_only_if_it_asked(start_daemon, db, items):
    sidecar = await start_daemon([items])
    start = pb.Revision(epoch=sidecar.core.revisions.epoch, number=sidecar.core.revisions.applied)
    published = sidecar.core.fanout.published_batches
    for version in range(1, 21):
        await db.execute(f"UPDATE {items} SET version = $1 WHERE id = $2", version, version)
    await eventually(lambda: sidecar.core.fanout.published_batches >= published + 20, what="20 batches published")

    async def read(accept_batches: bool) -> tuple[list[str], list[pb.ChangeBatch]]:
        kinds, batches = [], []
        request = pb.WatchRequest(tables=[items], start_revision=start, accept_batches=accept_batches)
        call = pb_grpc.CacheStub(channel).Watch(request)
        async with asyncio.timeout(20):
            while len(batches) < 20:
                message = await call.read()
                kinds.append(message.WhichOneof("kind"))
                batches.extend(message.batches.batches if kinds[-1] == "batches" else [message.changes])
        call.cancel()
        return kinds, batches

    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        old_kinds, old_batches = await read(False)  # an old client: one batch a message, as before
        new_kinds, new_batches = await read(True)
    assert old_kinds == ["changes"] * 20
    assert new_kinds == ["batches"]  # all 20 were there: one message
    assert new_batches == old_batches
    numbers = [b.revision.number for b in new_batches]
    assert len(numbers) == 20 and one_per_commit(numbers, start.number, sidecar.capture)
    # ... and the Python client, which asks for them, yields them one by one, in order
    async with AsyncClient(sidecar.target) as cache:
        got = await collect(
            cache.watch([items], start_revision=Revision(start.epoch, start.number)), lambda got: len(got) == 20
        )
    assert [b.revision.number for b in got] == numbers
    assert [b.changes[0].row["version"] for b in got] == list(range(1, 21))

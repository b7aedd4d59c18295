"""The Python client's near-cache, decorator and change events against a real
sidecar and PostgreSQL: coherence, resets, a sidecar restart, monotonic reads."""

from __future__ import annotations

import asyncio
import socket
import threading

import asyncpg
import pytest
from cache_sidecar_client import AsyncClient, Change, Client, UndecodableRow, cached, decorators

from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
async def items(db, schema) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.items (id int PRIMARY KEY, version int NOT NULL);"
        f"INSERT INTO {schema}.items SELECT g, 0 FROM generate_series(1, 20) g"
    )
    return f"{schema}.items"


async def version(cache: AsyncClient, table: str, key: int, **options) -> int:
    row = await cache.get(table, key, **options)
    assert row is not None
    return row["version"]


@pytest.mark.parametrize("mode", ["full", "lazy"])
async def test_near_cache_hits_and_follows_changes(start_daemon, db, items, mode):
    sidecar = await start_daemon([f"{items}:{mode}"])
    async with AsyncClient(sidecar.target, near_cache={items: 100}) as cache:
        near = cache.near_cache
        await eventually(lambda: near.connected, what="near-cache stream up")
        assert await version(cache, items, 1) == 0  # miss: from the sidecar
        assert await version(cache, items, 1) == 0  # hit
        assert near.stats.hits == 1 and near.stats.fills == 1
        row = await cache.get(items, 1)
        row["version"] = 999  # callers get their own copy
        assert await version(cache, items, 1) == 0
        await db.execute(f"UPDATE {items} SET version = 5 WHERE id = 1")
        await eventually(lambda: version(cache, items, 1), what="near-cache followed")  # (non-zero)
        assert await version(cache, items, 1) == 5
        assert await cache.get(items, 999) is None and await cache.get(items, 999) is None  # "not found" too
        await db.execute(f"INSERT INTO {items} VALUES (999, 1)")
        await eventually(lambda: cache.get(items, 999), what="insert seen")
        assert await version(cache, items, 1, consistency="strong") == 5
        hits = near.stats.hits
        assert [r["version"] for r in await cache.batch_get(items, [1, 2, 999])] == [5, 0, 1]
        assert near.stats.hits > hits


async def test_strong_reads_bypass_the_near_cache(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target, near_cache=[items]) as cache:
        await eventually(lambda: cache.near_cache.connected)
        await cache.get(items, 3)
        await db.execute(f"UPDATE {items} SET version = 7 WHERE id = 3")
        assert await version(cache, items, 3, consistency="strong") == 7  # no waiting for the stream


async def test_no_stale_read_after_a_reset(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target, near_cache=[items]) as cache:
        near = cache.near_cache
        await eventually(lambda: near.connected)
        assert await version(cache, items, 4) == 0
        flushes = near.stats.flushes
        history = sidecar.history
        await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
        await db.execute(f"UPDATE {items} SET version = 8 WHERE id = 4")  # possibly never notified
        await eventually(lambda: sidecar.engine.ready and sidecar.history != history, what="rebuilt")
        await eventually(lambda: near.stats.flushes > flushes and near.connected, what="reset reached the client")
        assert await version(cache, items, 4) == 8


async def test_sidecar_restart(start_daemon, db, items):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = await start_daemon([items], listen=(f"127.0.0.1:{port}",))
    async with AsyncClient(f"127.0.0.1:{port}", near_cache=[items]) as cache:
        near = cache.near_cache
        await eventually(lambda: near.connected)
        assert await version(cache, items, 5) == 0
        await first.stop()
        await eventually(lambda: not near.connected, what="stream loss noticed")
        assert len(near) == 0  # flushed: nothing stale is served while deaf
        await db.execute(f"UPDATE {items} SET version = 3 WHERE id = 5")
        await start_daemon([items], listen=(f"127.0.0.1:{port}",))
        await eventually(lambda: near.connected, timeout=20, what="stream back (resynced)")
        assert await version(cache, items, 5) == 3
        await db.execute(f"UPDATE {items} SET version = 4 WHERE id = 5")
        await eventually(lambda: near.stats.batches > 0 and version(cache, items, 5), what="following again")
        await eventually(lambda: _is(cache, items, 5, 4), what="following again")


async def _is(cache: AsyncClient, table: str, key: int, expected: int) -> bool:
    return await version(cache, table, key) == expected


async def test_reads_never_go_backwards_under_concurrent_updates(start_daemon, postgres, items):
    """The blocking client, read from a thread while writers commit."""
    sidecar = await start_daemon([items])
    stop = threading.Event()
    backwards: list[str] = []
    reads = 0
    hits = 0

    def reader() -> None:
        nonlocal reads, hits
        with Client(sidecar.target, near_cache=[items]) as cache:
            last: dict[int, int] = {}
            while not stop.is_set():
                for key in (1, 2, 3):
                    seen = cache.get(items, key)["version"]
                    reads += 1
                    if seen < last.get(key, 0):
                        backwards.append(f"key {key}: {last[key]} then {seen}")
                    last[key] = max(seen, last.get(key, 0))
            hits = cache.near_cache.stats.hits  # (asserted below: an assert here would only warn)

    thread = threading.Thread(target=reader)
    thread.start()

    async def writer(key: int) -> None:
        conn = await asyncpg.connect(postgres.dsn)
        for _ in range(150):
            await conn.execute(f"UPDATE {items} SET version = version + 1 WHERE id = $1", key)
        await conn.close()

    await asyncio.gather(*(writer(k) for k in (1, 2, 3)))
    after = reads
    await eventually(lambda: reads > after + 30, what="more reads after the last write")
    stop.set()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert reads > 100 and backwards == [] and hits > 0


async def test_cached_decorator_clears_when_the_table_changes(start_daemon, postgres, db, items):
    sidecar = await start_daemon([items])
    pool = await asyncpg.create_pool(postgres.dsn, min_size=1, max_size=2)
    async with AsyncClient(sidecar.target) as cache:

        @cached(cache, tables=[items])
        async def total() -> int:
            return int(await pool.fetchval(f"SELECT sum(version) FROM {items}"))

        assert await total() == 0
        await eventually(lambda: total.cache_info().connected)
        await total()
        await db.execute(f"UPDATE {items} SET version = 10 WHERE id = 1")
        await eventually(lambda: _equals(total(), 10), what="recomputed after the change")
        assert total.cache_info().hits >= 1
    await pool.close()


@pytest.mark.parametrize("flavour", ["async", "blocking"])
async def test_cached_caches_from_the_first_call(start_daemon, items, monkeypatch, flavour):
    """The first call waits for the change stream (a bounded wait: raised here so that a
    slow machine cannot make the test flaky) instead of running uncached."""
    monkeypatch.setattr(decorators, "CONNECT_WAIT", 30.0)
    sidecar = await start_daemon([items])
    calls = 0
    if flavour == "async":
        async with AsyncClient(sidecar.target) as cache:

            @cached(cache, tables=[items])
            async def counted() -> int:
                nonlocal calls
                calls += 1
                return calls

            assert await counted() == 1 and await counted() == 1
            info = counted.cache_info()
    else:
        with Client(sidecar.target) as blocking:

            @cached(blocking, tables=[items])
            def counted_blocking() -> int:
                nonlocal calls
                calls += 1
                return calls

            assert await asyncio.to_thread(counted_blocking) == 1 and await asyncio.to_thread(counted_blocking) == 1
            info = counted_blocking.cache_info()
    assert (info.hits, info.misses, info.size) == (1, 1, 1)


async def _equals(awaitable, expected) -> bool:  # type: ignore[no-untyped-def]
    return await awaitable == expected


async def test_changes_iterator_for_event_driven_code(start_daemon, db, items):
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target) as cache:
        seen: list[Change] = []

        async def consume() -> None:
            async for change in cache.changes([items], operations=["insert"]):
                seen.append(change)

        consumer = asyncio.create_task(consume())
        await eventually(lambda: sidecar.core.fanout.subscribers == 1)
        await db.execute(f"UPDATE {items} SET version = 1 WHERE id = 1")  # not an insert
        await db.execute(f"INSERT INTO {items} VALUES (100, 0), (101, 0)")
        await eventually(lambda: len(seen) == 2, what="two inserts")
        consumer.cancel()
    assert sorted(c.key for c in seen) == [100, 101] and all(c.operation == "insert" for c in seen)
    assert seen[0].row is not None and seen[0].row["version"] == 0


async def test_a_key_in_another_form_than_events_use_never_goes_stale(start_daemon, db, items):
    """An int key asked for as "2" (the sidecar coerces it) must not be held under "2":
    the change stream names the row 2, and would never update or drop that entry."""
    sidecar = await start_daemon([items])
    async with AsyncClient(sidecar.target, near_cache=[items]) as cache:
        await eventually(lambda: cache.near_cache.connected)
        assert (await cache.get(items, "2"))["version"] == 0
        assert (await cache.get(items, 2))["version"] == 0
        await db.execute(f"UPDATE {items} SET version = 3 WHERE id = 2")
        await cache.sync()
        await eventually(lambda: version(cache, items, 2), what="the int form followed")
        assert (await cache.get(items, "2"))["version"] == 3  # not the held 0
        assert [r["version"] for r in await cache.batch_get(items, ["2", 2])] == [3, 3]


# Rows Python's json refuses: an integer of more than 4300 digits, nesting deeper than ~1000.
@pytest.fixture
async def odd_rows(db, schema) -> str:
    await db.execute(
        f"CREATE TABLE {schema}.docs (id int PRIMARY KEY, big numeric, doc jsonb, tag text);"
        f"INSERT INTO {schema}.docs VALUES (1, 1, NULL, 'fine'), (2, pg_catalog.repeat('9', 5000)::numeric, NULL, 'x'),"
        f"  (3, NULL, (pg_catalog.repeat('[', 3000) || pg_catalog.repeat(']', 3000))::jsonb, 'x')"
    )
    return f"{schema}.docs"


async def test_the_default_decoder_reads_any_integer_and_any_depth(start_daemon, odd_rows):
    sidecar = await start_daemon([odd_rows])
    async with AsyncClient(sidecar.target) as cache:
        assert (await cache.get(odd_rows, 2))["big"] == 10**5000 - 1
        doc, depth = (await cache.get(odd_rows, 3))["doc"], 0
        while doc:
            doc, depth = doc[0], depth + 1
        assert depth == 2999
        assert [r["id"] for r in await cache.batch_get(odd_rows, [1, 2, 3])] == [1, 2, 3]


def _picky(data: bytes) -> object:
    """A decoder that cannot read one kind of row (as a caller's own decoder may not)."""
    if b'"poison"' in data:
        raise ValueError("poisoned row")
    import json

    return json.loads(data)


async def test_an_undecodable_row_fails_its_read_not_the_client(start_daemon, db, odd_rows):
    sidecar = await start_daemon([odd_rows])
    async with AsyncClient(sidecar.target, decoder=_picky, near_cache=[odd_rows]) as cache:
        near = cache.near_cache
        await eventually(lambda: near.connected, what="near-cache stream up")
        await db.execute(f"UPDATE {odd_rows} SET tag = 'poison' WHERE id = 1")
        await cache.sync()
        with pytest.raises(UndecodableRow, match=f"{odd_rows}.*key 1.*poisoned row") as info:
            await cache.get(odd_rows, 1)
        assert info.value.key == 1 and info.value.table == odd_rows
        with pytest.raises(UndecodableRow):
            await cache.batch_get(odd_rows, [2, 1])
        await db.execute(f"UPDATE {odd_rows} SET tag = 'healed' WHERE id = 1")
        await eventually(lambda: near.position is not None, what="stream position")
        await cache.sync()

        async def healed() -> bool:
            return (await cache.get(odd_rows, 1))["tag"] == "healed"

        await eventually(healed, what="the row read again")
        # The failed reads released their fill tickets: the key is near-cached again.
        fills = near.stats.fills
        await eventually(lambda: _hit(cache, odd_rows, 1), what="key 1 near-cached")
        assert near.stats.fills >= fills


async def _hit(cache: AsyncClient, table: str, key: int) -> bool:
    hits = cache.near_cache.stats.hits
    await cache.get(table, key)
    return cache.near_cache.stats.hits > hits


async def test_an_undecodable_row_is_reported_in_watch_and_the_stream_goes_on(start_daemon, db, odd_rows):
    sidecar = await start_daemon([odd_rows])
    async with AsyncClient(sidecar.target, decoder=_picky) as cache:
        stream = cache.watch([odd_rows], start_revision=await cache.sync())
        await db.execute(f"UPDATE {odd_rows} SET tag = 'poison' WHERE id = 1")
        await cache.sync()  # (applied, so the next change is a batch of its own)
        await db.execute(f"UPDATE {odd_rows} SET tag = 'healed' WHERE id = 1")
        changes: list[Change] = []
        async with asyncio.timeout(30):
            async for event in stream:
                changes += getattr(event, "changes", [])
                if len(changes) >= 2:
                    break
        await stream.aclose()
    poisoned, healed = changes
    assert poisoned.undecodable and poisoned.row is None and poisoned.has_row and "poisoned row" in poisoned.error
    assert not healed.undecodable and healed.row["tag"] == "healed"

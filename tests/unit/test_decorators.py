"""@cached semantics with a scripted change stream: clear on change, operation
filter, debounce, single-flight, exceptions, cancellation, disconnects."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
from cache_sidecar_client import ChangeBatch, Reset, Revision, cached, decorators
from cache_sidecar_client.client import CONNECTED, DISCONNECTED
from cache_sidecar_client.watch import Change

from tests.support.waiting import eventually, quiescent, wait_until

T = "public.items"
_n = 0


def batch(op: str = "update", key: object = 1) -> ChangeBatch:
    global _n
    _n += 1
    return ChangeBatch(Revision("e", _n), _n, [Change(T, op, key, None, None, False)])


class FakeAsyncClient:
    """Stands in for AsyncClient: its change stream is whatever the test puts in."""

    def __init__(self, connected: bool = True) -> None:
        self._closed = False
        self.items: asyncio.Queue[object] = asyncio.Queue()
        if connected:
            self.items.put_nowait(CONNECTED)
        self.streaming = False

    async def _stream(self, request, resume):  # type: ignore[no-untyped-def]
        self.streaming = True
        while True:
            yield await self.items.get()

    async def send(self, item: object) -> None:
        await self.items.put(item)
        await quiescent()  # the follower took it, acted on it and waits for the next
        assert self.items.empty()


@pytest.fixture
async def client() -> FakeAsyncClient:
    return FakeAsyncClient()


async def test_results_are_cached_per_arguments_and_cleared_by_a_change(client):
    calls = []

    @cached(client, tables=[T])
    async def lookup(key: int) -> str:
        calls.append(key)
        return f"value {key} #{len(calls)}"

    assert await lookup(1) == "value 1 #1"  # it waited for the stream: cached
    assert await lookup(1) == "value 1 #1"
    assert await lookup(2) == "value 2 #2"
    await client.send(batch())
    assert await lookup(1) == "value 1 #3"
    info = lookup.cache_info()
    assert (info.hits, info.clears) == (1, 1)


async def test_the_first_calls_wait_for_the_stream_to_connect(monkeypatch):
    monkeypatch.setattr(decorators, "CONNECT_WAIT", 30.0)  # only the connection can end the wait
    client = FakeAsyncClient(connected=False)
    calls = 0

    @cached(client, tables=[T])
    async def value() -> int:
        nonlocal calls
        calls += 1
        return calls

    first = asyncio.create_task(value())
    await eventually(lambda: client.streaming)  # the call started the stream, then had its turn
    assert not first.done() and calls == 0
    await client.send(CONNECTED)
    assert await asyncio.wait_for(first, 5) == 1
    assert await value() == 1 and value.cache_info().hits == 1


async def test_the_wait_is_bounded_and_a_later_disconnect_costs_no_wait(monkeypatch):
    monkeypatch.setattr(decorators, "CONNECT_WAIT", 0.2)
    client = FakeAsyncClient(connected=False)
    calls = 0

    @cached(client, tables=[T])
    async def value() -> int:
        nonlocal calls
        calls += 1
        return calls

    started = time.monotonic()
    assert await asyncio.wait_for(value(), 5) == 1  # no stream: it gave up waiting, ran, did not store
    assert time.monotonic() - started >= 0.2 * 0.9 and value.cache_info().size == 0
    assert await asyncio.wait_for(value(), 5) == 2
    monkeypatch.setattr(decorators, "CONNECT_WAIT", 30.0)
    await client.send(CONNECTED)
    await eventually(lambda: value.cache_info().connected)
    assert await value() == 3 and await value() == 3
    await client.send(DISCONNECTED)
    assert await asyncio.wait_for(value(), 5) == 4  # once connected, never waits again


async def test_only_the_named_operations_clear_but_table_wide_changes_always_do(client):
    count = 0

    @cached(client, tables=[T], operations=["insert"])
    async def total() -> int:
        nonlocal count
        count += 1
        return count

    await total()
    await eventually(lambda: total.cache_info().connected)
    first = await total()
    await client.send(batch("update"))
    assert await total() == first
    await client.send(batch("insert"))
    second = await total()
    assert second > first
    await client.send(batch("truncate", key=None))
    assert await total() > second


async def test_debounce_clears_at_most_once_per_interval(client):
    count = 0

    @cached(client, tables=[T], debounce=0.2)
    async def value() -> int:
        nonlocal count
        count += 1
        return count

    await value()
    await eventually(lambda: value.cache_info().connected)
    await value()
    await client.send(batch())  # the first change clears at once
    await client.send(batch())  # the next ones wait for the end of the interval
    await client.send(batch())
    assert value.cache_info().clears == 1
    await eventually(lambda: value.cache_info().clears == 2, timeout=2)


async def test_concurrent_misses_share_one_computation(client):
    started = 0
    release = asyncio.Event()
    release.set()

    @cached(client, tables=[T])
    async def slow(key: int) -> int:
        nonlocal started
        started += 1
        await release.wait()
        return key * 10

    await slow(0)  # starts following the changes
    await eventually(lambda: slow.cache_info().connected)
    release.clear()
    started = 0
    callers = [asyncio.create_task(slow(7)) for _ in range(10)]
    await quiescent()  # all ten are in before the computation can end
    release.set()
    assert await asyncio.gather(*callers) == [70] * 10
    assert started == 1


async def test_exceptions_are_not_cached(client):
    attempts = 0

    @cached(client, tables=[T])
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError(f"attempt {attempts}")
        return "ok"

    with pytest.raises(RuntimeError):
        await flaky()  # starts following the changes
    await eventually(lambda: flaky.cache_info().connected)
    for _ in range(5):
        try:
            result = await flaky()
        except RuntimeError:
            continue
        break
    assert result == "ok" and await flaky() == "ok"
    assert attempts == 3


async def test_a_cancelled_first_caller_does_not_leave_the_others_hanging(client):
    release = asyncio.Event()
    runs = 0

    @cached(client, tables=[T])
    async def slow() -> str:
        nonlocal runs
        runs += 1
        await release.wait()
        return "done"

    release.set()
    await slow()  # starts following the changes
    await eventually(lambda: slow.cache_info().connected)
    slow.cache_clear()
    release.clear()
    runs = 0
    first = asyncio.create_task(slow())
    await quiescent()  # the first computes
    second = asyncio.create_task(slow())
    await quiescent()  # the second waits for the first's computation
    first.cancel()
    release.set()
    assert await asyncio.wait_for(second, 2) == "done"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert runs == 1 and await slow() == "done" and runs == 1  # and its result was kept


async def test_a_computation_overtaken_by_a_change_is_not_stored(client):
    release = asyncio.Event()
    count = 0

    @cached(client, tables=[T])
    async def value() -> int:
        nonlocal count
        count += 1
        await release.wait()
        return count

    release.set()
    await value()
    await eventually(lambda: value.cache_info().connected)
    value.cache_clear()  # (else the next call is a hit and computes nothing)
    release.clear()
    pending = asyncio.create_task(value())
    await quiescent()  # it computes
    assert count == 2
    await client.send(batch())  # the table changes while it computes
    release.set()
    assert await pending == 2
    assert value.cache_info().size == 0


async def test_disconnect_and_reset_empty_the_cache_and_stop_caching(client):
    count = 0

    @cached(client, tables=[T])
    async def value() -> int:
        nonlocal count
        count += 1
        return count

    await value()
    await eventually(lambda: value.cache_info().connected)
    await value()
    await client.send(Reset(None, "resync"))
    assert value.cache_info().size == 0
    await value()
    await client.send(DISCONNECTED)
    before = count
    await value()
    await value()
    assert count == before + 2  # not cached while deaf
    await client.send(CONNECTED)
    await value()
    await value()
    assert count == before + 3


class FakeSyncClient:
    def __init__(self, connected: bool = True) -> None:
        self._closed = threading.Event()
        self.items: queue.Queue[object] = queue.Queue()
        if connected:
            self.items.put(CONNECTED)

    def _stream(self, request, resume):  # type: ignore[no-untyped-def]
        while not self._closed.is_set():
            try:
                yield self.items.get(timeout=0.05)
            except queue.Empty:
                continue


class CountedEvent(threading.Event):
    """A flight's ``done`` that counts the callers waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self._count = threading.Lock()

    def wait(self, timeout: float | None = None) -> bool:
        with self._count:
            self.waiting += 1
        return super().wait(timeout)


class CountedFlight(decorators._Flight):
    made: list[CountedFlight] = []

    def __init__(self) -> None:
        super().__init__()
        self.done = CountedEvent()
        CountedFlight.made.append(self)


def test_blocking_functions_single_flight_and_clear(monkeypatch):
    monkeypatch.setattr(decorators, "_Flight", CountedFlight)
    CountedFlight.made.clear()
    client = FakeSyncClient()
    calls = 0
    gate = threading.Event()

    @cached(client, tables=[T])
    def value(key: int) -> int:
        nonlocal calls
        calls += 1
        gate.wait(30)  # (a bound: the test fails instead of hanging)
        return key + calls

    try:
        gate.set()
        value(0)
        wait_until(lambda: value.cache_info().connected, what="the stream connected")
        gate.clear()
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(value(5))) for _ in range(8)]
        for thread in threads:
            thread.start()
        # One computes (held by the gate), the seven others wait for its flight.
        wait_until(lambda: calls == 2 and CountedFlight.made[-1].done.waiting == 7, what="eight callers met")
        gate.set()
        for thread in threads:
            thread.join(5)
        assert len(set(results)) == 1 and len(results) == 8 and calls == 2
        client.items.put(batch())
        wait_until(lambda: value.cache_info().clears > 0, what="the change cleared the cache")
        assert value(5) != results[0]
    finally:
        client._closed.set()


def test_blocking_first_calls_wait_for_the_stream_to_connect(monkeypatch):
    monkeypatch.setattr(decorators, "CONNECT_WAIT", 30.0)
    client = FakeSyncClient(connected=False)
    calls = 0

    @cached(client, tables=[T])
    def value() -> int:
        nonlocal calls
        calls += 1
        return calls

    try:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(value()))
        first.start()
        first.join(0.05)  # not a condition that can come true: long enough to see it does not return
        assert first.is_alive() and calls == 0
        client.items.put(CONNECTED)
        first.join(5)
        assert results == [1] and value() == 1 and value.cache_info().hits == 1
    finally:
        client._closed.set()

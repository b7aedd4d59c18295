"""``@cached``: cache a function's results until a table it reads changes.

    @cached(client, tables=["public.patron", "public.dish"])
    def favourite_dishes(patron_id: int) -> list[str]: ...

    @cached(async_client, tables=["public.prices"], operations=["update"], debounce=0.5)
    async def price_list(region: str) -> dict: ...

Results are kept per arguments (LRU, ``maxsize``) and all dropped when any
named table changes (only for the named ``operations``, if given; at most
once per ``debounce`` seconds, if given: results may then be up to that
stale). Concurrent calls with the same arguments share one computation;
exceptions are not cached; a caller that is cancelled (asyncio) does not
cancel the computation the others wait for. A computation that started
before a change is never stored after it.

Results are cached only while the change stream is connected (without it a
change could go unnoticed): the first call starts the stream, and the calls of
its first ``CONNECT_WAIT`` seconds (1 s) wait for it to connect, so a program's
first calls are cached too. Should it not connect by then, or drop later, calls
run the function, uncached and without waiting, until it is back.

``wrapper.cache_info()`` gives hits, misses and size; ``wrapper.cache_clear()``
empties it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cache_sidecar_client.watch import OPERATIONS, ChangeBatch, Reset
from cache_sidecar_client.watch import request as watch_request

# How long calls wait for a new stream to connect, counted from the first call: a
# bound, since the sidecar may be down. A plain variable so that tests can change it.
CONNECT_WAIT = 1.0


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    clears: int
    connected: bool


class _Policy:
    """What every decorated function shares: the result store and when to clear it."""

    def __init__(self, operations: Iterable[str] | None, debounce: float | None, maxsize: int) -> None:
        self.operations = frozenset(operations) if operations else None
        if self.operations and not self.operations <= OPERATIONS.keys():
            raise ValueError(f"unknown operations {sorted(self.operations - OPERATIONS.keys())}")
        self.debounce = debounce
        self.maxsize = maxsize
        self.results: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.generation = 0
        self.connected = False
        self.ever_connected = False
        self.connect_deadline = 0.0  # set when the stream starts
        self.hits = self.misses = self.clears = 0
        self.last_clear = 0.0
        self.clear_pending = False

    def start(self) -> None:
        self.connect_deadline = time.monotonic() + CONNECT_WAIT

    def mark_connected(self) -> None:
        self.connected = self.ever_connected = True

    def connect_wait(self) -> float:
        """How long a call should wait for the stream (only ever before it first connects)."""
        if self.ever_connected:
            return 0.0
        return max(0.0, self.connect_deadline - time.monotonic())

    def relevant(self, batch: ChangeBatch) -> bool:
        ops = self.operations
        return ops is None or any(c.operation in ops or c.key is None for c in batch.changes)

    def clear(self) -> None:
        self.results.clear()
        self.generation += 1
        self.clears += 1
        self.last_clear = time.monotonic()
        self.clear_pending = False

    def debounce_delay(self) -> float:
        """0: clear now; > 0: clear that much later (once)."""
        if not self.debounce:
            return 0.0
        return max(0.0, self.last_clear + self.debounce - time.monotonic())

    def store(self, key: Hashable, generation: int, value: Any) -> None:
        if generation != self.generation or not self.connected:
            return  # a change (or a disconnect) overtook this computation
        self.results[key] = value
        self.results.move_to_end(key)
        while len(self.results) > self.maxsize:
            self.results.popitem(last=False)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self.results), self.clears, self.connected)


def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    key = (args, tuple(sorted(kwargs.items()))) if kwargs else args
    try:
        hash(key)
    except TypeError:
        return None  # unhashable arguments: call through, uncached
    return key


def cached(
    client: Any,
    tables: Sequence[str],
    *,
    operations: Iterable[str] | None = None,
    debounce: float | None = None,
    maxsize: int = 1024,
) -> Callable[[Callable[..., Any]], Any]:
    """Cache a function's results until one of ``tables`` changes (see the module doc).

    Only while the change stream is connected: the calls of its first ``CONNECT_WAIT``
    seconds wait for it, later ones run uncached while it is down."""
    if not tables:
        raise ValueError("name at least one table whose changes clear the cache")

    def decorate(function: Callable[..., Any]) -> Any:
        policy = _Policy(operations, debounce, maxsize)
        if inspect.iscoroutinefunction(function):
            return _async_wrapper(client, list(tables), function, policy)
        return _sync_wrapper(client, list(tables), function, policy)

    return decorate


# ---------------------------------------------------------------- blocking


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


def _sync_wrapper(client: Any, tables: list[str], function: Callable[..., Any], policy: _Policy) -> Any:
    lock = threading.Lock()
    flights: dict[Hashable, _Flight] = {}
    started = threading.Event()
    connected = threading.Event()

    def on_change() -> None:
        with lock:
            delay = policy.debounce_delay()
            if delay == 0:
                policy.clear()
            elif not policy.clear_pending:
                policy.clear_pending = True
                timer = threading.Timer(delay, lambda: _locked(lock, policy.clear))
                timer.daemon = True
                timer.start()

    def follow() -> None:
        request = watch_request(tables, None, None, None, False, None)
        while not client._closed.is_set():
            try:
                for item in client._stream(request, resume=True):
                    _apply(item, policy, lock, on_change)
                    if policy.ever_connected:
                        connected.set()
            except Exception:
                _locked(lock, lambda: _disconnect(policy))
                client._closed.wait(1.0)

    def ensure_following() -> None:
        if not started.is_set():
            with lock:
                if started.is_set():
                    return
                started.set()
                policy.start()
            threading.Thread(target=follow, name=f"cached {function.__qualname__}", daemon=True).start()

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ensure_following()
        wait = _locked(lock, policy.connect_wait)
        if wait:
            connected.wait(wait)
        key = _key(args, kwargs)
        with lock:
            if key is None or not policy.connected:
                policy.misses += 1
                leader, flight = False, None
            elif key in policy.results:
                policy.hits += 1
                policy.results.move_to_end(key)
                return policy.results[key]
            elif key in flights:
                leader, flight = False, flights[key]
            else:
                policy.misses += 1
                leader, flight = True, _Flight()
                flights[key] = flight
                generation = policy.generation
        if flight is None:
            return function(*args, **kwargs)
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            value = function(*args, **kwargs)
        except BaseException as error:
            flight.error = error
            raise
        else:
            flight.value = value
            with lock:
                policy.store(key, generation, value)
            return value
        finally:
            with lock:
                flights.pop(key, None)
            flight.done.set()

    wrapper.cache_info = lambda: _locked(lock, policy.info)  # type: ignore[attr-defined]
    wrapper.cache_clear = lambda: _locked(lock, policy.clear)  # type: ignore[attr-defined]
    return wrapper


def _locked(lock: threading.Lock, action: Callable[[], Any]) -> Any:
    with lock:
        return action()


def _apply(item: Any, policy: _Policy, lock: threading.Lock, on_change: Callable[[], None]) -> None:
    from cache_sidecar_client.client import CONNECTED, DISCONNECTED

    if item is CONNECTED:
        with lock:
            policy.mark_connected()
    elif item is DISCONNECTED or isinstance(item, Reset):
        with lock:
            _disconnect(policy) if item is DISCONNECTED else policy.clear()
    elif isinstance(item, ChangeBatch) and policy.relevant(item):
        on_change()


def _disconnect(policy: _Policy) -> None:
    policy.connected = False
    policy.clear()


# ---------------------------------------------------------------- asyncio


def _async_wrapper(client: Any, tables: list[str], function: Callable[..., Any], policy: _Policy) -> Any:
    flights: dict[Hashable, asyncio.Future[Any]] = {}
    follower: list[asyncio.Task[None]] = []
    tasks: set[asyncio.Task[Any]] = set()
    connected = asyncio.Event()

    def on_change() -> None:
        delay = policy.debounce_delay()
        if delay == 0:
            policy.clear()
        elif not policy.clear_pending:
            policy.clear_pending = True
            asyncio.get_running_loop().call_later(delay, policy.clear)

    async def follow() -> None:
        from cache_sidecar_client.client import CONNECTED, DISCONNECTED

        request = watch_request(tables, None, None, None, False, None)
        while not client._closed:
            try:
                async for item in client._stream(request, resume=True):
                    if item is CONNECTED:
                        policy.mark_connected()
                        connected.set()
                    elif item is DISCONNECTED:
                        _disconnect(policy)
                    elif isinstance(item, Reset):
                        policy.clear()
                    elif isinstance(item, ChangeBatch) and policy.relevant(item):
                        on_change()
            except asyncio.CancelledError:
                raise
            except Exception:
                _disconnect(policy)
                await asyncio.sleep(1.0)

    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not follower:
            policy.start()
            follower.append(asyncio.get_running_loop().create_task(follow(), name=f"cached {function.__qualname__}"))
        wait = policy.connect_wait()
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(connected.wait(), wait)
        key = _key(args, kwargs)
        if key is None or not policy.connected:
            policy.misses += 1
            return await function(*args, **kwargs)
        if key in policy.results:
            policy.hits += 1
            policy.results.move_to_end(key)
            return policy.results[key]
        flight = flights.get(key)
        if flight is None:
            policy.misses += 1
            flight = asyncio.get_running_loop().create_future()
            flights[key] = flight
            generation = policy.generation
            # The computation runs on its own: cancelling any caller (even the
            # first) leaves it to finish for the others.
            task = asyncio.get_running_loop().create_task(function(*args, **kwargs))
            tasks.add(task)
            task.add_done_callback(lambda done: _settle(done, key, generation, flight, flights, policy, tasks))
        return await asyncio.shield(flight)

    wrapper.cache_info = policy.info  # type: ignore[attr-defined]
    wrapper.cache_clear = policy.clear  # type: ignore[attr-defined]
    return wrapper


def _settle(
    task: asyncio.Task[Any],
    key: Hashable,
    generation: int,
    flight: asyncio.Future[Any],
    flights: dict[Hashable, asyncio.Future[Any]],
    policy: _Policy,
    tasks: set[asyncio.Task[Any]],
) -> None:
    tasks.discard(task)
    if flights.get(key) is flight:
        del flights[key]
    if task.cancelled():
        flight.cancel()
        return
    error = task.exception()
    if error is not None:
        flight.set_exception(error)
        flight.exception()  # retrieved: callers may all have gone
        return
    policy.store(key, generation, task.result())
    flight.set_result(task.result())

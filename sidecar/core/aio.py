"""Small asyncio helpers the core shares: supervised short-lived tasks,
single-flight fetches, and waiters released when a level is reached."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """``event.wait()`` for at most ``timeout`` seconds; whether it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just
    as its timeout fires (it returns the finished wait instead), and a loop built on it
    then outlives its task's cancellation: a shutdown waits for it for ever.
    ``asyncio.timeout`` tells the two apart."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class TaskSet:
    """Keeps references to short-lived tasks (asyncio holds only weak ones)
    and logs any that fail."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name} {what}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Waiters:
    """Futures waiting for a level (a batch number) to be reached."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self, level: int) -> None:
        """Return once ``release`` reached ``level`` (or raise what ``fail`` was given)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((level, future))
        await future

    def release(self, level: int) -> None:
        """Wake the waiters whose level is reached."""
        rest = []
        for needed, future in self._waiting:
            if future.done():
                continue
            if needed <= level:
                future.set_result(None)
            else:
                rest.append((needed, future))
        self._waiting = rest

    def release_all(self) -> None:
        """Wake every waiter, whatever it waited for (there is nothing to wait for any more)."""
        for _, future in self._waiting:
            if not future.done():
                future.set_result(None)
        self._waiting = []

    def fail(self, error: BaseException) -> None:
        """Raise ``error`` in every waiter."""
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(error)
        self._waiting = []


class Flights(Generic[K, V]):
    """Single-flight fetches: concurrent misses for one key share one query.

    ``join`` returns a future per key and the keys nobody is fetching yet,
    which the caller must fetch and then ``land`` (or ``fail``). ``detach``
    forgets a key's flight so later readers start a new one (the old flight
    still answers the readers that joined it).
    """

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V | None]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, keys: Iterable[K]) -> tuple[dict[K, asyncio.Future[V | None]], list[K]]:
        loop = asyncio.get_running_loop()
        futures: dict[K, asyncio.Future[V | None]] = {}
        new: list[K] = []
        for key in keys:
            if key in futures:
                continue
            future = self._flights.get(key)
            if future is None:
                future = loop.create_future()
                future.add_done_callback(_retrieve)
                self._flights[key] = future
                new.append(key)
            futures[key] = future
        return futures, new

    def owns(self, key: K, future: asyncio.Future[V | None]) -> bool:
        return self._flights.get(key) is future

    def land(self, futures: dict[K, asyncio.Future[V | None]], keys: Iterable[K], rows: dict[K, V]) -> None:
        for key in keys:
            future = futures[key]
            if self._flights.get(key) is future:
                del self._flights[key]
            if not future.done():
                future.set_result(rows.get(key))

    def fail(self, futures: dict[K, asyncio.Future[V | None]], keys: Iterable[K], exc: BaseException) -> None:
        for key in keys:
            future = futures[key]
            if self._flights.get(key) is future:
                del self._flights[key]
            if not future.done():
                future.set_exception(exc)

    def seal(self, futures: dict[K, asyncio.Future[V | None]], keys: Iterable[K]) -> None:
        """The query for these flights is being sent: later readers must not join them."""
        for key in keys:
            if self._flights.get(key) is futures[key]:
                del self._flights[key]

    def detach(self, key: K) -> bool:
        return self._flights.pop(key, None) is not None

    def detach_all(self) -> None:
        self._flights.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # an error nobody awaited is not "never retrieved"


async def await_all(futures: Sequence[asyncio.Future[V]]) -> list[V]:
    """Await shared futures without letting one reader's cancellation cancel them."""
    return [await asyncio.shield(f) if not f.done() else f.result() for f in futures]


def backoff_delay(attempt: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): doubling, capped, half jittered."""
    ceiling = min(high, low * float(1 << min(attempt, 30)))
    return ceiling / 2 + rand() * ceiling / 2

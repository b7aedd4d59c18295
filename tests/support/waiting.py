"""Waiting on conditions with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


class _Poll:
    """One wait's bookkeeping: the last value seen, and the deadline."""

    def __init__(self, timeout: float, what: str) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout, self.what = timeout, what
        self.last: Any = None

    def reached(self, value: Any) -> bool:
        self.last = value
        if value and not isinstance(value, AssertionError):
            return True
        if time.monotonic() > self.deadline:
            raise AssertionError(f"{self.what} not reached within {self.timeout}s (last: {self.last!r})")
        return False


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> Any:
    """``eventually`` for blocking code (the e2e tier drives processes from plain threads)."""
    poll = _Poll(timeout, what)
    while True:
        try:
            value = check()
        except AssertionError as exc:
            value = exc
        if poll.reached(value):
            return value
        time.sleep(interval)


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    poll = _Poll(timeout, what)
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except AssertionError as exc:
            value = exc
        if poll.reached(value):
            return value
        await asyncio.sleep(interval)


async def quiescent(limit: int = 10_000) -> None:
    """Return once no task or callback is ready to run: everything the test set in motion
    went as far as it can (each waits on something: a gate, a timer, a socket). asyncio's
    counterpart of trio's ``wait_all_tasks_blocked``; what a test asserts *not* to happen
    is then shown not to happen, however many loop iterations it would have taken."""
    loop = asyncio.get_running_loop()
    for _ in range(limit):
        await asyncio.sleep(0)
        if not loop._ready:  # type: ignore[attr-defined]  # (CPython's queue of ready callbacks)
            return
    ready = list(loop._ready)[:3]  # type: ignore[attr-defined]
    raise AssertionError(f"the event loop never went idle in {limit} iterations (a busy loop?); ready: {ready}")

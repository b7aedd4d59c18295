"""sidecar.core.aio's waits."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.aio import wait_set
from tests.support.waiting import quiescent


async def test_wait_set_says_whether_the_event_was_set():
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 10) is True


async def test_a_cancel_that_meets_the_event_ends_the_loop_waiting_on_it():
    """The daemon's loops (catalog checks, health, the listener's pings) wait on an event
    with a timeout and go round again; a cancellation (shutdown) that arrives in the loop
    iteration the event is set must end them, not be swallowed (asyncio.wait_for on
    Python 3.11 returned the finished wait instead, and a shutdown then hung)."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            await wait_set(event, 3600)
            event.clear()
            rounds += 1

    task = asyncio.create_task(loop())
    await quiescent()  # (it waits on the event)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    assert rounds == 0

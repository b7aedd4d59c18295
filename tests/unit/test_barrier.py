"""The read barrier alone, with a fake NOTIFY: rounds are shared, one token is in flight at
a time, a caller that arrives after a NOTIFY was sent waits for the next round, and
failures reach every waiter."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.barrier import Barrier
from sidecar.errors import Unavailable
from tests.support.waiting import eventually


class Channel:
    """Tokens sent and not yet delivered; ``deliver`` plays the LISTEN side."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.barrier: Barrier | None = None
        self.applied = 0

    async def send(self, token: str) -> None:
        self.sent.append(token)

    def deliver(self, seq: int) -> None:
        assert self.barrier is not None
        token = self.sent.pop(0)
        assert self.barrier.token_received(token, seq)
        self.barrier.applied(self.applied)


@pytest.fixture
def channel() -> Channel:
    channel = Channel()
    channel.barrier = Barrier(channel.send, timeout=5)
    return channel


async def test_concurrent_callers_share_one_round(channel: Channel):
    barrier = channel.barrier
    assert barrier is not None
    waiters = [asyncio.create_task(barrier.wait()) for _ in range(10)]
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=0)
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert barrier.rounds == 1


async def test_a_caller_after_the_notify_was_sent_waits_for_the_next_round(channel: Channel):
    barrier = channel.barrier
    assert barrier is not None
    first = asyncio.create_task(barrier.wait())
    await eventually(lambda: len(channel.sent) == 1)  # round 1's NOTIFY is out
    late = asyncio.create_task(barrier.wait())  # may predate nothing that round 1 proves
    await eventually(lambda: barrier._next is not None, what="the late caller gathered on round 2")
    assert len(channel.sent) == 1  # at most one token in flight
    channel.deliver(seq=0)
    await asyncio.wait_for(first, 5)
    assert not late.done()
    await eventually(lambda: len(channel.sent) == 1)  # round 2, sent once round 1 landed
    channel.deliver(seq=0)
    await asyncio.wait_for(late, 5)
    assert barrier.rounds == 2


async def test_a_round_waits_until_what_arrived_before_its_token_is_applied(channel: Channel):
    barrier = channel.barrier
    assert barrier is not None
    waiter = asyncio.create_task(barrier.wait())
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=7)  # batches up to 7 were received before the token; 0 applied
    assert barrier._current is not None and not barrier._current.done.done()
    barrier.applied(7)
    await asyncio.wait_for(waiter, 5)


async def test_tokens_not_ours_and_listener_loss(channel: Channel):
    barrier = channel.barrier
    assert barrier is not None
    assert not barrier.token_received("never sent", 0)
    waiter = asyncio.create_task(barrier.wait())
    await eventually(lambda: len(channel.sent) == 1)
    barrier.fail_all("listener down")
    with pytest.raises(Unavailable, match="listener down"):
        await asyncio.wait_for(waiter, 5)
    await barrier.close()

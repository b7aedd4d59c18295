"""The read barrier alone, with a fake NOTIFY: rounds are shared, one token is in flight at
a time, a caller that arrives after a NOTIFY was sent waits for the next round, and
failures reach every waiter. A round's check (the catalog's) runs once per round, after
its callers joined, and the round covers the batch it asks for."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.assembly import direct
from sidecar.core.barrier import Barrier
from sidecar.errors import Unavailable
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually
from tests.unit.test_reload_reads import HeldLoads


class Channel:
    """Tokens sent and not yet delivered; ``deliver`` plays the LISTEN side."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.tokens_sent = 0
        self.barrier: Barrier | None = None
        self.applied = 0

    async def send(self, token: str) -> None:
        self.tokens_sent += 1
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


async def test_the_next_round_goes_once_the_token_is_back_not_once_applied(channel: Channel):
    barrier = channel.barrier
    assert barrier is not None
    first = asyncio.create_task(barrier.wait())
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=5)  # received; nothing applied (a reload holds batch 5, say)
    await eventually(lambda: barrier.landing == 1)
    second = asyncio.create_task(barrier.wait(applied=False))  # a STRONG read of another table
    await eventually(lambda: len(channel.sent) == 1, what="round 2 sent while round 1 waits to be applied")
    channel.deliver(seq=6)
    assert await asyncio.wait_for(second, 5) == 6
    assert not first.done()
    barrier.applied(6)
    await asyncio.wait_for(first, 5)
    assert barrier.landing == 0


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


# ---------------------------------------------------------------- a check in each round (the catalog's)


class Check:
    """A round's check: counts its calls, notes whether the round's NOTIFY was out when it
    began, and returns ``batch`` once ``gate`` is open (or raises ``error``)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.calls = 0
        self.began_after: list[int] = []  # tokens sent when each call began
        self.batch = 0
        self.error: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> int:
        self.calls += 1
        self.began_after.append(self.channel.tokens_sent)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.batch


@pytest.fixture
def checked(channel: Channel) -> tuple[Channel, Check]:
    check = Check(channel)
    channel.barrier = Barrier(channel.send, timeout=5, check=check)
    return channel, check


async def test_concurrent_callers_share_one_check(checked):
    channel, check = checked
    barrier = channel.barrier
    waiters = [asyncio.create_task(barrier.wait()) for _ in range(10)]
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=0)
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert (barrier.rounds, check.calls) == (1, 1)


async def test_a_late_caller_gets_a_check_that_began_after_it_joined(checked):
    channel, check = checked
    barrier = channel.barrier
    check.gate.clear()
    first = asyncio.create_task(barrier.wait())
    await eventually(lambda: check.calls == 1)
    late = asyncio.create_task(barrier.wait())  # round 1's check may have read the catalog already
    await eventually(lambda: barrier._next is not None)
    check.gate.set()
    channel.deliver(seq=0)
    await asyncio.wait_for(first, 5)
    await eventually(lambda: check.calls == 2)
    assert check.began_after == [1, 2]  # each began once its round's NOTIFY was out: its callers were all in
    channel.deliver(seq=0)
    await asyncio.wait_for(late, 5)


async def test_a_round_is_received_only_once_its_check_is_done(checked):
    channel, check = checked
    barrier = channel.barrier
    check.gate.clear()
    received = asyncio.create_task(barrier.wait(applied=False))
    await eventually(lambda: len(channel.sent) == 1 and check.calls == 1)
    channel.deliver(seq=4)  # the token is back, every earlier commit received ...
    assert barrier._current is not None and not barrier._current.received.done()  # ... but not the DDL
    check.gate.set()
    assert await asyncio.wait_for(received, 5) == 4


async def test_a_round_covers_the_batch_its_check_asks_for(checked):
    channel, check = checked
    barrier = channel.barrier
    check.batch = 9  # (the reload a schema change started)
    done = asyncio.create_task(barrier.wait())
    received = asyncio.create_task(barrier.wait(applied=False))
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=3)  # the token came back at batch 3
    assert await asyncio.wait_for(received, 5) == 9  # a STRONG read then waits for its table to reach 9
    channel.applied = 8
    barrier.applied(8)
    assert not done.done()
    barrier.applied(9)
    await asyncio.wait_for(done, 5)


async def test_a_failing_check_fails_its_round_and_the_next_round_works(checked):
    channel, check = checked
    barrier = channel.barrier
    check.error = OSError("connection reset")
    waiter = asyncio.create_task(barrier.wait())
    with pytest.raises(Unavailable, match="connection reset"):
        await asyncio.wait_for(waiter, 5)
    channel.sent.clear()  # (its token, no longer awaited)
    check.error = None
    waiter = asyncio.create_task(barrier.wait())
    await eventually(lambda: len(channel.sent) == 1)
    channel.deliver(seq=0)
    await asyncio.wait_for(waiter, 5)
    await barrier.close()


async def test_through_the_engine_a_reload_the_check_started_is_covered():
    table = "public.items"
    db = MemoryDatabase(int_key_schema(table))
    db.put(table, (1,), name="old")
    source = MemoryChangeSource(db)
    core = direct(source.database, list(db.schemas.values()))
    changed: list[str] = []  # tables the next check finds changed in the catalog
    reloads: list[int] = []  # the batches of the reloads it started
    go = asyncio.Event()  # the check's query answers
    go.set()

    async def check_catalog() -> None:
        await go.wait()
        while changed:
            core.notices.reload_table(changed.pop(), "changed in the catalog")
            reloads.append(core.revisions.seq)

    core.notices.attach(source, check_catalog=check_catalog)
    following = asyncio.create_task(source.follow(core.notices))
    try:
        await eventually(lambda: core.engine.ready)
        loads = HeldLoads(db, only=table)
        loads.gate.clear()
        db.put(table, (1,), name="new")  # (a rewrite: no notification)
        changed.append(table)
        go.clear()
        tokens = source.tokens
        receiving = asyncio.create_task(core.trust.barrier.wait(applied=False))
        strong = asyncio.create_task(core.engine.prepare_read(True, None, core.tables[table]))  # (same round)
        await eventually(lambda: source.tokens > tokens)
        go.set()  # (the token, already on its way, comes back first: the check acts later)
        received = await asyncio.wait_for(receiving, 5)
        assert received >= reloads[0]  # what reads of the table must reflect
        await eventually(lambda: loads.waiting == 1, what="the reload reads")
        # The STRONG read is answered without waiting for the reload, by PostgreSQL (newer than
        # the change), as during any reload ...
        await asyncio.wait_for(strong, 5)
        assert b'"new"' in (await core.engine.get(table, [1]) or b"")
        sync = asyncio.create_task(core.engine.sync())
        loads.gate.set()
        revision = await asyncio.wait_for(sync, 5)
        assert revision.number >= reloads[0]  # ... and Sync's revision covers the reload (watchers had TABLE_CHANGED)
        await core.engine.prepare_read(True, None, core.tables[table])
        assert b'"new"' in (await core.engine.get(table, [1]) or b"")
    finally:
        following.cancel()
        await core.close()

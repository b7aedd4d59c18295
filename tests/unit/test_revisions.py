"""Revision bookkeeping alone: batches of one transaction share a number until the loop
iteration ends, tables push their low-water marks, and applied never passes the lowest."""

from __future__ import annotations

from sidecar.core.revisions import Revisions
from tests.support.waiting import eventually


def revisions() -> tuple[Revisions, list[int]]:
    told: list[int] = []
    revisions = Revisions()
    revisions.on_applied(told.append)
    return revisions, told


async def test_one_transaction_one_batch_until_the_iteration_ends():
    revs, _ = revisions()
    first = revs.batch_for(7)
    assert revs.batch_for(7) == first and revs.batch_for(8) == first + 1
    assert revs.batch_open
    await eventually(lambda: not revs.batch_open)
    assert revs.batch_for(8) == first + 2  # (a later iteration: a batch of its own)


async def test_applied_follows_the_lowest_pushed_mark():
    revs, told = revisions()
    a, b = revs.own_batch(), revs.own_batch()
    revs.low_water("t1", a)
    revs.low_water("t2", b)
    revs.advance()
    assert revs.applied == a - 1 and told[-1] == a - 1
    revs.low_water("t1", None)  # t1 applied all it had
    assert revs.applied == b - 1
    revs.low_water("t2", None)
    assert revs.applied == b and revs.stalled_seconds(True) == 0


async def test_waiters_and_epochs():
    revs, _ = revisions()
    epoch = revs.epoch
    assert revs.knows(epoch) == "current" and revs.knows("other") == "unknown"
    revs.begin_epoch(rebuild=True)
    assert revs.knows(epoch) == "past" and revs.epoch != epoch
    assert revs.knows(Revisions().epoch) == "unknown"  # another process's first run
    target = revs.own_batch()
    revs.low_water("t", target)
    revs.advance()
    assert revs.stalled_seconds(True) > 0  # a batch waits
    revs.release_all()  # (nothing to wait for: returns at once)
    await revs.wait(0)

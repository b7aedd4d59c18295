"""Epochs of a database's history (logical capture): every sidecar decoding the same
database numbers the same commit alike, in the same epoch. A hub's own reconnect keeps
the epoch but starts its Watch history again (watchers reset, older resumes refused);
a resume or a ``min_revision`` ahead of this sidecar waits (another hub was ahead),
never answers anything older."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.assembly import Direct, direct
from sidecar.core.events import Op, RowChange, SyncToken
from sidecar.core.fanout import Batch, Filter, OutOfRange, Reset
from sidecar.core.revisions import Revisions, history_epoch, shared_history
from sidecar.errors import Unavailable
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

FULL = "public.items"
SYSTEM = "7301234567890123456"
E = history_epoch(SYSTEM, "app", 1)


# ------------------------------------------------------------------ the epoch


def test_the_same_database_and_timeline_give_the_same_epoch_everywhere():
    assert history_epoch(SYSTEM, "app", 1) == E  # (no process of its own in it)
    assert shared_history(E) and not shared_history(Revisions().epoch)
    assert history_epoch(SYSTEM, "other", 1) != E  # another database of the cluster
    assert history_epoch("7301234567890123457", "app", 1) != E  # another cluster
    later = history_epoch(SYSTEM, "app", 2)  # a promotion, a restore
    assert later.split(".")[0] == E.split(".")[0] and later != E


def test_an_earlier_timeline_is_past_and_a_process_epoch_unknown():
    revisions = Revisions()
    revisions.begin_epoch(False, at=100, epoch=history_epoch(SYSTEM, "app", 2))
    assert revisions.knows(history_epoch(SYSTEM, "app", 2)) == "current"
    assert revisions.knows(E) == "past"
    assert revisions.knows(history_epoch(SYSTEM, "app", 3)) == "unknown"  # (ahead: prove it)
    assert revisions.knows(history_epoch(SYSTEM, "other", 1)) == "unknown"
    assert revisions.knows(Revisions().epoch) == "unknown"


@pytest.mark.parametrize(
    ("system", "database", "timeline"),
    [
        ("", "app", 1),
        ("12a", "app", 1),
        ("1" * 21, "app", 1),
        (SYSTEM, "", 1),
        (SYSTEM, "d" * 256, 1),
        (SYSTEM, "app", 0),
        (SYSTEM, "app", 2**32),
    ],
)
def test_what_no_server_says_is_refused(system: str, database: str, timeline: int):
    with pytest.raises(ValueError):
        history_epoch(system, database, timeline)


def test_numbers_never_go_back_within_an_epoch_and_start_over_in_another():
    revisions = Revisions()
    assert revisions.begin_epoch(False, at=1000, epoch=E) == 1000 and revisions.epoch == E
    revisions.open_commit(1500, 7)
    revisions.close_commit()
    assert revisions.applied == 1500
    # A reconnect of the same history: a new slot's consistent point, never below what was numbered.
    assert revisions.begin_epoch(True, at=1200, epoch=E) == 1501 and revisions.epoch == E
    assert revisions.begin_epoch(True, at=3000, epoch=E) == 3000
    # A new timeline numbers by its log, which may be below what the old one reached.
    later = history_epoch(SYSTEM, "app", 2)
    assert revisions.begin_epoch(True, at=900, epoch=later) == 900
    assert revisions.epoch == later and revisions.applied <= 899


# ------------------------------------------------------------------ the engine


class HeldTokens:
    """A barrier's tokens, kept until the test lets them come back (a slow round trip)."""

    def __init__(self) -> None:
        self.sink: Direct | None = None
        self.held: list[str] = []

    async def send_token(self, token: str) -> None:
        self.held.append(token)

    def release(self) -> None:
        assert self.sink is not None
        for token in self.held:
            self.sink.notices.handle(SyncToken(token))
        self.held.clear()

    async def release_until(self, task: asyncio.Task[object]) -> object:
        """Let tokens come back (each round, a fence's too) until ``task`` is done; its result."""
        await eventually(lambda: self.release() or task.done(), what="done once the barrier came back")
        return task.result()


def change(xid: int, *ids: int) -> RowChange:
    return RowChange("public", "items", Op.UPDATE, xid, tuple((i,) for i in ids))


@pytest.fixture
def tokens() -> HeldTokens:
    return HeldTokens()


@pytest.fixture
async def core(tokens: HeldTokens):
    """A hub of history ``E``, connected at position 1000."""
    db = MemoryDatabase(int_key_schema(FULL))
    for i in range(1, 4):
        db.put(FULL, (i,), name=f"v{i}")
    core = direct(db, list(db.schemas.values()))
    tokens.sink = core
    core.notices.attach(tokens)
    core.notices.source_connected(at=1000, exact=False, epoch=E)
    await eventually(lambda: core.engine.ready)
    yield core
    await core.close()


async def commit(core: Direct, position: int, *ids: int) -> None:
    core.notices.transaction(position, position, [change(position, *ids)])
    await eventually(lambda: core.fanout.published >= position, what=f"commit {position} published")


async def test_a_reconnect_keeps_the_epoch_resets_watchers_and_starts_the_history_again(core: Direct):
    await commit(core, 1100, 1)
    watcher = core.engine.subscribe(Filter(frozenset()), start=(E, 1000))
    messages = watcher.messages()
    first = await asyncio.wait_for(anext(messages), 5)
    assert isinstance(first, Batch) and first.revision == 1100
    core.notices.source_lost("test")
    core.notices.source_connected(at=2000, exact=False, epoch=E)
    assert core.revisions.epoch == E
    reset = await asyncio.wait_for(anext(messages), 5)  # its stream broke here, whatever the epoch says
    assert isinstance(reset, Reset) and (reset.epoch, reset.revision) == (E, 2000)
    await eventually(lambda: core.engine.ready)
    with pytest.raises(OutOfRange, match="older than the history"):
        core.engine.subscribe(Filter(frozenset()), start=(E, 1100))
    assert core.engine.subscribe(Filter(frozenset()), start=(E, 2000)).position == 2000
    await messages.aclose()


async def test_a_resume_ahead_waits_until_this_sidecar_has_it_and_sends_nothing_older(core: Direct):
    await commit(core, 1100, 1)
    waiting = asyncio.create_task(core.engine.until_resumable(E, 1300))  # another hub was at 1300
    await eventually(lambda: core.revisions.waiting >= 1, what="waiting for revision 1300")
    await commit(core, 1200, 2)
    assert not waiting.done()
    await commit(core, 1300, 3)
    assert await asyncio.wait_for(waiting, 5) is False  # reached, no barrier needed
    watcher = core.engine.subscribe(Filter(frozenset()), start=(E, 1300))
    messages = watcher.messages()
    await commit(core, 1400, 1)
    first = await asyncio.wait_for(anext(messages), 5)
    assert isinstance(first, Batch) and first.revision == 1400
    await messages.aclose()


async def test_a_number_no_commit_here_takes_is_settled_by_a_read_barrier(core: Direct, tokens: HeldTokens):
    """Another hub's batch of its own (an Invalidate) numbered 1101, between two commits."""
    await commit(core, 1100, 1)
    waiting = asyncio.create_task(core.engine.until_resumable(E, 1101))
    await eventually(lambda: tokens.held, what="a barrier round sent")
    assert not waiting.done()
    assert await tokens.release_until(waiting) is True
    watcher = core.engine.subscribe(Filter(frozenset()), start=(E, 1101), beyond=True)
    messages = watcher.messages()
    await commit(core, 1200, 2)
    first = await asyncio.wait_for(anext(messages), 5)
    assert isinstance(first, Batch) and first.revision == 1200
    await messages.aclose()


async def test_a_min_revision_read_ahead_waits_for_that_revision(core: Direct, tokens: HeldTokens):
    """A read asks for the revision itself (another hub's, ahead): it gets it, or its deadline."""
    await commit(core, 1100, 1)
    reading = asyncio.create_task(core.engine.wait_revision(E, 1250))
    await eventually(lambda: core.revisions.waiting >= 1, what="the read waiting")
    tokens.release()  # (a barrier's round, if one were sent, would not end the wait)
    await commit(core, 1200, 2)
    assert not reading.done()
    await commit(core, 1250, 3)
    await asyncio.wait_for(reading, 5)


async def test_a_resume_ahead_that_is_not_reached_in_time_is_unavailable(core: Direct):
    core.revisions.stall_after = 0.2
    await commit(core, 1100, 1)
    with pytest.raises(Unavailable, match=r"ahead of this sidecar .* within 0.2 s"):
        await core.engine.until_resumable(E, 5000)  # (the barrier's token never comes back)
    # Nothing was subscribed; an epoch of another history is for subscribe to refuse.
    assert core.fanout.subscribers == 0
    assert await core.engine.until_resumable(history_epoch(SYSTEM, "app", 2), 5000) is False


async def test_a_process_epoch_ahead_waits_for_the_number_without_a_barrier():
    """NOTIFY capture: numbers are this process's (or its followers' upstream's) alone."""
    db = MemoryDatabase(int_key_schema(FULL))
    core = direct(db, list(db.schemas.values()))
    tokens = HeldTokens()
    tokens.sink = core
    core.notices.attach(tokens)
    core.notices.source_connected()
    await eventually(lambda: tokens.release() or core.engine.ready)
    try:
        target = core.revisions.seq + 1
        waiting = asyncio.create_task(core.engine.wait_revision(core.revisions.epoch, target))
        await eventually(lambda: core.revisions.waiting >= 1, what="waiting")
        assert tokens.held == []  # no barrier for it
        core.notices.handle(change(5, 1))
        await asyncio.wait_for(waiting, 5)
    finally:
        await core.close()


async def test_a_commit_numbered_apart_from_its_log_position_is_said_and_counted(
    core: Direct, caplog: pytest.LogCaptureFixture
):
    """Batches of the sidecar's own that reached the next commit's position: the commit
    takes the next number (this sidecar's history stays in order), said loudly, counted."""
    await commit(core, 1100, 1)
    for _ in range(3):
        core.revisions.own_batch()  # (1103)
    core.notices.transaction(1102, 1102, [change(1102, 2)])
    assert core.revisions.seq == 1104 and core.notices.numbered_apart == 1
    assert "numbered 1104" in caplog.text
    await commit(core, 1200, 3)
    assert core.revisions.seq == 1200 and core.notices.numbered_apart == 1

"""Rows ahead of their batch (the fleet checker's "going backwards" read): a relation's row
refreshed from the database may show a source row newer than its other rows joined to it
show, until the batch of that newer commit arrives. The hub fences such keys for its own
readers; its Watch batches mark the rows (``ahead``), and a follower fences them the same
way, with a read barrier of its own, so that its readers never see the source row go back."""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.core.ahead import KeyFences
from sidecar.core.assembly import direct
from sidecar.core.fanout import UPDATE, Batch, Filter
from sidecar.core.source import SourceBatch, SourceChange
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually
from tests.unit.test_follower import (
    FULL,
    FakeCall,
    FakeUpstream,
    RecordingSink,
    follow_until,
    follower_core,
    pb_messages,
    source_for,
)
from tests.unit.test_relation_refresh import REL, city_name, relation_schema, row, user_changed, users

pytestmark = pytest.mark.asyncio


class Gate:
    """A barrier round (a fence source) the test lets through."""

    def __init__(self) -> None:
        self.rounds = 0
        self.open = asyncio.Event()

    async def __call__(self) -> None:
        self.rounds += 1
        await self.open.wait()


async def test_keys_are_fenced_until_the_round_and_ahead_of_the_batches_before_its_end() -> None:
    seq = 5
    fences = KeyFences(lambda: seq)
    round_: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fences.add([(1,)], round_)
    assert (1,) in fences and (2,) not in fences
    assert fences.ahead((1,), 5) and fences.ahead((1,), 9)  # (the round under way: any batch)
    assert not fences.ahead((2,), 5)
    seq = 8  # the round ends once batches up to 8 came
    round_.set_result(None)
    await asyncio.sleep(0)  # (its done-callbacks)
    assert (1,) not in fences
    # A batch before 8 published after the round ended (another table held it back) still
    # has the row newer than its siblings; batch 8 and later have them all brought up to it.
    assert fences.ahead((1,), 7)
    assert not fences.ahead((1,), 8)
    assert not fences.ahead((1,), 7)  # (asked in publishing order: dropped once 8 was published)


async def test_a_relation_row_refreshed_newer_than_its_batch_is_published_marked_ahead() -> None:
    """User 1 changed (C1); the city of users 1 and 2 was renamed (C2) before C1's refetch
    read: user 1's row shows the new name, user 2's the old one until C2 arrives. C1's
    Watch batch carries user 1's row marked ahead."""
    db = MemoryDatabase(relation_schema())
    for user in (1, 2):
        users(db)[(user,)] = row(user, 1, "City 1")
    core = direct(db, list(db.schemas.values()))
    try:
        core.notices.source_connected()
        await eventually(lambda: core.engine.ready)
        table = core.full[REL]
        gate = Gate()
        table._fence_source = gate  # (the hub's barrier round, held until C2 came)
        for user in (1, 2):
            users(db)[(user,)] = row(user, 1, "Renamed")  # C2, committed
        core.notices.handle(user_changed(10, 1))  # C1 arrives, C2 has not
        c1 = core.revisions.seq
        await eventually(lambda: core.revisions.applied >= c1, what="C1 applied")
        [published] = [b for b in core.fanout._history if isinstance(b, Batch) and b.revision == c1]
        [change] = [c for c in published.changes if c.table == REL]
        assert change.key == (1,) and json.loads(change.row or b"")["city_name"] == "Renamed" and gate.rounds == 1
        assert change.ahead
        assert city_name(table.rows[(2,)]) == "City 1"  # (its sibling, as of C1)
        gate.open.set()
    finally:
        await core.close()


async def test_a_follower_serves_a_row_marked_ahead_only_after_a_barrier_of_its_own() -> None:
    """The follower applies C1's batch with user 1's row marked ahead: a read of user 1 waits
    for the follower's barrier (a Sync on the upstream, then its stream bringing C2), after
    which user 2 shows the new name too; the follower's own watchers get the mark."""
    schema = int_key_schema(FULL)
    upstream = MemoryDatabase(schema)
    core = follower_core(upstream, schema)
    coming: list[SourceBatch] = []  # what the stream brings before the next token
    synced = asyncio.Event()
    through = asyncio.Event()
    through.set()

    class Source:
        database = upstream

        async def follow(self, sink: object) -> None:  # (not used: the test drives the core)
            await asyncio.Event().wait()

        async def send_token(self, token: str) -> None:
            synced.set()
            await through.wait()
            while coming:
                core.batches.batch(coming.pop(0))
            core.batches.token_received(token)

    try:
        core.batches.attach(Source())  # type: ignore[arg-type]
        old = {(u,): row(u, 1, "City 1") for u in (1, 2)}
        core.batches.epoch_began("hub", 5, {FULL: old}, None)
        await eventually(lambda: core.engine.ready, what="trusted after the first fence")
        through.clear()
        synced.clear()
        watched = core.engine.subscribe(Filter(frozenset())).messages()
        core.batches.batch(SourceBatch(6, 9, [SourceChange(FULL, UPDATE, (1,), row=row(1, 1, "Renamed"), ahead=True)]))
        coming.append(SourceBatch(7, 10, [SourceChange(FULL, UPDATE, (u,), row=row(u, 1, "Renamed")) for u in (1, 2)]))
        reading = asyncio.create_task(core.engine.get(FULL, [1]))
        await asyncio.wait_for(synced.wait(), 5)
        assert not reading.done()  # (memory holds "Renamed" for user 1, but user 2 shows "City 1")
        through.set()
        assert city_name(await asyncio.wait_for(reading, 5)) == "Renamed"
        assert city_name(await core.engine.get(FULL, [2])) == "Renamed"  # never back
        first = await asyncio.wait_for(anext(watched), 5)
        assert isinstance(first, Batch) and first.revision == 6 and [c.ahead for c in first.changes] == [True]
    finally:
        await core.close()


async def test_the_follower_takes_the_mark_from_the_upstreams_batch() -> None:
    snapshot, done, batch, _ = pb_messages()
    marked = batch(6, UPDATE, 1, b'{"id":1,"v":6}')
    marked.changes.events[0].ahead = True  # type: ignore[attr-defined]
    upstream = FakeUpstream(FakeCall([snapshot(5, 1), done(5), marked, batch(7, UPDATE, 1, b'{"id":1,"v":7}')]), head=7)
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: [k for k, _ in calls].count("batch") == 2)
    applied = [args for kind, args in sink.calls if isinstance(args, SourceBatch)]
    assert [[c.ahead for c in b.changes] for b in applied] == [[True], [False]]

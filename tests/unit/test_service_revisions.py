"""The revision an answer carries. A read that had to go to the database while the
listener was down, and finished after the rebuild had begun, carries the revision it
began at: tagged with the new epoch, it would let a later EVENTUAL read from the rebuilt
memory (which may lag what the database said) look like going back in time within one
epoch -- the checker's (b) found exactly that once in a 5-minute run."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core.assembly import direct
from sidecar.edge.service import CacheService
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

T = "public.items"


class Context:
    def time_remaining(self) -> None:
        return None

    async def abort(self, code: object, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


@pytest.fixture
async def running():
    db = MemoryDatabase(int_key_schema(T))
    db.put(T, (1,), name="v1")
    source = MemoryChangeSource(db)
    core = direct(db, list(db.schemas.values()))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    yield core, source, db
    following.cancel()
    await core.close()


def get_request() -> pb.GetRequest:
    return pb.GetRequest(table=T, key=pb.Key(parts=[pb.KeyPart(int_value=1)]))


async def test_a_database_read_across_a_rebuild_carries_the_epoch_it_began_in(running):
    core, source, db = running
    service = CacheService(core)
    source.lose("cut")
    before = core.revisions.epoch
    db.hold()
    read = asyncio.create_task(service.Get(get_request(), Context()))  # type: ignore[arg-type]
    await db.held(1)  # the read went to the database and waits there
    source.reconnect()  # a new epoch begins; memory reloads
    assert core.revisions.epoch != before
    db.release()
    reply = pb.GetResponse.FromString(await asyncio.wait_for(read, 5))
    assert reply.found and reply.revision.epoch == before


async def test_a_read_within_one_epoch_carries_the_current_revision(running):
    core, _, _ = running
    reply = pb.GetResponse.FromString(await CacheService(core).Get(get_request(), Context()))  # type: ignore[arg-type]
    assert reply.revision.epoch == core.revisions.epoch and reply.revision.number == core.revisions.applied

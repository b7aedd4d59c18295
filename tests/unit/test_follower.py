"""Follower mode's core without gRPC or PostgreSQL: revisions adopted from the
source, the hub across a same-epoch rebuild and revision gaps, ``BatchIngest``
applying numbered batches, the core as a ``NumberedSink``, and the
configuration's rules for ``upstream.*``."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from sidecar import config as cfg
from sidecar.config import IndexConfig
from sidecar.core import batches as batches_module
from sidecar.core.assembly import Following, following
from sidecar.core.fanout import DELETE, INSERT, INVALIDATE, TABLE_CHANGED, UPDATE, Change, FanOut, Filter, Reset
from sidecar.core.lazy import LazyTable
from sidecar.core.replica import ReplicaTable
from sidecar.core.revisions import Revision, Revisions
from sidecar.core.schema import TableSchema
from sidecar.core.source import SourceBatch, SourceChange
from sidecar.core.wire import entry, row_json
from sidecar.errors import ConfigError, Unavailable
from sidecar.fleet.channels import explain
from sidecar.testing import MemoryDatabase, int_key_schema
from tests.support.waiting import eventually, quiescent

FULL = "public.items"
LAZY = "public.notes"


def row(**values: object) -> bytes:
    return entry(json.dumps(values, separators=(",", ":")).encode())


class NoForwarder:
    async def invalidate(self, *args: object) -> Revision:
        raise AssertionError("not forwarded in these tests")


def follower_core(db: MemoryDatabase, *schemas: TableSchema) -> Following:
    """A follower's parts over ``db`` (what reads that pass through see)."""
    return following(db, db, list(schemas), NoForwarder(), lambda: None, "hub:1")  # type: ignore[arg-type,return-value]


def replica_tables() -> Following:
    """A follower's parts with a full and a lazy table, in epoch e1 at revision 0."""
    core = follower_core(MemoryDatabase(), int_key_schema(FULL), int_key_schema(LAZY, mode="lazy"))
    core.batches.epoch_began("e1", 0, {FULL: {}}, None)
    return core


def make_fanout() -> FanOut:
    fanout = FanOut(rows_of=lambda name: None, row_json=lambda e: e)
    fanout.start("e1", 0)
    return fanout


# ---------------------------------------------------------------- revisions


def test_revisions_adopt_the_sources_epoch_and_numbers():
    revisions = Revisions()
    own = revisions.epoch
    revisions.adopt("hub.1", 41)
    assert (revisions.epoch, revisions.seq, revisions.applied, revisions.epoch_start) == ("hub.1", 41, 41, 41)
    assert revisions.knows("hub.1") == "current"
    assert revisions.knows(own) == "unknown"  # (its own start-up epoch is no run of the hub's)
    revisions.number(45)
    revisions.advance()
    assert revisions.applied == 45
    revisions.adopt("hub.1", 43)  # a rebuild in the same epoch never goes back
    assert revisions.applied == 45
    revisions.adopt("hub.2", 3)  # the hub's next run: its own numbers
    assert revisions.revision.number == 3 and revisions.knows("hub.1") == "past"


def test_a_hub_followed_before_is_not_past_once_the_follower_is_back_on_another():
    """A -> B -> A: B's epoch is a live hub's, maybe ahead of A's; only A's earlier runs are past."""
    revisions = Revisions()
    revisions.adopt("hubA.1", 10)
    revisions.adopt("hubB.1", 12)
    assert revisions.knows("hubA.1") == "unknown"
    revisions.adopt("hubA.1", 11)
    assert revisions.knows("hubB.1") == "unknown"
    assert revisions.knows("hubB.7") == "unknown" and revisions.knows("hubA.2") == "unknown"  # (ahead)
    revisions.adopt("hubA.3", 1)
    assert revisions.knows("hubA.1") == "past" and revisions.knows("hubA.2") == "past"
    for odd in ("hubA", "hubA.", ".1", "hubA.x", "hubA.-1", "hubA.\u0661", "hubA." + "1" * 40, "hubA.3.1"):
        assert revisions.knows(odd) == "unknown", odd


async def test_adopting_wakes_readers_that_waited_for_the_revision():
    revisions = Revisions()
    revisions.adopt("e", 1)
    waiting = asyncio.create_task(revisions.wait(5))
    await quiescent()
    assert not waiting.done()  # (it waits: adopting is what wakes it)
    revisions.adopt("e", 7)  # a rebuild from a snapshot at 7
    await asyncio.wait_for(waiting, 1)


# ---------------------------------------------------------------- hub


async def test_a_rebuild_resets_watchers_even_in_the_same_epoch():
    fanout = make_fanout()
    subscription = fanout.subscribe(Filter(frozenset()))
    fanout.start("e1", 10, "rebuilt from the upstream")
    messages = subscription.messages()
    first = await asyncio.wait_for(anext(messages), 1)
    assert isinstance(first, Reset) and first.revision == 10


async def test_revision_gaps_are_followed_and_resumable():
    fanout = make_fanout()
    subscription = fanout.subscribe(Filter(frozenset()))
    for revision in (2, 5, 6, 9):  # a follower of a filtered stream: other revisions were not its tables'
        fanout.record(revision, 0, Change(FULL, UPDATE, (revision,)))
        fanout.publish(revision)
    messages = subscription.messages()
    got = [(await asyncio.wait_for(anext(messages), 1)).revision for _ in range(4)]
    assert got == [2, 5, 6, 9]
    assert fanout.next_after(3) is not None and fanout.next_after(3).revision == 5
    assert fanout.next_after(9) is None
    assert fanout.oldest == 0  # nothing trimmed: every revision of the epoch resumes
    resumed = fanout.subscribe(Filter(frozenset()), start=("e1", 4))
    assert (await asyncio.wait_for(anext(resumed.messages()), 1)).revision == 5


def test_trimming_a_gapped_history_keeps_resumes_exact():
    fanout = FanOut(rows_of=lambda name: None, row_json=lambda e: e, max_batches=2)
    fanout.start("e1", 0)
    for revision in (3, 7, 8):
        fanout.record(revision, 0, Change(FULL, UPDATE, (revision,)))
        fanout.publish(revision)
    assert fanout.oldest == 3  # batch 3 was trimmed: resuming from 3..6 is exact, from below is not


# ---------------------------------------------------------------- replica


def test_batches_store_rows_and_drop_lazy_keys():
    core = replica_tables()
    full, lazy, fanout = core.tables[FULL], core.tables[LAZY], core.fanout
    assert isinstance(full, ReplicaTable) and isinstance(lazy, LazyTable)
    lazy.cache[(1,)] = row(id=1)
    lazy.cache[(2,)] = row(id=2)
    core.batches.batch(
        SourceBatch(
            1,
            7,
            [
                SourceChange(FULL, INSERT, (1,), row=row(id=1, v="a")),
                SourceChange(FULL, INSERT, (2,), row=row(id=2, v="b")),
                SourceChange(LAZY, UPDATE, (1,)),
                SourceChange("public.other", UPDATE, (1,)),  # not followed: ignored
            ],
        )
    )
    assert json.loads(row_json(full.store.get((1,)))) == {"id": 1, "v": "a"}
    assert (1,) not in lazy.cache and (2,) in lazy.cache
    fanout.publish(1)
    assert [c.table for c in fanout.next_after(0).changes] == [FULL, FULL, LAZY]


def test_a_moved_key_loses_its_row_unless_the_batch_says_otherwise():
    core = replica_tables()
    full = core.tables[FULL]
    assert isinstance(full, ReplicaTable)
    full.replace({(1,): row(id=1), (2,): row(id=2)})
    core.batches.batch(SourceBatch(1, 0, [SourceChange(FULL, UPDATE, (3,), (1,), row(id=3))]))
    assert full.store.get((1,)) is None and full.store.get((3,)) is not None
    # A key moved away from and written again in the same transaction: the row wins.
    core.batches.batch(
        SourceBatch(
            2,
            0,
            [
                SourceChange(FULL, UPDATE, (4,), (2,), row(id=4)),
                SourceChange(FULL, INSERT, (2,), row=row(id=2, v="new")),
            ],
        )
    )
    assert json.loads(row_json(full.store.get((2,)))) == {"id": 2, "v": "new"}


def test_changes_not_applied_are_only_told_and_tables_sent_again_replace():
    core = replica_tables()
    full, lazy, fanout = core.tables[FULL], core.tables[LAZY], core.fanout
    assert isinstance(full, ReplicaTable) and isinstance(lazy, LazyTable)
    full.replace({(1,): row(id=1, v="new")})
    lazy.cache[(5,)] = row(id=5)
    # The table came again at a newer revision than this batch: its older row must not win.
    core.batches.batch(SourceBatch(1, 0, [SourceChange(FULL, UPDATE, (1,), row=row(id=1, v="old"), apply=False)]))
    assert json.loads(row_json(full.store.get((1,)))) == {"id": 1, "v": "new"}
    core.batches.batch(
        SourceBatch(2, 0, [SourceChange(FULL, TABLE_CHANGED), SourceChange(LAZY, TABLE_CHANGED)], {FULL: {}})
    )
    assert full.row_count == 0 and len(lazy.cache) == 0
    core.batches.batch(SourceBatch(3, 0, [SourceChange(FULL, INVALIDATE, (1,))], failed={FULL: "gone upstream"}))
    assert full.problem == "gone upstream" and not full.loaded and full.authoritative_rows() is None
    core.batches.batch(SourceBatch(4, 0, [SourceChange(FULL, DELETE, (9,))], {FULL: {(8,): row(id=8)}}))
    assert full.problem is None and full.loaded and full.row_count == 1
    fanout.publish(4)
    assert [
        b.revision for b in (fanout.next_after(0), fanout.next_after(1), fanout.next_after(2), fanout.next_after(3))
    ] == [
        1,
        2,
        3,
        4,
    ]


def test_an_index_follows_the_rows():
    schema = int_key_schema(FULL, indexes=(IndexConfig("by_v", ("id",)),))
    table = ReplicaTable(schema)
    table.replace({(1,): row(id=1)})
    table.put({(2,): row(id=2), (1,): None})
    assert table.store.indexes is not None and table.store.indexes.matching(("id",), []) == set()
    assert set(table.store.rows) == {(2,)}


@pytest.mark.parametrize("when", ["replace", "put"])
def test_a_row_whose_index_values_cannot_be_read_fails_the_table(when):
    # Only an upstream can send a row that is not a JSON object: indexed under no value it
    # would be missing from every query, so the table is not served instead.
    schema = int_key_schema(FULL, indexes=(IndexConfig("by_id", ("id",)),))
    table = ReplicaTable(schema)
    deep = entry(b'{"id":3,"doc":' + b"[" * 5000 + b"]" * 5000 + b"}")  # (readable: any depth)
    table.replace({(1,): row(id=1), (3,): deep})
    assert table.problem is None
    bad = {(2,): entry(b"not json")}
    if when == "replace":
        table.replace({(1,): row(id=1), **bad})
    else:
        table.put(bad)
    assert table.problem is not None and "not JSON objects" in table.problem and not table.loaded


# ---------------------------------------------------------------- the core as a numbered sink


async def test_the_engine_takes_the_sources_revisions():
    schema = int_key_schema(FULL)
    core = follower_core(MemoryDatabase(schema), schema)
    assert not core.engine.ready
    core.batches.epoch_began("hub", 100, {FULL: {(1,): row(id=1, v="a")}}, None)
    assert core.engine.ready and str(core.engine.revision) == "hub/100"
    subscription = core.engine.subscribe(Filter(frozenset()))
    core.batches.batch(SourceBatch(103, 9, [SourceChange(FULL, UPDATE, (1,), row=row(id=1, v="b"))]))
    assert core.revisions.applied == 103
    batch = await asyncio.wait_for(anext(subscription.messages()), 1)
    assert batch.revision == 103 and batch.changes[0].row is not None
    core.batches.progress(110)
    assert core.revisions.applied == 110
    assert await core.engine.get(FULL, [1]) == row(id=1, v="b")
    core.batches.source_lost("test")
    assert not core.engine.ready
    core.batches.resumed()
    assert core.engine.ready and core.revisions.epoch == "hub"
    core.batches.epoch_began("hub2", 5, {}, "the upstream restarted")
    assert core.tables[FULL].problem is not None  # not in the snapshot: not served upstream
    await core.close()


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CACHE_SIDECAR_DATABASE_DSN": "postgresql://x@h/db"}, "database.dsn"),
        ({"CACHE_SIDECAR_SERVER_INSTALL_TRIGGERS": "true"}, "server.install_triggers"),
        ({"CACHE_SIDECAR_DATABASE_EMBEDDED": "1"}, "database.embedded"),
    ],
)
def test_a_follower_has_no_database(env, key):
    with pytest.raises(ConfigError) as error:
        cfg.load(env={"CACHE_SIDECAR_UPSTREAM_TARGET": "hub:50051", **env})
    assert error.value.key == key and "upstream.target" in str(error.value)


def test_the_stall_timeout_exceeds_the_progress_interval():
    with pytest.raises(ConfigError, match=r"upstream\.stall_timeout: must exceed upstream\.progress_interval"):
        cfg.load(env={"CACHE_SIDECAR_UPSTREAM_TARGET": "hub:1", "CACHE_SIDECAR_UPSTREAM_STALL_TIMEOUT": "0.5"})


@pytest.mark.parametrize("target", ["hub", "hub:", "hub:99999", "unix:///x.sock", ":80"])
def test_the_upstream_is_host_and_port(target):
    with pytest.raises(ConfigError, match=r"upstream\.target"):
        cfg.load(flags={"upstream.target": target}, env={})


def test_the_upstream_from_flag_file_and_env(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[upstream]\ntarget = "hub.svc:50051"\nprogress_interval = 0.5\n')
    assert cfg.load(path, env={}).upstream_target == "hub.svc:50051"
    assert cfg.load(env={"CACHE_SIDECAR_UPSTREAM_TARGET": "a:1"}).upstream_target == "a:1"
    assert cfg.load(path, env={}, flags={"upstream.target": "b:2"}).upstream_target == "b:2"


def test_a_followers_printed_config_loads_back(tmp_path):
    config = cfg.load(env={"CACHE_SIDECAR_UPSTREAM_TARGET": "hub.svc:50051"})
    lines = cfg.describe(config, environ={})
    assert lines[1] == "# database: none (a follower of hub.svc:50051)"
    path = tmp_path / "printed.toml"
    path.write_text("\n".join(lines))
    assert cfg.load(path, env={}) == config


# ---------------------------------------------------------------- the upstream source, against a fake upstream


class FakeCall:
    """A Watch call that answers a script: messages, then silence (a stall) -- or a refusal."""

    def __init__(self, messages: list[object], refused: object = None) -> None:
        self.messages = list(messages)
        self.refused = refused  # a grpc.StatusCode: no headers, that status
        self.cancelled = False
        self.more = asyncio.Event()  # set by ``push``

    def push(self, message: object) -> None:
        self.messages.append(message)
        self.more.set()

    async def initial_metadata(self) -> list[tuple[str, str]]:
        return [] if self.refused is not None else [("cachesidecar-epoch", "E")]

    async def code(self) -> object:
        return self.refused

    async def details(self) -> str:
        return "scripted"

    async def read(self) -> object:
        while not self.messages:  # silence, until a message is pushed
            self.more.clear()
            await self.more.wait()
        return self.messages.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeUpstream:
    target = "fake:1"
    timeout = 1.0
    renewed = 0  # times the source asked for a channel with rotated certificates

    async def renew_if_rotated(self) -> bool:
        self.renewed += 1
        return False

    def explain(self, error: object, established: bool = False) -> str:
        return f"fake:1: {error}"

    def __init__(self, *calls: FakeCall, head: int = 0) -> None:
        from sidecar.api.v1 import cache_pb2 as pb

        self.pb = pb
        self.calls = list(calls)
        self.requests: list[object] = []
        self.head = head
        self.syncs = 0
        self.problem = ""  # what ListTables says of FULL
        self.definition = "d1"
        self.listed = True
        outer = self

        class Stub:
            def Watch(self, request: object) -> FakeCall:
                outer.requests.append(request)
                return outer.calls.pop(0) if outer.calls else FakeCall([])

        self.stub = Stub()

    async def sync(self, timeout: float) -> object:
        from sidecar.core.revisions import Revision

        self.syncs += 1
        return Revision("E", self.head)

    async def list_tables(self) -> object:
        pb = self.pb
        info = pb.TableInfo(
            name=FULL,
            loaded=True,
            key_columns=[pb.Column(name="id", type="bigint", type_name="int8")],
            problem=self.problem,
            definition=self.definition,
        )
        return pb.ListTablesResponse(
            tables=[info] if self.listed else [], revision=pb.Revision(epoch="E", number=self.head)
        )


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def source_lost(self, reason: str) -> None:
        self.calls.append(("lost", reason))

    def token_received(self, token: str) -> None:
        self.calls.append(("token_received", token))

    def epoch_began(self, epoch: str, revision: int, rows: object, reason: str | None) -> None:
        self.calls.append(("began", (epoch, revision, rows, reason)))

    def batch(self, batch: SourceBatch) -> None:
        self.calls.append(("batch", batch))

    def progress(self, revision: int) -> None:
        self.calls.append(("progress", revision))

    def resumed(self) -> None:
        self.calls.append(("resumed", None))

    def reconciled(self, reloaded: object, failed: object) -> None:
        self.calls.append(("reconciled", (reloaded, failed)))


def pb_messages():  # type: ignore[no-untyped-def]
    from sidecar.api.v1 import cache_pb2 as pb

    def key(n: int) -> object:
        return pb.Key(parts=[pb.KeyPart(int_value=n)])

    def snapshot(number: int, *ids: int) -> object:
        events = [pb.ChangeEvent(table=FULL, operation=7, key=key(i), row=b'{"id":%d}' % i, has_row=True) for i in ids]
        return pb.WatchResponse(changes=pb.ChangeBatch(revision=pb.Revision(epoch="E", number=number), events=events))

    def done(number: int) -> object:
        return pb.WatchResponse(initial_state_done=pb.InitialStateDone(revision=pb.Revision(epoch="E", number=number)))

    def batch(number: int, op: int, ident: int | None = None, body: bytes = b"") -> object:
        event = pb.ChangeEvent(table=FULL, operation=op)
        if ident is not None:
            event.key.CopyFrom(key(ident))
            event.row, event.has_row = body, bool(body)
        return pb.WatchResponse(changes=pb.ChangeBatch(revision=pb.Revision(epoch="E", number=number), events=[event]))

    def progress(number: int) -> object:
        return pb.WatchResponse(progress=pb.Progress(revision=pb.Revision(epoch="E", number=number)))

    return snapshot, done, batch, progress


def source_for(upstream: FakeUpstream):  # type: ignore[no-untyped-def]
    from sidecar.fleet.follower import UpstreamSource

    return UpstreamSource(
        upstream,  # type: ignore[arg-type]
        {FULL: int_key_schema(FULL)},
        progress_interval=0.05,
        stall_timeout=0.2,
        reconnect_min_delay=0.01,
        reconnect_max_delay=0.02,
    )


async def follow_until(source, sink: RecordingSink, done) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: done(sink.calls), 5, what=f"the source's calls ({sink.calls})")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_stalled_stream_is_resumed_from_the_last_revision():
    snapshot, done, batch, progress = pb_messages()
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1, 2), done(5), batch(6, UPDATE, 1, b'{"id":1,"v":2}')]),  # then silence
        FakeCall([progress(6)]),
        head=6,
    )
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: ("resumed", None) in calls)
    kinds = [kind for kind, _ in sink.calls]
    assert kinds[:3] == ["began", "batch", "lost"] and "resumed" in kinds and kinds.count("began") == 1
    began = sink.calls[0][1]
    assert began[0:2] == ("E", 5) and set(began[2][FULL]) == {(1,), (2,)} and began[3] is None
    assert "stalled" in sink.calls[2][1]
    resumed_request = upstream.requests[1]
    assert not resumed_request.initial_state
    assert (resumed_request.start_revision.epoch, resumed_request.start_revision.number) == ("E", 6)
    assert source.resumes == 1 and source.rebuilds == 0


async def test_a_resume_the_upstream_refuses_is_a_rebuild():
    import grpc

    snapshot, done, _, _ = pb_messages()
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1), done(5)]),
        FakeCall([], refused=grpc.StatusCode.OUT_OF_RANGE),
        FakeCall([snapshot(9, 1, 3), done(9)]),
        head=9,
    )
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: [k for k, _ in calls].count("began") == 2)
    rebuilt = [args for kind, args in sink.calls if kind == "began"][1]
    assert rebuilt[1] == 9 and "cannot resume" in rebuilt[3]
    assert upstream.requests[2].initial_state and source.rebuilds == 1


async def test_a_rebuild_never_takes_an_initial_state_older_than_what_was_served():
    """Behind a Service, the next hub of the same history may be behind the last one: its
    initial state would take revisions back; the follower tries again until it is not."""
    import grpc

    snapshot, done, batch, _ = pb_messages()
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1), done(5), batch(12, UPDATE, 1, b'{"id":1,"v":2}')]),  # then silence
        FakeCall([], refused=grpc.StatusCode.OUT_OF_RANGE),  # the next hub does not reach back to 12
        FakeCall([snapshot(11, 1), done(11)]),  # ... and is at 11 only
        FakeCall([snapshot(14, 1, 2), done(14)]),
        head=14,
    )
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: [k for k, _ in calls].count("began") == 2)
    began = [args[1] for kind, args in sink.calls if kind == "began"]
    assert began == [5, 14] and source.rebuilds == 1
    assert any(kind == "lost" and "behind revision 12" in str(why) for kind, why in sink.calls)


async def test_rows_of_batches_older_than_a_table_sent_again_are_not_applied():
    """A whole-table change comes with the table again, as of a later revision (8): batch 7,
    published before that, carries an older row, which must not overwrite the newer one."""
    snapshot, done, batch, _ = pb_messages()
    upstream = FakeUpstream(
        FakeCall(
            [
                snapshot(5, 1),
                done(5),
                batch(6, TABLE_CHANGED),
                batch(7, UPDATE, 1, b'{"id":1,"v":"older"}'),
                batch(9, UPDATE, 1, b'{"id":1,"v":"newer"}'),
            ]
        ),
        FakeCall([snapshot(8, 1, 4), done(8)]),  # the table again (a second Watch of it alone)
        head=9,
    )
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: [k for k, _ in calls].count("batch") == 3)
    batches = [args for kind, args in sink.calls if kind == "batch"]
    assert isinstance(batches[0], SourceBatch) and set(batches[0].reloaded[FULL]) == {(1,), (4,)}
    side = upstream.requests[1]
    assert list(side.tables) == [FULL] and side.initial_state
    assert [c.apply for c in batches[1].changes] == [False]  # older than the table sent again
    assert [c.apply for c in batches[2].changes] == [True]


async def test_a_barrier_token_comes_back_only_once_the_stream_brought_the_upstreams_revision():
    snapshot, done, batch, _ = pb_messages()
    stream = FakeCall([snapshot(5, 1), done(5)])
    upstream = FakeUpstream(stream, head=5)
    source, sink = source_for(upstream), RecordingSink()
    source.stall_timeout = 30.0  # (this stream is only quiet, not stalled)
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: source.following, what="following")
        upstream.head = 7  # the upstream's Sync answers a revision the stream has not brought yet
        token = asyncio.create_task(source.send_token("t"))
        await eventually(lambda: upstream.syncs == 1, what="one Sync on the upstream")
        stream.push(batch(6, UPDATE, 1, b'{"id":1}'))
        await eventually(lambda: source.received == 6, what="batch 6 in")
        assert not token.done() and not [c for c in sink.calls if c[0] == "handle"]
        stream.push(batch(7, UPDATE, 1, b'{"id":1,"v":7}'))
        await asyncio.wait_for(token, 5)
        assert sink.calls[-1] == ("token_received", "t")
        kind, before = sink.calls[-2]
        assert kind == "batch" and isinstance(before, SourceBatch) and before.revision == 7  # right after it
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_several_batches_in_one_message_are_applied_in_order():
    """The follower asks for grouped batches (a hub sends them to a follower behind, or
    under load) and applies each as if it had come alone."""
    from sidecar.api.v1 import cache_pb2 as pb

    snapshot, done, batch, _ = pb_messages()
    grouped = pb.WatchResponse(
        batches=pb.ChangeBatches(
            batches=[
                batch(6, UPDATE, 1, b'{"id":1,"v":6}').changes,  # type: ignore[attr-defined]
                batch(7, UPDATE, 1, b'{"id":1,"v":7}').changes,  # type: ignore[attr-defined]
            ]
        )
    )
    upstream = FakeUpstream(FakeCall([snapshot(5, 1), done(5), grouped]), head=7)
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: [k for k, _ in calls].count("batch") == 2)
    assert upstream.requests[0].accept_batches
    applied = [args for kind, args in sink.calls if kind == "batch"]
    assert [b.revision for b in applied] == [6, 7]
    assert [c.row for b in applied for c in b.changes] == [entry(b'{"id":1,"v":6}'), entry(b'{"id":1,"v":7}')]


async def test_memory_is_trusted_again_only_once_it_is_as_new_as_what_passed_through():
    """While a follower is away its reads pass through to the upstream, whose answer may be
    newer than the revision the follower resumes at. Trusting memory right away would take
    that answer back (a version going backwards, found by the fleet checker). The follower
    first lets passed-through reads end and runs one barrier round, which brings the newer
    batch; reads meanwhile wait for it."""
    schema = int_key_schema(FULL)
    upstream = MemoryDatabase(schema)  # what reads passed through see: the upstream's memory
    core = follower_core(upstream, schema)

    coming: list[SourceBatch] = []  # what the stream brings before the next token

    class Source:
        database = upstream

        async def follow(self, sink: object) -> None:  # (not used: the test drives the core)
            await asyncio.Event().wait()

        async def send_token(self, token: str) -> None:
            while coming:
                core.batches.batch(coming.pop(0))
            core.batches.token_received(token)

    core.batches.attach(Source())  # type: ignore[arg-type]
    core.batches.epoch_began("hub", 5, {FULL: {(1,): row(id=1, v=1)}}, None)
    await eventually(lambda: core.engine.ready, what="trusted after the first fence")
    assert await core.engine.get(FULL, [1]) == row(id=1, v=1)
    core.batches.source_lost("test")
    upstream.put(FULL, (1,), id=1, v=2)  # committed upstream meanwhile (batch 6 of the stream)
    coming.append(SourceBatch(6, 9, [SourceChange(FULL, UPDATE, (1,), row=row(id=1, v=2))]))
    assert await core.engine.get(FULL, [1]) == row(id=1, v=2)  # passed through: the newer row
    core.batches.resumed()  # caught up at revision 5 (the batch with v=2 not yet here)
    assert await core.engine.get(FULL, [1]) == row(id=1, v=2)  # never back to v=1
    assert core.engine.ready and core.revisions.applied == 6
    await core.close()


def test_initial_state_keys_are_coerced_a_message_at_a_time_and_a_bad_one_is_refused():
    from sidecar.api.v1 import cache_pb2 as pb
    from sidecar.fleet.follower import Lost

    source = source_for(FakeUpstream())

    def event(part: object, table: str = FULL) -> object:
        return pb.ChangeEvent(table=table, operation=7, key=pb.Key(parts=[part]), row=b'{"id":1}', has_row=True)

    good = [event(pb.KeyPart(int_value=n)) for n in (1, 2, 3)] + [event(pb.KeyPart(int_value=9), "public.other")]
    rows: dict = {}
    source._snapshot_rows(rows, pb.ChangeBatch(events=good))
    assert list(rows) == [FULL] and sorted(rows[FULL]) == [(1,), (2,), (3,)]  # (other: not followed)
    assert rows[FULL][(2,)] == entry(b'{"id":1}')
    for bad in (pb.KeyPart(string_value="x"), pb.KeyPart(), pb.KeyPart(double_value=1.5)):
        with pytest.raises(Lost, match=r"public\.items that does not fit"):
            source._snapshot_rows({}, pb.ChangeBatch(events=[*good[:2], event(bad)]))


# ---------------------------------------------------------------- statuses passed on


def test_an_upstreams_status_reaches_the_caller_unchanged():
    import grpc

    from sidecar.edge.service import status_of
    from sidecar.errors import UpstreamFailed, UpstreamUnavailable

    assert status_of(UpstreamFailed("Invalidate", "PERMISSION_DENIED")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_of(UpstreamFailed("reading", "NOT_FOUND")) == grpc.StatusCode.NOT_FOUND
    assert status_of(UpstreamUnavailable("reading", "DEADLINE_EXCEEDED")) == grpc.StatusCode.DEADLINE_EXCEEDED
    # (the follower's own call cancelled, or a name no status has: the upstream is not there for it)
    for odd in ("CANCELLED", "OK", "NOT_A_STATUS", "__class__"):
        assert status_of(UpstreamUnavailable("reading", odd)) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- a table read again


class CountingUpstream(FakeUpstream):
    """Counts ListTables calls; answers none beyond ``answers`` of them."""

    listings = 0
    answers = 1_000_000

    async def list_tables(self) -> object:
        self.listings += 1
        if self.listings > self.answers:
            raise Unavailable("fake:1: ListTables failed: UNAVAILABLE")
        return await super().list_tables()


async def test_a_table_read_again_may_wait_for_the_upstreams_reload_while_the_upstream_answers():
    """The upstream sends a table again only once its reload of it landed: that silence is
    no stall while the upstream answers (it made the follower NOT_SERVING for as long)."""
    snapshot, done, batch, _ = pb_messages()
    again = FakeCall([])  # silent: the upstream is reloading the table
    upstream = CountingUpstream(FakeCall([snapshot(5, 1), done(5), batch(6, TABLE_CHANGED)]), again, head=6)
    source, sink = source_for(upstream), RecordingSink()
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: len(upstream.requests) == 2, what="the table read again")
        listed = upstream.listings
        await eventually(lambda: upstream.listings >= listed + 3, what="three stall timeouts of silence")
        again.push(snapshot(6, 1, 4))
        again.push(done(6))
        await eventually(lambda: source.received == 6, what="batch 6 applied with the table")
        assert [kind for kind, _ in sink.calls] == ["began", "batch"] and source.following
        assert set(sink.calls[1][1].reloaded[FULL]) == {(1,), (4,)}  # type: ignore[union-attr]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("why", ["gone", "too long"])
async def test_a_table_read_again_gives_up_when_the_upstream_does_not_answer_or_takes_too_long(why: str):
    snapshot, done, batch, _ = pb_messages()
    upstream = CountingUpstream(FakeCall([snapshot(5, 1), done(5), batch(6, TABLE_CHANGED)]), FakeCall([]), head=6)
    source, sink = source_for(upstream), RecordingSink()
    if why == "gone":
        source.reread_patience = 30.0
        upstream.answers = 1  # (the first stream's; none while the table is read again)
    else:
        source.reread_patience = 0.5
    await follow_until(source, sink, lambda calls: any(kind == "lost" for kind, _ in calls))
    lost = next(reason for kind, reason in sink.calls if kind == "lost")
    assert ("no answer" in lost) if why == "gone" else ("while reading a table again" in lost)


class _Closed(grpc.RpcError):
    """grpc's words for a connection closed under a call."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed"


def test_a_closed_connection_blames_the_handshake_only_before_the_stream_was_up():
    assert "probably requires TLS" in explain(_Closed(), "hub:50051")
    running = explain(_Closed(), "hub:50051", established=True)
    assert "TLS" not in running and "closed" in running and "Socket closed" in running


async def test_a_fence_whose_barrier_failed_is_tried_again_while_the_stream_is_up(monkeypatch):
    """The barrier round that would trust memory again failed (it timed out behind a slow
    upstream) while the stream stayed up: another round follows, and memory is trusted --
    nothing else would, and the follower would refuse Sync until its stream broke."""
    monkeypatch.setattr(batches_module, "FENCE_RETRY_MIN", 0.0, raising=False)
    schema = int_key_schema(FULL)
    upstream = MemoryDatabase(schema)
    core = follower_core(upstream, schema)
    failures = [Unavailable("read barrier failed: timed out")]

    class Source:
        database = upstream

        async def follow(self, sink: object) -> None:  # (not used: the test drives the core)
            await asyncio.Event().wait()

        async def send_token(self, token: str) -> None:
            if failures:
                raise failures.pop()
            core.batches.token_received(token)

    core.batches.attach(Source())  # type: ignore[arg-type]
    core.batches.epoch_began("hub", 5, {FULL: {(1,): row(id=1, v=1)}}, None)
    await eventually(lambda: core.engine.ready, what="trusted after a second barrier round")
    assert not failures
    assert (await core.engine.sync()).number == 5
    await core.close()


async def test_a_fence_of_a_stream_lost_meanwhile_does_not_trust_memory():
    schema = int_key_schema(FULL)
    upstream = MemoryDatabase(schema)
    core = follower_core(upstream, schema)
    release = asyncio.Event()

    class Source:
        database = upstream

        async def follow(self, sink: object) -> None:
            await asyncio.Event().wait()

        async def send_token(self, token: str) -> None:
            await release.wait()
            core.batches.token_received(token)

    core.batches.attach(Source())  # type: ignore[arg-type]
    core.batches.epoch_began("hub", 5, {FULL: {(1,): row(id=1, v=1)}}, None)
    await eventually(lambda: core.trust.barrier is not None and core.trust.barrier.rounds == 1, what="a round sent")
    core.batches.source_lost("test")
    release.set()
    await quiescent()
    assert not core.engine.ready
    await core.close()


# ---------------------------------------------------------------- resuming on another hub of the same history


async def test_a_resume_reads_again_a_table_whose_definition_differs_on_the_upstream():
    """Another hub reloaded the table for a schema change at a number of its own, below the
    revision the follower resumes from: the stream never brings that batch. Its ListTables
    says the table's definition differs from the one memory was read with: the follower
    asks it for a barrier (its catalog as new as the database's), reads the table again,
    and only then follows again; its watchers hear of it with the upstream's next batch."""
    snapshot, done, batch, progress = pb_messages()
    resumed_stream = FakeCall([progress(9)])
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1, 2), done(5), batch(8, UPDATE, 1, b'{"id":1}')]),  # then silence
        resumed_stream,
        FakeCall([snapshot(9, 1, 2), done(9)]),  # the table again: rows with the new column
        head=9,
    )
    source, sink = source_for(upstream), RecordingSink()
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: source.received == 8, what="batch 8 in")
        upstream.definition = "d2"  # (the hub the stream resumes on acted on a DDL at its own number)
        await eventually(lambda: ("resumed", None) in sink.calls, what="following again")
        kinds = [kind for kind, _ in sink.calls]
        assert kinds.index("reconciled") < kinds.index("resumed")
        reloaded, failed = next(args for kind, args in sink.calls if kind == "reconciled")
        assert set(reloaded[FULL]) == {(1,), (2,)} and failed == {}
        assert upstream.syncs == 1  # (a barrier first: a listing may be older than the catalog)
        assert list(upstream.requests[2].tables) == [FULL] and upstream.requests[2].initial_state
        assert source.definitions == {FULL: "d2"} and source.reconciled == 1 and source.rebuilds == 0
        told = [args for kind, args in sink.calls if kind == "batch"][-1]  # (the progress mark to 9)
        assert isinstance(told, SourceBatch) and told.revision == 9
        assert [(c.table, c.op, c.apply) for c in told.changes] == [(FULL, TABLE_CHANGED, False)]
        resumed_stream.push(batch(10, UPDATE, 2, b'{"id":2,"v":1}'))
        await eventually(lambda: source.received == 10, what="batch 10 in")
        after = sink.calls[-1][1]
        assert isinstance(after, SourceBatch) and [(c.op, c.apply) for c in after.changes] == [(UPDATE, True)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("how", ["problem", "gone", "key"])
async def test_a_resume_stops_serving_a_table_the_upstream_does_not_serve(how: str):
    """The new hub stopped serving the table (dropped, out of the publication, a key changed
    and restarted) at a number of its own the stream never brings: memory must not go on
    serving it. Watchers hear of it with the next revision, a progress mark here."""
    snapshot, done, batch, progress = pb_messages()
    resumed_stream = FakeCall([])
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1), done(5), batch(8, UPDATE, 1, b'{"id":1}')]), resumed_stream, head=8
    )
    source, sink = source_for(upstream), RecordingSink()
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: source.received == 8, what="batch 8 in")
        if how == "problem":
            upstream.problem = "public.items does not exist (dropped?)"
        elif how == "gone":
            upstream.listed = False
        else:
            source._schemas[FULL] = int_key_schema(FULL, indexes=(IndexConfig("by_id", ("id",)),))
        await eventually(lambda: ("resumed", None) in sink.calls, what="following again")
        reloaded, failed = next(args for kind, args in sink.calls if kind == "reconciled")
        assert reloaded == {} and list(failed) == [FULL]
        assert {"problem": "dropped?", "gone": "no longer serves", "key": "restart the follower"}[how] in failed[FULL]
        assert len(upstream.requests) == 2  # (nothing read again)
        resumed_stream.push(progress(9))
        await eventually(lambda: source.received == 9, what="progress 9 in")
        told = sink.calls[-1][1]
        assert isinstance(told, SourceBatch) and told.revision == 9
        assert [(c.table, c.op, c.apply) for c in told.changes] == [(FULL, TABLE_CHANGED, False)]
        upstream.definition = "d2"  # (not served here: nothing more to do until it is served again)
        assert source._differences(await upstream.list_tables()) == {}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_resume_on_an_upstream_that_agrees_costs_nothing_more():
    snapshot, done, batch, progress = pb_messages()
    upstream = FakeUpstream(FakeCall([snapshot(5, 1), done(5), batch(8, UPDATE, 1, b'{"id":1}')]), head=8)
    upstream.calls.append(FakeCall([progress(8)]))
    source, sink = source_for(upstream), RecordingSink()
    await follow_until(source, sink, lambda calls: ("resumed", None) in calls)
    assert "reconciled" not in [kind for kind, _ in sink.calls]
    assert upstream.syncs == 0 and len(upstream.requests) == 2 and source.reconciled == 0


async def test_a_resume_reads_again_a_table_the_upstream_serves_again():
    """Not served when the follower began (its initial state had no rows of it); the new
    hub serves it again since, at a number of its own below the resume."""
    snapshot, done, batch, _ = pb_messages()
    upstream = FakeUpstream(
        FakeCall([snapshot(5), done(5), batch(8, UPDATE, 1, b'{"id":1}')]),
        FakeCall([]),
        FakeCall([snapshot(8, 1, 3), done(8)]),
        head=8,
    )
    upstream.problem = "its load failed"
    source, sink = source_for(upstream), RecordingSink()
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: source.received == 8, what="batch 8 in")
        assert sink.calls[0][1][2] == {}  # type: ignore[index]  (began without the table)
        upstream.problem = ""
        await eventually(lambda: ("resumed", None) in sink.calls, what="following again")
        reloaded, failed = next(args for kind, args in sink.calls if kind == "reconciled")
        assert set(reloaded[FULL]) == {(1,), (3,)} and failed == {}
        assert source._differences(await upstream.list_tables()) == {}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_resume_never_reads_a_table_again_from_an_upstream_behind_what_was_served():
    """The table's rows as of revision 6 would take back batch 8 that memory holds: the
    follower gives up that stream and tries again (here: the upstream caught up)."""
    snapshot, done, batch, progress = pb_messages()
    upstream = FakeUpstream(
        FakeCall([snapshot(5, 1), done(5), batch(8, UPDATE, 1, b'{"id":1,"v":8}')]),
        FakeCall([]),
        FakeCall([snapshot(6, 1), done(6)]),  # behind
        FakeCall([progress(9)]),
        FakeCall([snapshot(9, 1, 2), done(9)]),
        head=9,
    )
    source, sink = source_for(upstream), RecordingSink()
    task = asyncio.create_task(source.follow(sink))
    try:
        await eventually(lambda: source.received == 8, what="batch 8 in")
        upstream.definition = "d2"
        await eventually(lambda: ("resumed", None) in sink.calls, what="following again")
        reconciled = [args for kind, args in sink.calls if kind == "reconciled"]
        assert len(reconciled) == 1 and set(reconciled[0][0][FULL]) == {(1,), (2,)}
        assert any(kind == "lost" and "behind revision 8" in str(why) for kind, why in sink.calls)
        assert source.rebuilds == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_reconciled_table_is_held_as_the_source_found_it():
    core = replica_tables()
    core.batches.batch(SourceBatch(3, 1, [SourceChange(FULL, INSERT, (1,), row=row(id=1))]))
    core.batches.reconciled({FULL: {(1,): row(id=1, added=None), (2,): row(id=2, added=7)}}, {})
    replica = core.tables[FULL]
    assert replica.stale_get((1,)) == row(id=1, added=None) and replica.stale_get((2,)) == row(id=2, added=7)
    assert core.revisions.applied == 3  # (no revision of its own: the next batch tells watchers)
    core.batches.reconciled({}, {FULL: "the upstream does not serve it from memory: dropped"})
    assert replica.problem is not None and not replica.loaded and replica.row_count == 0

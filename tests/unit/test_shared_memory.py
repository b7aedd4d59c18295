"""The shared-memory store's layout and rules without a database: the key encoding
(the daemon's and the client's agree, byte for byte, with the spec's vectors), the
reader's decision rule, and the daemon's writer driven by a fake engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from cache_sidecar_client import shared_memory as reader

from sidecar.core.fanout import TABLE_CHANGED, UPDATE, Batch, Change
from sidecar.core.keys import KeyColumn
from sidecar.core.revisions import Revision
from sidecar.core.wire import entry, row_json
from sidecar.shm import layout
from sidecar.shm.store import SharedStore
from tests.support.waiting import eventually

U = uuid.UUID("12345678-1234-5678-1234-567812345678")

# (coerced key as the daemon holds it, the client's key, kinds, bytes): docs/shared-memory.md's vectors
VECTORS: list[tuple[tuple[Any, ...], Any, str, bytes]] = [
    ((1,), 1, "l", b"\x01\x00\x00\x00\x00\x00\x00\x00\x01"),
    ((-2,), -2, "i", b"\x01\xff\xff\xff\xff\xff\xff\xff\xfe"),
    (("é",), "é", "s", b"\x02\x00\x00\x00\x02\xc3\xa9"),
    (("ab",), "ab  ", "p", b"\x02\x00\x00\x00\x02ab"),
    ((U,), str(U), "u", b"\x03" + U.bytes),
    ((True,), True, "b", b"\x04\x01"),
    ((b"\x00\xff",), b"\x00\xff", "x", b"\x05\x00\x00\x00\x02\x00\xff"),
    ((7, "a"), (7, "a"), "hs", b"\x01" + (7).to_bytes(8, "big") + b"\x02\x00\x00\x00\x01a"),
]


@pytest.mark.parametrize(("coerced", "given", "kinds", "expected"), VECTORS)
def test_the_daemon_and_the_client_encode_keys_alike(coerced, given, kinds, expected):
    assert layout.encode_key(coerced) == expected
    assert layout.key_encoder(kinds)(coerced) == expected  # (the writer's per-table encoder)
    assert reader.encode_key(kinds, given) == expected


@pytest.mark.parametrize("kinds", ["h", "i", "l", "o"])
@pytest.mark.parametrize("value", [0, 1, -1, 2**31, -(2**63), 2**63 - 1])
def test_the_writers_integer_key_encoder_is_encode_key(kinds, value):
    assert layout.key_encoder(kinds)((value,)) == layout.encode_key((value,))


def test_values_the_store_cannot_look_up_go_to_grpc():
    assert reader.encode_key("i", 2**31) is None  # out of int4's range: the sidecar names the problem
    assert reader.encode_key("l", True) is None  # a bool is not an int here
    assert reader.encode_key("l", "5") is None  # the sidecar coerces strings
    assert reader.encode_key("s", "a\x00b") is None
    assert reader.encode_key("s", "\ud800") is None
    assert reader.encode_key("u", "not a uuid") is None
    assert reader.encode_key("ls", 1) is None  # too few parts
    with pytest.raises(TypeError):
        layout.encode_key((1.5,))


def test_key_kinds_of_columns():
    def column(type_name: str, enum: bool = False) -> KeyColumn:
        return KeyColumn.create("c", type_name, type_name, is_enum=enum)

    assert layout.key_kinds([column("int8"), column("text"), column("uuid"), column("bool")]) == "lsub"
    assert layout.key_kinds([column("anything", enum=True), column("bpchar"), column("bytea")]) == "spx"
    assert layout.key_kinds([column("int4"), column("date")]) is None  # no encoding: stays on gRPC


def test_records_round_trip():
    state = reader.parse_state(layout.state_record(True, 123, 45, "abc.1"))
    assert state == reader.State(True, 123, 45, "abc.1")
    assert reader.parse_table(layout.table_record(True, 9, "ls")) == reader.TableState(True, 9, "ls")
    assert reader.parse_state(b"\x02" + layout.state_record(True, 1, 1, "")[1:]) is None  # another layout
    assert reader.parse_state(b"short") is None


NOW = 10_000_000_000


@pytest.mark.parametrize(
    ("state", "table", "allow_stale", "refused"),
    [
        (reader.State(True, NOW - 100_000, 5, "e.1"), reader.TableState(True, 1, "l"), False, None),
        (reader.State(False, NOW, 5, "e.1"), reader.TableState(True, 1, "l"), False, "change source is down"),
        (reader.State(True, NOW - 1_500_000, 5, "e.1"), reader.TableState(True, 1, "l"), False, "heartbeat is old"),
        (reader.State(True, NOW, 5, "e.1"), reader.TableState(False, 0, "l"), False, "not served"),
        (reader.State(True, NOW, 5, "e.1"), None, False, "not in the store"),
        (None, reader.TableState(True, 1, "l"), False, "no store"),
        (reader.State(False, 0, 5, "e.1"), reader.TableState(True, 1, "l"), True, None),  # allow_stale
        (reader.State(False, 0, 5, "e.1"), reader.TableState(False, 1, "l"), True, "not served"),
    ],
)
def test_the_reader_serves_only_while_the_store_is_fresh(state, table, allow_stale, refused):
    why = reader.refusal(state, table, NOW, allow_stale, bound=1.0)
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_table_names_as_the_store_spells_them():
    assert reader.store_name("patron") == "public.patron"
    assert reader.store_name("Sales.Patron") == "sales.patron"  # unquoted: folded, as the sidecar does
    assert reader.store_name('public."Patron"') == 'public."Patron"'  # quoted: as given


def test_a_revision_of_another_epoch_cannot_be_judged_by_the_store():
    state = reader.State(True, NOW, 5, "e.2")
    assert reader.reached(state, "e.2", 5) is True
    assert reader.reached(state, "e.2", 6) is False
    assert reader.reached(state, "e.1", 1) is None  # an epoch change: ask the sidecar


# ---------------------------------------------------------------- the writer, with a fake engine


@dataclass
class FakeSchema:
    qualified: str
    key_columns: list[KeyColumn]


@dataclass
class FakeTable:
    schema: FakeSchema
    rows: dict[tuple[Any, ...], bytes] = field(default_factory=dict)
    mode: str = "full"
    loaded: bool = True
    problem: str | None = None
    reloading: bool = False

    def authoritative_rows(self) -> dict[tuple[Any, ...], bytes] | None:
        return self.rows if self.problem is None else None


@dataclass
class FakeEngine:
    """The parts of the cache the store reads (``assembly.Core``'s tables, engine and trust), in one."""

    tables: dict[str, Any]
    revision: Revision = field(default_factory=lambda: Revision("e.1", 1))
    up: bool = True  # (the trust's: the change source is up)
    stalled_seconds: float = 0.0

    @property
    def engine(self) -> FakeEngine:
        return self

    @property
    def trust(self) -> FakeEngine:
        return self


def make(tmp_path, map_size: int = 64 * 1024 * 1024) -> tuple[SharedStore, FakeEngine, FakeTable]:
    table = FakeTable(FakeSchema("public.t", [KeyColumn.create("id", "int8", "bigint")]))
    table.rows = {(1,): entry(b'{"id":1}'), (2,): entry(b'{"id":2}')}
    engine = FakeEngine({"public.t": table})
    return SharedStore(str(tmp_path / "store"), map_size, engine), engine, table


def held(store: SharedStore) -> tuple[reader.State | None, reader.TableState | None, dict[bytes, bytes]]:
    """What a reader would see (through the writer's own environment: one per process)."""
    env = store._env
    meta, rows = env.open_db(layout.META_DB), env.open_db(layout.rows_db_name("public.t"))
    with env.begin() as txn:
        return (
            reader.parse_state(txn.get(layout.STATE_KEY, db=meta)),
            reader.parse_table(txn.get(layout.table_key("public.t"), db=meta)),
            dict(txn.cursor(db=rows).iternext()),
        )


def batch(revision: int, *changes: Change) -> Batch:
    return Batch("e.1", revision, 0, list(changes))


def test_the_writer_mirrors_applied_batches_and_rewrites_whole_tables(tmp_path):
    store, engine, table = make(tmp_path)
    state, info, rows = held(store)
    assert state is not None and not state.source_up and info == reader.TableState(False, 0, "l") and rows == {}
    store.rebuilt()
    store.applied(engine.revision, [])
    state, info, rows = held(store)
    assert state is not None and state.source_up and state.revision == 1 and state.epoch == "e.1"
    assert info == reader.TableState(True, 2, "l")
    assert rows == {layout.encode_key((1,)): b'{"id":1}', layout.encode_key((2,)): b'{"id":2}'}
    # a keyed batch: an update, an insert, a deleted key, a key change
    table.rows = {(1,): entry(b'{"id":1,"v":2}'), (3,): entry(b'{"id":3}'), (4,): entry(b'{"id":4}')}
    engine.revision = Revision("e.1", 2)
    store.applied(
        engine.revision,
        [
            batch(
                2,
                Change("public.t", UPDATE, (1,)),
                Change("public.t", UPDATE, (3,)),
                Change("public.t", UPDATE, (4,), old_key=(2,)),
            )
        ],
    )
    state, _, rows = held(store)
    assert state is not None and state.revision == 2
    assert rows == {
        layout.encode_key((1,)): b'{"id":1,"v":2}',
        layout.encode_key((3,)): b'{"id":3}',
        layout.encode_key((4,)): b'{"id":4}',
    }
    # a whole-table change (TRUNCATE, a reload): rewritten at once
    table.rows = {(9,): entry(b'{"id":9}')}
    engine.revision = Revision("e.1", 3)
    store.applied(engine.revision, [batch(3, Change("public.t", TABLE_CHANGED))])
    _, info, rows = held(store)
    assert rows == {layout.encode_key((9,)): b'{"id":9}'} and info == reader.TableState(True, 1, "l")
    store.close()


def test_a_table_being_reloaded_is_not_served_and_is_rewritten_after(tmp_path):
    store, engine, table = make(tmp_path)
    store.applied(engine.revision, [])
    table.reloading = True  # memory holds old and new rows mixed
    table.rows[(5,)] = entry(b'{"id":5}')
    engine.revision = Revision("e.1", 2)
    store.applied(engine.revision, [batch(2, Change("public.t", UPDATE, (5,)))])
    _, info, rows = held(store)
    assert info is not None and not info.served and layout.encode_key((5,)) not in rows
    table.reloading = False
    table.rows = {(6,): entry(b'{"id":6}')}
    store.beat()  # (a rewrite waits for no batch)
    _, info, rows = held(store)
    assert info is not None and info.served and rows == {layout.encode_key((6,)): b'{"id":6}'}
    store.close()


def test_source_down_held_back_and_closed_stores_are_not_fresh(tmp_path):
    store, engine, _ = make(tmp_path)
    store.applied(engine.revision, [])
    engine.up = False
    store.state_changed()
    assert held(store)[0].source_up is False  # type: ignore[union-attr]
    engine.up, engine.stalled_seconds = True, 5.0  # the revision stands still while changes wait
    store.beat()
    assert held(store)[0].source_up is False  # type: ignore[union-attr]
    engine.stalled_seconds = 0.0
    store.beat()
    state = held(store)[0]
    assert state is not None and state.source_up and abs(state.heartbeat_us - time.time_ns() // 1000) < 5_000_000
    env = store._env
    store.close()
    assert env is not None


def test_a_full_store_stops_being_written_and_says_so(tmp_path):
    store, engine, table = make(tmp_path, map_size=1024 * 1024)
    store.applied(engine.revision, [])
    table.rows = {(n,): entry(b"x" * 1000) for n in range(5000)}  # 5 MB: more than the map holds
    engine.revision = Revision("e.1", 2)
    store.applied(engine.revision, [batch(2, Change("public.t", TABLE_CHANGED))])
    assert store.failed is not None and "full" in store.failed
    state = held(store)[0]
    assert state is not None and not state.source_up
    store.close()


def test_a_big_table_is_rewritten_a_chunk_at_a_time_and_served_only_when_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("sidecar.shm.store.REWRITE_CHUNK", 2)
    store, engine, table = make(tmp_path)
    table.rows = {(n,): entry(b'{"id":%d}' % n) for n in range(1, 6)}
    store.applied(engine.revision, [])
    _, info, rows = held(store)
    assert store.rewriting and info is not None and not info.served and rows == {}
    store.rewrite_step()  # rows 1, 2
    # meanwhile: row 1 changes, row 2 goes, row 9 arrives (published), row 5 goes (not yet published)
    table.rows[(1,)] = entry(b'{"id":1,"v":2}')
    del table.rows[(2,)]
    table.rows[(9,)] = entry(b'{"id":9}')
    del table.rows[(5,)]
    engine.revision = Revision("e.1", 2)
    store.applied(engine.revision, [batch(2, *(Change("public.t", UPDATE, (n,)) for n in (1, 2, 9)))])
    _, info, _ = held(store)
    assert info is not None and not info.served
    store.rewrite_step()  # rows 3, 4
    _, info, _ = held(store)
    assert store.rewriting and info is not None and not info.served
    store.rewrite_step()  # row 5 (gone: skipped), then the changed keys; served
    _, info, rows = held(store)
    assert not store.rewriting and info is not None and info.served
    assert rows == {layout.encode_key(key): row_json(value) for key, value in table.rows.items()}
    store.close()


def test_a_whole_table_change_during_a_rewrite_begins_it_again(tmp_path, monkeypatch):
    monkeypatch.setattr("sidecar.shm.store.REWRITE_CHUNK", 2)
    store, engine, table = make(tmp_path)
    table.rows = {(n,): entry(b'{"id":%d}' % n) for n in range(1, 6)}
    store.applied(engine.revision, [])
    store.rewrite_step()
    table.rows = {(n,): entry(b'{"id":%d}' % n) for n in range(10, 14)}  # (TRUNCATE, then new rows)
    engine.revision = Revision("e.1", 2)
    store.applied(engine.revision, [batch(2, Change("public.t", TABLE_CHANGED))])
    while store.rewriting:
        store.rewrite_step()
    _, info, rows = held(store)
    assert info is not None and info.served
    assert rows == {layout.encode_key(key): row_json(value) for key, value in table.rows.items()}
    store.close()


async def test_the_heartbeat_task_drives_rewrites(tmp_path, monkeypatch):
    monkeypatch.setattr("sidecar.shm.store.REWRITE_CHUNK", 2)
    store, engine, table = make(tmp_path)
    table.rows = {(n,): entry(b'{"id":%d}' % n) for n in range(1, 8)}
    store.applied(engine.revision, [])
    task = asyncio.create_task(store.run())
    try:
        await eventually(lambda: (info := held(store)[1]) is not None and info.served, what="served")
    finally:
        task.cancel()
    assert len(held(store)[2]) == 7
    store.close()


@pytest.mark.parametrize(
    "size", [0, 1, 120, 123, 124, 125, 126, 127, 128, 16375, 16379, 16380, 16384, 65525, 65535, 70000]
)
def test_rows_are_written_as_the_json_the_api_serves_whatever_their_size(size):
    from sidecar.shm.store import _items

    row = b"x" * size
    assert _items({(1,): entry(row)}, [(1,), (2,)]) == [(layout.encode_key((1,)), row)]


# ---------------------------------------------------------------- the reader, with a fake LMDB


class FakeTxn:
    def __init__(self, env: FakeEnv) -> None:
        self.env, self.snapshot, self.data, self.looked_up = env, env.snapshot, env.data, env.looked_up
        env.open += 1

    def abort(self) -> None:
        self.env.open -= 1

    def id(self) -> int:
        return self.snapshot

    def get(self, key: bytes, db: str = "rows") -> bytes | None:
        self.looked_up.append(key)
        return self.data.get((db, key))


@dataclass
class FakeEnv:
    """An LMDB environment's snapshots: each ``commit`` makes a new one (a new transaction id)."""

    snapshot: int = 0
    data: dict[tuple[str, bytes], bytes] = field(default_factory=dict)
    looked_up: list[bytes] = field(default_factory=list)
    open: int = 0  # read transactions begun and not ended (each pins a snapshot's pages)

    def commit(self, revision: int, row: bytes, source_up: bool = True) -> None:
        self.snapshot += 1
        self.data = {
            ("meta", reader.STATE_KEY): layout.state_record(source_up, time.time_ns() // 1000, revision, "e.1"),
            ("meta", reader.TABLE_PREFIX + b"public.t"): layout.table_record(True, 1, "l"),
            ("rows", layout.encode_key((1,))): row,
        }

    def begin(self, db: str | None = None) -> FakeTxn:
        return FakeTxn(self)


def test_the_reader_reads_the_records_of_the_snapshot_it_reads_rows_from():
    env = FakeEnv()
    env.commit(5, b'{"v":1}')
    store = reader.SharedMemory("/nonexistent")
    store._env, store._meta, store._dbs["public.t"] = env, "meta", "rows"
    first = store.read("public.t", [1], None, False)
    assert isinstance(first, reader.Answer) and (first.revision, first.rows) == (5, [b'{"v":1}'])
    env.looked_up.clear()
    again = store.read("public.t", [1, 2], None, False)  # the same snapshot: its rows only
    assert isinstance(again, reader.Answer) and again.revision == 5 and again.rows == [b'{"v":1}', None]
    assert env.looked_up == [layout.encode_key((1,)), layout.encode_key((2,))]
    env.commit(6, b'{"v":2}')  # the writer's next transaction: the records read again with the rows
    after = store.read("public.t", [1], None, False)
    assert isinstance(after, reader.Answer) and (after.revision, after.rows) == (6, [b'{"v":2}'])
    env.commit(7, b'{"v":3}', source_up=False)
    assert store.read("public.t", [1], None, False) is None  # (this snapshot's state: source down)
    assert store.read("public.t", [1], ("e.1", 8), True) is reader.WAIT
    assert env.open == 0  # every read ended its transaction, answered, refused or waiting


def test_keys_too_long_for_lmdb_are_not_written_and_the_writer_goes_on(tmp_path):
    table = FakeTable(FakeSchema("public.t", [KeyColumn.create("name", "text", "text")]))
    longest, too_long = "m" * (layout.MAX_KEY - 5), "n" * (layout.MAX_KEY - 4)  # (5 bytes: tag and length)
    table.rows = {("a",): entry(b'{"n":1}'), (longest,): entry(b'{"n":2}'), (too_long,): entry(b'{"n":3}')}
    engine = FakeEngine({"public.t": table})
    store = SharedStore(str(tmp_path / "store"), 64 * 1024 * 1024, engine)
    store.applied(engine.revision, [])  # (the table's first write: a rewrite)
    _, info, rows = held(store)
    assert info is not None and info.served and set(rows) == {layout.encode_key(("a",)), layout.encode_key((longest,))}
    table.rows[(too_long,)] = entry(b'{"n":4}')  # changed, then deleted: nothing to write either way
    table.rows[("x" * 2000,)] = entry(b'{"n":5}')
    engine.revision = Revision("e.1", 2)
    store.applied(
        engine.revision, [batch(2, Change("public.t", UPDATE, (too_long,)), Change("public.t", UPDATE, ("x" * 2000,)))]
    )
    del table.rows[(too_long,)]
    engine.revision = Revision("e.1", 3)
    store.applied(engine.revision, [batch(3, Change("public.t", UPDATE, (too_long,)))])
    state, info, rows = held(store)
    assert store.failed is None and state is not None and state.revision == 3 and info is not None and info.served
    assert len(rows) == 2
    store.close()


def test_a_reader_closed_and_opened_again_forgets_the_old_stores_records(monkeypatch):
    monkeypatch.setattr(reader, "_release", lambda directory: None)  # (no real environment here)
    old, new = FakeEnv(), FakeEnv()
    old.commit(5, b'{"v":1}')
    new.commit(1, b'{"v":9}')  # a store made anew: its transaction ids start over (the same id, 1)
    store = reader.SharedMemory("/nonexistent")
    store._env, store._meta, store._dbs["public.t"] = old, "meta", "rows"
    assert store.read("public.t", [1], None, False).revision == 5
    store.close()
    store._env, store._meta, store._dbs["public.t"] = new, "meta", "rows"
    answer = store.read("public.t", [1], None, False)
    assert isinstance(answer, reader.Answer) and (answer.revision, answer.rows) == (1, [b'{"v":9}'])

"""Hand-made response encodings must equal what protobuf makes and parses."""

from __future__ import annotations

import pytest

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core import fanout, wire

SIZES = [0, 1, 120, 121, 122, 127, 128, 4095, 4096, 16379, 16380, 16384, 300_000]


def revisions(epoch: str = "0123456789abcdef", number: int = 300) -> wire.RevisionField:
    r = wire.RevisionField()
    r.update(epoch, number)
    return r


@pytest.mark.parametrize("size", SIZES)
def test_entry_is_a_row_result_and_gives_its_json_back(size):
    json_bytes = b"x" * size
    entry = wire.entry(json_bytes)
    parsed = pb.BatchGetResponse.FromString(entry)
    assert len(parsed.rows) == 1 and parsed.rows[0].found and parsed.rows[0].row == json_bytes
    if size:  # byte for byte what protobuf makes (it omits an empty row)
        assert entry == pb.BatchGetResponse(rows=[pb.RowResult(found=True, row=json_bytes)]).SerializeToString()
    assert wire.row_json(entry) == json_bytes


@pytest.mark.parametrize("size", SIZES)
def test_get_response(size):
    json_bytes = b"y" * size
    revs = revisions(number=size)
    expected = pb.GetResponse(found=True, row=json_bytes, revision=pb.Revision(epoch="0123456789abcdef", number=size))
    encoded = wire.get_response(wire.entry(json_bytes), revs)
    assert pb.GetResponse.FromString(encoded) == expected
    if size:  # (protobuf omits an empty row; a row's JSON is never empty)
        assert encoded == expected.SerializeToString()


def test_get_response_not_found():
    parsed = pb.GetResponse.FromString(wire.get_response(None, revisions()))
    assert not parsed.found and parsed.row == b"" and parsed.revision.number == 300


def test_batch_response_keeps_order_and_missing_rows():
    rows = [wire.entry(b'{"a":1}'), None, wire.entry(b"z" * 200), None]
    parsed = pb.BatchGetResponse.FromString(wire.batch_get_response(rows, revisions("e", 2**40)))
    assert [r.found for r in parsed.rows] == [True, False, True, False]
    assert parsed.rows[2].row == b"z" * 200
    assert (parsed.revision.epoch, parsed.revision.number) == ("e", 2**40)


def test_revision_fields_follow_updates():
    revs = revisions("a", 1)
    first = revs.get_field
    revs.update("a", 1)
    assert revs.get_field is first
    revs.update("a", 2)
    assert pb.GetResponse.FromString(revs.get_field).revision.number == 2


@pytest.mark.parametrize("truncated", [False, True])
def test_query_response(truncated):
    rows = [wire.entry(b'{"a":1}'), wire.entry(b"q" * 300)]
    encoded = wire.query_response(rows, truncated, revisions("e", 7))
    expected = pb.QueryResponse(
        rows=[pb.RowResult(found=True, row=b'{"a":1}'), pb.RowResult(found=True, row=b"q" * 300)],
        revision=pb.Revision(epoch="e", number=7),
        truncated=truncated,
    )
    assert pb.QueryResponse.FromString(encoded) == expected
    assert encoded == expected.SerializeToString()


def _batches(count: int, row_size: int = 10) -> list[fanout.Batch]:
    out = []
    for revision in range(1, count + 1):
        change = fanout.Change("public.t", fanout.UPDATE, (revision, "k"), None, b"x" * (row_size + revision), True)
        other = fanout.Change("public.t", fanout.DELETE, (-revision, "k"), (revision, "old"), None, False)
        out.append(fanout.Batch("epoch", revision, 1000 + revision, [change, other]))
    return out


def _decoded(messages: list[bytes]) -> list[pb.ChangeBatch]:
    """What a client reads: every batch of every message, in order."""
    found = []
    for data in messages:
        response = pb.WatchResponse.FromString(data)
        if response.WhichOneof("kind") == "batches":
            found.extend(response.batches.batches)
        else:
            assert response.WhichOneof("kind") == "changes"
            found.append(response.changes)
    return found


@pytest.mark.parametrize("count", [2, 3, 40])
def test_several_batches_decode_to_the_same_batches_in_order_as_single_ones(count):
    batches = _batches(count)
    singles = [wire.watch_messages(b, 1 << 20)[0] for b in batches]
    (grouped,) = wire.watch_messages(fanout.Batches(batches), 1 << 20)
    response = pb.WatchResponse.FromString(grouped)
    assert response.WhichOneof("kind") == "batches"
    assert list(response.batches.batches) == [pb.WatchResponse.FromString(s).changes for s in singles]
    assert [b.revision.number for b in response.batches.batches] == list(range(1, count + 1))
    assert wire.watch_message(fanout.Batches(batches)) == grouped


def test_several_batches_are_split_to_fit_and_a_big_one_goes_alone(monkeypatch):
    monkeypatch.setattr(wire, "BATCHES_BYTES", 600)
    big = fanout.Batch("epoch", 31, 1, [fanout.Change("public.t", fanout.INSERT, (31,), None, b"y" * 900, True)])
    batches = [*_batches(30), big, *_batches(3)]  # (revisions repeat: only order matters here)
    messages = wire.watch_messages(fanout.Batches(batches), 1 << 20)
    assert len(messages) > 3
    assert all(len(m) <= 600 for m in messages if pb.WatchResponse.FromString(m).WhichOneof("kind") == "batches")
    alone = [m for m in messages if len(m) > 600]
    assert len(alone) == 1 and pb.WatchResponse.FromString(alone[0]).WhichOneof("kind") == "changes"
    singles = [pb.WatchResponse.FromString(wire.watch_messages(b, 1 << 20)[0]).changes for b in batches]
    assert _decoded(messages) == singles
    # the server's message limit bounds them too, when it is the smaller
    monkeypatch.setattr(wire, "BATCHES_BYTES", 1 << 20)
    limited = wire.watch_messages(fanout.Batches(_batches(30)), 400)
    assert len(limited) > 1 and all(len(m) <= 400 for m in limited)
    assert _decoded(limited) == [pb.WatchResponse.FromString(wire.watch_message(b)).changes for b in _batches(30)]


# ---------------------------------------------------------------- Watch batches, by hand


def _runtime_batch(epoch: str, revision: int, xid: int, changes: list[fanout.Change]) -> bytes:
    """The same batch built with the protobuf runtime (what the hand encoding must equal)."""

    def key(values: tuple[object, ...]) -> pb.Key:
        from sidecar.core.keys import part_kind

        return pb.Key(parts=[pb.KeyPart(**dict([part_kind(v)])) for v in values])

    events = []
    for c in changes:
        event = pb.ChangeEvent(table=c.table, operation=c.op, has_row=c.has_row, ahead=c.ahead)  # type: ignore[arg-type]
        if c.key is not None:
            event.key.CopyFrom(key(c.key))
        if c.old_key is not None:
            event.old_key.CopyFrom(key(c.old_key))
        if c.row is not None:
            event.row = c.row
        events.append(event)
    message = pb.WatchResponse(
        changes=pb.ChangeBatch(revision=pb.Revision(epoch=epoch, number=revision), xid=xid, events=events)
    )
    return message.SerializeToString()


def _random_key(rng) -> tuple[object, ...]:
    import datetime as dt
    import uuid

    choices = [
        lambda: rng.randrange(-(1 << 63), 1 << 63),
        lambda: rng.randrange(0, 1 << 22),  # (the short path for one small key, and past it)
        lambda: rng.choice([0, 1, -1, 63, 64, -64, -65, 127, 128, (1 << 63) - 1, -(1 << 63)]),
        lambda: "".join(rng.choice("aé中\x00 z") for _ in range(rng.randrange(0, 200))),
        lambda: rng.choice([True, False]),
        lambda: rng.random() * 1e6 - 5e5,
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))),
        lambda: dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(1000)),
        lambda: uuid.UUID(int=rng.getrandbits(128)),
    ]
    return tuple(rng.choice(choices)() for _ in range(rng.choice([0, 1, 1, 1, 2, 3])))


@pytest.mark.parametrize("seed", range(40))
def test_hand_encoded_batches_equal_the_runtimes(seed):
    import random

    rng = random.Random(seed)
    changes = []
    for _ in range(rng.randrange(0, 30)):
        changes.append(
            fanout.Change(
                rng.choice(["public.items", "s.t", "", "ü" * 70]),
                rng.choice([fanout.INSERT, fanout.UPDATE, fanout.DELETE, fanout.TRUNCATE, fanout.SNAPSHOT, 0]),
                None if rng.random() < 0.1 else _random_key(rng),
                _random_key(rng) if rng.random() < 0.2 else None,
                rng.choice([None, b"", b'{"id":1}', b"x" * rng.randrange(0, 300)]),
                rng.random() < 0.5,
                ahead=rng.random() < 0.3,  # (a row newer than the batch's others: ChangeEvent.ahead)
            )
        )
    epoch = rng.choice(["", "0123456789abcdef"])
    revision, xid = rng.choice([0, 1, 300, 1 << 40]), rng.choice([0, 5, 1 << 33])
    ours = wire._batch(epoch, revision, xid, changes)
    runtime = _runtime_batch(epoch, revision, xid, changes)
    assert pb.WatchResponse.FromString(ours) == pb.WatchResponse.FromString(runtime)
    assert ours == runtime  # (byte for byte: the runtime writes fields in number order too)


def test_a_key_value_out_of_int64_is_refused_as_by_the_runtime():
    with pytest.raises(ValueError):
        wire._batch("e", 1, 0, [fanout.Change("public.items", fanout.UPDATE, (1 << 64,))])

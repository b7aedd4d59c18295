"""sidecar.pg.pgoutput against real messages captured from PostgreSQL (pgoutput_messages.json,
made by ``python -m tests.support.logical``), forged ones, and a fuzzer."""

from __future__ import annotations

import datetime as dt
import json
import random
import struct
import time
from pathlib import Path

import pytest

from sidecar.pg import pgoutput as p

FIXTURES = json.loads((Path(__file__).parent / "pgoutput_messages.json").read_text())
SCENARIOS: dict[str, list[bytes]] = {
    name: [bytes.fromhex(m) for m in messages] for name, messages in FIXTURES["scenarios"].items()
}


def decoded(name: str) -> list[p.Message]:
    decoder = p.StreamDecoder()
    return [decoder.feed(m) for m in SCENARIOS[name]]


def of_type(messages: list[p.Message], kind: type) -> list:  # type: ignore[type-arg]
    return [m for m in messages if isinstance(m, kind)]


def test_every_captured_message_parses_and_every_message_type_is_covered() -> None:
    seen: set[type] = set()
    for name in SCENARIOS:
        seen.update(type(m) for m in decoded(name))
    assert seen == set(p.Message.__args__)  # type: ignore[attr-defined]


def test_inserts_updates_and_deletes_of_many_types() -> None:
    messages = decoded("changes")
    begin, commit = messages[0], messages[-1]
    assert isinstance(begin, p.Begin) and isinstance(commit, p.Commit)
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert begin.commit_time == commit.commit_time

    types = {t.name: t for t in of_type(messages, p.Type)}
    assert set(types) >= {"mood", "pair"}  # user-defined types are announced (a domain by its base's name)
    (relation,) = of_type(messages, p.Relation)
    assert relation.name == "t" and relation.replica_identity == "d"
    assert [c.name for c in relation.columns] == ["id", "n", "txt", "b", "j", "arr", "m", "d", "p", "ts", "nothing"]
    assert [c.is_key for c in relation.columns] == [True] + [False] * 10
    assert relation.columns[0].type_oid == 23 and relation.columns[1].type_oid == 1700
    assert relation.columns[6].type_oid == types["mood"].type_oid

    (insert,) = of_type(messages, p.Insert)
    assert insert.relation_id == relation.relation_id and insert.xid is None
    assert insert.new == (
        p.Text(b"1"),
        p.Text(b"12345678901234567890.000000000000000001"),
        p.Text('h\u00e9llo \U0001f600 "q" \\ x'.encode()),
        p.Text(b"\\x00ff10"),
        p.Text(b'{"a": [1, 2.50, null]}'),
        p.Text(b"{1,NULL,3}"),
        p.Text(b"happy"),
        p.Text(b"7"),
        p.Text(b'(1,"x,""y""")'),  # record_out doubles quotes
        p.Text(b"2024-01-02 03:04:05.123+00"),
        None,
    )

    plain, key_change = of_type(messages, p.Update)
    assert plain.old_kind is None and plain.old is None and plain.new[2] == p.Text(b"changed")
    assert key_change.old_kind == "K" and key_change.old == (p.Text(b"1"),) + (None,) * 10
    assert key_change.new[0] == p.Text(b"2")

    (delete,) = of_type(messages, p.Delete)
    assert delete.old_kind == "K" and delete.old == (p.Text(b"2"),) + (None,) * 10


def test_replica_identity_full_sends_the_whole_old_row() -> None:
    messages = decoded("replica_identity_full")
    (relation,) = of_type(messages, p.Relation)
    assert relation.replica_identity == "f" and all(c.is_key for c in relation.columns)
    (update,) = of_type(messages, p.Update)
    assert update.old_kind == "O" and update.old == (p.Text(b"1"), p.Text(b"a"))
    assert update.new == (p.Text(b"1"), p.Text(b"b"))
    (delete,) = of_type(messages, p.Delete)
    assert delete.old_kind == "O" and delete.old == (p.Text(b"1"), p.Text(b"b"))


def test_an_unchanged_toasted_value_is_unchanged() -> None:
    insert, update = of_type(decoded("unchanged_toast"), (p.Insert, p.Update))
    assert insert.new[1] == p.Text(b"0123456789" * 300)
    assert update.new == (p.Text(b"1"), p.UNCHANGED, p.Text(b"b"))
    assert repr(p.UNCHANGED) == "UNCHANGED"


def test_binary_columns() -> None:
    first, second = of_type(decoded("binary_columns"), p.Insert)
    assert first.new == (p.Binary(struct.pack("!i", 1)), p.Binary(struct.pack("!d", 1.5)), p.Binary(b"x"))
    assert second.new == (p.Binary(struct.pack("!i", 2)), None, None)


def test_truncate_and_its_options() -> None:
    messages = decoded("truncate")
    relations = {r.name: r.relation_id for r in of_type(messages, p.Relation)}
    plain, both = of_type(messages, p.Truncate)
    assert plain.relation_ids == (relations["b"],) and not plain.cascade and not plain.restart_identity
    assert set(both.relation_ids) == {relations["a"], relations["b"]}
    assert both.cascade and both.restart_identity and both.options == 3


def test_a_rolled_back_savepoint_sends_nothing() -> None:
    inserts = of_type(decoded("savepoint"), p.Insert)
    assert [i.new for i in inserts] == [(p.Text(b"1"),), (p.Text(b"3"),)]


def test_logical_messages_transactional_and_not() -> None:
    messages = decoded("logical_messages")
    outside, begin, inside, commit = messages
    assert isinstance(outside, p.LogicalMessage) and not outside.transactional
    assert outside.prefix == "other" and outside.content == b"\x00\xff"
    assert isinstance(inside, p.LogicalMessage) and inside.transactional
    assert inside.prefix == "sidecar" and inside.content == "token-\u00e9".encode()
    assert isinstance(begin, p.Begin) and isinstance(commit, p.Commit)
    assert begin.final_lsn == commit.commit_lsn and inside.lsn < commit.commit_lsn


def test_origin() -> None:
    messages = decoded("origin")
    (origin,) = of_type(messages, p.Origin)
    assert origin.commit_lsn == p.parse_lsn("0/12345678") and origin.name.endswith("_origin")
    assert isinstance(messages[1], p.Origin)  # right after Begin
    assert p.from_pg_time(messages[0].commit_time) == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)  # type: ignore[union-attr]


def test_two_phase_commit_and_rollback() -> None:
    messages = decoded("two_phase")
    begin_one, begin_two = of_type(messages, p.BeginPrepare)
    prepare_one, prepare_two = of_type(messages, p.Prepare)
    (committed,) = of_type(messages, p.CommitPrepared)
    (rolled_back,) = of_type(messages, p.RollbackPrepared)
    assert begin_one.gid == prepare_one.gid == committed.gid and begin_one.gid.endswith("_one")
    assert begin_one.xid == prepare_one.xid == committed.xid
    assert begin_one.prepare_lsn == prepare_one.prepare_lsn and prepare_one.end_lsn <= committed.commit_lsn
    assert begin_two.gid == prepare_two.gid == rolled_back.gid and rolled_back.gid.endswith("_two")
    assert rolled_back.prepare_end_lsn == prepare_two.end_lsn < rolled_back.rollback_end_lsn
    assert rolled_back.prepare_time == prepare_two.prepare_time <= rolled_back.rollback_time


def test_a_streamed_transaction() -> None:
    messages = decoded("streamed")
    starts = of_type(messages, p.StreamStart)
    assert len(starts) > 1 and starts[0].first_segment and not any(s.first_segment for s in starts[1:])
    xid = starts[0].xid
    assert len(of_type(messages, p.StreamStop)) == len(starts)
    (relation,) = of_type(messages, p.Relation)
    assert relation.xid == xid
    inserts = of_type(messages, p.Insert)
    top = [i for i in inserts if i.xid == xid]
    sub = [i for i in inserts if i.xid != xid]
    assert top and sub and all(i.new[1] == p.Text(b"sub") for i in sub)
    (abort,) = of_type(messages, p.StreamAbort)
    assert abort.xid == xid and abort.subxid == sub[0].xid and abort.abort_lsn is None and abort.abort_time is None
    (commit,) = of_type(messages, p.StreamCommit)
    assert commit.xid == xid and commit.commit_lsn < commit.end_lsn and messages[-1] == commit


def test_streaming_parallel_stream_abort_carries_lsn_and_time() -> None:
    messages = decoded("streamed_parallel")
    (abort,) = of_type(messages, p.StreamAbort)
    (commit,) = of_type(messages, p.StreamCommit)
    assert abort.abort_lsn is not None and abort.abort_lsn <= commit.commit_lsn
    assert abort.abort_time is not None and abort.abort_time <= commit.commit_time


def test_a_streamed_prepared_transaction() -> None:
    messages = decoded("streamed_prepare")
    (prepare,) = of_type(messages, p.StreamPrepare)
    (committed,) = of_type(messages, p.CommitPrepared)
    assert prepare.xid == committed.xid == of_type(messages, p.StreamStart)[0].xid
    assert prepare.gid == committed.gid and prepare.end_lsn <= committed.commit_lsn


def test_a_streamed_change_read_as_unstreamed_is_refused() -> None:
    insert = next(m for m in SCENARIOS["streamed"] if m[:1] == b"I")
    assert isinstance(p.parse(insert, streamed=True), p.Insert)
    with pytest.raises(p.ProtocolError, match="Insert"):
        p.parse(insert)


def test_the_decoder_refuses_unbalanced_stream_blocks() -> None:
    start, stop = SCENARIOS["streamed"][0], b"E"
    decoder = p.StreamDecoder()
    decoder.feed(start)
    with pytest.raises(p.ProtocolError, match="already inside"):
        decoder.feed(start)
    decoder.feed(stop)
    with pytest.raises(p.ProtocolError, match="not inside"):
        decoder.feed(stop)


# -- malformed input --------------------------------------------------------------------


def all_messages() -> list[tuple[bytes, bool]]:
    """Every captured message with whether it was inside a streamed block."""
    out = []
    for name in SCENARIOS:
        decoder = p.StreamDecoder()
        for m in SCENARIOS[name]:
            streamed = decoder.streamed_xid is not None
            decoder.feed(m)
            out.append((m, streamed))
    return out


def test_every_truncation_of_every_captured_message_is_a_protocol_error() -> None:
    checked = 0
    for message, streamed in all_messages():
        for end in range(len(message)):
            if message[:1] == b"A" and end == 9:
                continue  # a parallel Stream Abort without its optional tail is a valid one
            with pytest.raises(p.ProtocolError, match=r"offset \d+"):
                p.parse(message[:end], streamed=streamed)
            checked += 1
    assert checked > 10_000


def test_a_byte_too_many_is_a_protocol_error() -> None:
    for message, streamed in all_messages():
        if message[:1] in (b"A",):  # Stream Abort's optional tail makes some lengths valid
            continue
        with pytest.raises(p.ProtocolError, match=r"unexpected bytes|need \d+ bytes"):
            p.parse(message + b"\0", streamed=streamed)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"Z", "unknown message type 0x5a"),
        # Insert: relation 1, 'N', 32767 columns but two bytes left
        (b"I\0\0\0\1N\x7f\xff" + b"nn", "count 32767 exceeds the 2 bytes left at offset 6"),
        (b"I\0\0\0\1N\xff\xff", "negative count -1 at offset 6"),
        # a text column claiming 2 GB, and one claiming a negative length
        (b"I\0\0\0\1N\0\1t\x7f\xff\xff\xff" + b"abc", "column length 2147483647 exceeds the 3 bytes left at offset 9"),
        (b"I\0\0\0\1N\0\2t\xff\xff\xff\xfbnabcdef", "column length -5 exceeds"),
        (b"I\0\0\0\1N\0\1x", "unknown column kind 0x78 at offset 8"),
        (b"I\0\0\0\1X\0\0", "expected 'N' (new tuple), found 0x58 at offset 5"),
        (b"U\0\0\0\1K\0\0", "truncated"),
        (b"D\0\0\0\1N\0\0", "expected 'K' or 'O'"),
        (b"R\0\0\0\1public\0t\0x\0\0", "unknown replica identity 'x' at offset 14"),
        (b"R\0\0\0\1public\0t\0d\0\x05\1id\0", "count 5 exceeds"),
        (b"R\0\0\0\1pub\xfflic\0t\0d\0\0", "string is not UTF-8 (invalid start byte) at offset 8"),
        (b"Y\0\0\0\1public", "string without its terminating NUL"),
        (b"T\0\0\0\x10\0\0\0\0\1", "16 relations need 64 bytes, 4 left"),
        (b"M\1" + bytes(8) + b"p\0\x7f\xff\xff\xff", "content length 2147483647 exceeds"),
        (b"E\0", "Stream Stop message: 1 unexpected bytes"),
        (b"A\0\0\0\1\0\0\0\2\0\0\0", "Stream Abort message: truncated"),
    ],
)
def test_forged_messages_are_refused_with_a_clear_error(data: bytes, problem: str) -> None:
    with pytest.raises(p.ProtocolError) as error:
        p.parse(data)
    assert problem in str(error.value)
    assert str(error.value).startswith("pgoutput ")


def test_fuzzing_the_captured_messages_raises_only_protocol_errors() -> None:
    rng = random.Random(20261207)
    corpus = [m for m, _ in all_messages() if len(m) < 2000]
    iterations = 20_000
    parsed = refused = 0
    started = time.monotonic()
    for _ in range(iterations):
        data = bytearray(rng.choice(corpus))
        mutation = rng.randrange(5)
        if mutation == 0:  # flip bits
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif mutation == 1:  # overwrite a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation == 2:  # cut
            del data[rng.randrange(len(data)) :]
        elif mutation == 3:  # splice two messages
            other = rng.choice(corpus)
            data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other)) :]
        else:  # random bytes after a valid type
            data = bytearray(data[:1] + rng.randbytes(rng.randrange(64)))
        try:
            p.parse(bytes(data), streamed=rng.random() < 0.5)
            parsed += 1
        except p.ProtocolError:
            refused += 1
    assert parsed + refused == iterations and refused > iterations // 2
    assert time.monotonic() - started < 30


def _outcome(parse: object, data: bytes, streamed: bool) -> object:
    try:
        return parse(data, streamed)  # type: ignore[operator]
    except p.ProtocolError as exc:
        return ("refused", str(exc))


def test_the_fast_path_reads_what_the_general_parser_reads() -> None:
    """Begin, Commit, Insert and Update are read by a fast path: for every captured message
    and thousands of mutations of them, ``parse`` gives what the general reader gives --
    the same message, or the same error."""
    rng = random.Random(20261208)
    corpus = [m for m, streamed in all_messages() if not streamed and m[:1] in (b"B", b"C", b"I", b"U")]
    assert {m[:1] for m in corpus} == {b"B", b"C", b"I", b"U"}
    cases = [bytes(m) for m in corpus]
    for message in corpus:
        cases += [message[:end] for end in range(len(message))] + [message + b"\0"]
    for _ in range(20_000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(1, len(data))] = rng.choice(
                (0, 1, 0x4E, 0x4B, 0x4F, 0x6E, 0x74, 0x75, 0xFF, rng.randrange(256))
            )
        cases.append(bytes(data))
    fast = 0
    for data in cases:
        expected = _outcome(p._parse, data, False)
        assert _outcome(lambda d, s: p.parse(d, streamed=s), data, False) == expected, data.hex()
        fast += not isinstance(expected, tuple)
    assert fast > 1000


# -- framing, LSNs, times ---------------------------------------------------------------


def test_xlogdata_and_keepalive() -> None:
    payload = SCENARIOS["changes"][0]
    frame = b"w" + struct.pack("!QQq", 0x16B374D848, 0x16B374D900, 123456) + payload
    assert p.parse_copy_data(frame) == p.XLogData(0x16B374D848, 0x16B374D900, 123456, payload)
    keepalive = b"k" + struct.pack("!Qq", 0x16B374D900, -5) + b"\1"
    assert p.parse_copy_data(keepalive) == p.PrimaryKeepalive(0x16B374D900, -5, True)
    assert p.parse_copy_data(keepalive[:-1] + b"\0").reply_requested is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"x", "unknown type 0x78"),
        (b"w" + bytes(23), "XLogData message: truncated"),
        (b"k" + bytes(16), "Primary keepalive message: truncated"),
        (b"k" + bytes(18), "Primary keepalive message: 1 unexpected bytes"),
    ],
)
def test_malformed_frames_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(p.ProtocolError, match=problem):
        p.parse_copy_data(data)


def test_standby_status_update_layout() -> None:
    message = p.standby_status_update(1, 2, 3, now=-7, reply_requested=True)
    assert message == b"r" + struct.pack("!QQQqB", 1, 2, 3, -7, 1)
    assert len(message) == 34
    assert p.standby_status_update(0, 0, 0, 0)[-1] == 0
    with pytest.raises(ValueError, match="flushed"):
        p.standby_status_update(0, -1, 0, 0)


def test_lsn_text() -> None:
    assert p.parse_lsn("16/B374D848") == 0x16B374D848
    assert p.parse_lsn("0/0") == 0 and p.parse_lsn("FFFFFFFF/FFFFFFFF") == 2**64 - 1
    assert p.parse_lsn("a/b") == 0xA0000000B
    assert p.format_lsn(0x16B374D848) == "16/B374D848" and p.format_lsn(0) == "0/0"
    for lsn in (0, 1, 2**32 - 1, 2**32, 2**64 - 1):
        assert p.parse_lsn(p.format_lsn(lsn)) == lsn
    for bad in ("", "1", "1/", "/1", "1/2/3", "G/0", "100000000/0", " 1/2", "1/2\n", "+1/2"):
        with pytest.raises(ValueError, match="not an LSN"):
            p.parse_lsn(bad)
    for bad_lsn in (-1, 2**64):
        with pytest.raises(ValueError, match="out of range"):
            p.format_lsn(bad_lsn)


def test_protocol_times() -> None:
    assert p.from_pg_time(0) == dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    assert p.from_pg_time(p.to_pg_time(moment)) == moment
    assert p.to_pg_time(dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)) == -1_000_000

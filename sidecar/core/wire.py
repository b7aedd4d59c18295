"""The hot responses' protobuf encoding, done once per row instead of per read.

A cached row is kept as an *entry*: the encoded ``RowResult`` (``found =
true``, ``row = <JSON>``) wrapped as one element of ``BatchGetResponse.rows``:

    0a <len>  08 01  12 <len> <row JSON>
    ^ rows    ^found ^ row

``GetResponse`` numbers ``found`` and ``row`` as ``RowResult`` does, so a Get
answer is the entry without its two-byte-ish wrapper, plus the revision field.
A BatchGet answer is the entries joined, plus the revision field. Serving a
read therefore encodes nothing per row: it joins bytes made at load time.
``tests/unit/test_wire.py`` checks every form against the protobuf runtime.
"""

from __future__ import annotations

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core import fanout
from sidecar.core.keys import key_text, part_kind
from sidecar.errors import SidecarError

MISSING_ENTRY = b"\x0a\x00"  # an empty RowResult: found = false


class TooLarge(SidecarError):
    """A row (or an answer) is larger than one gRPC message may carry; retrying cannot help."""


def row_too_large(table: str, key: tuple[object, ...] | None, size: int, limit: int) -> TooLarge:
    shown = "?" if key is None else key_text(key)
    return TooLarge(
        f"row {shown} of {table} is {size} bytes encoded; a message carries at most {limit} bytes "
        "(the sidecar's row-size limit): it cannot be served"
    )


_SMALL = tuple(bytes((n,)) for n in range(128))


def _varint(value: int) -> bytes:
    if 0 <= value < 0x200000:  # (lengths and most numbers: without the loop)
        if value < 0x80:
            return _SMALL[value]
        if value < 0x4000:
            return bytes(((value & 0x7F) | 0x80, value >> 7))
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def entry_prefix(size: int) -> bytes:
    """What an entry holds before a row JSON of ``size`` bytes: it depends on the size alone."""
    inner = b"\x08\x01\x12" + _varint(size)
    return b"\x0a" + _varint(len(inner) + size) + inner


# The prefixes of the common sizes, made once: a load then pays one concatenation per row
# instead of two varint loops (they were most of a 1 M-row load's own time).
PREFIXES = tuple(entry_prefix(size) for size in range(4096))


def entry(row_json: bytes) -> bytes:
    """Encode a row's JSON once, as it is cached."""
    size = len(row_json)
    return (PREFIXES[size] if size < 4096 else entry_prefix(size)) + row_json


def _header(entry_bytes: bytes) -> int:
    """Length of the entry's ``0a <len>`` wrapper."""
    index = 1
    while entry_bytes[index] & 0x80:
        index += 1
    return index + 1


def row_json(entry_bytes: bytes) -> bytes:
    """The row's JSON back out of an entry."""
    position = _header(entry_bytes) + 3  # past 08 01 12: at the row's length varint
    while entry_bytes[position] & 0x80:
        position += 1
    return entry_bytes[position + 1 :]


class RevisionField:
    """The revision field of each response, encoded once per revision."""

    def __init__(self) -> None:
        self._key: tuple[str, int] | None = None
        self.get_field = b""  # GetResponse.revision (field 3)
        self.batch_field = b""  # BatchGetResponse.revision (field 2)
        self.message = pb.Revision()

    def update(self, epoch: str, number: int) -> None:
        if self._key == (epoch, number):
            return
        self._key = (epoch, number)
        self.message = pb.Revision(epoch=epoch, number=number)
        body = self.message.SerializeToString()
        self.get_field = b"\x1a" + _varint(len(body)) + body
        self.batch_field = b"\x12" + _varint(len(body)) + body


def get_response(entry_bytes: bytes | None, revisions: RevisionField) -> bytes:
    """An encoded GetResponse."""
    if entry_bytes is None:
        return revisions.get_field
    return entry_bytes[_header(entry_bytes) :] + revisions.get_field


def batch_get_response(entries: list[bytes | None], revisions: RevisionField) -> bytes:
    """An encoded BatchGetResponse, rows in the order given."""
    return b"".join([e if e is not None else MISSING_ENTRY for e in entries]) + revisions.batch_field


def query_response(entries: list[bytes], truncated: bool, revisions: RevisionField) -> bytes:
    """An encoded QueryResponse (its rows and revision numbered as BatchGetResponse's)."""
    return b"".join(entries) + revisions.batch_field + (b"\x18\x01" if truncated else b"")


# ---------------------------------------------------------------- Watch


# Watch batches are encoded here by hand, field by field, as the protobuf runtime would
# (tests/unit/test_wire.py parses both and compares): building a message object per event
# and per key part was most of what a hub spends on an initial state or a fan-out.

_INT64 = (-(1 << 63), 1 << 63)


def _key_bytes(key: tuple[object, ...]) -> bytes:
    """An encoded ``Key``: its parts, each a KeyPart (field 1)."""
    if len(key) == 1 and type(key[0]) is int and 0 <= key[0] < 0x100000:  # the common key, in short
        part = b"\x08" + _varint(key[0] << 1)  # (sint64, zigzag: a non-negative n is 2n)
        return b"\x0a" + _SMALL[len(part)] + part
    out = []
    for value in key:
        kind = type(value)
        if kind is int and _INT64[0] <= value < _INT64[1]:  # type: ignore[operator]
            part = b"\x08" + _varint((value << 1) ^ (value >> 63))  # type: ignore[operator]  # sint64: zigzag
        elif kind is str:
            text = value.encode()  # type: ignore[attr-defined]
            part = b"\x12" + _varint(len(text)) + text
        else:  # (bool, float, bytes, dates, ...: as the runtime does them)
            name, sent = part_kind(value)
            part = pb.KeyPart(**{name: sent}).SerializeToString()
        out.append(b"\x0a" + _varint(len(part)) + part)
    return b"".join(out)


def _event(change: fanout.Change, head: bytes) -> bytes:
    """An encoded ``ChangeEvent`` (``head``: its table and operation fields, encoded)."""
    out = [head]
    if change.key is not None:
        key = _key_bytes(change.key)
        out += (b"\x1a", _varint(len(key)), key)
    if change.old_key is not None:
        key = _key_bytes(change.old_key)
        out += (b"\x22", _varint(len(key)), key)
    if change.row:  # (an empty row is the field's default: not sent)
        out += (b"\x2a", _varint(len(change.row)), change.row)
    if change.has_row:
        out.append(b"\x30\x01")
    if change.ahead:
        out.append(b"\x38\x01")
    body = b"".join(out)
    return b"\x12" + _varint(len(body)) + body  # ChangeBatch.events (field 2)


def _head(table: str, op: int) -> bytes:
    name = table.encode()
    fields = (b"\x0a" + _varint(len(name)) + name) if name else b""
    return fields + (b"\x10" + _varint(op) if op else b"")


def _batch(epoch: str, revision: int, xid: int, changes: list[fanout.Change]) -> bytes:
    """An encoded ``WatchResponse`` whose ``changes`` is this batch."""
    name = epoch.encode()
    mark = (b"\x0a" + _varint(len(name)) + name if name else b"") + (b"\x10" + _varint(revision) if revision else b"")
    heads: dict[tuple[str, int], bytes] = {}
    out = [b"\x0a", _varint(len(mark)), mark]  # ChangeBatch.revision (always set)
    for change in changes:
        head = heads.get((change.table, change.op))
        if head is None:
            head = heads[(change.table, change.op)] = _head(change.table, change.op)
        out.append(_event(change, head))
    if xid:
        out += (b"\x18", _varint(xid))
    body = b"".join(out)
    return b"\x0a" + _varint(len(body)) + body  # WatchResponse.changes (field 1)


# Most bytes of one WatchResponse.batches message (when ``limit`` allows): big
# enough that a subscriber behind by a thousand small batches gets them in a
# few messages, small enough for any client's default receive limit (grpc-js:
# 4 MiB). A plain variable so that tests can change it.
BATCHES_BYTES = 1024 * 1024
_BATCHES_TAG = b"\x2a"  # WatchResponse.batches: field 5, length-delimited


def watch_messages(message: fanout.Message, limit: int) -> list[bytes]:
    """Encode what a subscription yields, each message at most ``limit`` bytes.

    A batch is encoded once and kept on it: every subscriber that sees it
    whole (or through an equal filter) sends the same bytes. Several batches
    (``fanout.Batches``) become as few ``WatchResponse.batches`` messages as
    their size allows, each the batches' own encodings joined: an element of
    ``ChangeBatches.batches`` is encoded exactly as a ``WatchResponse`` whose
    ``changes`` holds it (both are field 1). Raises ``TooLarge`` for a row
    that alone exceeds ``limit``.
    """
    if isinstance(message, fanout.Batch):
        if message.encoded is None:
            message.encoded = _fitting_batch(message, limit)
        return [message.encoded]
    if isinstance(message, fanout.Batches):
        return _grouped([watch_messages(batch, limit)[0] for batch in message.batches], limit)
    if isinstance(message, fanout.InitialState):
        if message.encoded is not None and len(message.encoded) <= limit:
            return [message.encoded]
        return _snapshot(message.epoch, message.revision, message.changes, limit)
    return [watch_message(message)]


def _grouped(encoded: list[bytes], limit: int) -> list[bytes]:
    """Batches' encodings as ``WatchResponse.batches`` messages, in order, each within
    ``min(limit, BATCHES_BYTES)`` (a batch too big to share one goes alone, as ``changes``)."""
    room = min(limit, BATCHES_BYTES) - 1 - 5  # the tag and a length varint of up to 5 bytes
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0

    def flush() -> None:
        if len(group) == 1:
            out.append(group[0])
        elif group:
            out.append(_BATCHES_TAG + _varint(size) + b"".join(group))

    for one in encoded:
        if group and size + len(one) > room:
            flush()
            group, size = [], 0
        group.append(one)
        size += len(one)
    flush()
    return out


def _fitting_batch(batch: fanout.Batch, limit: int) -> bytes:
    encoded = _batch(batch.epoch, batch.revision, batch.xid, batch.changes)
    if len(encoded) <= limit:
        return encoded
    _check_rows(batch.epoch, batch.revision, batch.changes, limit)
    # Every row fits alone, only not all together: one transaction is one
    # message (clients apply a revision once), so it cannot be split. Say instead
    # that its tables changed wholesale, as for a bulk statement: clients drop
    # what they hold of them and read again, one row at a time.
    tables = dict.fromkeys(change.table for change in batch.changes)
    wholesale = [fanout.Change(table, fanout.TABLE_CHANGED) for table in tables]
    return _batch(batch.epoch, batch.revision, batch.xid, wholesale)


def _snapshot(epoch: str, revision: int, changes: list[fanout.Change], limit: int) -> list[bytes]:
    """A chunk of initial rows, split in halves until each part fits (all carry one revision)."""
    encoded = _batch(epoch, revision, 0, changes)
    if len(encoded) <= limit:
        return [encoded]
    if len(changes) == 1:
        _check_rows(epoch, revision, changes, limit)
    half = len(changes) // 2
    return _snapshot(epoch, revision, changes[:half], limit) + _snapshot(epoch, revision, changes[half:], limit)


def _check_rows(epoch: str, revision: int, changes: list[fanout.Change], limit: int) -> None:
    """Raise ``TooLarge`` naming the largest row if it cannot be sent even alone."""
    largest = max(changes, key=lambda c: len(c.row or b""))
    alone = len(_batch(epoch, revision, 0, [largest]))
    if alone > limit:
        raise row_too_large(largest.table, largest.key, alone, limit)


def watch_message(message: fanout.Message) -> bytes:
    """Encode one message of a subscription (no size limit: see ``watch_messages``)."""
    if isinstance(message, fanout.Batches):
        body = b"".join(watch_message(batch) for batch in message.batches)
        return _BATCHES_TAG + _varint(len(body)) + body
    if isinstance(message, fanout.Batch):
        if message.encoded is None:
            message.encoded = _batch(message.epoch, message.revision, message.xid, message.changes)
        return message.encoded
    if isinstance(message, fanout.InitialState):
        return _batch(message.epoch, message.revision, 0, message.changes)
    revision = pb.Revision(epoch=message.epoch, number=message.revision)
    if isinstance(message, fanout.Reset):
        response = pb.WatchResponse(reset=pb.Reset(revision=revision, reason=message.reason))
    elif isinstance(message, fanout.Progress):
        response = pb.WatchResponse(progress=pb.Progress(revision=revision))
    else:
        response = pb.WatchResponse(initial_state_done=pb.InitialStateDone(revision=revision))
    encoded: bytes = response.SerializeToString()
    return encoded

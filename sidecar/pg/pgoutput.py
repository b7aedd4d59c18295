"""PostgreSQL's ``pgoutput`` logical replication messages, parsed; no I/O.

``parse(data)`` turns one message (the payload of an XLogData frame, or one ``data`` value of
``pg_logical_slot_get_binary_changes``) into a frozen dataclass. ``StreamDecoder`` does the
same for a sequence of messages and knows whether it is inside a Stream Start/Stop block
(where the transactional messages carry their transaction id). The replication protocol's
framing (XLogData ``w``, Primary keepalive ``k``, Standby status update ``r``) and LSN
helpers are here too.

Everything read is untrusted: a message that is truncated, has bytes left over, an unknown
type, a forged count or length, or a string that is not UTF-8 raises ``ProtocolError`` naming
the message and the offset; counts and lengths are checked against the bytes that remain
before anything is allocated, so a forged length costs nothing.

Protocol versions 1-4 as PostgreSQL 16/17 send them: Begin, Commit, Origin, Relation, Type,
Insert, Update, Delete, Truncate, Message; streaming (2+): Stream Start/Stop/Commit/Abort,
with Stream Abort's abort LSN and time when ``streaming = parallel`` (4); two-phase (3+):
Begin Prepare, Prepare, Commit Prepared, Rollback Prepared, Stream Prepare. Column values are
kept as the bytes PostgreSQL sent (text format in the server's encoding, or binary).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

__all__ = [
    "UNCHANGED",
    "Begin",
    "BeginPrepare",
    "Binary",
    "Column",
    "Commit",
    "CommitPrepared",
    "Datum",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Prepare",
    "PrimaryKeepalive",
    "ProtocolError",
    "Relation",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamDecoder",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Text",
    "Truncate",
    "Type",
    "Update",
    "XLogData",
    "format_lsn",
    "from_pg_time",
    "parse",
    "parse_copy_data",
    "parse_lsn",
    "standby_status_update",
    "to_pg_time",
]


class ProtocolError(ValueError):
    """A replication message is malformed or truncated."""


# -- values ------------------------------------------------------------------------------


class _Unchanged(enum.Enum):
    UNCHANGED = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged.UNCHANGED
"""An unchanged TOASTed value ('u'): PostgreSQL did not send it; the previous value holds."""


@dataclass(frozen=True, slots=True)
class Text:
    """A column value in text format ('t'): its type's output function's bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Binary:
    """A column value in binary format ('b'): its type's send function's bytes."""

    data: bytes


Datum: TypeAlias = Text | Binary | Literal[_Unchanged.UNCHANGED] | None
"""One column of a TupleData: ``None`` is SQL NULL ('n')."""


# -- messages ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: int  # microseconds since 2000-01-01 UTC (see from_pg_time)
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int  # 1: part of the replica identity key
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    xid: int | None  # only inside a streamed transaction
    relation_id: int
    namespace: str  # empty for pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    xid: int | None
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    xid: int | None
    relation_id: int
    new: tuple[Datum, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """``old_kind`` is 'K' (the old key: the replica identity changed), 'O' (the whole old row:
    REPLICA IDENTITY FULL) or None (neither sent; ``old`` is None then)."""

    xid: int | None
    relation_id: int
    old_kind: str | None
    old: tuple[Datum, ...] | None
    new: tuple[Datum, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    """``old_kind`` is 'K' (only the key columns are non-NULL) or 'O' (the whole old row)."""

    xid: int | None
    relation_id: int
    old_kind: str
    old: tuple[Datum, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    xid: int | None
    options: int  # 1: CASCADE, 2: RESTART IDENTITY
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``pg_logical_emit_message``'s message; ``flags`` 1 means transactional."""

    xid: int | None
    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """``abort_lsn`` and ``abort_time`` are sent only with ``streaming = parallel`` (version 4)."""

    xid: int
    subxid: int
    abort_lsn: int | None
    abort_time: int | None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: int
    rollback_time: int
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)


# -- reading -----------------------------------------------------------------------------

_U8 = struct.Struct("!B")
_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")


class _Reader:
    """A cursor over one message; every read checks the bytes that remain."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 1  # after the type byte
        self.what = what

    def fail(self, problem: str, at: int | None = None) -> ProtocolError:
        return ProtocolError(f"pgoutput {self.what} message: {problem} at offset {self.pos if at is None else at}")

    def _take(self, size: int) -> int:
        start = self.pos
        if size > len(self.data) - start:
            raise self.fail(f"truncated: {size} more bytes needed, {len(self.data) - start} left")
        self.pos = start + size
        return start

    def u8(self) -> int:
        return int(_U8.unpack_from(self.data, self._take(1))[0])

    def i16(self) -> int:
        return int(_I16.unpack_from(self.data, self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.data, self._take(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack_from(self.data, self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.data, self._take(8))[0])

    def i64(self) -> int:
        return int(_I64.unpack_from(self.data, self._take(8))[0])

    def raw(self, size: int) -> bytes:
        start = self._take(size)
        return self.data[start : start + size]

    def string(self) -> str:
        """A NUL-terminated UTF-8 string."""
        start = self.pos
        end = self.data.find(b"\0", start)
        if end < 0:
            raise self.fail("string without its terminating NUL")
        self.pos = end + 1
        try:
            return self.data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string is not UTF-8 ({exc.reason})", at=start + exc.start) from None

    def count(self, per_item: int) -> int:
        """An Int16 count of items that take at least ``per_item`` bytes each."""
        at = self.pos
        n = self.i16()
        if n < 0:
            raise self.fail(f"negative count {n}", at=at)
        if n * per_item > len(self.data) - self.pos:
            raise self.fail(f"count {n} exceeds the {len(self.data) - self.pos} bytes left", at=at)
        return n

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unexpected bytes after the message")

    def tuple_data(self) -> tuple[Datum, ...]:
        ncols = self.count(1)
        values: list[Datum] = []
        for _ in range(ncols):
            at = self.pos
            kind = self.u8()
            if kind == 0x74 or kind == 0x62:  # 't', 'b'
                length_at = self.pos
                length = self.i32()
                if length < 0 or length > self.remaining():
                    raise self.fail(f"column length {length} exceeds the {self.remaining()} bytes left", at=length_at)
                data = self.raw(length)
                values.append(Text(data) if kind == 0x74 else Binary(data))
            elif kind == 0x6E:  # 'n'
                values.append(None)
            elif kind == 0x75:  # 'u'
                values.append(UNCHANGED)
            else:
                raise self.fail(f"unknown column kind {kind:#04x}", at=at)
        return tuple(values)


def _xid(r: _Reader, streamed: bool) -> int | None:
    return r.u32() if streamed else None


def _begin(r: _Reader, streamed: bool) -> Begin:
    return Begin(r.u64(), r.i64(), r.u32())


def _commit(r: _Reader, streamed: bool) -> Commit:
    return Commit(r.u8(), r.u64(), r.u64(), r.i64())


def _origin(r: _Reader, streamed: bool) -> Origin:
    return Origin(r.u64(), r.string())


def _relation(r: _Reader, streamed: bool) -> Relation:
    xid = _xid(r, streamed)
    relation_id = r.u32()
    namespace = r.string()
    name = r.string()
    at = r.pos
    identity = chr(r.u8())
    if identity not in "dnfi":
        raise r.fail(f"unknown replica identity {identity!r}", at=at)
    columns = []
    for _ in range(r.count(10)):  # flags, NUL, type, typmod: 10 bytes at least
        columns.append(Column(r.u8(), r.string(), r.u32(), r.i32()))
    return Relation(xid, relation_id, namespace, name, identity, tuple(columns))


def _type(r: _Reader, streamed: bool) -> Type:
    return Type(_xid(r, streamed), r.u32(), r.string(), r.string())


def _expect(r: _Reader, allowed: bytes, what: str) -> int:
    at = r.pos
    marker = r.u8()
    if marker not in allowed:
        raise r.fail(f"expected {what}, found {marker:#04x}", at=at)
    return marker


def _insert(r: _Reader, streamed: bool) -> Insert:
    xid = _xid(r, streamed)
    relation_id = r.u32()
    _expect(r, b"N", "'N' (new tuple)")
    return Insert(xid, relation_id, r.tuple_data())


def _update(r: _Reader, streamed: bool) -> Update:
    xid = _xid(r, streamed)
    relation_id = r.u32()
    marker = _expect(r, b"KON", "'K', 'O' or 'N'")
    old_kind = None
    old = None
    if marker != 0x4E:
        old_kind = chr(marker)
        old = r.tuple_data()
        _expect(r, b"N", "'N' (new tuple)")
    return Update(xid, relation_id, old_kind, old, r.tuple_data())


def _delete(r: _Reader, streamed: bool) -> Delete:
    xid = _xid(r, streamed)
    relation_id = r.u32()
    marker = _expect(r, b"KO", "'K' or 'O'")
    return Delete(xid, relation_id, chr(marker), r.tuple_data())


def _truncate(r: _Reader, streamed: bool) -> Truncate:
    xid = _xid(r, streamed)
    at = r.pos
    n = r.u32()
    options = r.u8()
    if n * 4 != r.remaining():
        raise r.fail(f"{n} relations need {n * 4} bytes, {r.remaining()} left", at=at)
    return Truncate(xid, options, tuple(r.u32() for _ in range(n)))


def _message(r: _Reader, streamed: bool) -> LogicalMessage:
    xid = _xid(r, streamed)
    flags = r.u8()
    lsn = r.u64()
    prefix = r.string()
    at = r.pos
    length = r.u32()
    if length > r.remaining():
        raise r.fail(f"content length {length} exceeds the {r.remaining()} bytes left", at=at)
    return LogicalMessage(xid, flags, lsn, prefix, r.raw(length))


def _stream_start(r: _Reader, streamed: bool) -> StreamStart:
    return StreamStart(r.u32(), bool(r.u8()))


def _stream_stop(r: _Reader, streamed: bool) -> StreamStop:
    return StreamStop()


def _stream_commit(r: _Reader, streamed: bool) -> StreamCommit:
    return StreamCommit(r.u32(), r.u8(), r.u64(), r.u64(), r.i64())


def _stream_abort(r: _Reader, streamed: bool) -> StreamAbort:
    xid, subxid = r.u32(), r.u32()
    if r.remaining() == 0:
        return StreamAbort(xid, subxid, None, None)
    return StreamAbort(xid, subxid, r.u64(), r.i64())


def _begin_prepare(r: _Reader, streamed: bool) -> BeginPrepare:
    return BeginPrepare(r.u64(), r.u64(), r.i64(), r.u32(), r.string())


def _prepare(r: _Reader, streamed: bool) -> Prepare:
    return Prepare(r.u8(), r.u64(), r.u64(), r.i64(), r.u32(), r.string())


def _commit_prepared(r: _Reader, streamed: bool) -> CommitPrepared:
    return CommitPrepared(r.u8(), r.u64(), r.u64(), r.i64(), r.u32(), r.string())


def _rollback_prepared(r: _Reader, streamed: bool) -> RollbackPrepared:
    return RollbackPrepared(r.u8(), r.u64(), r.u64(), r.i64(), r.i64(), r.u32(), r.string())


def _stream_prepare(r: _Reader, streamed: bool) -> StreamPrepare:
    return StreamPrepare(r.u8(), r.u64(), r.u64(), r.i64(), r.u32(), r.string())


_PARSERS: dict[int, tuple[str, Callable[[_Reader, bool], Message]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _message),
    ord("S"): ("Stream Start", _stream_start),
    ord("E"): ("Stream Stop", _stream_stop),
    ord("c"): ("Stream Commit", _stream_commit),
    ord("A"): ("Stream Abort", _stream_abort),
    ord("b"): ("Begin Prepare", _begin_prepare),
    ord("P"): ("Prepare", _prepare),
    ord("K"): ("Commit Prepared", _commit_prepared),
    ord("r"): ("Rollback Prepared", _rollback_prepared),
    ord("p"): ("Stream Prepare", _stream_prepare),
}


def parse(data: bytes, *, streamed: bool = False) -> Message:
    """One pgoutput message. ``streamed``: it was sent between Stream Start and Stream Stop,
    so Relation, Type, Insert, Update, Delete, Truncate and Message carry a transaction id
    (``StreamDecoder`` keeps track of that)."""
    if type(data) is not bytes:
        data = bytes(data)
    if not streamed and data:
        fast = _FAST.get(data[0])
        if fast is not None:
            message = fast(data)
            if message is not None:
                return message
    return _parse(data, streamed)


# -- the common messages, read at once ----------------------------------------------------
#
# Begin, Commit, Insert and Update outside a streamed block are most of a stream: each is
# read here with a few struct calls and no cursor object. Each returns None for anything
# that is not a well-formed message of its kind (the general parser then reads it again,
# and raises naming the problem), so both give the same message for the same bytes.

_BEGIN = struct.Struct("!QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit time
_CHANGE = struct.Struct("!IB")  # relation id, the first tuple's marker
_BEGIN_SIZE = 1 + _BEGIN.size
_COMMIT_SIZE = 1 + _COMMIT.size


def _fast_begin(data: bytes) -> Begin | None:
    if len(data) != _BEGIN_SIZE:
        return None
    return Begin(*_BEGIN.unpack_from(data, 1))


def _fast_commit(data: bytes) -> Commit | None:
    if len(data) != _COMMIT_SIZE:
        return None
    return Commit(*_COMMIT.unpack_from(data, 1))


def _fast_tuple(data: bytes, pos: int) -> tuple[tuple[Datum, ...], int] | None:
    """A TupleData at ``pos``, and the offset after it; None if it is not well-formed."""
    end = len(data)
    if end - pos < 2:
        return None
    ncols = _I16.unpack_from(data, pos)[0]
    pos += 2
    if ncols < 0 or ncols > end - pos:
        return None
    values: list[Datum] = []
    append = values.append
    unpack_length = _I32.unpack_from
    for _ in range(ncols):
        if pos >= end:
            return None
        kind = data[pos]
        if kind == 0x74 or kind == 0x62:  # 't', 'b'
            if end - pos < 5:
                return None
            length = unpack_length(data, pos + 1)[0]
            start = pos + 5
            pos = start + length
            if length < 0 or pos > end:
                return None
            append(Text(data[start:pos]) if kind == 0x74 else Binary(data[start:pos]))
        elif kind == 0x6E:  # 'n'
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u'
            append(UNCHANGED)
            pos += 1
        else:
            return None
    return tuple(values), pos


def _fast_insert(data: bytes) -> Insert | None:
    if len(data) < 6:
        return None
    relation_id, marker = _CHANGE.unpack_from(data, 1)
    if marker != 0x4E:  # 'N'
        return None
    new = _fast_tuple(data, 6)
    if new is None or new[1] != len(data):
        return None
    return Insert(None, relation_id, new[0])


def _fast_update(data: bytes) -> Update | None:
    if len(data) < 6:
        return None
    relation_id, marker = _CHANGE.unpack_from(data, 1)
    if marker == 0x4E:  # 'N'
        new = _fast_tuple(data, 6)
        if new is None or new[1] != len(data):
            return None
        return Update(None, relation_id, None, None, new[0])
    if marker != 0x4B and marker != 0x4F:  # 'K', 'O'
        return None
    old = _fast_tuple(data, 6)
    if old is None or old[1] >= len(data) or data[old[1]] != 0x4E:
        return None
    new = _fast_tuple(data, old[1] + 1)
    if new is None or new[1] != len(data):
        return None
    return Update(None, relation_id, chr(marker), old[0], new[0])


_FAST: dict[int, Callable[[bytes], Message | None]] = {
    ord("B"): _fast_begin,
    ord("C"): _fast_commit,
    ord("I"): _fast_insert,
    ord("U"): _fast_update,
}


def _parse(data: bytes, streamed: bool) -> Message:
    """``parse`` by the general reader (every message; the errors' words)."""
    if not data:
        raise ProtocolError("pgoutput message: empty at offset 0")
    entry = _PARSERS.get(data[0])
    if entry is None:
        raise ProtocolError(f"pgoutput message: unknown message type {data[0]:#04x} at offset 0")
    what, parser = entry
    reader = _Reader(bytes(data), what)
    message = parser(reader, streamed)
    reader.done()
    return message


class StreamDecoder:
    """Parses the messages of one replication stream in order, knowing when they are inside
    a streamed block (Stream Start ... Stream Stop) of an in-progress transaction."""

    __slots__ = ("streamed_xid",)

    def __init__(self) -> None:
        self.streamed_xid: int | None = None

    def feed(self, data: bytes) -> Message:
        if self.streamed_xid is None and type(data) is bytes and data:  # (parse's fast path, one call less)
            fast = _FAST.get(data[0])
            if fast is not None and (message := fast(data)) is not None:
                return message  # (never a Stream Start or Stop)
        message = parse(data, streamed=self.streamed_xid is not None)
        if data[0] != 0x53 and data[0] != 0x45:  # (not 'S' or 'E': the common case)
            return message
        if isinstance(message, StreamStart):
            if self.streamed_xid is not None:
                raise ProtocolError("pgoutput Stream Start message: already inside a streamed block at offset 0")
            self.streamed_xid = message.xid
        elif isinstance(message, StreamStop):
            if self.streamed_xid is None:
                raise ProtocolError("pgoutput Stream Stop message: not inside a streamed block at offset 0")
            self.streamed_xid = None
        return message


# -- the replication protocol's framing (CopyData payloads) --------------------------------


@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL data from ``wal_start``; ``wal_end`` is the server's current end of WAL."""

    wal_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """'k': the server's current end of WAL; ``reply_requested`` asks for a status update now."""

    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_data(data: bytes) -> XLogData | PrimaryKeepalive:
    """One CopyData message of a START_REPLICATION stream (server to client)."""
    if not data:
        raise ProtocolError("replication CopyData message: empty at offset 0")
    if data[0] == 0x77:  # 'w'
        reader = _Reader(bytes(data), "XLogData")
        start, end, sent = reader.u64(), reader.u64(), reader.i64()
        return XLogData(start, end, sent, reader.data[reader.pos :])
    if data[0] == 0x6B:  # 'k'
        reader = _Reader(bytes(data), "Primary keepalive")
        keepalive = PrimaryKeepalive(reader.u64(), reader.i64(), bool(reader.u8()))
        reader.done()
        return keepalive
    raise ProtocolError(f"replication CopyData message: unknown type {data[0]:#04x} at offset 0")


def standby_status_update(written: int, flushed: int, applied: int, now: int, reply_requested: bool = False) -> bytes:
    """'r': the client's positions (LSNs) and its clock (``to_pg_time``), to send as CopyData."""
    for name, lsn in (("written", written), ("flushed", flushed), ("applied", applied)):
        if not 0 <= lsn < 1 << 64:
            raise ValueError(f"{name} LSN {lsn} is out of range")
    return b"r" + struct.pack("!QQQqB", written, flushed, applied, now, 1 if reply_requested else 0)


# -- LSNs and times ---------------------------------------------------------------------

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` (pg_lsn's text) -> the 64-bit position."""
    match = _LSN.fullmatch(text)
    if match is None:
        raise ValueError(f"not an LSN: {text[:40]!r}")
    return int(match[1], 16) << 32 | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """The 64-bit position -> pg_lsn's text (upper-case hex, as PostgreSQL writes it)."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"LSN {lsn} is out of range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


POSTGRES_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def from_pg_time(microseconds: int) -> dt.datetime:
    """A protocol timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return POSTGRES_EPOCH + dt.timedelta(microseconds=microseconds)


def to_pg_time(moment: dt.datetime) -> int:
    """An aware datetime as a protocol timestamp."""
    delta = moment - POSTGRES_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

"""Reading the sidecar's shared-memory store directly (docs/shared-memory.md).

``Client(target, shared_memory=DIR)`` answers ``get`` and ``batch_get`` of the
store's tables from the LMDB environment the sidecar writes in DIR, in
microseconds and without a call, while the store says it is fresh: the change
source up, the table served, the heartbeat recent. Anything else goes over gRPC,
which answers or fails as it always does. Needs the ``shared-memory`` extra
(``pip install cache-sidecar-client[shared-memory]``: the ``lmdb`` package),
imported only when a client is given a directory.

The decisions (``parse_state``, ``refusal``, ``encode_key``) are plain functions
of the bytes read, tested without a store; ``SharedMemory`` adds the I/O.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LAYOUT = 1
META_DB = b"meta"
STATE_KEY = b"state"
TABLE_PREFIX = b"table:"
ROWS_PREFIX = b"rows:"
STATE_HEADER = struct.Struct("<IIqQ")  # layout, flags, heartbeat (µs since 1970), revision number
TABLE_HEADER = struct.Struct("<IIQ")  # layout, flags, rows
SOURCE_UP = 1
SERVED = 1
MAX_KEY = 511  # bytes: longer keys are not in the store (LMDB's limit): ask gRPC for them
FRESH_BOUND = 1.0  # seconds: an older heartbeat means the sidecar died or hangs
POLL = 0.0002  # seconds between looks at the store's revision while a read waits for one
REOPEN_AFTER = 1.0  # seconds between attempts to open a store that was not there
READER_MAP_SIZE = 1 << 40  # bytes of address space a reader maps (the store's files grow within it)

_INT = struct.Struct(">q")
_TAGGED_INT = struct.Struct(">Bq").pack  # (the tag and the integer: one call)
_LENGTH = struct.Struct(">I")
_RANGES = {"h": (-(2**15), 2**15 - 1), "i": (-(2**31), 2**31 - 1), "l": (-(2**63), 2**63 - 1), "o": (0, 2**32 - 1)}


@dataclass(frozen=True, slots=True)
class State:
    """The store's state record."""

    source_up: bool
    heartbeat_us: int
    revision: int
    epoch: str


@dataclass(frozen=True, slots=True)
class TableState:
    served: bool
    rows: int
    kinds: str  # one character per key column (see encode_part)


def parse_state(data: bytes | None) -> State | None:
    if data is None or len(data) < STATE_HEADER.size:
        return None
    layout, flags, heartbeat, revision = STATE_HEADER.unpack_from(data)
    if layout != LAYOUT:
        return None
    return State(bool(flags & SOURCE_UP), heartbeat, revision, data[STATE_HEADER.size :].decode())


def parse_table(data: bytes | None) -> TableState | None:
    if data is None or len(data) < TABLE_HEADER.size:
        return None
    layout, flags, rows = TABLE_HEADER.unpack_from(data)
    if layout != LAYOUT:
        return None
    return TableState(bool(flags & SERVED), rows, data[TABLE_HEADER.size :].decode())


def refusal(
    state: State | None, table: TableState | None, now_us: int, allow_stale: bool, bound: float = FRESH_BOUND
) -> str | None:
    """Why the store may not answer a read of this table now (None: it may).

    The store answers only while the sidecar says its change source is up and keeps
    renewing the heartbeat (it is alive and not held back), and the table's rows in
    it are complete (served). ``allow_stale`` reads need only the latter."""
    if state is None:
        return "no store (or another layout)"
    if table is None:
        return "the table is not in the store"
    if not table.served:
        return "the table is not served from the store now"
    if allow_stale:
        return None
    if not state.source_up:
        return "the sidecar's change source is down"
    if now_us - state.heartbeat_us > bound * 1_000_000:
        return "the heartbeat is old (the sidecar died or hangs)"
    return None


def store_name(table: str) -> str:
    """A table's name as the store spells it, ``schema.table``: unquoted names fold to lower
    case and default to ``public``, as the sidecar reads them (a quoted name is kept as given)."""
    if '"' in table:
        return table
    return table.lower() if "." in table else "public." + table.lower()


def reached(state: State, epoch: str, number: int) -> bool | None:
    """Whether the store holds revision ``(epoch, number)``: True, False (not yet), or
    None (another epoch: the store cannot tell; ask the sidecar)."""
    if state.epoch != epoch:
        return None
    return state.revision >= number


def encode_part(kind: str, value: Any) -> bytes | None:
    """One key part as the store's keys hold it; None when the value is not one the
    store can look up as it is (the sidecar then coerces it, or names the problem)."""
    if kind in _RANGES:
        if type(value) is not int:
            return None
        low, high = _RANGES[kind]
        return b"\x01" + _INT.pack(value) if low <= value <= high else None
    if kind in ("s", "p"):
        if type(value) is not str or "\x00" in value:
            return None
        try:
            data = (value.rstrip(" ") if kind == "p" else value).encode()
        except UnicodeEncodeError:
            return None
        return b"\x02" + _LENGTH.pack(len(data)) + data
    if kind == "u":
        if isinstance(value, uuid.UUID):
            return b"\x03" + value.bytes
        if isinstance(value, str):
            try:
                return b"\x03" + uuid.UUID(value).bytes
            except ValueError:
                return None
        return None
    if kind == "b":
        return (b"\x04\x01" if value else b"\x04\x00") if type(value) is bool else None
    if kind == "x":
        return b"\x05" + _LENGTH.pack(len(value)) + value if type(value) is bytes else None
    return None


def encode_key(kinds: str, key: Any) -> bytes | None:
    """A client's key (a scalar, or a tuple for a composite key) as the store's key bytes."""
    parts = key if isinstance(key, tuple | list) else (key,)
    if len(parts) != len(kinds):
        return None
    if len(parts) == 1:
        return encode_part(kinds, parts[0])
    encoded = []
    for kind, part in zip(kinds, parts, strict=True):
        data = encode_part(kind, part)
        if data is None:
            return None
        encoded.append(data)
    return b"".join(encoded)


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs a microsecond here)
class Answer:
    """Rows read from one snapshot of the store, and the revision they are at."""

    rows: list[bytes | None]
    epoch: str
    revision: int


def store_target(revision: Any) -> tuple[str, int] | None:
    """A ``Revision`` (or None) as ``read``'s target."""
    return None if revision is None else (revision.epoch, revision.number)


WAIT = object()  # the store is fresh but behind the revision asked for: look again soon


# LMDB allows one open environment per file per process (its locks are the process's): every
# SharedMemory of one directory in a process shares one, closed with the last of them.
_OPEN: dict[str, tuple[Any, Any, int]] = {}  # real path -> (environment, meta db, users)
_OPEN_LOCK = threading.Lock()


def _acquire(lmdb: Any, directory: str) -> tuple[Any, Any]:
    path = os.path.realpath(directory)
    with _OPEN_LOCK:
        held = _OPEN.get(path)
        if held is None:
            # The map: address space only for a reader, and at least the sidecar's map size
            # (shared_memory.map_size), else LMDB refuses reads once the store grows past it.
            env = lmdb.open(
                path, readonly=True, create=False, lock=True, max_dbs=1024, readahead=False, map_size=READER_MAP_SIZE
            )
            try:
                meta = env.open_db(META_DB, create=False)  # (in a transaction of its own: py-lmdb's)
            except BaseException:
                env.close()
                raise
            held = (env, meta, 0)
        _OPEN[path] = (held[0], held[1], held[2] + 1)
        return held[0], held[1]


def _release(directory: str) -> None:
    path = os.path.realpath(directory)
    with _OPEN_LOCK:
        env, meta, users = _OPEN[path]
        if users > 1:
            _OPEN[path] = (env, meta, users - 1)
        else:
            del _OPEN[path]
            env.close()


class SharedMemory:
    """The store in ``directory``, opened on first use (and again later if it was not there)."""

    def __init__(self, directory: str, bound: float = FRESH_BOUND) -> None:
        import lmdb  # (the optional extra: only when a directory is given)

        self._lmdb = lmdb
        self.directory = directory
        self.bound = bound
        self._env: Any = None
        self._meta: Any = None
        self._dbs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._next_open = 0.0
        self._state_seen: tuple[bytes | None, State | None] = (None, None)  # (one tuple: threads read it whole)
        # The records as of one LMDB snapshot (its transaction id): the same snapshot holds the
        # same records, so reads between two of the sidecar's transactions (the heartbeat's are
        # 100 ms apart) look up only their rows. (snapshot, state, table -> its record)
        self._snapshot: tuple[int, State | None, dict[str, TableState]] = (-1, None, {})
        self._parsed_tables: dict[bytes, TableState | None] = {}
        self._record_keys: dict[str, bytes] = {}
        self._names: dict[str, str] = {}  # as given -> as the store spells it
        self.reads = 0  # reads answered from the store
        self.refused = 0  # reads the store could not answer (they went over gRPC)
        self.errors = 0  # reads that failed in LMDB (they went over gRPC)
        self.last_error: Exception | None = None

    def _open(self) -> Any:
        if self._env is not None:
            return self._env
        with self._lock:
            if self._env is None and time.monotonic() >= self._next_open:
                self._next_open = time.monotonic() + REOPEN_AFTER
                try:
                    self._env, self._meta = _acquire(self._lmdb, self.directory)
                except self._lmdb.Error:
                    return None  # (not there yet, or opened by the sidecar in this very process)
        return self._env

    def _db(self, env: Any, table: str) -> Any:
        db = self._dbs.get(table)
        if db is None:
            with self._lock:
                db = self._dbs.get(table)
                if db is None:
                    try:
                        db = env.open_db(ROWS_PREFIX + table.encode(), create=False)
                    except self._lmdb.Error:
                        return None
                    self._dbs[table] = db
        return db

    def read(self, table: str, keys: Sequence[Any], target: tuple[str, int] | None, allow_stale: bool) -> Any:
        """An ``Answer``; ``WAIT`` (fresh, but not yet at ``target``); or None: ask over gRPC
        (an LMDB error too: counted in ``errors``, the last one kept in ``last_error``)."""
        try:
            return self._read(table, keys, target, allow_stale)
        except self._lmdb.Error as exc:
            self.errors += 1
            self.last_error = exc
            return None

    def _read(self, table: str, keys: Sequence[Any], target: tuple[str, int] | None, allow_stale: bool) -> Any:
        env = self._env or self._open()
        if env is None:
            return None
        table = self._names.get(table) or self._name(table)
        db = self._dbs.get(table) or self._db(env, table)
        if db is None:
            self.refused += 1
            return None
        meta = self._meta
        txn = env.begin(db=db)  # (the rows' database the default: a keyword less per key)
        try:
            get = txn.get
            snapshot = self._snapshot
            if snapshot[0] != txn.id():
                snapshot = self._snapshot = (txn.id(), self._state(get(STATE_KEY, db=meta)), {})
            state = snapshot[1]
            info = snapshot[2].get(table)
            if info is None:
                info = self._table(get(self._record_keys.get(table) or self._record_key(table), db=meta))
                if info is not None:
                    snapshot[2][table] = info
            if refusal(state, info, time.time_ns() // 1000, allow_stale, self.bound) is not None:
                self.refused += 1
                return None
            assert state is not None and info is not None
            if target is not None:
                at = reached(state, *target)
                if at is None:
                    self.refused += 1
                    return None
                if not at:
                    return WAIT
            kinds = info.kinds
            rows: list[bytes | None] = []
            append = rows.append
            bounds = _RANGES.get(kinds)
            if bounds is not None:  # one integer column, the common case: no call per key but LMDB's
                low, high = bounds
                pack = _TAGGED_INT
                for key in keys:
                    if type(key) is not int or not low <= key <= high:
                        break
                    append(get(pack(1, key)))
                else:
                    self.reads += 1
                    return Answer(rows, state.epoch, state.revision)
                rows.clear()
            for key in keys:
                encoded = encode_key(kinds, key)
                if encoded is None or len(encoded) > MAX_KEY:
                    self.refused += 1
                    return None
                append(get(encoded))
        finally:
            txn.abort()  # (a read transaction: nothing to commit; cheaper than the context manager)
        self.reads += 1
        return Answer(rows, state.epoch, state.revision)

    # Records change rarely (the state at each heartbeat): each is parsed once per value.

    def _state(self, data: bytes | None) -> State | None:
        seen = self._state_seen
        if data != seen[0]:
            seen = self._state_seen = (data, parse_state(data))
        return seen[1]

    def _table(self, data: bytes | None) -> TableState | None:
        if data is None:
            return None
        parsed = self._parsed_tables.get(data)
        if parsed is None:
            if len(self._parsed_tables) > 1024:
                self._parsed_tables.clear()
            parsed = self._parsed_tables[data] = parse_table(data)
        return parsed

    def _name(self, table: str) -> str:
        if len(self._names) > 1024:
            self._names.clear()
        name = self._names[table] = store_name(table)
        return name

    def _record_key(self, table: str) -> bytes:
        key = self._record_keys[table] = TABLE_PREFIX + table.encode()
        return key

    def refusal(self, table: str, allow_stale: bool = False) -> str | None:
        """Why a read of ``table`` would go over gRPC now (None: the store answers it)."""
        env = self._open()
        if env is None:
            return "no store in " + self.directory
        with env.begin() as txn:
            state = parse_state(txn.get(STATE_KEY, db=self._meta))
            info = parse_table(txn.get(TABLE_PREFIX + store_name(table).encode(), db=self._meta))
        return refusal(state, info, time.time_ns() // 1000, allow_stale, self.bound)

    def close(self) -> None:
        with self._lock:
            if self._env is not None:
                self._env = None
                self._dbs.clear()
                self._snapshot = (-1, None, {})  # (a store opened again may be another file: its ids too)
                _release(self.directory)

"""The shared-memory store: every full table and relation mirrored into an LMDB
environment that the pod's processes read directly (docs/shared-memory.md).

The daemon is its only writer. The fan-out tells it (``fanout.AppliedObserver``)
what it applied: each time the applied revision moves, the batches published
with it are written in ONE write transaction -- the rows memory holds now for
their keys, and the revision -- so a reader's snapshot holds whole transactions
and the revision they belong to. A whole-table change (TRUNCATE, a reload, a
rebuild) rewrites the table in one transaction once memory holds it complete
again; until then the table's record says "not served". A heartbeat (every
``HEARTBEAT`` seconds) renews the state record: the change source up, the time;
readers trust the store only while it is recent.

Lazy tables are not written (a miss there is no "not found"); nor tables whose
key types have no encoding in the layout (layout.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lmdb

from sidecar.core.cache import TableCache
from sidecar.core.fanout import Batch
from sidecar.core.keys import Key
from sidecar.core.revisions import Revision
from sidecar.core.wire import entry_prefix, row_json
from sidecar.errors import ConfigError
from sidecar.shm import layout

log = logging.getLogger(__name__)

# Where an entry's row JSON starts, by the entry's length (the prefix depends on the JSON's
# size alone, so the entry's length tells it): a slice per row instead of parsing varints.
_FAST = 65536  # entries shorter than this use the table (longer ones: wire.row_json)
_JSON_AT = [0] * _FAST
for _size in range(_FAST):
    _prefix = len(entry_prefix(_size))
    if _prefix + _size < _FAST:
        _JSON_AT[_prefix + _size] = _prefix


def _items(
    rows: Mapping[Key, bytes], keys: Iterable[Key], encode: Callable[[Key], bytes] = layout.encode_key
) -> list[tuple[bytes, bytes]]:
    """(store key, row JSON) of each of ``keys`` that ``rows`` holds (but those whose key is
    too long for LMDB: readers ask gRPC for them)."""
    at, limit = _JSON_AT, layout.MAX_KEY
    return [
        (stored, entry[at[size] :] if (size := len(entry)) < _FAST else row_json(entry))
        for key in keys
        if (entry := rows.get(key)) is not None and len(stored := encode(key)) <= limit
    ]


def _write_keys(txn: Any, table: _Table, rows: Mapping[Key, bytes], keys: Iterable[Key]) -> None:
    """Write (or delete) the rows memory holds for ``keys`` (a key too long for LMDB is never
    in the store: LMDB would refuse it, and readers ask gRPC for it)."""
    encode, db, limit = table.encode, table.db, layout.MAX_KEY
    for key in keys:
        stored = encode(key)
        if len(stored) > limit:
            continue
        entry = rows.get(key)
        if entry is None:
            txn.delete(stored, db=db)
        else:
            txn.put(stored, row_json(entry), db=db)


HEARTBEAT = 0.1  # seconds between heartbeats
HELD_BACK = 1.0  # seconds the revision may stand still while changes wait before readers are told "not up"
READER_CHECK = 1.0  # seconds between clearings of dead readers' slots
REWRITE_CHUNK = 10_000  # rows per write transaction when a table is rewritten (the event loop runs between)
MAX_READERS = 4096  # reader slots (one per reading thread of every process)
FILE_MODE = 0o660  # the pod's containers share a group (Kubernetes fsGroup)


class _Engine(Protocol):
    @property
    def revision(self) -> Revision: ...
    @property
    def stalled_seconds(self) -> float: ...


class _Trust(Protocol):
    up: bool


class Source(Protocol):
    """What the store reads of the cache (``assembly.Core`` is one)."""

    @property
    def tables(self) -> Mapping[str, TableCache]: ...
    @property
    def engine(self) -> _Engine: ...
    @property
    def trust(self) -> _Trust: ...


@dataclass(slots=True)
class _Table:
    name: str
    cache: TableCache
    kinds: str | None  # None: the key has no encoding; the table is not written
    encode: Callable[[Key], bytes] = layout.encode_key  # (layout.key_encoder's for its kinds)
    db: Any = None
    dirty: bool = True  # its rows in the store are not a complete copy: rewrite before serving
    written: bytes = b""  # the table record last written
    pending: dict[Key, None] = field(default_factory=dict)  # keys to write in the open transaction
    rewrite: _Rewrite | None = None  # a rewrite under way, chunk by chunk (the table not served meanwhile)


@dataclass(slots=True)
class _Rewrite:
    """A big table's rewrite: its keys as of the start, written ``REWRITE_CHUNK`` at a time
    with the rows memory holds then; the keys the published batches change meanwhile are
    written again at the end, with the rest of the last chunk, so the copy ends exact."""

    keys: list[Key]
    done: int = 0
    changed: dict[Key, None] = field(default_factory=dict)


class SharedStore:
    """The LMDB environment in ``directory`` and what the daemon writes to it."""

    def __init__(self, directory: str, map_size: int, source: Source) -> None:
        self.directory = directory
        self._source = source
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(
                directory,
                map_size=map_size,
                max_dbs=len(source.tables) + 2,
                max_readers=MAX_READERS,
                subdir=True,
                sync=False,  # (a tmpfs: nothing to make durable; a crash leaves a consistent store)
                metasync=False,
                readahead=False,
                mode=FILE_MODE,
            )
        except (OSError, lmdb.Error) as exc:
            raise ConfigError("shared_memory.dir", f"{directory!r}: cannot open the store there: {exc}") from exc
        if self._env.max_key_size() < layout.MAX_KEY:  # (an LMDB built with a smaller limit)
            self._env.close()
            raise ConfigError("shared_memory.dir", f"this LMDB's keys are too short for layout {layout.LAYOUT}")
        self._meta = self._env.open_db(layout.META_DB)
        self._tables: dict[str, _Table] = {}
        for name, cache in source.tables.items():
            if cache.mode != "full":
                continue
            kinds = layout.key_kinds(cache.schema.key_columns)
            table = _Table(name, cache, kinds, layout.key_encoder(kinds))
            if kinds is None:
                log.info("%s: its key types have no shared-memory encoding; its reads stay on gRPC", name)
            else:
                table.db = self._env.open_db(layout.rows_db_name(name))
            self._tables[name] = table
        self._revision: Revision | None = None
        self._source_up = False
        self._last_check = 0.0
        self.failed: str | None = None  # why the store stopped being written (map full), if it did
        self.transactions = 0
        with self._env.begin(write=True) as txn:
            # A store left by an earlier run: nothing in it is current until rewritten.
            txn.put(layout.STATE_KEY, layout.state_record(False, _now_us(), 0, ""), db=self._meta)
            for table in self._tables.values():
                txn.put(layout.table_key(table.name), layout.table_record(False, 0, table.kinds or ""), db=self._meta)
        written = sum(t.kinds is not None for t in self._tables.values())
        log.info("shared-memory store in %s (%d table(s))", directory, written)

    # ------------------------------------------------------------ the engine's side (AppliedObserver)

    def rebuilt(self) -> None:
        for table in self._tables.values():
            table.dirty = True
            table.pending.clear()
            table.rewrite = None

    def applied(self, revision: Revision, batches: Sequence[Batch]) -> None:
        if not batches and revision == self._revision:
            return
        tables = self._tables
        for batch in batches:
            for change in batch.changes:
                table = tables.get(change.table)
                if table is None or (table.dirty and table.rewrite is None):
                    continue
                if change.key is None:
                    table.dirty = True
                    table.pending.clear()
                    table.rewrite = None  # (begun again from scratch)
                    continue
                table.pending[change.key] = None
                if change.old_key is not None:
                    table.pending[change.old_key] = None
        self._write(revision)

    def state_changed(self) -> None:
        """The engine's readiness may have changed (the listener lost, say): tell readers now."""
        self._write(self._source.engine.revision)

    # ------------------------------------------------------------ writing

    def _servable(self, table: _Table) -> dict[Key, bytes] | None:
        """The table's rows when memory holds it complete now, else None."""
        cache = table.cache
        if table.kinds is None or not cache.loaded or cache.problem is not None:
            return None
        if getattr(cache, "reloading", False):
            return None
        return cache.authoritative_rows()

    def _write(self, revision: Revision) -> None:
        if self.failed is not None:
            return
        source = self._source
        source_up = source.trust.up and source.engine.stalled_seconds <= HELD_BACK
        try:
            with self._env.begin(write=True) as txn:
                for table in self._tables.values():
                    self._write_table(txn, table)
                txn.put(
                    layout.STATE_KEY,
                    layout.state_record(source_up, _now_us(), revision.number, revision.epoch),
                    db=self._meta,
                )
        except lmdb.MapFullError:
            self._fail("the store is full (raise shared_memory.map_size)")
            return
        self._revision = revision
        self._source_up = source_up
        self.transactions += 1

    def _write_table(self, txn: Any, table: _Table) -> None:
        if table.kinds is None:
            return
        rows = self._servable(table)
        if rows is None:
            table.dirty = True  # (memory is being rebuilt: the store's copy is rewritten after)
            table.pending.clear()
            table.rewrite = None
        elif table.rewrite is not None:
            table.rewrite.changed.update(table.pending)  # (written at the rewrite's end)
            table.pending.clear()
        elif table.dirty:
            txn.drop(table.db, delete=False)
            table.pending.clear()
            if len(rows) > REWRITE_CHUNK:
                # A big table: written a chunk per transaction by ``rewrite_step``, not served
                # meanwhile (readers go over gRPC), so that the event loop is never held long.
                table.rewrite = _Rewrite(list(rows))
            else:
                txn.cursor(table.db).putmulti(_items(rows, rows, table.encode), dupdata=False, overwrite=True)
                table.dirty = False
        elif table.pending:
            _write_keys(txn, table, rows, table.pending)
            table.pending.clear()
        served = rows is not None and not table.dirty
        record = layout.table_record(served, len(rows) if served and rows is not None else 0, table.kinds)
        if record != table.written:
            txn.put(layout.table_key(table.name), record, db=self._meta)
            table.written = record

    def _fail(self, why: str) -> None:
        """Stop writing; tell readers (if the store lets us) that nothing in it is current."""
        log.error("shared-memory store: %s; readers go over gRPC from now on", why)
        self.failed = why
        try:
            with self._env.begin(write=True) as txn:
                txn.put(layout.STATE_KEY, layout.state_record(False, 0, 0, ""), db=self._meta)
        except lmdb.Error:
            log.exception("shared-memory store: could not mark it stale")

    @property
    def rewriting(self) -> bool:
        return any(table.rewrite is not None for table in self._tables.values())

    def rewrite_step(self) -> None:
        """Write the next chunk of each table being rewritten; the last one also writes the
        keys changed meanwhile and marks the table served, in the same transaction."""
        if self.failed is not None:
            return
        try:
            with self._env.begin(write=True) as txn:
                for table in self._tables.values():
                    rewrite = table.rewrite
                    if rewrite is None:
                        continue
                    rows = self._servable(table)
                    if rows is None:
                        continue  # (the next _write_table marks it dirty and drops the rewrite)
                    chunk = rewrite.keys[rewrite.done : rewrite.done + REWRITE_CHUNK]
                    rewrite.done += len(chunk)
                    txn.cursor(table.db).putmulti(_items(rows, chunk, table.encode), dupdata=False, overwrite=True)
                    if rewrite.done < len(rewrite.keys):
                        continue
                    rewrite.changed.update(table.pending)
                    table.pending.clear()
                    _write_keys(txn, table, rows, rewrite.changed)
                    table.rewrite = None
                    table.dirty = False
                    self._write_table(txn, table)  # (its record: served)
        except lmdb.MapFullError:
            self._fail("the store is full (raise shared_memory.map_size)")

    # ------------------------------------------------------------ heartbeat

    def beat(self) -> None:
        """Renew the heartbeat (and the state the engine is in now); clear dead readers' slots."""
        self._write(self._revision or self._source.engine.revision)
        now = time.monotonic()
        if now - self._last_check >= READER_CHECK:
            self._last_check = now
            cleared = self._env.reader_check()
            if cleared:
                log.info("shared-memory store: cleared %d slot(s) of dead readers", cleared)

    async def run(self) -> None:
        """The heartbeat, and the chunks of big tables' rewrites, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self.beat()
            next_beat = loop.time() + HEARTBEAT
            while self.rewriting and loop.time() < next_beat:
                self.rewrite_step()
                await asyncio.sleep(0)  # (whatever waits runs between chunks)
            await asyncio.sleep(max(0.0, next_beat - loop.time()))

    def close(self) -> None:
        """The daemon stops: readers go over gRPC from now on (not after the heartbeat's bound)."""
        if self.failed is None:
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(
                        layout.STATE_KEY,
                        layout.state_record(False, _now_us(), 0, self._revision.epoch if self._revision else ""),
                        db=self._meta,
                    )
            except lmdb.Error:
                log.exception("shared-memory store: could not mark it stale")
        self._env.close()


def _now_us() -> int:
    return time.time_ns() // 1000

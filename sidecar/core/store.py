"""A full table's rows in memory: key -> cache entry (see wire.py), and the
table's secondary indexes kept in step with them; shared, lazily read
snapshots of those rows.

Plain data, no I/O and no scheduling: ``full.py`` decides when rows are
fetched and stored; this only holds what it stores.

Snapshots (``RowStore.snapshot``): an initial-state Watch reads every row as of
one moment, for as long as its client takes, while the table keeps changing.
Entries are immutable bytes, so a snapshot copies none of them: it is the
list of the keys held at that moment (made once, shared by every snapshot
taken while the store did not change) plus a copy-on-write record, filled by
the store, of each key's entry as it was before its first change since the
snapshot (``None``: the key was not there). Every mutation goes through the
store and feeds the live snapshots first; a snapshot nobody holds any more is
gone (weak references) and costs nothing.

What live snapshots keep alive (old entries; a replaced rows dict) is bounded by
a ``Retention`` shared by every store: past its limit, the oldest snapshots are
given up (``Snapshot.items`` raises ``SnapshotGivenUp``; their streams end and
start over) and what they held is released at once, whoever still holds them.
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections.abc import Iterable, Iterator, Sequence

from sidecar.core import heap
from sidecar.core.indexes import IndexQuery, IndexSet
from sidecar.core.keys import Key
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.errors import SidecarError

Row = bytes | None

# Stands in the rows during an in-place reload: keys the reload stored were moved
# after it, so the keys still before it at the end are the ones the table lost.
# (A tuple of a private object: it equals no key and sorts with none.)
_MARK: Key = (object(),)
_not_mark = functools.partial(operator.is_not, _MARK)
_UNCHANGED = object()
_KEY_COST = 64  # bytes a kept entry costs beyond its own (dict slot, key)


class SnapshotGivenUp(SidecarError):
    """The snapshot kept too much alive and was given up: read the rows again."""


class Retention:
    """The bytes that live snapshots keep alive, across stores, bounded by ``limit``:
    past it the oldest are given up (a plain variable, so that tests can change it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._live: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self._made = 0
        self.given_up = 0  # snapshots given up (metrics, tests)

    def track(self, view: Snapshot) -> None:
        self._made += 1
        view.order = self._made
        self._live.add(view)

    @property
    def held(self) -> int:
        """Bytes the live snapshots keep alive now."""
        return sum(view.retained for view in self._live)

    def check(self) -> None:
        """Give up the oldest snapshots while they keep more than ``limit`` alive."""
        held = self.held
        if held <= self.limit:
            return
        for view in sorted(self._live, key=operator.attrgetter("order")):
            if held <= self.limit:
                break
            held -= view.retained
            view.give_up(
                f"the table changed so much while its initial state was being sent that the snapshot kept "
                f"{view.retained} bytes of old rows alive (watch.snapshot_max_bytes = {self.limit} for all "
                "snapshots together); start over"
            )
            self._live.discard(view)
            self.given_up += 1


class RowStore:
    """Every row of a table (or of its ``where`` subset), and its indexes."""

    def __init__(self, schema: TableSchema) -> None:
        self.rows: Rows = {}
        self._bytes = 0  # the entries' total size, kept as they change (metrics, ListTables)
        indexes = IndexSet(schema)
        self.indexes: IndexSet | None = indexes if indexes else None
        self.version = 0  # rises with every change of the rows
        self._views: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self._shared: weakref.ref[Snapshot] | None = None  # the newest snapshot, while alive
        self.retention: Retention | None = None  # the bound on what snapshots keep alive (the engine's)
        self._reloading = False  # the mark is in the rows

    def __len__(self) -> int:
        return len(self.rows) - self._reloading

    def byte_count(self) -> int:
        return self._bytes

    def get(self, key: Key) -> Row:
        return self.rows.get(key)

    def get_many(self, keys: Sequence[Key]) -> list[Row]:
        return list(map(self.rows.get, keys))

    def store(self, keys: Iterable[Key], rows: Rows) -> None:
        """Rows fetched for ``keys``: stored, or removed where there is none; indexes follow."""
        assert not self._reloading  # (full.py fetches no key while it reloads)
        table_rows, indexes = self.rows, self.indexes
        views = list(self._views) if self._views else ()
        changed = False
        for key in keys:
            row = rows.get(key)
            old = table_rows.get(key)
            if old == row:
                continue
            changed = True
            for view in views:
                view.changing(key, old)
            self._bytes += (0 if row is None else len(row)) - (0 if old is None else len(old))
            if row is None:
                del table_rows[key]
                if indexes is not None:
                    indexes.delete(key)
            else:
                table_rows[key] = row
                if indexes is not None:
                    indexes.put(key, row)
        if changed:
            self.version += 1
            if views:
                self._check_retention()

    def _check_retention(self) -> None:
        if self.retention is not None:
            self.retention.check()

    def replace(self, rows: Rows) -> None:
        """The whole table at once (from scratch: live snapshots keep the old rows)."""
        self._detach()
        self._reloading = False
        self.rows = rows
        self._bytes = sum(map(len, rows.values()))
        self.version += 1
        if self.indexes is not None:
            self.indexes.rebuild(rows)
        heap.built(len(rows))

    def clear(self) -> None:
        self.replace({})

    # ------------------------------------------------------------ reload in place

    def begin_reload(self) -> None:
        """A whole-table reload starts: ``reload_chunk`` stores its rows over the
        current ones, ``finish_reload`` removes the rows it did not bring. Meanwhile
        the store holds old and new rows mixed (full.py serves no read from it
        then), never a second copy of the table."""
        self.abort_reload()
        self.rows[_MARK] = b""
        self._reloading = True
        if self.indexes is not None:
            self.indexes.defer()

    def reload_chunk(self, rows: Rows) -> None:
        """Some of the reload's rows (each key once per reload)."""
        assert self._reloading
        table = self.rows
        # Popping first moves every stored key after the mark; map/update keep the
        # loop in C (a chunk is thousands of rows).
        olds = list(map(table.pop, rows, itertools.repeat(None)))
        table.update(rows)
        self._bytes += sum(map(len, rows.values())) - sum(map(len, filter(None, olds)))
        indexes = self.indexes
        if self._views or indexes is not None:
            views = list(self._views)
            for (key, entry), old in zip(rows.items(), olds, strict=True):
                if old != entry:
                    for view in views:
                        view.changing(key, old)
                    if indexes is not None:
                        indexes.put(key, entry)
            if views:
                self._check_retention()
        self.version += 1

    def finish_reload(self) -> int:
        """The reload brought every row: drop the others; how many were dropped."""
        assert self._reloading
        table = self.rows
        gone = list(itertools.takewhile(_not_mark, table))
        del table[_MARK]
        self._reloading = False
        views = list(self._views) if self._views else ()
        indexes = self.indexes
        for key in gone:
            old = table.pop(key)
            self._bytes -= len(old)
            for view in views:
                view.changing(key, old)
            if indexes is not None:
                indexes.delete(key)
        if indexes is not None:
            indexes.flush()
        if views:
            self._check_retention()
        self.version += 1
        heap.built(len(table))  # (a first load fills the dict in place: it is new to the collector)
        return len(gone)

    def abort_reload(self) -> None:
        """A reload stopped half-way: the rows stay as they are (old and new mixed)."""
        if self._reloading:
            del self.rows[_MARK]
            self._reloading = False
            if self.indexes is not None:
                self.indexes.flush()

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> Snapshot:
        """The rows as they are now, to read at leisure (shared while nothing changed)."""
        shared = self._shared() if self._shared is not None else None
        if shared is not None and shared.version == self.version and shared.rows is self.rows and not shared.lost:
            return shared
        view = Snapshot(self.rows, self.version, self._reloading)
        heap.built(len(view.keys))  # (its list of keys is as long as the table)
        self._views.add(view)
        if self.retention is not None:
            self.retention.track(view)
        self._shared = weakref.ref(view)
        return view

    def _detach(self) -> None:
        """The rows dict is about to be dropped, not changed: snapshots keep it, as it is."""
        views = list(self._views)
        for view in views:
            view.retained += self._bytes + _KEY_COST * len(self.rows)
        self._views = weakref.WeakSet()
        self._shared = None
        if views:
            self._check_retention()

    @property
    def snapshots(self) -> int:
        """Live snapshots (metrics, tests)."""
        return len(self._views)

    # ------------------------------------------------------------ queries

    def matching(self, columns: Sequence[str], values: Iterable[Key]) -> set[Key]:
        """Keys whose ``columns`` hold one of ``values`` (a relation's hidden source index)."""
        assert self.indexes is not None  # (a relation with non-key sources has its hidden indexes)
        return self.indexes.matching(columns, values)

    def query(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        """The entries an index query matches, in order, and whether more matched."""
        assert self.indexes is not None  # a table with declared indexes has them
        keys, truncated = self.indexes.run(query)
        rows = self.rows
        # (during a reload, allow_stale queries only: an index may lag its rows, a row
        # that is gone from them is skipped)
        return [entry for key in keys if (entry := rows.get(key)) is not None], truncated


class Snapshot:
    """A store's rows as of one moment (``RowStore.snapshot``), read lazily.

    ``keys`` is every key held then, in the order they are read; ``get`` and
    ``items`` answer what each key held then, however the store changed since.
    """

    __slots__ = ("__weakref__", "_before", "keys", "lost", "order", "retained", "rows", "version")

    def __init__(self, rows: Rows, version: int, reloading: bool) -> None:
        self.rows = rows  # the store's dict (changed in place; each change recorded here first)
        self.version = version
        keys = list(rows)
        if reloading:
            keys.remove(_MARK)
        self.keys = keys
        self._before: dict[Key, Row] = {}  # a key's entry before its first change since
        self.retained = 0  # bytes kept alive for it (old entries; a replaced rows dict)
        self.order = 0  # (Retention: older ones are given up first)
        self.lost: str | None = None  # why it was given up

    def give_up(self, why: str) -> None:
        """Release what it holds; reading it from now on raises ``SnapshotGivenUp``."""
        self.lost = why
        self.rows, self._before, self.keys = {}, {}, []
        self.retained = 0

    def __len__(self) -> int:
        return len(self.keys)

    def changing(self, key: Key, old: Row) -> None:
        """The store is about to change ``key``, which holds ``old``."""
        if key not in self._before and self.lost is None:
            self._before[key] = old
            self.retained += _KEY_COST + (0 if old is None else len(old))

    def get(self, key: Key) -> Row:
        before = self._before.get(key, _UNCHANGED)
        return self.rows.get(key) if before is _UNCHANGED else before  # type: ignore[return-value]

    def items(self, start: int = 0, stop: int | None = None) -> list[tuple[Key, bytes]]:
        """The keys ``keys[start:stop]`` and their entries then."""
        if self.lost is not None:
            raise SnapshotGivenUp(self.lost)
        rows, before = self.rows, self._before
        found = []
        for key in self.keys[start:stop]:
            entry = before.get(key, _UNCHANGED)
            found.append((key, rows[key] if entry is _UNCHANGED else entry))
        return found  # type: ignore[return-value]

    def chunks(self, size: int) -> Iterator[list[tuple[Key, bytes]]]:
        """Every row, ``size`` at a time (each chunk read when it is asked for)."""
        for start in range(0, len(self.keys), size):
            yield self.items(start, start + size)

    @property
    def changed(self) -> int:
        """Keys changed since (their old entries kept here)."""
        return len(self._before)

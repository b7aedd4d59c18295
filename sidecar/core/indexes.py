"""Secondary indexes over a full-mode table's rows, kept in step with them.

An index maps column values to keys: a hash index answers equality on one or
more columns, a range index keeps one column's values sorted for ranges and
ordered scans. Column values are read from each row's JSON when the row is
stored (so indexes cost nothing on the read path) and coerced with the
column's type, exactly as key parts are. NULLs are not indexed (``= NULL``
matches nothing in SQL either).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.config import IndexConfig
from sidecar.core import jsonread
from sidecar.core.keys import Key, KeyColumn, coerce_key, key_text, orderable
from sidecar.core.schema import TableSchema
from sidecar.core.wire import row_json
from sidecar.errors import InvalidRequest, UnknownTable

log = logging.getLogger(__name__)


class HashIndex:
    def __init__(self, config: IndexConfig) -> None:
        self.name = config.name
        self.columns = config.columns
        self.unique = config.unique
        self._keys: dict[tuple[Any, ...], set[Key]] = {}

    def add(self, value: tuple[Any, ...], key: Key) -> None:
        if None in value:
            return
        self._keys.setdefault(value, set()).add(key)

    def remove(self, value: tuple[Any, ...], key: Key) -> None:
        keys = self._keys.get(value)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[value]

    def lookup(self, values: Iterable[tuple[Any, ...]]) -> set[Key]:
        found: set[Key] = set()
        for value in values:
            keys = self._keys.get(value)
            if keys:
                found.update(keys)
        return found

    def fill(self, pairs: Iterable[tuple[tuple[Any, ...], Key]]) -> None:
        for value, key in pairs:
            self.add(value, key)

    def clear(self) -> None:
        self._keys.clear()


def _value(entry: tuple[Any, Key]) -> Any:
    return entry[0]


class RangeIndex:
    """One column's values, sorted (with the key to break ties)."""

    def __init__(self, config: IndexConfig) -> None:
        self.name = config.name
        self.columns = config.columns
        self.unique = config.unique
        self._entries: list[tuple[Any, Key]] = []
        # While deferred (a reload: many changes at once), changes wait here and are
        # merged in one pass by ``flush``, instead of one insertion into the sorted
        # list (a memmove of all of it) each.
        self._deferred = False
        self._added: set[tuple[Any, Key]] = set()
        self._removed: set[tuple[Any, Key]] = set()

    def add(self, value: tuple[Any, ...], key: Key) -> None:
        if value[0] is None:
            return
        if self._deferred:
            entry = (value[0], key)
            if entry in self._removed:
                self._removed.discard(entry)
            else:
                self._added.add(entry)
            return
        bisect.insort(self._entries, (value[0], key))

    def remove(self, value: tuple[Any, ...], key: Key) -> None:
        if value[0] is None:
            return
        if self._deferred:
            entry = (value[0], key)
            if entry in self._added:
                self._added.discard(entry)
            else:
                self._removed.add(entry)
            return
        position = bisect.bisect_left(self._entries, (value[0], key))
        if position < len(self._entries) and self._entries[position] == (value[0], key):
            del self._entries[position]

    def defer(self) -> None:
        """Hold changes until ``flush`` (lookups meanwhile see the entries as they were)."""
        self._deferred = True

    def flush(self) -> None:
        """Apply the held changes: one filtering pass and one merge of two sorted runs."""
        self._deferred = False
        removed, added = self._removed, self._added
        self._removed, self._added = set(), set()
        if removed:
            self._entries = [entry for entry in self._entries if entry not in removed]
        if added:
            self._entries.extend(sorted(added))
            self._entries.sort()  # (timsort merges the two sorted runs in linear time)

    def fill(self, pairs: Iterable[tuple[tuple[Any, ...], Key]]) -> None:
        """Add many at once (a load): one sort instead of an insertion each."""
        self._entries.extend((value[0], key) for value, key in pairs if value[0] is not None)
        self._entries.sort()

    def lookup(self, values: Iterable[tuple[Any, ...]]) -> set[Key]:
        entries = self._entries
        found: set[Key] = set()
        for (value,) in values:
            start = bisect.bisect_left(entries, value, key=_value)
            end = bisect.bisect_right(entries, value, key=_value, lo=start)
            found.update(key for _, key in entries[start:end])
        return found

    def span(self, low: Any, high: Any, low_open: bool, high_open: bool) -> tuple[int, int]:
        """Positions of the entries within the bounds (``None``: unbounded)."""
        entries = self._entries
        start, end = 0, len(entries)
        if low is not None:
            start = (bisect.bisect_right if low_open else bisect.bisect_left)(entries, low, key=_value)
        if high is not None:
            end = (bisect.bisect_left if high_open else bisect.bisect_right)(entries, high, key=_value, lo=start)
        return start, max(start, end)

    def keys(self, start: int, end: int) -> list[Key]:
        return [key for _, key in self._entries[start:end]]

    def clear(self) -> None:
        self._entries.clear()
        self._added.clear()
        self._removed.clear()
        self._deferred = False


Index = HashIndex | RangeIndex


@dataclass(frozen=True)
class IndexQuery:
    """A validated index query: values (or range bounds) already coerced to the columns' types."""

    index: str
    columns: tuple[KeyColumn, ...]
    values: list[Key] | None  # equality; None for a range
    low: Any = None  # range bounds; None: unbounded
    high: Any = None
    low_open: bool = False
    high_open: bool = False
    limit: int = 1000
    descending: bool = False


class IndexSet:
    """Every index of one table, plus the hidden hash indexes relation refreshes use."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.indexes: dict[str, Index] = {}
        for config in schema.config.indexes:
            self.indexes[config.name] = RangeIndex(config) if config.range else HashIndex(config)
        for source in schema.sources:  # "which rows have these source values"
            columns = source.relation_columns
            if not set(schema.config.key) <= set(columns):
                name = "source:" + ",".join(columns)
                self.indexes.setdefault(name, HashIndex(IndexConfig(name, columns)))
        self.columns = sorted({c for index in self.indexes.values() for c in index.columns})
        self._coercers: list[Callable[[Any], Any]] = [schema.column(c).coerce for c in self.columns]
        self._values: dict[Key, dict[str, Any]] = {}
        self.unreadable = 0  # rows that were not JSON objects (indexed under no value)

    def __bool__(self) -> bool:
        return bool(self.indexes)

    def _read(self, key: Key, entry: bytes) -> dict[str, Any]:
        try:  # (any length of integer, any depth of nesting: see jsonread.py)
            row = jsonread.loads(row_json(entry))
        except ValueError:
            row = None
        if not isinstance(row, dict):
            # Not a row PostgreSQL's row_to_json makes (a follower's upstream sent it): it is
            # served as it came, but indexed under no value, never fatal; said loudly.
            self.unreadable += 1
            log.error(
                "%s: the row of key %s is not a JSON object: it is indexed under no value",
                self.schema.qualified,
                key_text(key),
                extra={"event": "row_unreadable", "table": self.schema.qualified},
            )
            return dict.fromkeys(self.columns)
        values = {}
        for column, coerce in zip(self.columns, self._coercers, strict=True):
            raw = row.get(column)
            try:
                value = None if raw is None else coerce(raw)
            except InvalidRequest:
                value = None
            values[column] = value if orderable(value) else None  # (e.g. 'infinity' dates: not indexed)
        return values

    def put(self, key: Key, entry: bytes) -> None:
        if key in self._values:
            self.delete(key)
        values = self._read(key, entry)
        self._values[key] = values
        for index in self.indexes.values():
            index.add(tuple(values[c] for c in index.columns), key)

    def delete(self, key: Key) -> None:
        values = self._values.pop(key, None)
        if values is None:
            return
        for index in self.indexes.values():
            index.remove(tuple(values[c] for c in index.columns), key)

    def defer(self) -> None:
        """Many changes follow (a reload): range indexes apply them at ``flush``."""
        for index in self.indexes.values():
            if isinstance(index, RangeIndex):
                index.defer()

    def flush(self) -> None:
        for index in self.indexes.values():
            if isinstance(index, RangeIndex):
                index.flush()

    def rebuild(self, rows: dict[Key, bytes]) -> None:
        self._values = {key: self._read(key, entry) for key, entry in rows.items()}
        for index in self.indexes.values():
            index.clear()
            index.fill((tuple(values[c] for c in index.columns), key) for key, values in self._values.items())

    def matching(self, columns: Sequence[str], values: Iterable[tuple[Any, ...]]) -> set[Key]:
        """Keys whose ``columns`` hold one of ``values`` (a hidden source index)."""
        index = self.indexes.get("source:" + ",".join(columns))
        return index.lookup(values) if index is not None else set()

    # ------------------------------------------------------------ queries

    def index(self, name: str) -> Index:
        index = self.indexes.get(name)
        if index is None or name.startswith("source:"):
            raise UnknownTable(f"table {self.schema.qualified} has no index {name!r} (its indexes: {self.names()})")
        return index

    def names(self) -> str:
        return ", ".join(n for n in self.indexes if not n.startswith("source:")) or "none"

    def run(self, query: IndexQuery) -> tuple[list[Key], bool]:
        """The keys ``query`` matches, in order, at most ``query.limit`` of them, and
        whether more matched."""
        index = self.index(query.index)
        limit = query.limit
        if query.values is not None:
            keys = sorted(index.lookup(query.values), reverse=query.descending)
            return keys[:limit], len(keys) > limit
        assert isinstance(index, RangeIndex)
        start, end = index.span(query.low, query.high, query.low_open, query.high_open)
        if not query.descending:
            return index.keys(start, min(end, start + limit)), end - start > limit
        keys = index.keys(max(start, end - limit), end)
        keys.reverse()
        return keys, end - start > limit


def plan(
    schema: TableSchema,
    name: str,
    values: Sequence[Sequence[Any]] | None,
    low: Any,
    high: Any,
    *,
    low_open: bool = False,
    high_open: bool = False,
    limit: int,
    descending: bool = False,
) -> IndexQuery:
    """Check a query against the table's declared indexes and coerce its values
    (``low``/``high``: a bound's raw value, ``None`` for unbounded)."""
    config = next((i for i in schema.config.indexes if i.name == name), None)
    if config is None:
        declared = ", ".join(i.name for i in schema.config.indexes) or "none"
        raise UnknownTable(f"table {schema.qualified} has no index {name!r} (its indexes: {declared})")
    columns = tuple(schema.column(c) for c in config.columns)
    if values is not None:
        coerced = [coerce_key(columns, value) for value in values]
        return IndexQuery(name, columns, coerced, limit=limit, descending=descending)
    if not config.range:
        raise InvalidRequest(f"index {name!r} of {schema.qualified} is not a range index (declare it: range = true)")
    bounds = [None if bound is None else coerce_key(columns, [bound])[0] for bound in (low, high)]
    return IndexQuery(name, columns, None, bounds[0], bounds[1], low_open, high_open, limit, descending)

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
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sidecar.config import IndexConfig
from sidecar.errors import InvalidRequest, UnknownTable
from sidecar.keys import Key, coerce_key
from sidecar.schema import TableSchema
from sidecar.wire import row_json


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
            found |= self._keys.get(value, set())
        return found

    def clear(self) -> None:
        self._keys.clear()


class RangeIndex:
    """One column's values, sorted (with the key to break ties)."""

    def __init__(self, config: IndexConfig) -> None:
        self.name = config.name
        self.columns = config.columns
        self.unique = config.unique
        self._entries: list[tuple[Any, Key]] = []

    def add(self, value: tuple[Any, ...], key: Key) -> None:
        if value[0] is None:
            return
        bisect.insort(self._entries, (value[0], key))

    def remove(self, value: tuple[Any, ...], key: Key) -> None:
        if value[0] is None:
            return
        position = bisect.bisect_left(self._entries, (value[0], key))
        if position < len(self._entries) and self._entries[position] == (value[0], key):
            del self._entries[position]

    def lookup(self, values: Iterable[tuple[Any, ...]]) -> set[Key]:
        found: set[Key] = set()
        for (value,) in values:
            start = bisect.bisect_left(self._entries, (value,))
            for entry_value, key in self._entries[start:]:
                if entry_value != value:
                    break
                found.add(key)
        return found

    def scan(self, low: Any, high: Any, low_open: bool, high_open: bool) -> list[Key]:
        """Keys with ``low <= value <= high`` (``None``: unbounded), in value order."""
        entries = self._entries
        start = 0 if low is None else bisect.bisect_left(entries, (low,))
        keys = []
        for value, key in entries[start:]:
            if low is not None and low_open and value == low:
                continue
            if high is not None and (value > high or (high_open and value == high)):
                break
            keys.append(key)
        return keys

    def clear(self) -> None:
        self._entries.clear()


Index = HashIndex | RangeIndex


@dataclass(frozen=True)
class QueryResult:
    keys: list[Key]
    truncated: bool


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

    def __bool__(self) -> bool:
        return bool(self.indexes)

    def _read(self, entry: bytes) -> dict[str, Any]:
        row = json.loads(row_json(entry), parse_float=Decimal)
        values = {}
        for column, coerce in zip(self.columns, self._coercers, strict=True):
            raw = row.get(column)
            try:
                values[column] = None if raw is None else coerce(raw)
            except InvalidRequest:
                values[column] = None  # (e.g. 'infinity' dates: not indexed)
        return values

    def put(self, key: Key, entry: bytes) -> None:
        if key in self._values:
            self.delete(key)
        values = self._read(entry)
        self._values[key] = values
        for index in self.indexes.values():
            index.add(tuple(values[c] for c in index.columns), key)

    def delete(self, key: Key) -> None:
        values = self._values.pop(key, None)
        if values is None:
            return
        for index in self.indexes.values():
            index.remove(tuple(values[c] for c in index.columns), key)

    def rebuild(self, rows: dict[Key, bytes]) -> None:
        for index in self.indexes.values():
            index.clear()
        self._values.clear()
        for key, entry in rows.items():
            self.put(key, entry)

    def matching(self, columns: Sequence[str], values: Iterable[tuple[Any, ...]]) -> set[Key]:
        """Keys whose ``columns`` hold one of ``values`` (a hidden source index)."""
        index = self.indexes.get("source:" + ",".join(columns))
        return index.lookup(values) if index is not None else set()

    # ------------------------------------------------------------ queries

    def index(self, name: str) -> Index:
        index = self.indexes.get(name)
        if index is None or name.startswith("source:"):
            known = ", ".join(n for n in self.indexes if not n.startswith("source:")) or "none"
            raise UnknownTable(f"table {self.schema.qualified} has no index {name!r} (its indexes: {known})")
        return index

    def query(
        self,
        name: str,
        values: Sequence[Sequence[Any]] | None,
        low: Sequence[Any] | None,
        high: Sequence[Any] | None,
        low_open: bool,
        high_open: bool,
        limit: int,
        descending: bool,
    ) -> QueryResult:
        """Keys matching index values (equality) or a range, ordered, at most ``limit``."""
        index = self.index(name)
        columns = [self.schema.column(c) for c in index.columns]
        if values is not None:
            coerced = [coerce_key(columns, value) for value in values]
            keys = sorted(index.lookup(coerced), key=_sort_key, reverse=descending)
        else:
            if not isinstance(index, RangeIndex):
                raise InvalidRequest(f"index {name!r} is not a range index (declare it with range = true)")
            bound_low = coerce_key(columns, low)[0] if low is not None else None
            bound_high = coerce_key(columns, high)[0] if high is not None else None
            keys = index.scan(bound_low, bound_high, low_open, high_open)
            if descending:
                keys.reverse()
        truncated = len(keys) > limit
        return QueryResult(keys[:limit], truncated)


def _sort_key(key: Key) -> tuple[Any, ...]:
    return key

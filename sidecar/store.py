"""A full table's rows in memory: key -> cache entry (see wire.py), and the
table's secondary indexes kept in step with them.

Plain data, no I/O and no scheduling: ``full.py`` decides when rows are
fetched and stored; this only holds what it stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sidecar.indexes import IndexQuery, IndexSet
from sidecar.keys import Key
from sidecar.schema import TableSchema
from sidecar.source import Rows

Row = bytes | None


class RowStore:
    """Every row of a table (or of its ``where`` subset), and its indexes."""

    def __init__(self, schema: TableSchema) -> None:
        self.rows: Rows = {}
        indexes = IndexSet(schema)
        self.indexes: IndexSet | None = indexes if indexes else None

    def __len__(self) -> int:
        return len(self.rows)

    def byte_count(self) -> int:
        return sum(map(len, self.rows.values()))

    def get(self, key: Key) -> Row:
        return self.rows.get(key)

    def get_many(self, keys: Sequence[Key]) -> list[Row]:
        return list(map(self.rows.get, keys))

    def store(self, keys: Iterable[Key], rows: Rows) -> None:
        """Rows fetched for ``keys``: stored, or removed where there is none; indexes follow."""
        table_rows, indexes = self.rows, self.indexes
        for key in keys:
            row = rows.get(key)
            if row is None:
                if table_rows.pop(key, None) is not None and indexes is not None:
                    indexes.delete(key)
            else:
                table_rows[key] = row
                if indexes is not None:
                    indexes.put(key, row)

    def replace(self, rows: Rows) -> None:
        """The whole table, freshly loaded."""
        self.rows = rows
        if self.indexes is not None:
            self.indexes.rebuild(rows)

    def clear(self) -> None:
        self.replace({})

    def matching(self, columns: Sequence[str], values: Iterable[Key]) -> set[Key]:
        """Keys whose ``columns`` hold one of ``values`` (a relation's hidden source index)."""
        assert self.indexes is not None  # (a relation with non-key sources has its hidden indexes)
        return self.indexes.matching(columns, values)

    def query(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        """The entries an index query matches, in order, and whether more matched."""
        assert self.indexes is not None  # a table with declared indexes has them
        keys, truncated = self.indexes.run(query)
        rows = self.rows
        return [rows[key] for key in keys], truncated

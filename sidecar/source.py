"""Where a cache's rows come from: the small interface the core reads through.

``db.PgDatabase`` implements it over an asyncpg pool; ``testing.MemoryDatabase``
in memory. It raises only the daemon's own errors: ``errors.Unavailable`` for a
failure that may pass, ``errors.QueryFailed`` for one the same query would meet
again. (The other half of the change-source seam, where change notifications
come from, is ``listener.py`` today.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from sidecar.config import TableConfig
from sidecar.indexes import IndexQuery
from sidecar.keys import Key
from sidecar.schema import TableSchema

Rows = dict[Key, bytes]  # key -> cache entry (see wire.py)


class Database(Protocol):
    """What the caches need from PostgreSQL."""

    async def describe(self, table: TableConfig) -> TableSchema: ...

    def load(self, schema: TableSchema) -> AsyncIterator[Rows]:
        """Every row of the table, in chunks, from one snapshot."""
        ...

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        """The rows that exist among ``keys`` (missing keys are absent)."""
        ...

    async def fetch_matching(self, schema: TableSchema, columns: Sequence[str], values: Sequence[Key]) -> Rows:
        """The rows whose ``columns`` take one of ``values`` (tuples in ``columns`` order)."""
        ...

    async def query(self, schema: TableSchema, query: IndexQuery) -> Rows:
        """The rows an index query matches, in its order, up to one past its limit."""
        ...

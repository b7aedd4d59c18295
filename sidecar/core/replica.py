"""A follower's copy of its upstream's full tables: ``ReplicaTable`` (a full table as
the upstream sends it), which ``batches.BatchIngest`` changes as the upstream's numbered
batches say.

An upstream batch carries rows (full tables: the row the upstream held when it
published the batch, never older than the batch), so nothing is fetched: a
batch is applied the moment it arrives, and the follower's revision is the
batch's. Its own watchers get the batch under the same revision, with the rows
the follower holds when it publishes -- as on the upstream, never older.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key
from sidecar.core.progress import LoadProgress
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.store import Row, RowStore, Snapshot

log = logging.getLogger(__name__)


class ReplicaTable:
    """A full table kept as the upstream's batches say: rows and indexes in memory,
    changed only by ``replace`` and ``put`` (no fetch, so nothing waits)."""

    mode: Literal["full", "lazy"] = "full"
    holds_all_rows = True
    max_rows = 0

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.store = RowStore(schema)
        self.loaded = False
        self.problem: str | None = None
        self.reloads = 0
        self.reads: collections.Counter[str] = collections.Counter()
        self.load_progress: LoadProgress | None = None  # (its rows come from the upstream's stream)

    # ------------------------------------------------------------ state

    @property
    def row_count(self) -> int:
        return len(self.store)

    def byte_count(self) -> int:
        return self.store.byte_count()

    def queries(self) -> dict[str, int]:
        return {"reload": self.reloads}  # (snapshots the upstream sent again; never a query)

    def low_water(self) -> int | None:
        return None  # a batch is applied as it arrives

    def authoritative_rows(self) -> Rows | None:
        return self.store.rows if self.problem is None and self.loaded else None

    def snapshot(self) -> Snapshot | None:
        """Every row as of now, read lazily (the initial state of this follower's own
        watchers, e.g. a follower of it), when memory is the table."""
        return self.store.snapshot() if self.problem is None and self.loaded else None

    # ------------------------------------------------------------ what the upstream says

    def replace(self, rows: Rows) -> None:
        """Every row, as of one upstream revision."""
        unreadable = self._unreadable()
        self.store.replace(rows)
        self.problem = None
        self.loaded = True
        self.reloads += 1
        self._check_readable(unreadable)

    def put(self, rows: Mapping[Key, bytes | None]) -> None:
        """Rows now (None: the key has no row)."""
        unreadable = self._unreadable()
        self.store.store(rows.keys(), {key: row for key, row in rows.items() if row is not None})
        self._check_readable(unreadable)

    def _unreadable(self) -> int:
        indexes = self.store.indexes
        return indexes.unreadable if indexes is not None else 0

    def _check_readable(self, before: int) -> None:
        """A row whose index values cannot be read (not a JSON object: only an upstream can
        send one) would be missing from every index: the table is not served instead."""
        count = self._unreadable() - before
        if count:
            self.fail(f"{count} row(s) from the upstream are not JSON objects: their index values cannot be read")

    def fail(self, problem: str) -> None:
        """The upstream does not serve the table from memory: neither does the follower."""
        if self.problem != problem:
            log.error(
                "%s is not served from memory (reads of it go to the upstream): %s",
                self.schema.qualified,
                problem,
                extra={"event": "table_failed", "table": self.schema.qualified},
            )
        self.problem = problem
        self.loaded = False
        self.store.clear()

    # ------------------------------------------------------------ reads

    def stale_get(self, key: Key) -> Row:
        return self.store.get(key)

    def peek(self, key: Key) -> tuple[bool, Row]:
        row = self.store.get(key)
        self.reads["hit" if row is not None else "not_found"] += 1
        return True, row

    async def get_many(self, keys: Sequence[Key]) -> list[Row]:
        found = self.store.get_many(keys)
        hits = len(found) - found.count(None)
        self.reads["hit"] += hits
        self.reads["not_found"] += len(found) - hits
        return found

    async def query_current(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        return self.query_memory(query)  # (every batch received is applied already)

    def query_memory(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        entries, truncated = self.store.query(query)
        self.reads["hit"] += len(entries)
        return entries, truncated

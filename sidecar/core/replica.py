"""A follower's copy of its upstream's full tables: ``ReplicaTable`` (a full table as
the upstream sends it), which ``batches.BatchIngest`` changes as the upstream's numbered
batches say.

An upstream batch carries rows (full tables: the row the upstream held when it
published the batch, never older than the batch), so nothing is fetched: a
batch is applied the moment it arrives, and the follower's revision is the
batch's. Its own watchers get the batch under the same revision, with the rows
the follower holds when it publishes -- as on the upstream, never older.

A row the upstream marks ``ahead`` (a relation's row its database read brought
newer than the batch's other rows show: ``ahead.KeyFences``) is stored at once,
but reads of its key wait for one read barrier of the follower's own (a Sync on
the upstream, then its stream bringing that revision), which brings the batches
that bring the other rows up to it; the follower's own watchers get the mark too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal

from sidecar.core.ahead import KeyFences
from sidecar.core.aio import TaskSet
from sidecar.core.cache import Rerouted
from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key
from sidecar.core.progress import LoadProgress
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.store import Row, RowStore, Snapshot

log = logging.getLogger(__name__)


class ReplicaTable:
    """A full table kept as the upstream's batches say: rows and indexes in memory,
    changed only by ``replace`` and ``put`` (no fetch: only reads of rows marked ahead wait)."""

    mode: Literal["full", "lazy"] = "full"
    holds_all_rows = True
    max_rows = 0

    def __init__(
        self,
        schema: TableSchema,
        *,
        fence: Callable[[], Awaitable[None]] | None = None,
        seq: Callable[[], int] = lambda: 0,
    ) -> None:
        self.schema = schema
        self._fence_source = fence  # returns once the stream brought every upstream batch before the call
        self._key_fences = KeyFences(seq)  # rows the upstream marked ahead (``seq``: the newest batch received)
        self._tasks = TaskSet(f"replica {schema.qualified}")
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

    def fence_ahead(self, keys: Iterable[Key]) -> None:
        """Rows of ``keys`` just stored may be newer than other rows showing the same source
        rows (the upstream marked them ahead): memory answers for them once one read barrier
        round of this follower passed -- the batches bringing the others are applied by then."""
        keys = list(keys)
        if not keys or self._fence_source is None:
            return
        fence: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fence.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._key_fences.add(keys, fence)
        self._tasks.spawn(self._run_fence(fence), "fence")

    async def _run_fence(self, fence: asyncio.Future[None]) -> None:
        assert self._fence_source is not None
        try:
            await self._fence_source()
        except Exception as exc:  # (the upstream went away, a barrier timed out: reads go to the upstream)
            log.debug("fence of rows of %s marked ahead failed: %s", self.schema.qualified, exc)
            if not fence.done():
                fence.set_exception(Rerouted())
        else:
            if not fence.done():
                fence.set_result(None)

    def ahead(self, key: Key, revision: int) -> bool:
        """Whether ``key``'s row may be newer than the other rows as of batch ``revision``
        show (this follower's own watchers get the mark too)."""
        return self._key_fences.ahead(key, revision)

    async def close(self) -> None:
        await self._tasks.close()

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
        if key in self._key_fences:
            return False, None
        row = self.store.get(key)
        self.reads["hit" if row is not None else "not_found"] += 1
        return True, row

    async def get_many(self, keys: Sequence[Key]) -> list[Row]:
        if self._key_fences:
            await self._key_fences.wait(keys)
        found = self.store.get_many(keys)
        hits = len(found) - found.count(None)
        self.reads["hit"] += hits
        self.reads["not_found"] += len(found) - hits
        return found

    async def query_current(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        if self._key_fences:  # (every batch received is applied already: only rows marked ahead wait)
            await self._key_fences.wait(self._key_fences.keys())
        return self.query_memory(query)

    def query_memory(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        entries, truncated = self.store.query(query)
        self.reads["hit"] += len(entries)
        return entries, truncated

"""``LazyTable``: a read-through cache of a table, bounded by ``max_rows``
(LRU) and an optional TTL.

A fill that started before an invalidation of its key (or its table) is
returned to the readers that were waiting for it but never stored (a change
detaches the key's flight).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from cachetools import Cache, LRUCache, TTLCache

from sidecar.core.aio import Flights, TaskSet, await_all
from sidecar.core.cache import unavailable
from sidecar.core.keys import Key
from sidecar.core.progress import LoadProgress
from sidecar.core.schema import TableSchema
from sidecar.core.source import Database, Rows
from sidecar.core.store import Row

log = logging.getLogger(__name__)

NOT_FOUND = b""  # cached "no such row" in lazy tables (a real row is never empty JSON)


class LazyTable:
    """Read-through cache of a table, bounded by ``max_rows`` (LRU) and an optional TTL."""

    mode: Literal["full", "lazy"] = "lazy"
    holds_all_rows = False  # a missing key is only a miss
    load_progress: LoadProgress | None = None  # (never loaded whole)

    def __init__(
        self,
        schema: TableSchema,
        db: Database,
        *,
        max_rows: int,
        ttl_seconds: float | None = None,
        timer: Callable[[], float] | None = None,
    ) -> None:
        self.schema = schema
        self.db = db
        self.max_rows = max_rows
        self.cache: Cache[Key, bytes]
        if ttl_seconds and timer is not None:
            self.cache = TTLCache(max_rows, ttl_seconds, timer=timer)
        elif ttl_seconds:
            self.cache = TTLCache(max_rows, ttl_seconds)
        else:
            self.cache = LRUCache(max_rows)
        self.loaded = False
        self.problem: str | None = None  # why the table is not served (see FullTable.fail)
        self.fills = 0
        self.reads: collections.Counter[str] = collections.Counter()  # by result: hit, not_found, miss
        self._flights: Flights[Key, bytes] = Flights()
        self._tasks = TaskSet(schema.qualified)

    @property
    def row_count(self) -> int:
        return len(self.cache)

    def byte_count(self) -> int:
        return sum(map(len, self.cache.values()))

    def low_water(self) -> int | None:
        return None  # changes apply the moment they arrive

    def authoritative_rows(self) -> Rows | None:
        return None  # what a lazy table holds is no statement about the rest

    def queries(self) -> dict[str, int]:
        return {"fill": self.fills}

    def changed_matching(self, columns: tuple[str, ...], values: list[Key], seq: int) -> None:
        # (no index to find the rows by: the engine clears lazy relations whole instead)
        self.changed_all(seq)

    def rebuild(self, seq: int) -> None:
        """Forget everything (notifications may have been lost); fill again on demand."""
        self.changed_all(seq)
        self.problem = None
        self.loaded = True

    def fail(self, problem: str) -> None:
        """Stop serving the table from memory because of ``problem``; ``rebuild`` tries again."""
        log.error(
            "%s is not served from memory (reads of it go to the database; other tables are served): %s",
            self.schema.qualified,
            problem,
            extra={"event": "table_failed", "table": self.schema.qualified},
        )
        self.changed_all(0)
        self.problem = problem
        self.loaded = False

    def changed(self, keys: Iterable[Key], seq: int) -> None:
        for key in keys:
            self.cache.pop(key, None)
            self._flights.detach(key)

    def carried(self, rows: Mapping[Key, bytes | None], seq: int, xid: int = 0) -> None:
        self.changed(rows, seq)  # (a lazy table holds what a read asked for: it drops them)

    def emptied(self, seq: int, xid: int = 0) -> None:
        self.changed_all(seq)

    def changed_all(self, seq: int) -> None:
        self.cache.clear()
        self._flights.detach_all()

    async def close(self) -> None:
        await self._tasks.close()

    def stale_get(self, key: Key) -> Row:
        return self.cache.get(key) or None

    def peek(self, key: Key) -> tuple[bool, Row]:
        try:
            row = self.cache[key]
        except KeyError:
            return False, None
        self.reads["hit" if row else "not_found"] += 1
        return True, (row or None)

    async def get_many(self, keys: Sequence[Key]) -> list[Row]:
        results: list[Row] = [None] * len(keys)
        missing: list[int] = []
        cache = self.cache
        negative = 0
        for index, key in enumerate(keys):
            try:
                row = cache[key]
            except KeyError:
                missing.append(index)
                continue
            if row:
                results[index] = row
            else:
                negative += 1
        self.reads["hit"] += len(keys) - len(missing) - negative
        self.reads["not_found"] += negative
        if not missing:
            return results
        self.reads["miss"] += len(missing)
        futures, new = self._flights.join(keys[i] for i in missing)
        if new:
            self._tasks.spawn(self._fill(futures, new), "fill")
        for index, filled in zip(missing, await await_all([futures[keys[i]] for i in missing]), strict=True):
            results[index] = filled
        return results

    async def _fill(self, futures: dict[Key, asyncio.Future[Row]], keys: list[Key]) -> None:
        try:
            rows = await self.db.fetch(self.schema, keys)
        except Exception as exc:  # never leave readers of a flight hanging
            self._flights.fail(futures, keys, unavailable(f"reading {self.schema.qualified}", exc))
            return
        self.fills += 1
        for key in keys:
            # Stored only if no change to the key (or table) arrived meanwhile:
            # a change detaches the flight.
            if self._flights.owns(key, futures[key]):
                self.cache[key] = rows.get(key, NOT_FOUND)
        self._flights.land(futures, keys, rows)

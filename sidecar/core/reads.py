"""The read path: answer from a table's memory while memory can be trusted,
else from the database -- decided in one place.

Memory is trusted while the listener is up and the table is loaded and not
being reloaded (the table says so by raising ``Rerouted``, even to a read
already waiting), and only if that still holds, in the same epoch, once a read
that had to wait is answered: a listener that went down (and maybe came back)
meanwhile may have missed changes. Otherwise reads go to the database (correct, slower, not
cached; concurrent ones for a key share a query), and fail with
``Unavailable`` if it is unreachable too -- unless the caller allows stale
answers, which memory then gives.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sidecar.core.aio import Flights, TaskSet, await_all
from sidecar.core.cache import FETCH_ERRORS, Rerouted, Row, TableCache, whole
from sidecar.core.indexes import IndexQuery, plan
from sidecar.core.keys import Key, coerce_key, coerce_single
from sidecar.core.source import Database
from sidecar.errors import InvalidRequest, QueryFailed, SidecarError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ReadStats:
    passthrough_reads: int = 0  # reads answered by the database (listener down, a table loading)
    stale_reads: int = 0
    database_reads: collections.Counter[str] = field(default_factory=collections.Counter)  # keys, by table


class ReadPath:
    """Rows and index queries of cached tables, from memory or from the database."""

    def __init__(
        self,
        db: Database,
        trusted_epoch: Callable[[], str | None],
        max_batch_keys: int = 1000,
        source_name: str = "database",  # (a follower's: "upstream HOST:PORT")
    ) -> None:
        self.db = db
        self.source_name = source_name  # where reads that memory cannot answer go, in words
        self._trusted_epoch = trusted_epoch  # the epoch while memory can be trusted, else None
        self.max_batch_keys = max_batch_keys
        self.stats = ReadStats()
        self._passthrough: Flights[tuple[str, Key], bytes] = Flights()
        self._tasks = TaskSet("reads")
        # While memory is about to be trusted again (a follower back on its upstream), reads
        # wait here instead of reading through: see ``BatchIngest._fence_then_trust``.
        self.gate: asyncio.Future[None] | None = None
        self.sourced = 0  # reads answered from the source, in flight now
        self._none_sourced = asyncio.Event()
        self._none_sourced.set()

    async def close(self) -> None:
        await self._tasks.close()

    # ------------------------------------------------------------ keys

    def keys(self, table: TableCache, raw_keys: Sequence[Sequence[Any]]) -> list[Key]:
        """Coerce keys given as parts (one sequence of parts per key)."""
        self.check_count(len(raw_keys))
        columns = table.schema.key_columns
        return [coerce_key(columns, parts) for parts in raw_keys]

    def single_keys(self, table: TableCache, values: Sequence[Any]) -> list[Key]:
        """Coerce keys given as bare values of a one-column primary key."""
        self.check_count(len(values))
        return coerce_single(table.schema.key_columns, values)

    def check_count(self, count: int) -> None:
        if count > self.max_batch_keys:
            raise InvalidRequest(
                f"{count} keys requested; at most {self.max_batch_keys} per call (server.max_batch_keys)"
            )

    # ------------------------------------------------------------ rows

    async def get(self, table: TableCache, key: Key, allow_stale: bool = False) -> Row:
        """One row (``None`` if there is none); a row memory holds is answered at once."""
        if table.loaded and self._trusted_epoch() is not None:
            hit, row = table.peek(key)
            if hit:
                return row
        return (await self.read(table, [key], allow_stale))[0]

    async def read(self, table: TableCache, keys: list[Key], allow_stale: bool = False) -> list[Row]:
        """Rows of already coerced keys, in order."""
        return await self._serve(
            table,
            memory=lambda: table.get_many(keys),
            source=lambda: self._read_through(table, keys),
            stale=(lambda: [table.stale_get(key) for key in keys]) if allow_stale else None,
        )

    async def _serve(
        self,
        table: TableCache,
        *,
        memory: Callable[[], Awaitable[T]] | None,
        source: Callable[[], Awaitable[T]],
        stale: Callable[[], T] | None,
    ) -> T:
        """Memory while it can be trusted (before and after waiting), else the source;
        ``stale`` (memory, knowingly) if the source is unreachable and the caller allows it."""
        if self.gate is not None:
            await asyncio.shield(self.gate)
        epoch = self._trusted_epoch()
        if memory is not None and epoch is not None and table.loaded:
            try:
                answer = await memory()
            except Rerouted:
                pass  # the listener went down while the read waited
            else:
                if self._trusted_epoch() == epoch:
                    return answer
        self.stats.passthrough_reads += 1
        self.sourced += 1
        self._none_sourced.clear()
        try:
            return await source()
        except Unavailable:
            if stale is None or not table.loaded:
                raise
            self.stats.stale_reads += 1
            return stale()
        finally:
            self.sourced -= 1
            if not self.sourced:
                self._none_sourced.set()

    async def until_none_sourced(self) -> None:
        """Return once no read is being answered from the source."""
        await self._none_sourced.wait()

    async def _read_through(self, table: TableCache, keys: list[Key]) -> list[Row]:
        """Read from the database, uncached (memory cannot be trusted now)."""
        self.stats.database_reads[table.schema.qualified] += len(keys)
        flight_keys = [(table.schema.qualified, key) for key in keys]
        futures, new = self._passthrough.join(flight_keys)
        if new:
            self._tasks.spawn(self._fetch_through(table, futures, new), "read-through")
        return await await_all([futures[k] for k in flight_keys])

    async def _fetch_through(self, table: TableCache, futures: dict[Any, Any], flight_keys: list[Any]) -> None:
        # Readers that join from now on began after this query is sent, so it
        # may miss commits they must see: they start their own.
        self._passthrough.seal(futures, flight_keys)
        keys = [key for _, key in flight_keys]
        try:
            rows = await self.db.fetch(table.schema, keys)
        except Exception as exc:  # never leave the flight's readers hanging
            self._passthrough.fail(futures, flight_keys, self._source_failed(table, exc))
            return
        self._passthrough.land(futures, flight_keys, {(table.schema.qualified, k): v for k, v in rows.items()})

    def _source_failed(self, table: TableCache, exc: BaseException) -> SidecarError:
        """What a reader is told: ``QueryFailed`` when asking again cannot help (a privilege
        missing, the schema changed), else ``Unavailable``; naming the source (the database,
        or a follower's upstream) and the cause."""
        if not isinstance(exc, FETCH_ERRORS):
            log.error(
                "reading %s from the %s failed unexpectedly", table.schema.qualified, self.source_name, exc_info=exc
            )
        if table.problem is not None:
            why = f"{table.schema.qualified} is not served from memory ({table.problem}) and reading it failed"
        elif isinstance(exc, QueryFailed):
            why = f"reading {table.schema.qualified} from the {self.source_name} failed, and would fail again"
        else:
            why = f"{self.source_name} unreachable and the cache is not current"
        if isinstance(exc, QueryFailed):
            return QueryFailed(f"{why}: {_brief(exc)}")
        return Unavailable(f"{why}: {_brief(exc)}")

    # ------------------------------------------------------------ index queries

    def plan_query(
        self,
        table: TableCache,
        index: str,
        values: Sequence[Sequence[Any]] | None,
        low: Any,
        high: Any,
        *,
        low_open: bool = False,
        high_open: bool = False,
        limit: int = 0,
        descending: bool = False,
    ) -> IndexQuery:
        """Validate an index query (``limit`` 0: the most one call may return)."""
        if limit > self.max_batch_keys:
            raise InvalidRequest(
                f"limit {limit} is above the most one call returns ({self.max_batch_keys}, server.max_batch_keys)"
            )
        if values is not None:
            self.check_count(len(values))
        return plan(
            table.schema,
            index,
            values,
            low,
            high,
            low_open=low_open,
            high_open=high_open,
            limit=limit or self.max_batch_keys,
            descending=descending,
        )

    async def query(self, table: TableCache, query: IndexQuery, allow_stale: bool = False) -> tuple[list[bytes], bool]:
        """The rows (entries) an index query matches, in order, and whether more matched.

        Served from memory once every change received before the call is
        applied; from the database while memory cannot be trusted, as reads are.
        """

        async def source() -> tuple[list[bytes], bool]:
            try:
                rows = await self.db.query(table.schema, query)
            except Exception as exc:
                raise self._source_failed(table, exc) from None
            self.stats.database_reads[table.schema.qualified] += len(rows)
            entries = list(rows.values())
            return entries[: query.limit], len(entries) > query.limit

        if not whole(table):  # (a lazy table holds no index: the database answers)
            return await self._serve(table, memory=None, source=source, stale=None)
        held = table

        return await self._serve(
            table,
            memory=lambda: held.query_current(query),
            source=source,
            stale=(lambda: held.query_memory(query)) if allow_stale else None,
        )


def _brief(exc: BaseException) -> str:
    """An error for a message: the daemon's own speak for themselves; others say their type."""
    return str(exc) if isinstance(exc, SidecarError) else f"{type(exc).__name__}: {exc}"

"""What every cached table offers for reads (``TableCache``); what a table that holds
every row adds (``WholeTable``: index queries, initial states); and what a table kept
current by refetching adds (``RefetchingTable``: told of changes by key). The kinds:
``full.py`` (every row, refetched: whole and refetching), ``lazy.py`` (read-through,
bounded, LRU/TTL: refetching) and ``replica.py`` (every row, as a follower's upstream
sends them: whole).

All database access goes through ``source.Database``, so unit tests drive the
caches with an in-memory fake.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol, TypeGuard

from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key
from sidecar.core.progress import LoadProgress
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.store import Row, Snapshot
from sidecar.errors import QueryFailed, SidecarError, Unavailable

log = logging.getLogger(__name__)

# What a Database raises when a query fails (db.py translates the driver's errors).
FETCH_ERRORS: tuple[type[BaseException], ...] = (Unavailable, QueryFailed)
RETRY_MIN_DELAY = 0.05
RETRY_MAX_DELAY = 5.0

__all__ = [
    "FETCH_ERRORS",
    "RefetchingTable",
    "Rerouted",
    "Row",
    "Rows",
    "TableCache",
    "WholeTable",
    "whole",
    "would_repeat",
]


class TableCache(Protocol):
    """One cached table (or relation), as reads see it."""

    schema: TableSchema
    mode: Literal["full", "lazy"]
    holds_all_rows: bool  # every row is in memory: a missing key is a definite "no such row"
    max_rows: int  # lazy: the LRU bound; 0 for full tables
    loaded: bool  # reads may be answered from memory
    problem: str | None  # why the table is not served from memory, if it is not
    reads: collections.Counter[str]  # by result: hit, not_found, miss

    @property
    def load_progress(self) -> LoadProgress | None:
        """Full tables: how far the running (or last) load got; None for lazy tables."""
        ...

    @property
    def row_count(self) -> int: ...
    def byte_count(self) -> int: ...
    def queries(self) -> dict[str, int]:
        """Queries made, by kind (metrics)."""
        ...

    def low_water(self) -> int | None:
        """The oldest received batch not yet applied to this table, if any."""
        ...

    def authoritative_rows(self) -> Rows | None:
        """Every row, when memory is the table (full and served); else None."""
        ...

    def stale_get(self, key: Key) -> Row: ...
    def peek(self, key: Key) -> tuple[bool, Row]: ...
    async def get_many(self, keys: Sequence[Key]) -> list[Row]: ...


class WholeTable(TableCache, Protocol):
    """A table that holds every row (``holds_all_rows``): index queries and initial states."""

    async def query_current(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        """An index query's entries (and whether more matched) once every change received
        before the call is applied to rows and indexes."""
        ...

    def query_memory(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        """The same, from memory as it is now (a stale read)."""
        ...

    def snapshot(self) -> Snapshot | None:
        """Every row as of now, read lazily, when memory is the table; else None."""
        ...


def whole(table: TableCache) -> TypeGuard[WholeTable]:
    """Whether ``table`` holds every row (and so answers index queries and initial states)."""
    return table.holds_all_rows


class RefetchingTable(TableCache, Protocol):
    """A table kept current by refetching what change notices name."""

    def rebuild(self, seq: int) -> None: ...
    def changed(self, keys: Iterable[Key], seq: int) -> None: ...
    def changed_all(self, seq: int) -> None: ...
    def changed_matching(self, columns: tuple[str, ...], values: list[Key], seq: int) -> None: ...
    def carried(self, rows: Mapping[Key, bytes | None], seq: int, xid: int = 0) -> None:
        """These keys changed in batch ``seq`` (transaction ``xid``) and the change brought
        their rows (None: gone)."""
        ...

    def emptied(self, seq: int, xid: int = 0) -> None:
        """The table was emptied (TRUNCATE) in batch ``seq``, and the change stream says so."""
        ...

    def fail(self, problem: str) -> None: ...
    async def close(self) -> None: ...


def would_repeat(exc: BaseException) -> bool:
    """Whether a query that failed with ``exc`` would fail again if retried as it is."""
    # (an error that is not the daemon's own is a bug, or an encoding no retry changes)
    return isinstance(exc, QueryFailed) or not isinstance(exc, SidecarError)


def unavailable(what: str, exc: BaseException) -> SidecarError:
    """The error readers see when a query failed: ``QueryFailed`` when asking again cannot
    help (a privilege missing: FAILED_PRECONDITION, not a status clients retry), else
    ``Unavailable``; an unexpected one is logged in full."""
    if not isinstance(exc, FETCH_ERRORS):
        log.error("%s failed unexpectedly", what, exc_info=exc)
    if isinstance(exc, QueryFailed):
        return QueryFailed(f"{what} failed: {exc}")
    if isinstance(exc, SidecarError):
        return Unavailable(f"{what} failed: {exc}")
    return Unavailable(f"{what} failed: {type(exc).__name__}: {exc}")


class Rerouted(Exception):
    """Internal: memory stopped being trustworthy while a read waited (the
    listener went down); the engine answers the read from the database."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""

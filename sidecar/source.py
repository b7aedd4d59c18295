"""The change-source seam: where changes and rows come from, as the core needs them.

* ``Database``: keyed and bulk fetches of rows (``db.PgDatabase`` over an asyncpg
  pool; ``testing.MemoryDatabase`` in memory). It raises only the daemon's own
  errors: ``errors.Unavailable`` for a failure that may pass,
  ``errors.QueryFailed`` for one the same query would meet again.
* ``ChangeSource``: a stream of change events with its connections and losses
  (after a loss, changes may have been missed: the core rebuilds), a way to send
  a read-barrier token that comes back ordered with the changes, and the
  ``Database`` its rows come from. ``pg_source.PgChangeSource`` is PostgreSQL's
  (LISTEN + the pool); ``testing.MemoryChangeSource`` the in-memory one; a
  follower's upstream sidecar (Watch + BatchGet + Sync) is the next.
* ``ChangeSink``: what a source tells the core (the ``Engine`` is one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from sidecar.config import TableConfig
from sidecar.events import Event
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

    async def estimate(self, schema: TableSchema) -> int | None:
        """Roughly how many rows ``load`` would yield (for progress reports), or None."""
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


class ChangeSink(Protocol):
    """What a change source tells the core."""

    def listener_connected(self) -> None:
        """Changes flow from now on; those before may have been missed: rebuild."""
        ...

    def listener_lost(self, reason: str) -> None:
        """Changes may be missed from now on: stop trusting memory."""
        ...

    def handle(self, event: Event) -> None:
        """One change event (or a read-barrier token), in the source's order."""
        ...


class ChangeSource(Protocol):
    """Where changes and rows come from."""

    @property
    def database(self) -> Database:
        """The rows behind the changes."""
        ...

    async def follow(self, sink: ChangeSink) -> None:
        """Tell ``sink`` every change, connection and loss until cancelled, reconnecting as needed."""
        ...

    async def send_token(self, token: str) -> None:
        """Send a read-barrier token: it comes back to the sink as ``events.SyncToken``,
        after every change that was committed before it was sent."""
        ...

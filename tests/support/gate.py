"""Pausing the daemon's queries to force interleavings against a real database.

``GatedPgDatabase`` runs each query for real, then (when the gate is closed)
waits before handing the rows back: the query has read the database as of
its snapshot, and the test can commit, deliver notifications, even kill the
listener, before the stale answer arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from sidecar.core.keys import Key
from sidecar.core.schema import TableSchema
from sidecar.pg.db import PgDatabase, Rows


class Gate:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0
        self._changed = asyncio.Condition()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def held(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` queries are held at the gate."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.waiting >= count)

    async def passage(self) -> None:
        if self._open.is_set():
            return
        async with self._changed:
            self.waiting += 1
            self._changed.notify_all()
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1


GATE = Gate()
LOADS = Gate()  # loads only (reloads included): fetches pass


class GatedPgDatabase(PgDatabase):
    """PgDatabase whose fetches and loads stop at ``GATE`` after reading (loads at ``LOADS`` too)."""

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        rows = await super().fetch(schema, keys)
        await GATE.passage()
        return rows

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        chunks = [chunk async for chunk in super().load(schema)]
        await GATE.passage()
        await LOADS.passage()
        for chunk in chunks:
            yield chunk

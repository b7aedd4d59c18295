"""An in-memory ``Database`` for tests: the caches and the engine run against
it with no PostgreSQL, and tests can pause fetches to force interleavings.

A fetch reads the data when it *starts* (as a query's snapshot would) and can
then be held at a gate, so a test can commit a change and deliver its
notification while an older read is still in flight.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from sidecar.config import TableConfig
from sidecar.core.events import Event, SyncToken
from sidecar.core.indexes import IndexQuery, IndexSet
from sidecar.core.keys import Key, KeyColumn
from sidecar.core.schema import TableSchema
from sidecar.core.source import ChangeSink, Rows
from sidecar.core.wire import entry, row_json
from sidecar.errors import SchemaError


def int_key_schema(name: str = "public.items", mode: str = "full", **table: Any) -> TableSchema:
    """A table keyed by one int8 column ``id``."""
    schema, _, relname = name.partition(".")
    config = TableConfig(schema=schema, name=relname, mode=mode, **table)  # type: ignore[arg-type]
    return TableSchema(config=config, key_columns=(KeyColumn.create("id", "int8", "bigint"),))


class MemoryDatabase:
    """Tables as dicts of key -> row JSON bytes."""

    def __init__(self, *schemas: TableSchema) -> None:
        self.schemas = {s.qualified: s for s in schemas}
        self.data: dict[str, dict[Key, bytes]] = {s.qualified: {} for s in schemas}
        self.fetches: list[tuple[str, tuple[Key, ...]]] = []
        self.loads: list[str] = []
        self.error: BaseException | None = None  # raised by every query while set
        self._gate: asyncio.Event | None = None
        self._held = 0
        self._held_changed = asyncio.Condition()

    # ---------------------------------------------------------- test controls

    def put(self, table: str, key: Key, **row: Any) -> None:
        self.data[table][key] = entry(json.dumps(row, separators=(",", ":")).encode())

    def delete(self, table: str, key: Key) -> None:
        self.data[table].pop(key, None)

    def hold(self) -> None:
        """Make later queries wait (after reading their snapshot) until ``release``."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def held(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` queries are waiting at the gate."""
        async with asyncio.timeout(timeout), self._held_changed:
            await self._held_changed.wait_for(lambda: self._held >= count)

    async def _pass_gate(self) -> None:
        gate = self._gate
        if gate is None:
            await asyncio.sleep(0)  # a real query always yields
            return
        async with self._held_changed:
            self._held += 1
            self._held_changed.notify_all()
        try:
            await gate.wait()
        finally:
            self._held -= 1

    # ---------------------------------------------------------- Database

    async def describe(self, table: TableConfig) -> TableSchema:
        try:
            return self.schemas[table.qualified]
        except KeyError:
            raise SchemaError(f"table {table.qualified} does not exist") from None

    async def estimate(self, schema: TableSchema) -> int | None:
        if self.error is not None:
            raise self.error
        table = self.data.get(schema.qualified)
        return None if table is None else len(table)

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        if self.error is not None:
            raise self.error
        self.loads.append(schema.qualified)
        snapshot = dict(self.data[schema.qualified])
        await self._pass_gate()
        if self.error is not None:
            raise self.error
        yield snapshot

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        if self.error is not None:
            raise self.error
        self.fetches.append((schema.qualified, tuple(keys)))
        table = self.data[schema.qualified]
        snapshot = {key: table[key] for key in keys if key in table}
        await self._pass_gate()
        if self.error is not None:
            raise self.error
        return snapshot

    async def fetch_matching(self, schema: TableSchema, columns: Sequence[str], values: Sequence[Key]) -> Rows:
        """Rows whose JSON holds one of ``values`` in ``columns`` (plain JSON scalars only)."""
        if self.error is not None:
            raise self.error
        wanted = set(values)
        snapshot = {}
        for key, stored in self.data[schema.qualified].items():
            row = json.loads(row_json(stored))
            if tuple(row.get(column) for column in columns) in wanted:
                snapshot[key] = stored
        await self._pass_gate()
        if self.error is not None:
            raise self.error
        return snapshot

    async def query(self, schema: TableSchema, query: IndexQuery) -> Rows:
        """Answered by indexing a snapshot of the table (the sidecar's own index code)."""
        if self.error is not None:
            raise self.error
        snapshot = dict(self.data[schema.qualified])
        await self._pass_gate()
        if self.error is not None:
            raise self.error
        indexes = IndexSet(schema)
        indexes.rebuild(snapshot)
        keys, _ = indexes.run(replace(query, limit=query.limit + 1))
        return {key: snapshot[key] for key in keys}


class MemoryChangeSource:
    """``source.ChangeSource`` in memory: the test says what arrives (``emit``), and when
    the connection is lost or back (``lose``, ``reconnect``); barrier tokens come back
    right away, after every event emitted before them."""

    def __init__(self, database: MemoryDatabase) -> None:
        self._database = database
        self._sink: ChangeSink | None = None
        self.tokens = 0

    @property
    def database(self) -> MemoryDatabase:
        return self._database

    async def follow(self, sink: ChangeSink) -> None:
        self._sink = sink
        sink.source_connected()
        await asyncio.Event().wait()  # until cancelled

    async def send_token(self, token: str) -> None:
        assert self._sink is not None, "not followed yet"
        self.tokens += 1
        asyncio.get_running_loop().call_soon(self._sink.handle, SyncToken(token))

    def emit(self, event: Event) -> None:
        assert self._sink is not None, "not followed yet"
        self._sink.handle(event)

    def lose(self, reason: str = "test") -> None:
        assert self._sink is not None
        self._sink.source_lost(reason)

    def reconnect(self) -> None:
        assert self._sink is not None
        self._sink.source_connected()

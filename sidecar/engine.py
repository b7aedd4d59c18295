"""The cache core: routes change events to the tables, numbers transaction
batches, tracks revisions and serves reads, with no gRPC and no SQL in sight.

Reads are answered from a table's memory only while the listener is up and
the table is loaded. Otherwise they go to the database (correct, slower, not
cached) -- notifications may be missing, so memory cannot be trusted -- and
fail with ``Unavailable`` if the database is unreachable too, unless the
caller allows stale answers.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.aio import Flights, TaskSet, Waiters, await_all
from sidecar.barrier import Barrier
from sidecar.cache import FETCH_ERRORS, Rerouted, Row, TableCache
from sidecar.config import Config, parse_table_name, qualified_name
from sidecar.errors import ConfigError, InvalidKey, InvalidRequest, SidecarError, Unavailable, UnknownTable
from sidecar.events import Event, Op, RowChange, SyncToken, TableChange
from sidecar.full import FullTable
from sidecar.hub import (
    DELETE,
    INSERT,
    INVALIDATE,
    TABLE_CHANGED,
    TRUNCATE,
    UPDATE,
    Change,
    Hub,
    Snapshot,
    snapshot_chunks,
)
from sidecar.indexes import IndexQuery, plan
from sidecar.keys import Key, KeyColumn, coerce_key, coerce_single, key_text
from sidecar.lazy import LazyTable
from sidecar.schema import SourceSchema, TableSchema
from sidecar.source import Database
from sidecar.wire import row_json

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Revision:
    epoch: str
    number: int

    def __str__(self) -> str:
        return f"{self.epoch}/{self.number}"


def new_epoch() -> str:
    return secrets.token_hex(8)


_OPS = {Op.INSERT: INSERT, Op.UPDATE: UPDATE, Op.DELETE: DELETE}


@dataclass
class EngineStats:
    events: int = 0
    ignored: int = 0  # events for tables this sidecar does not cache
    bad_keys: int = 0  # keys that did not fit their columns (degraded to whole-table)
    passthrough_reads: int = 0  # read-throughs (listener down or a table loading)
    stale_reads: int = 0
    database_reads: collections.Counter[str] = field(default_factory=collections.Counter)  # keys, by table


class Engine:
    """Tables, the batch sequence, revisions and the read path."""

    def __init__(
        self,
        db: Database,
        schemas: Sequence[TableSchema],
        *,
        max_batch_keys: int = 1000,
        refetch_batch_size: int = 500,
        refetch_concurrency: int = 2,
        history_batches: int = 10_000,
        history_bytes: int = 64 * 1024 * 1024,
        watch_max_lag: int = 1_000,
        stall_after: float = 30.0,
    ) -> None:
        self.db = db
        self.max_batch_keys = max_batch_keys
        self.epoch = new_epoch()
        self.seq = 0  # transaction batches received (and sidecar-made batches)
        self.applied = 0  # every batch <= applied is reflected in every table
        self.listener_up = False
        self.stats = EngineStats()
        self._open_xid: int | None = None
        self._batch_open = False
        self._state_listeners: list[Callable[[], None]] = []
        self._was_ready = False
        self._connected_before = False
        self._passthrough: Flights[tuple[str, Key], bytes] = Flights()
        self._tasks = TaskSet("engine")
        self.barrier: Barrier | None = None  # set by the app once it can send NOTIFYs
        self.max_wait = 30.0  # longest a read waits for min_revision without a deadline
        self.on_barrier: Callable[[float], None] | None = None  # told how long each barrier took
        self._past_epochs: set[str] = set()
        self._revision_waiters = Waiters()
        self._epoch_start = 0  # the rebuild that began this epoch
        self.stall_after = stall_after
        self._waiting_since: float | None = None  # batches wait since: the last advance, or the first arrival
        self.tables: dict[str, TableCache] = {}
        # Who hears about changes of a PostgreSQL table: the table's own cache
        # (source None) and the relations it is a source of.
        self._consumers: dict[tuple[str, str], list[tuple[TableCache, SourceSchema | None]]] = {}
        self.hub = Hub(
            rows_of=self._full_rows,
            row_json=row_json,
            max_batches=history_batches,
            max_bytes=history_bytes,
            max_lag=watch_max_lag,
        )
        for schema in schemas:
            table: TableCache
            if schema.config.mode == "full":
                table = FullTable(
                    schema,
                    db,
                    current_seq=lambda: self.seq,
                    on_progress=self._progress,
                    on_matched=functools.partial(self._matched, schema.qualified),
                    batch_size=refetch_batch_size,
                    concurrency=refetch_concurrency,
                )
            else:
                table = LazyTable(schema, db, max_rows=schema.config.max_rows, ttl_seconds=schema.config.ttl_seconds)
            self.tables[schema.qualified] = table
            if schema.config.is_relation:
                for source in schema.sources:
                    config = source.table.config
                    self._consumers.setdefault((config.schema, config.name), []).append((table, source))
            else:
                self._consumers.setdefault((schema.config.schema, schema.config.name), []).append((table, None))

    @classmethod
    def from_config(cls, config: Config, db: Database, schemas: Sequence[TableSchema]) -> Engine:
        return cls(
            db,
            schemas,
            max_batch_keys=config.max_batch_keys,
            refetch_batch_size=config.refetch_batch_size,
            refetch_concurrency=config.refetch_concurrency,
            history_batches=config.watch_history_batches,
            history_bytes=config.watch_history_bytes,
            watch_max_lag=config.watch_max_lag,
            stall_after=config.stall_seconds,
        )

    # ------------------------------------------------------------ state

    @property
    def revision(self) -> Revision:
        return Revision(self.epoch, self.applied)

    @property
    def ready(self) -> bool:
        """Serving from memory: the listener is up and every table is loaded,
        and the rebuild that began this epoch is done."""
        return (
            self.listener_up
            and self.applied >= self._epoch_start
            and all(t.loaded or t.problem is not None for t in self.tables.values())
        )

    @property
    def stalled_seconds(self) -> float:
        """How long received batches have waited without the revision advancing (0: none wait)."""
        if self._waiting_since is None or not self.listener_up:
            return 0.0
        return time.monotonic() - self._waiting_since

    @property
    def stalled(self) -> bool:
        """The revision has not advanced for ``stall_after`` seconds while batches wait
        (refetches failing, a table stuck): health says NOT_SERVING."""
        return self.stalled_seconds > self.stall_after

    async def until_ready(self) -> None:
        """Wait until ``ready`` (bounded by the caller's deadline)."""
        while not self.ready:
            changed = asyncio.Event()
            self._state_listeners.append(changed.set)
            try:
                await changed.wait()
            finally:
                self._state_listeners.remove(changed.set)

    def snapshot(self, names: frozenset[str]) -> list[Snapshot]:
        """Every row of the named full-mode tables (all of them when ``names`` is
        empty), as of the last published revision, in chunks."""
        tables = [
            (name, rows)
            for name, table in self.tables.items()
            if (rows := table.authoritative_rows()) is not None and (not names or name in names)
        ]
        return snapshot_chunks(self.hub.epoch, self.hub.published, tables, row_json)

    def _full_rows(self, name: str) -> dict[Key, bytes] | None:
        table = self.tables.get(name)
        return None if table is None else table.authoritative_rows()

    def on_state_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``ready`` may have changed."""
        self._state_listeners.append(callback)

    def _state_changed(self) -> None:
        ready = self.ready
        if ready == self._was_ready:
            return
        self._was_ready = ready
        for callback in self._state_listeners:
            callback()

    def _progress(self) -> None:
        oldest = self.seq + 1
        if self._batch_open:
            oldest = self.seq
        for table in self.tables.values():
            low = table.low_water()
            if low is not None and low < oldest:
                oldest = low
        applied = oldest - 1
        if applied > self.applied:
            self._waiting_since = time.monotonic()
            self.applied = applied
            self.hub.publish(applied)
            if self._revision_waiters:
                self._revision_waiters.release(applied)
        if self.seq <= self.applied:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = time.monotonic()
        if self.barrier is not None:
            self.barrier.applied(self.applied)
        self._state_changed()

    # ------------------------------------------------------------ listener side

    def listener_connected(self) -> None:
        """LISTEN is active: (re)build every table, in a new epoch.

        Notifications sent while no connection listened are lost, so memory
        is rebuilt from scratch: full tables reload, lazy tables empty.
        """
        rebuild = self._connected_before
        if rebuild:
            self._past_epochs.add(self.epoch)
            self.epoch = new_epoch()
            log.info(
                "rebuilding every table after reconnect (new epoch %s)",
                self.epoch,
                extra={"event": "rebuild", "epoch": self.epoch},
            )
        self._connected_before = True
        self.seq += 1
        self._epoch_start = self.seq
        self._batch_open = False
        self._open_xid = None
        self.listener_up = True
        self.hub.start(self.epoch, self.seq, "cache rebuilt after the listener reconnected" if rebuild else None)
        for table in self.tables.values():
            table.rebuild(self.seq)
        self._progress()

    def listener_lost(self, reason: str) -> None:
        """Notifications may be missed from now on: stop trusting memory.

        Waiting readers are released to read from the database (which is
        fresher than any revision they waited for); barriers fail.
        """
        self.listener_up = False
        if self.barrier is not None:
            self.barrier.fail_all(f"listener down ({reason})")
        for table in self.tables.values():
            table.reroute()
        self._revision_waiters.release_all()
        self._state_changed()

    def handle(self, event: Event) -> None:
        """Apply one parsed notification (called synchronously by the listener)."""
        if isinstance(event, SyncToken):
            if self.barrier is not None and self.barrier.token_received(event.token, self.seq):
                self._progress()
            return
        consumers = self._consumers.get((event.schema, event.table))
        if consumers is None:
            self.stats.ignored += 1
            return
        self.stats.events += 1
        seq = self._batch_seq(event.xid)
        for table, source in consumers:
            if source is None:
                self._apply(table, event, seq)
            else:
                self._apply_to_relation(table, source, event, seq)
        self._progress()

    def _apply(self, table: TableCache, event: RowChange | TableChange, seq: int) -> None:
        name = table.schema.qualified
        if isinstance(event, TableChange):
            log.debug("%s: whole table changed (%s)", name, event.reason)
            op = TRUNCATE if event.op is Op.TRUNCATE else TABLE_CHANGED
            self.hub.record(seq, event.xid, Change(name, op))
            table.changed_all(seq)
            return
        keys = self._coerce(table.schema.key_columns, event, name)
        if keys is None:
            self.hub.record(seq, event.xid, Change(name, TABLE_CHANGED))
            table.changed_all(seq)
            return
        self._record_rows(seq, event, name, keys)
        table.changed(keys, seq)

    def _apply_to_relation(
        self, relation: TableCache, source: SourceSchema, event: RowChange | TableChange, seq: int
    ) -> None:
        """A source of ``relation`` changed: refresh exactly the relation rows it affects."""
        name = relation.schema.qualified
        source_keys = None if isinstance(event, TableChange) else self._coerce(source.table.key_columns, event, name)
        if source_keys is None:
            self.hub.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)
            return
        columns = source.relation_columns
        mapped = [tuple(key[position] for position, _ in source.mapping) for key in source_keys]
        key_names = [c.name for c in relation.schema.key_columns]
        by_key = set(key_names) <= set(columns)  # the source's key gives the relation's key
        try:
            if by_key:
                keys = list(
                    dict.fromkeys(
                        coerce_key(relation.schema.key_columns, [value[columns.index(n)] for n in key_names])
                        for value in mapped
                    )
                )
            else:
                value_columns = [relation.schema.column(c) for c in columns]
                values = list(dict.fromkeys(coerce_key(value_columns, value) for value in mapped))
        except InvalidKey as exc:
            log.warning("%s: source values that do not fit (%s); reloading it", name, exc)
            self.hub.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)
            return
        if by_key:
            for key in keys:  # (a source insert may change a relation row, a delete add none...)
                self.hub.record(seq, event.xid, Change(name, UPDATE, key, by_outcome=True))
            relation.changed(keys, seq)
        elif relation.holds_all_rows:
            self.hub.ensure(seq, event.xid)  # its changes are known once the refresh has run
            relation.changed_matching(columns, values, seq)
        else:  # a lazy relation holds no index to find the rows: drop them all
            self.hub.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)

    def _coerce(self, columns: Sequence[KeyColumn], event: RowChange, name: str) -> list[Key] | None:
        """The event's keys (new, then old) coerced to ``columns``; None when one does not fit."""
        try:
            keys = [coerce_key(columns, parts) for parts in event.keys]
            keys += [coerce_key(columns, parts) for parts in event.old_keys]
        except InvalidKey as exc:
            # Never guess: a key we cannot read could be any row.
            self.stats.bad_keys += 1
            log.warning("%s: unreadable key in notification (%s); reloading it", name, exc)
            return None
        return keys

    def _matched(self, name: str, seq: int, keys: set[Key]) -> None:
        """A relation refresh ran: the rows a source change of batch ``seq`` touched join that batch."""
        for key in keys:
            self.hub.add(seq, Change(name, UPDATE, key, by_outcome=True))

    def _record_rows(self, seq: int, event: RowChange, name: str, keys: list[Key]) -> None:
        op = _OPS[event.op]
        new_count = len(event.keys)
        moved = keys[new_count:]
        if len(moved) == 1 and new_count == 1:  # one row changed its key: pair them
            self.hub.record(seq, event.xid, Change(name, op, keys[0], moved[0]))
            return
        for key in keys:  # (keys an UPDATE moved away from carry no row: gone)
            self.hub.record(seq, event.xid, Change(name, op, key))

    def _batch_seq(self, xid: int) -> int:
        """The batch an event belongs to: consecutive events of one transaction
        share one, until the loop iteration that received them ends."""
        if self._batch_open and self._open_xid == xid:
            return self.seq
        self.seq += 1
        self._open_xid = xid
        if not self._batch_open:
            self._batch_open = True
            asyncio.get_running_loop().call_soon(self._close_batch)
        return self.seq

    def _close_batch(self) -> None:
        self._batch_open = False
        self._progress()

    # ------------------------------------------------------------ consistency

    async def sync(self) -> Revision:
        """Read barrier: every commit completed before this call is applied."""
        if not self.listener_up or self.barrier is None:
            raise Unavailable("the listener is down; the cache cannot be brought up to date now")
        started = time.perf_counter()
        await self.barrier.wait()
        if self.on_barrier is not None:
            self.on_barrier(time.perf_counter() - started)
        return self.revision

    async def wait_revision(self, epoch: str, number: int) -> None:
        """Wait until the cache has reached ``(epoch, number)``.

        While the listener is down there is nothing to wait for: reads then
        go to the database, which is newer than any revision.
        """
        if not self.listener_up:
            return
        if epoch == self.epoch:
            if self.applied >= number:
                return
            await self._revision_waiters.wait(number)
            return
        if epoch in self._past_epochs:
            return  # rebuilt since: newer than anything of that epoch
        # Another process's (or a previous run's) revision: prove freshness instead.
        if self.listener_up:
            await self.sync()

    async def prepare_read(self, strong: bool, min_revision: Revision | None) -> None:
        """Honour read options before answering (see ReadOptions in the API)."""
        if strong and self.listener_up:
            await self.sync()
        if min_revision is not None:
            await self.wait_revision(min_revision.epoch, min_revision.number)

    # ------------------------------------------------------------ reads

    def table(self, name: str) -> TableCache:
        table = self.tables.get(name)
        if table is not None:
            return table
        # A request's name is echoed in the error: never all of a huge one.
        shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name)} characters)"
        try:
            schema, relname = parse_table_name(name)
        except ConfigError:
            raise InvalidRequest(f"{shown} is not a table name like 'public.patron'") from None
        table = self.tables.get(qualified_name(schema, relname))
        if table is None:
            known = ", ".join(self.tables) or "none"
            raise UnknownTable(f"table {shown} is not cached here (cached: {known})")
        return table

    def keys(self, table: TableCache, raw_keys: Sequence[Sequence[Any]]) -> list[Key]:
        """Coerce keys given as parts (one sequence of parts per key)."""
        self._check_batch(len(raw_keys))
        columns = table.schema.key_columns
        return [coerce_key(columns, parts) for parts in raw_keys]

    def single_keys(self, table: TableCache, values: Sequence[Any]) -> list[Key]:
        """Coerce keys given as bare values of a one-column primary key."""
        self._check_batch(len(values))
        return coerce_single(table.schema.key_columns, values)

    def _check_batch(self, count: int) -> None:
        if count > self.max_batch_keys:
            raise InvalidRequest(
                f"{count} keys requested; at most {self.max_batch_keys} per call (server.max_batch_keys)"
            )

    async def get(self, name: str, parts: Sequence[Any], allow_stale: bool = False) -> Row:
        """One row (``None`` if there is none)."""
        table = self.table(name)
        key = coerce_key(table.schema.key_columns, parts)
        if self.listener_up and table.loaded:
            hit, row = table.peek(key)
            if hit:
                return row
        return (await self.read(table, [key], allow_stale))[0]

    async def get_many(self, name: str, raw_keys: Sequence[Sequence[Any]], allow_stale: bool = False) -> list[Row]:
        """Rows in key order (``None`` where there is none)."""
        table = self.table(name)
        return await self.read(table, self.keys(table, raw_keys), allow_stale)

    async def read(self, table: TableCache, keys: list[Key], allow_stale: bool = False) -> list[Row]:
        """Rows of already coerced keys, in order."""
        if self.listener_up and table.loaded:
            epoch = self.epoch
            try:
                rows = await table.get_many(keys)
                if self.listener_up and self.epoch == epoch:
                    return rows
            except Rerouted:
                pass
            # the listener went down (and maybe came back) while we waited: memory may have missed changes
        return await self._read_through(table, keys, allow_stale)

    async def _read_through(self, table: TableCache, keys: list[Key], allow_stale: bool) -> list[Row]:
        """Read from the database, uncached (memory cannot be trusted now)."""
        self.stats.passthrough_reads += 1
        self.stats.database_reads[table.schema.qualified] += len(keys)
        flight_keys = [(table.schema.qualified, key) for key in keys]
        futures, new = self._passthrough.join(flight_keys)
        if new:
            self._tasks.spawn(self._fetch_through(table, futures, new), "read-through")
        try:
            return await await_all([futures[k] for k in flight_keys])
        except Unavailable:
            if not allow_stale or not table.loaded:
                raise
            self.stats.stale_reads += 1
            return [table.stale_get(key) for key in keys]

    async def _fetch_through(self, table: TableCache, futures: dict[Any, Any], flight_keys: list[Any]) -> None:
        # Readers that join from now on began after this query is sent, so it
        # may miss commits they must see: they start their own.
        self._passthrough.seal(futures, flight_keys)
        keys = [key for _, key in flight_keys]
        try:
            rows = await self.db.fetch(table.schema, keys)
        except Exception as exc:  # never leave the flight's readers hanging
            if not isinstance(exc, FETCH_ERRORS):
                log.error("read-through of %s failed unexpectedly", table.schema.qualified, exc_info=exc)
            if table.problem is not None:
                why = f"{table.schema.qualified} is not served from memory ({table.problem}) and reading it failed"
            else:
                why = "database unreachable and the cache is not current"
            self._passthrough.fail(futures, flight_keys, Unavailable(f"{why}: {_brief(exc)}"))
            return
        self._passthrough.land(futures, flight_keys, {(table.schema.qualified, k): v for k, v in rows.items()})

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
            self._check_batch(len(values))
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
        if self.listener_up and table.loaded and table.holds_all_rows:
            epoch = self.epoch
            try:
                await table.settle()
                if self.listener_up and self.epoch == epoch:
                    return table.query_memory(query)
            except Rerouted:
                pass  # the listener went down while we waited
        self.stats.passthrough_reads += 1
        try:
            rows = await self.db.query(table.schema, query)
        except FETCH_ERRORS as exc:
            if allow_stale and table.loaded and table.holds_all_rows:
                self.stats.stale_reads += 1
                return table.query_memory(query)
            raise Unavailable(f"database unreachable and the cache is not current: {_brief(exc)}") from None
        self.stats.database_reads[table.schema.qualified] += len(rows)
        entries = list(rows.values())
        return entries[: query.limit], len(entries) > query.limit

    # ------------------------------------------------------------ invalidation

    def _own_batch(self) -> int:
        """A batch of the sidecar's own making (not a transaction's)."""
        self.seq += 1
        self._open_xid = None  # later notifications start their own batch
        return self.seq

    def reload_table(self, name: str, why: str) -> None:
        """Reload a cached table from scratch (its definition changed, or it can be served again)."""
        table = self.tables[name]
        log.info("%s: reloading (%s)", name, why, extra={"event": "table_reload", "table": name})
        seq = self._own_batch()
        self.hub.record(seq, 0, Change(name, TABLE_CHANGED))
        table.rebuild(seq)
        self._progress()

    def fail_table(self, name: str, problem: str) -> None:
        """Stop serving a cached table from memory (reads go to the database) because of ``problem``."""
        table = self.tables[name]
        if table.problem == problem:
            return
        seq = self._own_batch()
        self.hub.record(seq, 0, Change(name, TABLE_CHANGED))  # watchers drop what they hold of it
        table.fail(problem)
        self._progress()

    def problem(self, name: str) -> str | None:
        return self.tables[name].problem

    async def invalidate(self, name: str, raw_keys: Sequence[Sequence[Any]] | None, refresh: bool) -> None:
        """Drop cached rows of ``name`` (all of them when ``raw_keys`` is None)."""
        table = self.table(name)
        keys = None if raw_keys is None else self.keys(table, raw_keys)
        if keys == []:
            return
        seq = self._own_batch()
        name = table.schema.qualified
        if keys is None:
            log.info("%s: invalidated (whole table)", name)
            self.hub.record(seq, 0, Change(name, TABLE_CHANGED))
            table.changed_all(seq)
        else:
            log.debug("%s: invalidated %s", name, ", ".join(map(key_text, keys[:10])))
            for key in keys:
                self.hub.record(seq, 0, Change(name, INVALIDATE, key))
            table.changed(keys, seq)
        self._progress()
        if refresh and self.listener_up and table.loaded and (keys or table.holds_all_rows):
            await table.get_many(keys or [])

    async def close(self) -> None:
        await self._tasks.close()
        for table in self.tables.values():
            await table.close()
        if self.barrier is not None:
            await self.barrier.close()


def _brief(exc: BaseException) -> str:
    """An error for a message: the daemon's own speak for themselves; others say their type."""
    return str(exc) if isinstance(exc, SidecarError) else f"{type(exc).__name__}: {exc}"

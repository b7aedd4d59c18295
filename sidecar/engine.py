"""The cache core's facade, with no gRPC and no SQL in sight: it builds the
tables and wires the parts that each do one job --

* ``router.ChangeRouter``: change events to tables and relations, recorded for Watch;
* ``revisions.Revisions``: the batch sequence, the applied revision, its epoch;
* ``reads.ReadPath``: memory or the database, decided once;
* ``fanout.FanOut``: Watch history and fan-out;

-- and owns what ties them together: the listener's state (up, lost,
reconnected: a rebuild in a new epoch) and the consistency options of a read
(``Sync``, ``STRONG``, ``min_revision``).

A follower's source numbers its batches itself (``source.NumberedSink``): its
batches go ``Engine.batch`` -> ``replica.Replica.apply`` (rows stored as they
come, recorded under the upstream's revision) -> ``Revisions.advance``.

A notification goes: listener -> ``Engine.handle`` -> ``ChangeRouter.route``
(``Revisions.batch_for`` numbers it; ``FanOut.record`` keeps its changes; the
table's ``changed`` marks keys pending) -> ``FullTable`` refetches -> the table
pushes its low-water mark -> ``Revisions.advance`` -> ``FanOut.publish`` (rows
attached) -> each ``Subscription``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from sidecar.barrier import Barrier
from sidecar.cache import Rerouted, Row, TableCache
from sidecar.config import Config
from sidecar.errors import ConfigError, InvalidRequest, Unavailable, UnknownTable
from sidecar.events import Event, SyncToken
from sidecar.fanout import FanOut, FellBehind, Filter, InitialState, SharedInitialState, Subscription
from sidecar.full import FullTable, Reloading
from sidecar.identifiers import parse_table_name, qualified_name
from sidecar.indexes import IndexQuery
from sidecar.keys import Key, coerce_key
from sidecar.lazy import LazyTable
from sidecar.reads import ReadPath
from sidecar.replica import Replica, ReplicaTable
from sidecar.revisions import Revision, Revisions, new_epoch
from sidecar.router import ChangeRouter
from sidecar.schema import TableSchema
from sidecar.source import ChangeSource, Database, FollowState, NumberedSource, Rows, SourceBatch
from sidecar.store import Retention, RowStore, SnapshotGivenUp
from sidecar.wire import row_json, watch_message

__all__ = ["Engine", "Revision", "new_epoch"]

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 500  # rows per initial-state message


class Engine:
    """The tables, and the parts that keep and serve them."""

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
        watch_max_streams: int = 10_000,
        watch_max_streams_per_connection: int = 1_000,
        watch_send_timeout: float = 30.0,
        snapshot_max_bytes: int = 256 * 1024 * 1024,
        stall_after: float = 30.0,
        make_table: Callable[[TableSchema], TableCache] | None = None,
    ) -> None:
        self.db = db
        self.max_batch_keys = max_batch_keys
        self.source_up = False
        self._fences = 0  # switches back to trusting memory begun (a follower's; see _trust_after_fence)
        self._fence_tasks: set[asyncio.Task[None]] = set()
        self.barrier: Barrier | None = None  # set by the app once it can send NOTIFYs
        self._check_catalog: Callable[[], Awaitable[None]] | None = None
        self._schema_batch = 0  # the newest batch of a reload or failure for a schema change
        self.max_wait = 30.0  # longest a read waits for min_revision without a deadline
        self.on_barrier: Callable[[float], None] | None = None  # told how long each barrier took
        # A follower's: Invalidate goes to the upstream (whose batch then comes back), and its state.
        # (table, keys or None for all rows, refresh, the caller's 'authorization' values)
        self.forward_invalidate: (
            Callable[[str, Sequence[Sequence[Any]] | None, bool, tuple[str, ...]], Awaitable[Revision]] | None
        ) = None
        self.follow_state: Callable[[], FollowState] | None = None
        self._state_listeners: list[Callable[[], None]] = []
        self._connected_listeners: list[Callable[[], None]] = []
        self._was_ready = False
        self._connected_before = False
        self.tables: dict[str, TableCache] = {}
        self.revisions = Revisions(self._applied, stall_after)
        self.fanout = FanOut(
            rows_of=lambda name: table.authoritative_rows() if (table := self.tables.get(name)) else None,
            row_json=row_json,
            max_batches=history_batches,
            max_bytes=history_bytes,
            max_lag=watch_max_lag,
            max_streams=watch_max_streams,
            max_streams_per_connection=watch_max_streams_per_connection,
            send_timeout=watch_send_timeout,
        )
        for schema in schemas:
            name = schema.qualified
            table: TableCache
            if make_table is not None:
                table = make_table(schema)
            elif schema.config.mode == "full":
                table = FullTable(
                    schema,
                    db,
                    current_seq=lambda: self.revisions.seq,
                    on_low_water=functools.partial(self.revisions.low_water, name),
                    on_matched=functools.partial(self._matched, name),
                    batch_size=refetch_batch_size,
                    concurrency=refetch_concurrency,
                    fence=self._fence,
                )
            else:
                table = LazyTable(schema, db, max_rows=schema.config.max_rows, ttl_seconds=schema.config.ttl_seconds)
            self.tables[name] = table
        # What initial-state snapshots keep alive, bounded across tables (see store.Retention).
        self.retention = Retention(snapshot_max_bytes)
        for table in self.tables.values():
            store = getattr(table, "store", None)
            if isinstance(store, RowStore):
                store.retention = self.retention
        self.router = ChangeRouter(self.tables, self.revisions, self.fanout)
        # Initial states being streamed, by store snapshot and revision: streams that start
        # together share their messages (gone with the last stream that reads them).
        self._initial_states: weakref.WeakValueDictionary[tuple[int, str, int, str], SharedInitialState] = (
            weakref.WeakValueDictionary()
        )
        self.replica = Replica(self.tables, self.fanout)
        self.reads = ReadPath(db, self._trusted_epoch, max_batch_keys)

    async def _fence(self) -> None:
        """Return once every commit before the call has been received (a token round trip)."""
        if self.source_up and self.barrier is not None:
            await self.barrier.wait(applied=False)

    def _matched(self, name: str, seq: int, keys: set[Key]) -> None:
        self.router.matched(name, seq, keys)  # (the router is made once the tables are)

    def attach(
        self,
        source: ChangeSource | NumberedSource,
        barrier_timeout: float = 30.0,
        check_catalog: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Read barriers go through ``source``: its tokens come back ordered with its changes.
        With ``check_catalog`` (``CatalogWatch.verify``), each round also checks the catalog:
        DDL sends no notification."""
        self._check_catalog = check_catalog
        check = self._barrier_check if check_catalog is not None else None
        self.barrier = Barrier(source.send_token, timeout=barrier_timeout, check=check)

    async def _barrier_check(self) -> int:
        """A barrier round's catalog check; the newest batch a schema change made (the
        round covers it: a reload the check started, or one a check under way started)."""
        assert self._check_catalog is not None
        await self._check_catalog()
        return self._schema_batch

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each (re)connection's rebuild has begun."""
        self._connected_listeners.append(callback)

    @classmethod
    def from_config(
        cls,
        config: Config,
        db: Database,
        schemas: Sequence[TableSchema],
        make_table: Callable[[TableSchema], TableCache] | None = None,
    ) -> Engine:
        return cls(
            db,
            schemas,
            max_batch_keys=config.max_batch_keys,
            refetch_batch_size=config.refetch_batch_size,
            refetch_concurrency=config.refetch_concurrency,
            history_batches=config.watch_history_batches,
            history_bytes=config.watch_history_bytes,
            watch_max_lag=config.watch_max_lag,
            watch_max_streams=config.watch_max_streams,
            watch_max_streams_per_connection=config.watch_max_streams_per_connection,
            watch_send_timeout=config.watch_send_timeout,
            snapshot_max_bytes=config.watch_snapshot_max_bytes,
            stall_after=config.stall_seconds,
            make_table=make_table,
        )

    # ------------------------------------------------------------ state

    @property
    def epoch(self) -> str:
        return self.revisions.epoch

    @property
    def seq(self) -> int:
        return self.revisions.seq

    @property
    def applied(self) -> int:
        return self.revisions.applied

    @property
    def revision(self) -> Revision:
        return self.revisions.revision

    @property
    def ready(self) -> bool:
        """Serving from memory: the listener is up, every table is loaded (or known not
        to be servable), and the rebuild that began this epoch is done."""
        return (
            self.source_up
            and self.applied >= self.revisions.epoch_start
            and all(t.loaded or t.problem is not None for t in self.tables.values())
        )

    @property
    def stall_after(self) -> float:
        return self.revisions.stall_after

    @stall_after.setter
    def stall_after(self, seconds: float) -> None:
        self.revisions.stall_after = seconds

    @property
    def stalled_seconds(self) -> float:
        """How long received batches have waited without the revision advancing (0: none wait)."""
        return self.revisions.stalled_seconds(self.source_up)

    @property
    def stalled(self) -> bool:
        """The revision has not advanced for ``stall_after`` seconds while batches wait
        (refetches failing, a table stuck): health says NOT_SERVING."""
        return self.stalled_seconds > self.stall_after

    def _trusted_epoch(self) -> str | None:
        """The epoch while memory can be trusted (the listener is up), else None."""
        return self.revisions.epoch if self.source_up else None

    async def until_ready(self) -> None:
        """Wait until ``ready`` (bounded by the caller's deadline)."""
        while not self.ready:
            changed = asyncio.Event()
            self._state_listeners.append(changed.set)
            try:
                await changed.wait()
            finally:
                self._state_listeners.remove(changed.set)

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

    def _applied(self, applied: int) -> None:
        """``applied`` may have moved: publish, tell the barrier, and health."""
        self.fanout.publish(applied)
        if self.barrier is not None:
            self.barrier.applied(applied)
        self._state_changed()

    # ------------------------------------------------------------ listener side

    def source_connected(self) -> None:
        """LISTEN is active: (re)build every table, in a new epoch.

        Notifications sent while no connection listened are lost, so memory
        is rebuilt from scratch: full tables reload, lazy tables empty.
        """
        rebuild = self._connected_before
        self._connected_before = True
        seq = self.revisions.begin_epoch(rebuild)
        if rebuild:
            log.info(
                "rebuilding every table after reconnect (new epoch %s)",
                self.epoch,
                extra={"event": "rebuild", "epoch": self.epoch},
            )
        self.source_up = True
        self.fanout.start(self.epoch, seq, "cache rebuilt after the listener reconnected" if rebuild else None)
        for table in self.tables.values():
            table.rebuild(seq)
        self.revisions.advance()
        for callback in self._connected_listeners:
            callback()

    def source_lost(self, reason: str) -> None:
        """Notifications may be missed from now on: stop trusting memory.

        Waiting readers are released to read from the database (which is
        fresher than any revision they waited for); barriers fail.
        """
        self.source_up = False
        if self.barrier is not None:
            self.barrier.fail_all(f"listener down ({reason})")
        for table in self.tables.values():
            table.reroute()
        self.revisions.release_all()
        self._state_changed()

    def handle(self, event: Event) -> None:
        """Apply one parsed notification (called synchronously by the listener)."""
        if isinstance(event, SyncToken):
            if self.barrier is not None and self.barrier.token_received(event.token, self.seq):
                self.revisions.advance()
            return
        self.router.route(event)
        self.revisions.advance()

    # ------------------------------------------------------------ a numbering source's side (a follower)

    def epoch_began(self, epoch: str, revision: int, rows: Mapping[str, Rows], reason: str | None) -> None:
        """Memory is rebuilt from the source's state at ``revision`` of its ``epoch``."""
        if reason is not None:
            log.info(
                "rebuilt every table at the upstream's revision %s/%d (%s)",
                epoch,
                revision,
                reason,
                extra={"event": "rebuild", "epoch": epoch, "reason": reason},
            )
        self._connected_before = True
        self.revisions.adopt(epoch, revision)
        self.fanout.start(epoch, revision, reason)
        self.replica.rebuild(rows)
        self.revisions.advance()
        self._trust_after_fence()
        for callback in self._connected_listeners:
            callback()

    def batch(self, batch: SourceBatch) -> None:
        """One batch the source numbered, applied at once."""
        self.revisions.number(batch.revision)
        self.replica.apply(batch)
        self.revisions.advance()

    def progress(self, revision: int) -> None:
        """Nothing of ours happened at the source up to ``revision``."""
        self.revisions.number(revision)
        self.revisions.advance()

    def resumed(self) -> None:
        """The source follows again without having missed anything: trust memory again."""
        self._trust_after_fence()

    def _trust_after_fence(self) -> None:
        """Trust memory again once it is at least as new as every answer the source gave
        meanwhile. A read passed through to the upstream while this follower was away may
        have seen rows newer than the revision memory is at now; so reads wait (not pass
        through) while the reads in flight end and one barrier round -- an upstream Sync
        sent after them, applied here -- brings memory past all they saw."""
        if self.barrier is None:
            self.source_up = True
            self._state_changed()
            return
        self._fences += 1
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.reads.gate is not None and not self.reads.gate.done():
            self.reads.gate.set_result(None)  # (an earlier fence's readers go on to this one's)
        self.reads.gate = gate
        task = asyncio.create_task(self._fence_then_trust(self._fences, gate), name="fence")
        self._fence_tasks.add(task)
        task.add_done_callback(self._fence_tasks.discard)

    async def _fence_then_trust(self, fence: int, gate: asyncio.Future[None]) -> None:
        assert self.barrier is not None
        try:
            await self.reads.until_none_sourced()
            await self.barrier.wait()
        except Unavailable as exc:  # lost again meanwhile: reads go on passing through
            log.info("memory not trusted yet: %s", exc)
        else:
            if fence == self._fences:
                self.source_up = True
                self._state_changed()
        finally:
            if not gate.done():
                gate.set_result(None)
            if self.reads.gate is gate:
                self.reads.gate = None

    # ------------------------------------------------------------ consistency

    async def sync(self) -> Revision:
        """Read barrier: every commit completed before this call is applied."""
        if not self.source_up or self.barrier is None:
            if self.follow_state is not None:  # (a follower: its changes come from its upstream)
                raise Unavailable(
                    f"upstream {self.follow_state().target} unreachable: the cache cannot be brought up to date now"
                )
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
        if not self.source_up:
            return
        known = self.revisions.knows(epoch)
        if known == "current":
            await self.revisions.wait(number)
        elif known == "unknown":  # another process's (another hub's) revision, maybe ahead: prove freshness
            await self.sync()
        # (an earlier run of the process whose epoch is current: rebuilt since, newer than all of it)

    async def prepare_read(self, strong: bool, min_revision: Revision | None, table: TableCache | None = None) -> None:
        """Honour read options before answering a read of ``table`` (see ReadOptions in the API).

        A STRONG read needs every commit before it *received* (the barrier's token
        came back) and applied to ``table`` -- not to every table, so a reload of
        another table does not hold it up. While ``table`` itself is being reloaded
        its reads come from the database or, once the reload landed, from memory
        fresh as of every change received before the read: receipt is enough then,
        and a ``min_revision`` read needs only that this revision was received.
        """
        gate = self.reads.gate
        if (strong or min_revision is not None) and gate is not None:
            await asyncio.shield(gate)  # (memory is being fenced: what to wait for is known after it)
        reloading = isinstance(table, FullTable) and table.reloading
        if strong and self.source_up:
            if table is None or self.barrier is None:
                await self.sync()
            else:
                # Every commit before the read was received once the token is back; then
                # only this table must have applied them -- not every table (another
                # table's reload would hold this read up for its whole length).
                started = time.perf_counter()
                received = await self.barrier.wait(applied=False)
                # (a reload may have begun meanwhile -- a schema change the round found: then
                # the database answers, as for any reload, newer than what the round covers)
                reloading = reloading or (isinstance(table, FullTable) and table.reloading)
                if not reloading and received is not None:
                    await self.revisions.wait_for_table(table.schema.qualified, received)
                if self.on_barrier is not None:
                    self.on_barrier(time.perf_counter() - started)
        if min_revision is not None:
            if reloading and min_revision.epoch == self.epoch and min_revision.number <= self.seq:
                return
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

    def listing(self) -> list[TableCache]:
        """Every cached table, in configuration order (ListTables)."""
        return list(self.tables.values())

    def keys(self, table: TableCache, raw_keys: Sequence[Sequence[Any]]) -> list[Key]:
        """Coerce keys given as parts (one sequence of parts per key)."""
        return self.reads.keys(table, raw_keys)

    def single_keys(self, table: TableCache, values: Sequence[Any]) -> list[Key]:
        """Coerce keys given as bare values of a one-column primary key."""
        return self.reads.single_keys(table, values)

    async def get(self, name: str, parts: Sequence[Any], allow_stale: bool = False) -> Row:
        """One row (``None`` if there is none)."""
        table = self.table(name)
        return await self.reads.get(table, coerce_key(table.schema.key_columns, parts), allow_stale)

    async def get_many(self, name: str, raw_keys: Sequence[Sequence[Any]], allow_stale: bool = False) -> list[Row]:
        """Rows in key order (``None`` where there is none)."""
        table = self.table(name)
        return await self.reads.read(table, self.keys(table, raw_keys), allow_stale)

    async def read(self, table: TableCache, keys: list[Key], allow_stale: bool = False) -> list[Row]:
        """Rows of already coerced keys, in order."""
        return await self.reads.read(table, keys, allow_stale)

    def plan_query(self, table: TableCache, index: str, *args: Any, **options: Any) -> IndexQuery:
        """Validate an index query (see ``ReadPath.plan_query``)."""
        return self.reads.plan_query(table, index, *args, **options)

    async def query(self, table: TableCache, query: IndexQuery, allow_stale: bool = False) -> tuple[list[bytes], bool]:
        """The rows (entries) an index query matches, in order, and whether more matched."""
        return await self.reads.query(table, query, allow_stale)

    # ------------------------------------------------------------ Watch

    async def started(self) -> None:
        """Return once the first epoch began (no revision exists before the listener connects)."""
        if not self.fanout.started.is_set():
            await self.fanout.started.wait()

    def subscribe(
        self,
        selection: Filter,
        *,
        start: tuple[str, int] | None = None,
        initial_state: bool = False,
        progress_interval: float = 0.0,
        connection: str | None = None,
        several: bool = False,
    ) -> Subscription:
        """A Watch subscriber (raises ``OutOfRange`` for a revision that cannot be resumed,
        ``TooManyStreams`` beyond the stream limits; see ``FanOut.subscribe``)."""
        names = selection.tables
        return self.fanout.subscribe(
            selection,
            start=start,
            snapshot=(lambda: self.snapshot(names)) if initial_state else None,
            progress_interval=progress_interval,
            connection=connection,
            several=several,
        )

    def unsubscribe(self, subscription: Subscription) -> None:
        self.fanout.unsubscribe(subscription)

    @property
    def oldest_revision(self) -> str:
        """The oldest revision a Watch may resume from."""
        return f"{self.fanout.epoch}/{self.fanout.oldest}"

    async def snapshot(self, names: frozenset[str]) -> Iterator[InitialState]:
        """Every row of the named full-mode tables (all of them when ``names`` is
        empty), as of the revision published when this returns, in chunks read
        lazily from shared store snapshots (no rows copied).

        A table being reloaded is waited for first: its memory is then a mix of
        old and new rows, exact as of no revision. Only while a reload is writing:
        the moment it lands, memory is exact as of the published revision (which a
        whole-table change still due holds back), even if another reload is due
        already -- under a steady stream of whole-table changes there is always one.
        """
        tables = [
            (name, table)
            for name, table in self.tables.items()
            if isinstance(table, FullTable | ReplicaTable) and (not names or name in names)
        ]
        while waiting := next(
            (t for _, t in tables if isinstance(t, FullTable) and t.mixed and t.problem is None), None
        ):
            try:
                await waiting.until_reloaded()
            except (Rerouted, Unavailable):
                # The reload failed (it is retried) or the listener went down (a
                # rebuild follows): look again in a moment.
                await asyncio.sleep(0.05)
        # No await from here on: the views and the revision are of one moment.
        epoch, revision = self.fanout.epoch, self.fanout.published
        parts = []
        for name, table in tables:
            view = table.snapshot()
            if view is None:
                continue
            key = (id(view), epoch, revision, name)  # (alive while the view is: it holds the view)
            shared = self._initial_states.get(key)
            if shared is None:
                shared = SharedInitialState(epoch, revision, name, view, row_json, watch_message, SNAPSHOT_CHUNK)
                self._initial_states[key] = shared
            parts.append(shared)
        return self._unless_given_up(itertools.chain.from_iterable(part.messages() for part in parts))

    def _unless_given_up(self, messages: Iterator[InitialState]) -> Iterator[InitialState]:
        """``messages``, ending the stream (fell behind: start over) if its snapshot is given up
        (it kept too many old rows alive: see ``store.Retention``)."""
        try:
            yield from messages
        except SnapshotGivenUp as exc:
            self.fanout.dropped += 1
            raise FellBehind(f"watch fell behind during its initial state: {exc}") from None

    # ------------------------------------------------------------ the sidecar's own changes

    async def invalidate(
        self,
        name: str,
        raw_keys: Sequence[Sequence[Any]] | None,
        refresh: bool,
        credentials: tuple[str, ...] = (),
    ) -> None:
        """Drop cached rows of ``name`` (all of them when ``raw_keys`` is None). A follower
        forwards it to its upstream with the caller's ``credentials`` (its 'authorization'
        values): the upstream decides whether that caller may."""
        table = self.table(name)
        keys = None if raw_keys is None else self.keys(table, raw_keys)
        if keys == []:
            return
        if self.forward_invalidate is not None:
            # A follower's numbers are its upstream's: the upstream invalidates (every follower
            # then hears of it), and this one answers once it has applied that.
            revision = await self.forward_invalidate(table.schema.qualified, raw_keys, refresh, credentials)
            await self.wait_revision(revision.epoch, revision.number)
            return
        self.router.invalidate(table, keys)
        self.revisions.advance()
        if refresh and self.source_up and table.loaded and (keys or table.holds_all_rows):
            try:
                await table.get_many(keys or [])
            except Reloading:  # (a whole-table refresh: reads do not wait for it, this does)
                assert isinstance(table, FullTable)
                await table.until_reloaded()

    def reload_table(self, name: str, why: str) -> None:
        """Reload a cached table from scratch (its definition changed, or it can be served again)."""
        self.router.reload(name, why)
        self._schema_batch = self.revisions.seq
        self.revisions.advance()

    def fail_table(self, name: str, problem: str) -> None:
        """Stop serving a cached table from memory (reads go to the database) because of ``problem``."""
        seq = self.revisions.seq
        self.router.fail(name, problem)
        if self.revisions.seq != seq:  # (no batch when the table was not served for that already)
            self._schema_batch = self.revisions.seq
        self.revisions.advance()

    def problem(self, name: str) -> str | None:
        return self.tables[name].problem

    async def close(self) -> None:
        for task in list(self._fence_tasks):
            task.cancel()
        await asyncio.gather(*self._fence_tasks, return_exceptions=True)
        await self.reads.close()
        for table in self.tables.values():
            await table.close()
        if self.barrier is not None:
            await self.barrier.close()

"""Table caches: ``FullTable`` (the whole table, kept complete by batched
refetches) and ``LazyTable`` (read-through, bounded, LRU/TTL).

Plain asyncio and dicts: all database access goes through ``db.Database``, so
unit tests drive these classes with an in-memory fake.

Sequence numbers. The engine numbers every received transaction batch
(``seq``). Tables record, per changed key, the oldest and newest batch not yet
applied to it, and a fetch records the ``seq`` at which it was *sent*: its
snapshot is at least as new as every commit whose notification had arrived by
then (PostgreSQL delivers notifications in commit order, after commit). Hence:

* a refetch result satisfies a key's pending changes up to its level;
* at most one refetch per key is in flight, so results never land out of
  order; a change that arrives meanwhile re-queues the key;
* a read of a key with pending changes waits for a refetch at least as new
  as the newest change received before the read began ("fresh after
  notify"); a read of any other key answers from memory at once;
* a whole-table change (TRUNCATE, bulk statement, reconnect) reloads the
  table; reads wait for it; per-key refetches pause meanwhile;
* a lazy fill that started before an invalidation of its key (or its table)
  is returned to the readers that were waiting for it but never stored.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import asyncpg
from cachetools import Cache, LRUCache, TTLCache

from sidecar.db import CONNECTION_ERRORS, Database, Rows
from sidecar.errors import Unavailable
from sidecar.indexes import IndexSet
from sidecar.keys import Key
from sidecar.schema import TableSchema

log = logging.getLogger(__name__)

FETCH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
RETRY_MIN_DELAY = 0.05
RETRY_MAX_DELAY = 5.0
# SQLSTATE classes that the same query, sent again, meets again: data exceptions (a
# value PostgreSQL cannot take), undefined or mistyped objects (the schema changed),
# unsupported features, errors raised by functions a relation's query calls.
REPEATING_SQLSTATE_CLASSES = frozenset({"0A", "22", "2F", "38", "39", "42", "P0"})


def would_repeat(exc: BaseException) -> bool:
    """Whether a query that failed with ``exc`` would fail again if retried as it is."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # an argument asyncpg cannot encode
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in REPEATING_SQLSTATE_CLASSES
    return not isinstance(exc, CONNECTION_ERRORS)  # an unexpected error (a bug, an encoding): it repeats


Row = bytes | None


def _unavailable(what: str, exc: BaseException) -> Unavailable:
    """The error readers see when a query failed; an unexpected one is logged in full."""
    if not isinstance(exc, FETCH_ERRORS):
        log.error("%s failed unexpectedly", what, exc_info=exc)
    return Unavailable(f"{what} failed: {type(exc).__name__}: {exc}")


class Rerouted(Exception):
    """Internal: memory stopped being trustworthy while a read waited (the
    listener went down); the engine answers the read from the database."""


class Flights:
    """Single-flight fetches: concurrent misses for one key share one query.

    ``join`` returns a future per key and the keys nobody is fetching yet,
    which the caller must fetch and then ``land`` (or ``fail``). ``detach``
    forgets a key's flight so later readers start a new one (the old flight
    still answers the readers that joined it).
    """

    def __init__(self) -> None:
        self._flights: dict[Key, asyncio.Future[Row]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, keys: Iterable[Key]) -> tuple[dict[Key, asyncio.Future[Row]], list[Key]]:
        loop = asyncio.get_running_loop()
        futures: dict[Key, asyncio.Future[Row]] = {}
        new: list[Key] = []
        for key in keys:
            if key in futures:
                continue
            future = self._flights.get(key)
            if future is None:
                future = loop.create_future()
                future.add_done_callback(_retrieve)
                self._flights[key] = future
                new.append(key)
            futures[key] = future
        return futures, new

    def owns(self, key: Key, future: asyncio.Future[Row]) -> bool:
        return self._flights.get(key) is future

    def land(self, futures: dict[Key, asyncio.Future[Row]], keys: Iterable[Key], rows: Rows) -> None:
        for key in keys:
            future = futures[key]
            if self._flights.get(key) is future:
                del self._flights[key]
            if not future.done():
                future.set_result(rows.get(key))

    def fail(self, futures: dict[Key, asyncio.Future[Row]], keys: Iterable[Key], exc: BaseException) -> None:
        for key in keys:
            future = futures[key]
            if self._flights.get(key) is future:
                del self._flights[key]
            if not future.done():
                future.set_exception(exc)

    def seal(self, futures: dict[Key, asyncio.Future[Row]], keys: Iterable[Key]) -> None:
        """The query for these flights is being sent: later readers must not join them."""
        for key in keys:
            if self._flights.get(key) is futures[key]:
                del self._flights[key]

    def detach(self, key: Key) -> bool:
        return self._flights.pop(key, None) is not None

    def detach_all(self) -> None:
        self._flights.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # an error nobody awaited is not "never retrieved"


async def await_all(futures: Sequence[asyncio.Future[Row]]) -> list[Row]:
    """Await shared futures without letting one reader's cancellation cancel them."""
    return [await asyncio.shield(f) if not f.done() else f.result() for f in futures]


class TaskSet:
    """Keeps references to short-lived tasks (asyncio holds only weak ones)
    and logs any that fail."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name} {what}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class FullTable:
    """Holds every row of a table (or of its ``where`` subset)."""

    mode: Literal["full", "lazy"] = "full"

    def __init__(
        self,
        schema: TableSchema,
        db: Database,
        *,
        current_seq: Callable[[], int],
        on_progress: Callable[[], None],
        on_matched: Callable[[int, set[Key]], None] | None = None,
        batch_size: int = 500,
        concurrency: int = 2,
    ) -> None:
        self.schema = schema
        self.db = db
        self._seq = current_seq
        self._on_progress = on_progress
        self._on_matched = on_matched  # told which keys a source change touched, per batch
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.rows: dict[Key, bytes] = {}
        self.loaded = False
        self.problem: str | None = None  # why the table is not served: a failure that would repeat
        self.refetches = 0
        self.reloads = 0
        self.degraded = 0  # keyed refetches or relation refreshes that became reloads
        self.reads: collections.Counter[str] = collections.Counter()  # by result: hit, not_found
        self._pending: dict[Key, list[int]] = {}  # key -> [oldest, newest] unapplied seq
        self._queue: dict[Key, None] = {}  # pending keys not in flight, in arrival order
        self._inflight: set[Key] = set()
        self._waiters: dict[Key, list[tuple[int, asyncio.Future[None]]]] = {}
        self._reload_needed = 0  # a reload must reach at least this seq
        self._reload_oldest = 0  # the oldest whole-table change not yet reloaded
        self._reload_done = -1  # seq level of the last completed (re)load
        self._reloading = False
        self._table_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Relation refreshes by source values: (seq, relation columns, values), run
        # like a small reload (no keyed fetch meanwhile; reads wait for them).
        self._matching: list[tuple[int, tuple[str, ...], list[Key]]] = []
        self._matching_running = False
        self._keys_turn = False
        indexes = IndexSet(schema)
        self.indexes: IndexSet | None = indexes if indexes else None
        self._fetching = 0
        self._failures = 0
        self._dispatch_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._tasks = TaskSet(schema.qualified)

    # -------------------------------------------------------------- state

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def byte_count(self) -> int:
        return sum(map(len, self.rows.values()))

    def low_water(self) -> int | None:
        """The oldest received seq not yet applied to this table, if any."""
        oldest = self._reload_oldest if self._reload_needed > self._reload_done else None
        if self._matching:
            oldest = self._matching[0][0] if oldest is None else min(oldest, self._matching[0][0])
        if self._pending:
            key_oldest = min(p[0] for p in self._pending.values())
            oldest = key_oldest if oldest is None else min(oldest, key_oldest)
        return oldest

    # -------------------------------------------------------------- changes

    def rebuild(self, seq: int) -> None:
        """(Re)load from scratch at ``seq`` (LISTEN must already be active); a table
        that could not be served tries again."""
        self.problem = None
        self.changed_all(seq)

    def changed(self, keys: Iterable[Key], seq: int) -> None:
        """These keys changed in batch ``seq``: refetch them."""
        if self.problem is not None:
            return  # not served: nothing to keep current until it is rebuilt
        for key in keys:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = [seq, seq]
            elif seq > pending[1]:
                pending[1] = seq
            if key not in self._inflight:
                self._queue[key] = None
        self._schedule()

    def changed_all(self, seq: int) -> None:
        """The whole table changed in batch ``seq``: reload it."""
        if self.problem is not None:
            return
        if self._reload_needed <= self._reload_done:
            self._reload_oldest = seq
        self._reload_needed = max(self._reload_needed, seq)
        self._schedule()

    def changed_matching(self, columns: tuple[str, ...], values: list[Key], seq: int) -> None:
        """Rows whose ``columns`` hold one of ``values`` changed in batch ``seq`` (a relation's
        source changed): refresh exactly those rows, including ones that appear or vanish."""
        if self.problem is not None:
            return
        self._matching.append((seq, columns, values))
        self._schedule()

    def reroute(self) -> None:
        """Memory can no longer be trusted (listener down): readers waiting on
        refetches are sent to the database instead of waiting here."""
        for waiters in (self._table_waiters, *self._waiters.values()):
            _fail_all(waiters, Rerouted())
        self._table_waiters = []
        self._waiters.clear()

    def close(self) -> None:
        self._tasks.cancel()
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()

    # -------------------------------------------------------------- reads

    def stale_get(self, key: Key) -> Row:
        """Whatever memory holds, current or not (for allow_stale reads)."""
        return self.rows.get(key)

    def peek(self, key: Key) -> tuple[bool, Row]:
        """Answer from memory if no change to ``key`` (or the table) is pending."""
        if self._reload_needed > self._reload_done or key in self._pending or self._matching:
            return False, None
        row = self.rows.get(key)
        self.reads["hit" if row is not None else "not_found"] += 1
        return True, row

    async def get_many(self, keys: Sequence[Key]) -> list[Row]:
        """The rows of ``keys``, fresh as of every change received before the call."""
        if self._reload_needed > self._reload_done:
            await self._wait(self._table_waiters, self._reload_needed)
        if self._matching:
            await self._wait(self._table_waiters, self._matching[-1][0])
        if self._pending:
            for key in keys:
                pending = self._pending.get(key)
                if pending is not None:
                    await self._wait(self._waiters.setdefault(key, []), pending[1])
        rows = self.rows
        found = [rows.get(key) for key in keys]
        hits = len(found) - found.count(None)
        self.reads["hit"] += hits
        self.reads["not_found"] += len(found) - hits
        return found

    async def settle(self) -> None:
        """Wait until every change received before the call is applied to rows and
        indexes (what a read of the whole table, such as an index query, needs)."""
        if self._reload_needed > self._reload_done:
            await self._wait(self._table_waiters, self._reload_needed)
        if self._matching:
            await self._wait(self._table_waiters, self._matching[-1][0])
        for key, level in [(key, pending[1]) for key, pending in self._pending.items()]:
            pending = self._pending.get(key)
            if pending is not None and pending[0] <= level:
                await self._wait(self._waiters.setdefault(key, []), level)

    async def _wait(self, waiters: list[tuple[int, asyncio.Future[None]]], level: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append((level, future))
        await future

    # -------------------------------------------------------------- fetching

    def _schedule(self, delay: float = 0.0) -> None:
        """Dispatch once per loop iteration, so a burst becomes one batch."""
        if self._dispatch_handle is not None:
            if delay == 0.0 and isinstance(self._dispatch_handle, asyncio.TimerHandle):
                return  # a retry is already scheduled; don't hammer a failing database
            return
        loop = asyncio.get_running_loop()
        if delay:
            self._dispatch_handle = loop.call_later(delay, self._dispatch)
        else:
            self._dispatch_handle = loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_handle = None
        if self._reloading or self._matching_running:
            return
        if self._reload_needed > self._reload_done:
            if self._fetching == 0:  # reload only once keyed fetches have landed
                self._reloading = True
                self._tasks.spawn(self._reload(self._seq()), "reload")
            return
        if self._matching and not (self._keys_turn and self._queue):
            if self._fetching == 0:  # likewise: one writer of the affected rows at a time
                # (the requests stay in _matching until they land: reads and the
                # revision must wait for them while they run, as for queued ones)
                self._matching_running = True
                self._tasks.spawn(self._refresh_matching(list(self._matching), self._seq()), "refresh")
            return
        self._keys_turn = False  # after a relation refresh, queued keys go first: none starves
        while self._queue and self._fetching < self.concurrency:
            batch: list[Key] = []
            for key in self._queue:
                batch.append(key)
                if len(batch) >= self.batch_size:
                    break
            for key in batch:
                del self._queue[key]
            self._inflight.update(batch)
            self._fetching += 1
            self._tasks.spawn(self._refetch(batch, self._seq()), "refetch")

    async def _refetch(self, keys: list[Key], level: int) -> None:
        try:
            rows = await self.db.fetch(self.schema, keys)
        except Exception as exc:  # never leave keys stuck in flight
            self._fetching -= 1
            self._inflight.difference_update(keys)
            for key in keys:
                self._queue[key] = None
            what = f"refetch of {len(keys)} key(s) of {self.schema.qualified}"
            if would_repeat(exc):
                levels = [p[1] for p in map(self._pending.get, keys) if p is not None]
                self._degrade(what, exc, max(levels, default=self._seq()))
            else:
                self._failed(what, exc, keys)
            return
        self._fetching -= 1
        self._failures = 0
        self.refetches += 1
        self._inflight.difference_update(keys)
        if self.problem is not None:  # (the table stopped being served meanwhile)
            return
        self._store(keys, rows)
        for key in keys:
            pending = self._pending.get(key)
            if pending is not None:
                if pending[1] <= level:
                    del self._pending[key]
                else:
                    pending[0] = level + 1
                    self._queue[key] = None
            waiters = self._waiters.get(key)
            if waiters:
                self._waiters[key] = release_waiters(waiters, level)
                if not self._waiters[key]:
                    del self._waiters[key]
        self._on_progress()
        self._schedule()

    async def _reload(self, level: int) -> None:
        started = time.monotonic()
        fresh: dict[Key, bytes] = {}
        try:
            async for chunk in self.db.load(self.schema):
                fresh.update(chunk)
        except Exception as exc:
            self._reloading = False
            if would_repeat(exc):
                self._break(f"loading {self.schema.qualified}", exc)
            else:
                self._failed(f"loading {self.schema.qualified}", exc, None)
            return
        self._reloading = False
        if self.problem is not None:  # (the table stopped being served meanwhile)
            return
        self._failures = 0
        first = not self.loaded
        self.rows = fresh
        if self.indexes is not None:
            self.indexes.rebuild(fresh)
        self._matching = [m for m in self._matching if m[0] > level]  # (the reload covered them)
        self.loaded = True
        self.reloads += 1
        self._reload_done = level
        self._reload_oldest = level + 1  # (a lower bound for changes that came during the load)
        for key, pending in list(self._pending.items()):
            if pending[1] <= level:
                del self._pending[key]
                self._queue.pop(key, None)
            else:
                pending[0] = max(pending[0], level + 1)
                self._queue[key] = None
        self._table_waiters = release_waiters(self._table_waiters, level)
        for key, waiters in list(self._waiters.items()):
            rest = release_waiters(waiters, level)
            if rest:
                self._waiters[key] = rest
            else:
                del self._waiters[key]
        seconds = time.monotonic() - started
        log.log(
            logging.INFO if first else logging.DEBUG,
            "%s %s: %d rows in %.3fs",
            "loaded" if first else "reloaded",
            self.schema.qualified,
            len(fresh),
            seconds,
            extra={
                "event": "table_loaded" if first else "table_reloaded",
                "table": self.schema.qualified,
                "rows": len(fresh),
                "seconds": round(seconds, 4),
            },
        )
        self._on_progress()
        self._schedule()

    def _store(self, keys: Iterable[Key], rows: Rows) -> None:
        """Rows fetched for ``keys``: stored, or removed where there is none; indexes follow."""
        table_rows, indexes = self.rows, self.indexes
        for key in keys:
            row = rows.get(key)
            if row is None:
                if table_rows.pop(key, None) is not None and indexes is not None:
                    indexes.delete(key)
            else:
                table_rows[key] = row
                if indexes is not None:
                    indexes.put(key, row)

    async def _refresh_matching(self, requests: list[tuple[int, tuple[str, ...], list[Key]]], level: int) -> None:
        by_columns: dict[tuple[str, ...], set[Key]] = {}
        for _, columns, wanted in requests:
            by_columns.setdefault(columns, set()).update(wanted)
        fetched: list[tuple[tuple[str, ...], set[Key], Rows]] = []
        try:
            for columns, values in by_columns.items():
                fetched.append((columns, values, await self.db.fetch_matching(self.schema, columns, list(values))))
        except Exception as exc:
            self._matching_running = False  # (the requests are still queued: retried)
            if would_repeat(exc):
                self._degrade(f"refreshing {self.schema.qualified}", exc, max(m[0] for m in self._matching))
            else:
                self._failed(f"refreshing {self.schema.qualified}", exc, None)
            return
        self._matching_running = False
        if self.problem is not None:  # (the table stopped being served meanwhile)
            return
        self._keys_turn = True
        del self._matching[: len(requests)]
        self._failures = 0
        self.refetches += 1
        indexes = self.indexes
        assert indexes is not None  # (a relation with non-key sources has its hidden indexes)
        before = [indexes.matching(columns, wanted) for _, columns, wanted in requests]
        fetched_keys: set[Key] = set()
        moved: set[Key] = set()
        for columns, values, rows in fetched:
            # Rows that held these values and no longer match may be gone, or may hold
            # other values now (changed in the same transaction): only a keyed refetch
            # can tell, so they are refetched, not dropped.
            moved |= indexes.matching(columns, values) - rows.keys()
            self._store(rows.keys(), rows)
            fetched_keys.update(rows)
        moved -= fetched_keys
        for key in fetched_keys:
            pending = self._pending.get(key)
            if pending is not None and pending[1] <= level:
                del self._pending[key]
                self._queue.pop(key, None)
            waiters = self._waiters.get(key)
            if waiters:
                rest = release_waiters(waiters, level)
                if rest:
                    self._waiters[key] = rest
                else:
                    del self._waiters[key]
        if moved:  # at the newest request's batch: that batch is not applied until they land
            self.changed(moved, max(seq for seq, _, _ in requests))
        if self._on_matched is not None:  # each request's batch: the rows that held or hold its values
            for (seq, columns, wanted), held in zip(requests, before, strict=True):
                self._on_matched(seq, held | indexes.matching(columns, wanted))
        self._table_waiters = release_waiters(self._table_waiters, level)
        self._on_progress()
        self._schedule()

    def _degrade(self, what: str, exc: BaseException, level: int) -> None:
        """A keyed refetch or a relation refresh failed as it would again (say, a key
        PostgreSQL cannot take): reload the whole table instead of retrying it forever."""
        self.degraded += 1
        log.warning(
            "%s failed as it would again (%s: %s); reloading the whole table instead",
            what,
            type(exc).__name__,
            _first_line(exc),
            extra={"event": "refetch_degraded", "table": self.schema.qualified},
        )
        self.changed_all(level)

    def _break(self, what: str, exc: BaseException) -> None:
        """Loading failed as it would again (the table was dropped or changed, its query fails)."""
        self.fail(f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")

    def fail(self, problem: str) -> None:
        """Stop serving the table from memory, and stop holding back the revision of the
        others, because of ``problem``; reads go to the database. ``rebuild`` tries again."""
        self.problem = problem
        log.error(
            "%s is not served from memory (reads of it go to the database; other tables are served): %s",
            self.schema.qualified,
            problem,
            extra={"event": "table_failed", "table": self.schema.qualified},
        )
        error = Unavailable(f"{self.schema.qualified} is not being served: {self.problem}")
        _fail_all(self._table_waiters, error)
        self._table_waiters = []
        for waiters in self._waiters.values():
            _fail_all(waiters, error)
        self._waiters.clear()
        self._pending.clear()
        self._queue.clear()
        self._matching.clear()
        self._reload_done = self._reload_needed
        self.loaded = False
        self.rows = {}
        if self.indexes is not None:
            self.indexes.rebuild(self.rows)
        self._on_progress()

    def _failed(self, what: str, exc: BaseException, keys: list[Key] | None) -> None:
        error = _unavailable(what, exc)
        self._failures += 1
        delay = min(RETRY_MAX_DELAY, RETRY_MIN_DELAY * 2 ** min(self._failures, 10))
        log.warning("%s; retrying in %.2fs", error, delay)
        # Readers waiting on this fetch get the error now rather than hang;
        # the fetch itself is retried.
        if keys is None:
            _fail_all(self._table_waiters, error)
            self._table_waiters = []
            for waiters in self._waiters.values():
                _fail_all(waiters, error)
            self._waiters.clear()
        else:
            for key in keys:
                _fail_all(self._waiters.pop(key, []), error)
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
            self._dispatch_handle = None
        self._schedule(delay)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def release_waiters(
    waiters: list[tuple[int, asyncio.Future[None]]], level: int
) -> list[tuple[int, asyncio.Future[None]]]:
    """Wake waiters whose level is reached; return the rest."""
    rest = []
    for needed, future in waiters:
        if future.done():
            continue
        if needed <= level:
            future.set_result(None)
        else:
            rest.append((needed, future))
    return rest


def _fail_all(waiters: list[tuple[int, asyncio.Future[None]]], error: BaseException) -> None:
    for _, future in waiters:
        if not future.done():
            future.set_exception(error)


NOT_FOUND = b""  # cached "no such row" in lazy tables (a real row is never empty JSON)


class LazyTable:
    """Read-through cache of a table, bounded by ``max_rows`` (LRU) and an optional TTL."""

    mode: Literal["full", "lazy"] = "lazy"

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
        self._flights = Flights()
        self._tasks = TaskSet(schema.qualified)

    @property
    def row_count(self) -> int:
        return len(self.cache)

    def byte_count(self) -> int:
        return sum(map(len, self.cache.values()))

    def low_water(self) -> int | None:
        return None  # changes apply the moment they arrive

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

    def changed_all(self, seq: int) -> None:
        self.cache.clear()
        self._flights.detach_all()

    def close(self) -> None:
        self._tasks.cancel()

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
            self._flights.fail(futures, keys, _unavailable(f"reading {self.schema.qualified}", exc))
            return
        self.fills += 1
        for key in keys:
            # Stored only if no change to the key (or table) arrived meanwhile:
            # a change detaches the flight.
            if self._flights.owns(key, futures[key]):
                self.cache[key] = rows.get(key, NOT_FOUND)
        self._flights.land(futures, keys, rows)


TableCache = FullTable | LazyTable

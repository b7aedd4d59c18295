"""``FullTable``: the whole table in memory (its rows in a ``store.RowStore``),
kept complete by batched refetches, reloads and relation refreshes.

Plain asyncio and dicts: all database access goes through ``db.Database``, so
unit tests drive it with an in-memory fake.

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
  table; per-key refetches pause meanwhile (so none lands out of order
  around it: the reload starts once those in flight landed, and those sent
  after it are newer); repeated ones coalesce: one reload in flight, at most
  one more queued, at the newest level asked;
* meanwhile memory answers no read of the table (``Reloading``): the read
  path asks the database, as during the first load, and readers already
  waiting here are sent there -- a database read that starts after the
  change was received is newer than it. The reload stores its rows over the
  old ones chunk by chunk and drops the rows it did not bring at the end
  (``RowStore.begin_reload``), so the table is never held twice;
* a database read may have seen a commit whose notification has not arrived
  yet, so once a reload landed memory answers only after a barrier token sent
  then came back (``fence``: every commit before it was received, so a key a
  database read saw newer is pending): within an epoch, answers never go back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol

from sidecar.core.ahead import KeyFences
from sidecar.core.aio import TaskSet, Waiters
from sidecar.core.cache import RETRY_MAX_DELAY, RETRY_MIN_DELAY, Rerouted, first_line, unavailable, would_repeat
from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key, collision_text
from sidecar.core.progress import LoadProgress
from sidecar.core.schema import TableSchema
from sidecar.core.source import Database, Rows
from sidecar.core.store import Row, RowStore, Snapshot
from sidecar.core.xids import Visibility
from sidecar.errors import Unavailable

log = logging.getLogger(__name__)


class Reloading(Rerouted):
    """Internal: the table is being reloaded; the read is answered from the database."""


class Numbering(Protocol):
    """What a full table needs of the batch numbering (``revisions.Revisions``)."""

    seq: int  # the newest batch received

    def low_water(self, table: str, low: int | None) -> None:
        """``table``'s oldest unapplied batch is now ``low`` (None: none)."""


class FullTable:
    """Keeps every row of a table (or of its ``where`` subset) current: schedules the
    refetches, reloads and relation refreshes that changes call for and holds readers
    until what they must see has landed. The rows themselves are in ``store``."""

    mode: Literal["full", "lazy"] = "full"
    holds_all_rows = True  # a missing key is a definite "no such row"
    max_rows = 0

    def __init__(
        self,
        schema: TableSchema,
        db: Database,
        *,
        numbering: Numbering,
        on_matched: Callable[[str, int, set[Key]], None] | None = None,
        batch_size: int = 500,
        concurrency: int = 2,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.schema = schema
        self.db = db
        self._numbering = numbering  # the newest batch; told the table's low-water mark when it may have changed
        self._on_matched = on_matched  # told which keys a source change touched, per table and batch
        self._fence_source = fence  # returns once every commit before the call was received
        self._fence: asyncio.Future[None] | None = None  # memory answers once this is done
        self._key_fences = KeyFences(lambda: self._numbering.seq)  # a relation's rows just refreshed
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.store = RowStore(schema)
        self.load_progress = LoadProgress(schema.qualified, due=lambda: self.reloading and self.problem is None)
        self.loaded = False
        self.problem: str | None = None  # why the table is not served: a failure that would repeat
        # Changes bring their rows (logical decoding), stored as they come, in commit order.
        # A database read (a refetch, a reload) may see commits the stream has not brought
        # yet, after which a row the stream brings could be older than the one held; so a
        # keyed refetch turns this off (every change is then refetched, as notices are),
        # and a reload records its snapshot to skip what it saw (``_resumed``).
        self.streamed = False
        self.streams = False  # whether rows may be taken from changes at all (set by the ingest)
        self.stream_stopped: str | None = None  # why ``streamed`` went off (logged once)
        # A reload is due or running after which rows are taken again: changes wait in
        # ``_held`` (batch, transaction, rows or None for emptied) until it landed; then
        # ``_seen`` says which transactions its snapshot saw, until a fence completed.
        self._resume = False
        self._held: list[tuple[int, int, Mapping[Key, bytes | None] | None]] = []
        self._seen: Visibility | None = None
        self.refetches = 0
        self.reloads = 0
        self.degraded = 0  # keyed refetches or relation refreshes that became reloads
        self.coalesced = 0  # whole-table changes folded into a reload already due (none of their own)
        self.reads: collections.Counter[str] = collections.Counter()  # by result: hit, not_found
        self._pending: dict[Key, list[int]] = {}  # key -> [oldest, newest] unapplied seq
        self._queue: dict[Key, None] = {}  # pending keys not in flight, in arrival order
        self._inflight: set[Key] = set()
        self._waiters: dict[Key, Waiters] = {}
        self._reload_needed = 0  # a reload must reach at least this seq
        self._reload_oldest = 0  # the oldest whole-table change not yet reloaded
        self._reload_done = -1  # seq level of the last completed (re)load
        self._reloading = False
        self._reloading_level = -1  # the level of the reload in flight (while _reloading)
        self._mixed = False  # the store holds rows of a reload that has not landed
        self._generation = 0  # rises when the rows are dropped (fail): a reload under way stops
        self._table_waiters = Waiters()  # readers waiting for relation refreshes
        self._reload_waiters = Waiters()  # waiting for a reload to land (not readers: they go elsewhere)
        # Relation refreshes by source values: (seq, relation columns, values), run
        # like a small reload (no keyed fetch meanwhile; reads wait for them).
        self._matching: list[tuple[int, tuple[str, ...], list[Key]]] = []
        self._matching_running = False
        self._keys_turn = False
        self._fetching = 0
        self._failures = 0
        self._dispatch_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._tasks = TaskSet(schema.qualified)

    # -------------------------------------------------------------- state

    @property
    def rows(self) -> Rows:
        return self.store.rows

    @property
    def row_count(self) -> int:
        return len(self.store)

    def byte_count(self) -> int:
        return self.store.byte_count()

    def authoritative_rows(self) -> Rows | None:
        """Every row, when memory is the table (for the rows of Watch batches)."""
        return self.store.rows if self.problem is None else None

    def snapshot(self) -> Snapshot | None:
        """Every row as of now, read lazily (a Watch's initial state), when memory is the table."""
        return self.store.snapshot() if self.problem is None else None

    @property
    def reloading(self) -> bool:
        """A whole-table reload is due or under way: memory answers no read."""
        return self._reload_needed > self._reload_done

    @property
    def mixed(self) -> bool:
        """A reload is writing its rows over the old ones, or one stopped half-way and none
        landed since: memory is exact as of no revision (a reload that is only due has not
        touched them)."""
        return self._reloading or self._mixed

    async def until_reloaded(self) -> None:
        """Return once every whole-table change received before the call is reloaded
        (for ``Invalidate(refresh)`` and initial states; reads do not wait for it)."""
        if self._reload_needed > self._reload_done:
            await self._reload_waiters.wait(self._reload_needed)

    def queries(self) -> dict[str, int]:
        return {"refetch": self.refetches, "reload": self.reloads, "degraded": self.degraded}

    def _progress(self) -> None:
        self._numbering.low_water(self.schema.qualified, self.low_water())

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

    def rebuild(self, seq: int, exact: bool = False) -> None:
        """(Re)load from scratch at ``seq`` (LISTEN must already be active); a table
        that could not be served tries again. ``exact``: the load reads the database
        exactly as of ``seq`` (a snapshot the change stream starts from), so changes that
        bring rows may be stored as they come again."""
        self.problem = None
        self.streamed = False
        self._resume = self.streams  # (a reload that records its snapshot may take rows again)
        self._held.clear()
        self._seen = None
        self.changed_all(seq)
        if exact and self.streams:
            self._resume = False
            self.streamed = True
            self.stream_stopped = None

    def _stop_streaming(self, why: str) -> None:
        """Changes are refetched from now on: rows held for a reload become refetches."""
        was = self.streamed or self._resume
        self.streamed = self._resume = False
        self._seen = None
        held, self._held = self._held, []
        for seq, _, rows in held:
            if rows is None:
                self.changed_all(seq)
            else:
                self._refetch_keys(rows, seq)
        if was:
            self.stream_stopped = why
            log.info(
                "%s: %s; its changes are refetched from now on (until a reload)",
                self.schema.qualified,
                why,
                extra={"event": "rows_refetched", "table": self.schema.qualified, "reason": why},
            )

    def row_before(self, key: Key) -> bytes | None:
        """The row as the change stream has it so far, while rows are taken from it (or held
        for a reload): what an UPDATE that did not send an unchanged TOASTed value keeps.
        None when the table does not take rows, or holds none for ``key``. (While a reload
        runs, a key no held change names has the same row in the rows before it and in the
        reload's: a change of it between the two would have come, and be held.)"""
        if self._resume:
            for _, _, rows in reversed(self._held):
                if rows is None:
                    return None  # (emptied)
                if key in rows:
                    return rows[key]
            return self.store.get(key)
        return self.store.get(key) if self.streamed else None

    def _takes_rows(self) -> bool:
        return self.streamed and self._reload_needed <= self._reload_done and not self._matching

    def carried(self, rows: Mapping[Key, bytes | None], seq: int, xid: int = 0) -> None:
        """These keys changed in batch ``seq`` (transaction ``xid``) and the change brought
        their rows (None: gone): stored at once while the table takes rows from its changes
        (unless a reload's snapshot saw that transaction already), held while a reload runs
        after which it takes them again, otherwise refetched like any change."""
        if self.problem is not None:
            return
        if self._resume:
            self._held.append((seq, xid, rows))
            return
        if self._takes_rows() and (not self._pending or self._pending.keys().isdisjoint(rows)):
            if self._seen is None or not self._seen.saw(xid):
                self.store.store(rows, rows)  # type: ignore[arg-type]  # (None: removed)
            return
        self.changed(rows, seq)

    def emptied(self, seq: int, xid: int = 0) -> None:
        """The table was emptied (TRUNCATE) in batch ``seq``, as the change stream says:
        its rows dropped at once while it takes rows from its changes; otherwise reloaded."""
        if self.problem is not None:
            return
        if self._resume:
            self._held.append((seq, xid, None))
            return
        if self._takes_rows() and not self._pending:
            if self._seen is None or not self._seen.saw(xid):
                self.store.store(list(self.store.rows), {})
            return
        self.changed_all(seq)

    def changed(self, keys: Iterable[Key], seq: int) -> None:
        """These keys changed in batch ``seq``: refetch them."""
        if self.problem is not None:
            return  # not served: nothing to keep current until it is rebuilt
        self._stop_streaming("a change had to be refetched")
        self._refetch_keys(keys, seq)

    def _refetch_keys(self, keys: Iterable[Key], seq: int) -> None:
        for key in keys:
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = [seq, seq]
            elif seq > pending[1]:
                pending[1] = seq
            elif seq < pending[0]:  # (a relation refresh's moved rows, at its own older batch)
                pending[0] = seq
            if key not in self._inflight:
                self._queue[key] = None
        self._progress()
        self._schedule()

    def changed_all(self, seq: int) -> None:
        """The whole table changed in batch ``seq``: reload it. A table that takes rows
        from its changes holds the ones that come meanwhile, and takes rows again once the
        reload landed (see ``_resumed``)."""
        if self.problem is not None:
            return
        if self.streams and (self.streamed or self._resume) and not self._pending and not self._matching:
            self.streamed, self._resume = False, True
        elif self.streamed or self._resume:
            self._stop_streaming("the table had to be reloaded")
        if self._reloading and self._reload_needed > self._reloading_level:
            self.coalesced += 1  # (the reload queued behind the one in flight covers it)
        elif not self._reloading and self.loaded and self._reload_needed > self._reload_done:
            self.coalesced += 1  # (the reload due, not started yet, covers it)
        if self._reload_needed <= self._reload_done:
            self._reload_oldest = seq
        self._reload_needed = max(self._reload_needed, seq)
        # Readers waiting for refetches or refreshes would wait for the reload too
        # (those pause meanwhile): they read the database instead.
        self._send_readers_away(Reloading())
        self._progress()
        self._schedule()

    def _resumed(self, snapshot: str | None) -> None:
        """A reload landed while changes were held for it: the ones its snapshot did not see
        are applied, and rows are taken from changes again -- except the ones that
        snapshot saw, until a barrier round shows the stream has brought all of those. A
        reload that could not tell its snapshot leaves the held changes to refetches."""
        if not self._resume or self.reloading:
            return  # (another reload is due: the held changes wait for it)
        try:
            seen = Visibility.parse(snapshot) if snapshot is not None else None
        except ValueError as exc:
            log.warning("%s: %s", self.schema.qualified, exc)
            seen = None
        if seen is None or self._pending or self._matching:
            self._stop_streaming("a reload could not tell what it saw")
            return
        held, self._held = self._held, []
        self._resume = False
        for _, xid, rows in held:
            if seen.saw(xid):
                continue
            if rows is None:
                self.store.store(list(self.store.rows), {})
            else:
                self.store.store(rows, rows)  # type: ignore[arg-type]
        self.streamed = True
        self._seen = seen

    def changed_matching(self, columns: tuple[str, ...], values: list[Key], seq: int) -> None:
        """Rows whose ``columns`` hold one of ``values`` changed in batch ``seq`` (a relation's
        source changed): refresh exactly those rows, including ones that appear or vanish."""
        if self.problem is not None:
            return
        self._stop_streaming("a relation refresh")
        self._matching.append((seq, columns, values))
        self._progress()
        self._schedule()

    def reroute(self) -> None:
        """Memory can no longer be trusted (listener down): readers waiting on
        refetches are sent to the database instead of waiting here."""
        self._send_readers_away(Rerouted())
        self._reload_waiters.fail(Rerouted())

    def _send_readers_away(self, error: Rerouted) -> None:
        for waiters in (self._table_waiters, *self._waiters.values()):
            waiters.fail(error)
        self._waiters.clear()

    async def close(self) -> None:
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
        await self._tasks.close()

    # -------------------------------------------------------------- reads

    def stale_get(self, key: Key) -> Row:
        """Whatever memory holds, current or not (for allow_stale reads)."""
        return self.store.get(key)

    def peek(self, key: Key) -> tuple[bool, Row]:
        """Answer from memory if no change to ``key`` (or the table) is pending."""
        if (
            self._reload_needed > self._reload_done
            or key in self._pending
            or self._matching
            or self._fence is not None
            or key in self._key_fences
        ):
            return False, None
        row = self.store.get(key)
        self.reads["hit" if row is not None else "not_found"] += 1
        return True, row

    async def get_many(self, keys: Sequence[Key]) -> list[Row]:
        """The rows of ``keys``, fresh as of every change received before the call
        (raises ``Reloading`` while a reload is due: memory cannot tell then)."""
        await self._memory_served()
        if self._key_fences:
            await self._key_fences.wait(keys)
        if self._matching:
            await self._table_waiters.wait(self._matching[-1][0])
        if self._pending:
            for key in keys:
                pending = self._pending.get(key)
                if pending is not None:
                    await self._waiters.setdefault(key, Waiters()).wait(pending[1])
        found = self.store.get_many(keys)
        hits = len(found) - found.count(None)
        self.reads["hit"] += hits
        self.reads["not_found"] += len(found) - hits
        return found

    async def query_current(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        await self.settle()
        return self.query_memory(query)

    async def settle(self) -> None:
        """Wait until every change received before the call is applied to rows and
        indexes (what a read of the whole table, such as an index query, needs);
        raises ``Reloading`` while a reload is due."""
        await self._memory_served()
        if self._key_fences:
            await self._key_fences.wait(self._key_fences.keys())
        if self._matching:
            await self._table_waiters.wait(self._matching[-1][0])
        for key, level in [(key, pending[1]) for key, pending in self._pending.items()]:
            pending = self._pending.get(key)
            if pending is not None and pending[0] <= level:
                await self._waiters.setdefault(key, Waiters()).wait(level)

    async def _memory_served(self) -> None:
        """Raise ``Reloading`` if memory answers no read now; wait for a fence under way."""
        while True:
            if self._reload_needed > self._reload_done:
                raise Reloading()
            fence = self._fence
            if fence is None:
                return
            if fence.done():  # (its callbacks have not run yet: awaiting it again would spin)
                self._fence_done(fence)
                continue
            await asyncio.shield(fence)  # (about one round trip; Reloading if it failed)

    def query_memory(self, query: IndexQuery) -> tuple[list[bytes], bool]:
        """An index query answered from memory (after ``settle``)."""
        entries, truncated = self.store.query(query)
        self.reads["hit"] += len(entries)
        return entries, truncated

    def _release_key(self, key: Key, level: int) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.release(level)
            if not waiters:
                del self._waiters[key]

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
                self._reloading_level = self._numbering.seq
                self._tasks.spawn(self._reload(self._reloading_level), "reload")
            return
        if self._matching and not (self._keys_turn and self._queue):
            if self._fetching == 0:  # likewise: one writer of the affected rows at a time
                # (the requests stay in _matching until they land: reads and the
                # revision must wait for them while they run, as for queued ones)
                self._matching_running = True
                self._tasks.spawn(self._refresh_matching(list(self._matching), self._numbering.seq), "refresh")
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
            self._tasks.spawn(self._refetch(batch, self._numbering.seq), "refetch")

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
                self._degrade(what, exc, max(levels, default=self._numbering.seq))
            else:
                self._failed(what, exc, keys)
            return
        self._fetching -= 1
        self._failures = 0
        self.refetches += 1
        self._inflight.difference_update(keys)
        if self.problem is not None:  # (the table stopped being served meanwhile)
            return
        self.store.store(keys, rows)
        self._fence_relation(keys)
        for key in keys:
            pending = self._pending.get(key)
            if pending is not None:
                if pending[1] <= level:
                    del self._pending[key]
                else:
                    pending[0] = level + 1
                    self._queue[key] = None
            self._release_key(key, level)
        self._progress()
        self._schedule()

    async def _reload(self, level: int) -> None:
        started = time.monotonic()
        generation = self._generation
        store = self.store
        store.begin_reload()
        self._mixed = True
        count = 0
        snapshot: list[str] = []  # (the load's, when changes are held for it)
        chunks = self.load_progress.track(self.db, self.schema, snapshot.append if self._resume else None)
        try:
            async for chunk in chunks:
                if generation != self._generation:
                    break  # the table failed meanwhile (its rows were dropped)
                store.reload_chunk(chunk)
                count += len(chunk)
        except Exception as exc:
            self._reloading = False
            if generation == self._generation:
                store.abort_reload()  # (the rows stay as they are, mixed: no read is served from them)
            if would_repeat(exc):
                self._break(f"loading {self.schema.qualified}", exc)
            else:
                self._failed(f"loading {self.schema.qualified}", exc, None)
            return
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        self._reloading = False
        if generation != self._generation or self.problem is not None:
            self._schedule()  # (failed meanwhile; rebuilt too, maybe: that needs a reload of its own)
            return
        self._failures = 0
        first = not self.loaded
        dropped = store.finish_reload()
        if len(store) != count:  # (rows of one key in different chunks: each chunk checks its own)
            self.fail(f"loading {self.schema.qualified} failed: {collision_text(count - len(store))}")
            return
        self._mixed = False
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
        self._resumed(snapshot[0] if snapshot else None)
        self._start_fence()
        self._table_waiters.release(level)
        self._reload_waiters.release(level)
        for key in list(self._waiters):
            self._release_key(key, level)
        seconds = time.monotonic() - started
        log.log(
            logging.INFO if first else logging.DEBUG,
            "%s %s: %d rows (%d dropped) in %.3fs",
            "loaded" if first else "reloaded",
            self.schema.qualified,
            count,
            dropped,
            seconds,
            extra={
                "event": "table_loaded" if first else "table_reloaded",
                "table": self.schema.qualified,
                "rows": count,
                "dropped": dropped,
                "seconds": round(seconds, 4),
            },
        )
        self._progress()
        self._schedule()

    def _fence_relation(self, keys: Iterable[Key]) -> None:
        """A relation's rows just read may show a source row newer than its other rows
        joined to it show (a commit read whose change has not arrived, so they are not
        pending yet): memory answers for these keys once a barrier round brought that
        change -- the others are pending by then, and a read of them waits for them.
        (A table's own rows have no such siblings.) Per key, so that reads of a relation
        under constant writes wait for one round at most, not for every new one."""
        if not self.schema.config.is_relation or self._fence_source is None:
            return
        keys = list(keys)
        if not keys:
            return
        self._key_fences.add(keys, self._new_fence(f"refreshing rows of {self.schema.qualified}"))

    def ahead(self, key: Key, revision: int) -> bool:
        """Whether ``key``'s row may be newer than the table's other rows as of batch
        ``revision`` show (the Watch marks it: ``ahead.KeyFences``)."""
        return self._key_fences.ahead(key, revision)

    def _start_fence(self) -> None:
        """Memory answers again once every commit a database read meanwhile may have
        seen has been received (see the module's docstring)."""
        if self._fence_source is None:
            return
        fence = self._fence = self._new_fence(f"reloading {self.schema.qualified}")
        fence.add_done_callback(self._fence_done)

    def _fence_done(self, fence: asyncio.Future[None]) -> None:
        if self._fence is not fence:
            return  # (an earlier fence says nothing of a later reload's snapshot)
        self._fence = None
        if not fence.cancelled() and fence.exception() is None:
            self._seen = None  # (every transaction the reload saw has come through the stream)

    def _new_fence(self, after: str) -> asyncio.Future[None]:
        """A future done once every commit before now has been received (a barrier round
        through ``fence``); failed with ``Reloading`` (readers ask the database) if the round
        fails."""
        fence: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fence.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._tasks.spawn(self._run_fence(fence, after), "fence")
        return fence

    async def _run_fence(self, fence: asyncio.Future[None], after: str) -> None:
        assert self._fence_source is not None
        try:
            await self._fence_source()
        except Exception as exc:  # (the change source went down, a barrier timed out)
            log.debug("fence after %s failed: %s", after, exc)
            if not fence.done():
                fence.set_exception(Reloading())
        else:
            if not fence.done():
                fence.set_result(None)

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
        store = self.store
        before = [store.matching(columns, wanted) for _, columns, wanted in requests]
        fetched_keys: set[Key] = set()
        moved: set[Key] = set()
        for columns, values, rows in fetched:
            # Rows that held these values and no longer match may be gone, or may hold
            # other values now (changed in the same transaction): only a keyed refetch
            # can tell, so they are refetched, not dropped.
            moved |= store.matching(columns, values) - rows.keys()
            store.store(rows.keys(), rows)
            fetched_keys.update(rows)
        moved -= fetched_keys
        self._fence_relation(fetched_keys)
        for key in fetched_keys:
            pending = self._pending.get(key)
            if pending is not None and pending[1] <= level:
                del self._pending[key]
                self._queue.pop(key, None)
            self._release_key(key, level)
        if moved:  # at the newest request's batch: that batch is not applied until they land
            self.changed(moved, max(seq for seq, _, _ in requests))
        if self._on_matched is not None:  # each request's batch: the rows that held or hold its values
            for (seq, columns, wanted), held in zip(requests, before, strict=True):
                self._on_matched(self.schema.qualified, seq, held | store.matching(columns, wanted))
        self._table_waiters.release(level)
        self._progress()
        self._schedule()

    def _degrade(self, what: str, exc: BaseException, level: int) -> None:
        """A keyed refetch or a relation refresh failed as it would again (say, a key
        PostgreSQL cannot take): reload the whole table instead of retrying it forever."""
        self.degraded += 1
        log.warning(
            "%s failed as it would again (%s: %s); reloading the whole table instead",
            what,
            type(exc).__name__,
            first_line(exc),
            extra={"event": "refetch_degraded", "table": self.schema.qualified},
        )
        self.changed_all(level)

    def _break(self, what: str, exc: BaseException) -> None:
        """Loading failed as it would again (the table was dropped or changed, its query fails)."""
        self.fail(f"{what} failed: {type(exc).__name__}: {first_line(exc)}")

    def fail(self, problem: str) -> None:
        """Stop serving the table from memory, and stop holding back the revision of the
        others, because of ``problem``; reads go to the database. ``rebuild`` tries again."""
        self.problem = problem
        self._generation += 1
        log.error(
            "%s is not served from memory (reads of it go to the database; other tables are served): %s",
            self.schema.qualified,
            problem,
            extra={"event": "table_failed", "table": self.schema.qualified},
        )
        error = Unavailable(f"{self.schema.qualified} is not being served: {self.problem}")
        self._fail_waiters(error)
        self._pending.clear()
        self._queue.clear()
        self._matching.clear()
        self._held.clear()
        self.streamed = self._resume = False
        self._seen = None
        self._reload_done = self._reload_needed
        self.loaded = False
        self.store.clear()
        self._mixed = False
        self._progress()

    def _failed(self, what: str, exc: BaseException, keys: list[Key] | None) -> None:
        error = unavailable(what, exc)
        self._failures += 1
        delay = min(RETRY_MAX_DELAY, RETRY_MIN_DELAY * 2 ** min(self._failures, 10))
        log.warning("%s; retrying in %.2fs", error, delay)
        # Readers waiting on this fetch get the error now rather than hang;
        # the fetch itself is retried.
        if keys is None:
            self._fail_waiters(error)
        else:
            for key in keys:
                waiters = self._waiters.pop(key, None)
                if waiters is not None:
                    waiters.fail(error)
        if self._dispatch_handle is not None:
            self._dispatch_handle.cancel()
            self._dispatch_handle = None
        self._schedule(delay)

    def _fail_waiters(self, error: BaseException) -> None:
        self._table_waiters.fail(error)
        self._reload_waiters.fail(error)
        for waiters in self._waiters.values():
            waiters.fail(error)
        self._waiters.clear()

"""The cache's read and Watch facade, with no gRPC and no SQL in sight: a table's rows
(``get``, ``get_many``, through ``reads.ReadPath``), the consistency options of a read
(``Sync``, ``STRONG``, ``min_revision``, through the barrier in ``trust.Trust``), Watch
(``subscribe``, initial states, through ``fanout.FanOut``), readiness, and ``invalidate``.

Changes come in elsewhere, each kind on its own path (``assembly`` wires them):

* PostgreSQL's notices (keys to refetch): ``notices.NoticeIngest.handle`` ->
  ``router.ChangeRouter.route`` (``Revisions.batch_for`` numbers the batch;
  ``FanOut.record`` keeps its changes; ``FullTable.changed`` marks keys pending) ->
  ``FullTable`` refetches and pushes its low-water mark -> ``Revisions.advance``;
* numbered batches that carry rows (a follower's upstream): ``batches.BatchIngest.batch``
  (rows stored as they come, recorded under the source's revision) -> ``Revisions.advance``.

Either way ``Revisions`` then tells, in order, ``FanOut.publish`` (each ``Subscription``
wakes), the barrier (``Trust``) and this engine (readiness).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from sidecar.core.cache import Rerouted, Row, TableCache, whole
from sidecar.core.fanout import FanOut, FellBehind, Filter, InitialState, SharedInitialState, Subscription
from sidecar.core.full import FullTable
from sidecar.core.keys import Key, coerce_key
from sidecar.core.reads import ReadPath
from sidecar.core.revisions import Revision, Revisions, new_epoch, shared_history
from sidecar.core.store import SnapshotGivenUp
from sidecar.core.trust import Trust
from sidecar.core.wire import row_json, watch_message
from sidecar.errors import ConfigError, InvalidRequest, Unavailable, UnknownTable
from sidecar.identifiers import parse_table_name, qualified_name

__all__ = ["Engine", "Ingest", "Revision", "new_epoch"]

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 500  # rows per initial-state message


class Ingest(Protocol):
    """Where the sidecar's own changes (``Invalidate``) go: the side changes come in by."""

    async def invalidate(
        self,
        table: TableCache,
        raw_keys: Sequence[Sequence[Any]] | None,
        keys: list[Key] | None,
        refresh: bool,
        credentials: tuple[str, ...],
    ) -> Revision | None:
        """Drop cached rows; a revision to wait for before answering, if any."""


class Engine:
    """The tables as read and watched: memory or the database, at a revision."""

    def __init__(
        self,
        tables: Mapping[str, TableCache],
        full: Mapping[str, FullTable],
        revisions: Revisions,
        fanout: FanOut,
        trust: Trust,
        reads: ReadPath,
        ingest: Ingest,
    ) -> None:
        self._tables = tables
        self._full = full  # the tables that reload (their reads go to the database meanwhile)
        self._revisions = revisions
        self._fanout = fanout
        self._trust = trust
        self._reads = reads
        self._ingest = ingest
        self._ready_listeners: list[Callable[[], None]] = []
        # Makes the database hold every commit completed before the call, for the reads it
        # answers while the change source is down (None: it always does -- a primary; a hub
        # on a standby waits until the standby has replayed the primary's WAL as of the call).
        self.database_fresh: Callable[[], Awaitable[None]] | None = None
        self._barrier_listeners: list[Callable[[float], None]] = []
        self._was_ready = False
        # Initial states being streamed, by store snapshot and revision: streams that start
        # together share their messages (gone with the last stream that reads them).
        self._initial_states: weakref.WeakValueDictionary[tuple[int, str, int, str], SharedInitialState] = (
            weakref.WeakValueDictionary()
        )
        trust.on_change(self._state_changed)
        revisions.on_applied(self._applied)

    def on_barrier(self, callback: Callable[[float], None]) -> None:
        """Tell ``callback`` how long each read barrier a read waited for took (metrics)."""
        self._barrier_listeners.append(callback)

    # ------------------------------------------------------------ state

    @property
    def revision(self) -> Revision:
        """The applied revision: every change up to it is in memory."""
        return Revision(self._revisions.epoch, self._revisions.applied)

    @property
    def ready(self) -> bool:
        """Serving from memory: the change source is up, every table is loaded (or known
        not to be servable), and the rebuild that began this epoch is done."""
        return (
            self._trust.up
            and self._revisions.applied >= self._revisions.epoch_start
            and all(t.loaded or t.problem is not None for t in self._tables.values())
        )

    @property
    def stalled_seconds(self) -> float:
        """How long received batches have waited without the revision advancing (0: none wait)."""
        return self._revisions.stalled_seconds(self._trust.up)

    @property
    def stalled(self) -> bool:
        """The revision has not advanced for ``stall_after`` seconds while batches wait
        (refetches failing, a table stuck): health says NOT_SERVING."""
        return self.stalled_seconds > self._revisions.stall_after

    async def until_ready(self) -> None:
        """Wait until ``ready`` (bounded by the caller's deadline)."""
        while not self.ready:
            changed = asyncio.Event()
            self._ready_listeners.append(changed.set)
            try:
                await changed.wait()
            finally:
                self._ready_listeners.remove(changed.set)

    def on_state_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``ready`` may have changed."""
        self._ready_listeners.append(callback)

    def _state_changed(self) -> None:
        ready = self.ready
        if ready == self._was_ready:
            return
        self._was_ready = ready
        for callback in self._ready_listeners:
            callback()

    def _applied(self, applied: int) -> None:
        self._state_changed()

    def _barrier_took(self, started: float) -> None:
        took = time.perf_counter() - started
        for callback in self._barrier_listeners:
            callback(took)

    # ------------------------------------------------------------ consistency

    async def sync(self) -> Revision:
        """Read barrier: every commit completed before this call is applied."""
        barrier = self._trust.barrier
        if not self._trust.up or barrier is None:
            raise Unavailable(self._trust.unavailable)
        started = time.perf_counter()
        await barrier.wait()
        self._barrier_took(started)
        return self.revision

    async def wait_revision(self, epoch: str, number: int) -> None:
        """Wait until the cache has reached ``(epoch, number)``.

        While the change source is down there is nothing to wait for: reads then
        go to the database, which is newer than any revision.
        """
        if not self._trust.up:
            return
        known = self._revisions.knows(epoch)
        if known == "current":
            # (a number ahead, maybe another hub's of the same history, is waited for: a read
            # asks for that revision, and gets it, or its deadline)
            await self._revisions.wait(number)
        elif known == "unknown":  # another process's (another hub's) revision, maybe ahead: prove freshness
            await self.sync()
        # (an earlier run of the process whose epoch is current: rebuilt since, newer than all of it)

    async def _reach(self, number: int) -> bool:
        """Return once ``applied`` reached ``number`` of the current epoch (False), or once a
        read barrier showed that nothing numbered up to it is still to come here (True).

        In an epoch of a database's history (logical capture: commit LSNs), a number not
        received yet may be another sidecar's: another hub's, ahead of this one -- or a
        number it gave a batch of its own between two commits, which no commit here will
        take (on a quiet database, none may come for long). A read barrier run meanwhile
        settles it: every commit made before this call is then received, so a number
        still beyond them is no commit's to wait for. Both are waited for at once: the
        barrier may be slow (its upstream stalled) while the stream brings the number.
        (Reads with ``min_revision`` wait for the number itself, as they always did.)"""
        revisions = self._revisions
        barrier = self._trust.barrier
        if number <= revisions.seq or not shared_history(revisions.epoch) or barrier is None or not self._trust.up:
            await revisions.wait(number)
            return False
        reached = asyncio.ensure_future(revisions.wait(number))
        proven = asyncio.ensure_future(self.sync())
        try:
            await asyncio.wait({reached, proven}, return_when=asyncio.FIRST_COMPLETED)
            if reached.done():
                reached.result()
                return False
            if proven.exception() is None and number > revisions.seq:
                return True
            await reached  # (the barrier failed, or brought the number: it is being applied)
            return False
        finally:
            for task in (reached, proven):
                if task.done() and not task.cancelled():
                    task.exception()  # (retrieved: a failure here is no one else's to log)
                task.cancel()

    async def until_resumable(self, epoch: str, number: int) -> bool:
        """Before a Watch resumes after ``epoch/number``: a revision of the current epoch
        not published here yet (the watcher came from another sidecar of the same history,
        ahead of this one) is waited for -- nothing older is ever streamed to it -- up to
        ``stall_after`` seconds, then ``Unavailable`` (resume later, or elsewhere). True
        when the stream may start beyond the published revision (``FanOut.subscribe``'s
        ``beyond``: a read barrier showed nothing up to it is still to come)."""
        fanout = self._fanout
        if epoch != fanout.epoch or number <= fanout.published:
            return False
        limit = self._revisions.stall_after
        try:
            async with asyncio.timeout(limit):
                beyond = await self._reach(number)
        except TimeoutError:
            raise Unavailable(
                f"revision {epoch}/{number} is ahead of this sidecar (at {fanout.epoch}/{fanout.published}), "
                f"which did not reach it within {limit:g} s (cache.stall_seconds); resume later, or elsewhere"
            ) from None
        if epoch == fanout.epoch and number > fanout.published and not beyond:
            raise Unavailable(
                f"revision {epoch}/{number} is ahead of this sidecar (at {fanout.epoch}/{fanout.published}), "
                f"which cannot reach it now ({self._trust.unavailable or 'its change source is down'}); "
                "resume later, or elsewhere"
            )
        return beyond

    async def prepare_read(self, strong: bool, min_revision: Revision | None, table: TableCache | None = None) -> None:
        """Honour read options before answering a read of ``table`` (see ReadOptions in the API).

        A STRONG read needs every commit before it *received* (the barrier's token
        came back) and applied to ``table`` -- not to every table, so a reload of
        another table does not hold it up. While ``table`` itself is being reloaded
        its reads come from the database or, once the reload landed, from memory
        fresh as of every change received before the read: receipt is enough then,
        and a ``min_revision`` read needs only that this revision was received.
        """
        gate = self._reads.gate
        if (strong or min_revision is not None) and gate is not None:
            await asyncio.shield(gate)  # (memory is being fenced: what to wait for is known after it)
        if (strong or min_revision is not None) and not self._trust.up and self.database_fresh is not None:
            # The database answers while the change source is down: "newer than any revision"
            # on a primary, not on a standby that lags it. (Up again meanwhile: the barrier
            # below covers the read.)
            await self.database_fresh()
        full = self._full.get(table.schema.qualified) if table is not None else None
        reloading = full is not None and full.reloading
        barrier = self._trust.barrier
        if strong and self._trust.up:
            if table is None or barrier is None:
                await self.sync()
            else:
                # Every commit before the read was received once the token is back; then
                # only this table must have applied them -- not every table (another
                # table's reload would hold this read up for its whole length).
                started = time.perf_counter()
                received = await barrier.wait(applied=False)
                # (a reload may have begun meanwhile -- a schema change the round found: then
                # the database answers, as for any reload, newer than what the round covers)
                reloading = reloading or (full is not None and full.reloading)
                if not reloading and received is not None:
                    await self._revisions.wait_for_table(table.schema.qualified, received)
                self._barrier_took(started)
        if min_revision is not None:
            revisions = self._revisions
            if reloading and min_revision.epoch == revisions.epoch and min_revision.number <= revisions.seq:
                return
            await self.wait_revision(min_revision.epoch, min_revision.number)

    # ------------------------------------------------------------ reads

    def table(self, name: str) -> TableCache:
        table = self._tables.get(name)
        if table is not None:
            return table
        # A request's name is echoed in the error: never all of a huge one.
        shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}... ({len(name)} characters)"
        try:
            schema, relname = parse_table_name(name)
        except ConfigError:
            raise InvalidRequest(f"{shown} is not a table name like 'public.patron'") from None
        table = self._tables.get(qualified_name(schema, relname))
        if table is None:
            known = ", ".join(self._tables) or "none"
            raise UnknownTable(f"table {shown} is not cached here (cached: {known})")
        return table

    def listing(self) -> list[TableCache]:
        """Every cached table, in configuration order (ListTables)."""
        return list(self._tables.values())

    async def get(self, name: str, parts: Sequence[Any], allow_stale: bool = False) -> Row:
        """One row (``None`` if there is none)."""
        table = self.table(name)
        return await self._reads.get(table, coerce_key(table.schema.key_columns, parts), allow_stale)

    async def get_many(self, name: str, raw_keys: Sequence[Sequence[Any]], allow_stale: bool = False) -> list[Row]:
        """Rows in key order (``None`` where there is none)."""
        table = self.table(name)
        return await self._reads.read(table, self._reads.keys(table, raw_keys), allow_stale)

    # ------------------------------------------------------------ Watch

    async def started(self) -> None:
        """Return once the first epoch began (no revision exists before the source connects)."""
        if not self._fanout.started.is_set():
            await self._fanout.started.wait()

    def subscribe(
        self,
        selection: Filter,
        *,
        start: tuple[str, int] | None = None,
        initial_state: bool = False,
        progress_interval: float = 0.0,
        connection: str | None = None,
        several: bool = False,
        beyond: bool = False,
    ) -> Subscription:
        """A Watch subscriber (raises ``OutOfRange`` for a revision that cannot be resumed,
        ``TooManyStreams`` beyond the stream limits; see ``FanOut.subscribe``; a ``start``
        ahead of this sidecar is first waited for: ``until_resumable``)."""
        names = selection.tables
        return self._fanout.subscribe(
            selection,
            start=start,
            snapshot=(lambda: self.snapshot(names)) if initial_state else None,
            progress_interval=progress_interval,
            connection=connection,
            several=several,
            beyond=beyond,
        )

    @property
    def oldest_revision(self) -> str:
        """The oldest revision a Watch may resume from."""
        return f"{self._fanout.epoch}/{self._fanout.oldest}"

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
            (name, table) for name, table in self._tables.items() if whole(table) and (not names or name in names)
        ]
        while waiting := next(
            (full for name, _ in tables if (full := self._full.get(name)) and full.mixed and full.problem is None),
            None,
        ):
            try:
                await waiting.until_reloaded()
            except (Rerouted, Unavailable):
                # The reload failed (it is retried) or the source went down (a
                # rebuild follows): look again in a moment.
                await asyncio.sleep(0.05)
        # No await from here on: the views and the revision are of one moment.
        epoch, revision = self._fanout.epoch, self._fanout.published
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
            self._fanout.dropped += 1
            raise FellBehind(f"watch fell behind during its initial state: {exc}") from None

    # ------------------------------------------------------------ the sidecar's own changes

    async def invalidate(
        self,
        name: str,
        raw_keys: Sequence[Sequence[Any]] | None,
        refresh: bool,
        credentials: tuple[str, ...] = (),
    ) -> None:
        """Drop cached rows of ``name`` (all of them when ``raw_keys`` is None), on the side
        changes come in by (a follower forwards it to its upstream with the caller's
        ``credentials``, and answers once it has applied that)."""
        table = self.table(name)
        keys = None if raw_keys is None else self._reads.keys(table, raw_keys)
        if keys == []:
            return
        revision = await self._ingest.invalidate(table, raw_keys, keys, refresh, credentials)
        if revision is not None:
            await self.wait_revision(revision.epoch, revision.number)

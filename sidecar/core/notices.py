"""PostgreSQL's change notices into the tables: ``NoticeIngest``.

A notice names keys (or a whole table), never rows: the tables refetch. So this side
owns the ``router.ChangeRouter`` (a notice to the tables and relations that hear of it,
numbered into its batch by ``Revisions.batch_for`` and recorded in the Watch fan-out)
and the full tables, whose refetches push their low-water marks to ``Revisions``; the
revision then advances, and the fan-out publishes (``revisions.Revisions.on_applied``).

It is the ``source.ChangeSink`` of ``pg_source.PgChangeSource`` (and of the in-memory
source of the tests): connected, lost, and each parsed notice -- a change, or a read
barrier's token coming back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sidecar.core.barrier import Barrier
from sidecar.core.cache import RefetchingTable, Rerouted, TableCache
from sidecar.core.events import Event, RowChange, SyncToken, TableChange
from sidecar.core.fanout import FanOut
from sidecar.core.full import FullTable, Reloading
from sidecar.core.keys import Key
from sidecar.core.revisions import Revision, Revisions
from sidecar.core.router import ChangeRouter, RouterStats
from sidecar.core.source import TokenSender
from sidecar.core.trust import Trust
from sidecar.errors import Unavailable

log = logging.getLogger(__name__)


class NoticeIngest:
    """Change notices (keys to refetch) from PostgreSQL, applied to the tables that hear of them."""

    def __init__(
        self,
        tables: Mapping[str, RefetchingTable],
        full: Mapping[str, FullTable],
        router: ChangeRouter,
        revisions: Revisions,
        fanout: FanOut,
        trust: Trust,
        source_name: str = "listener",
    ) -> None:
        self._tables = tables
        self._full = full  # the full tables among them (reloads, readers held until refetches land)
        self._router = router
        self._revisions = revisions
        self._fanout = fanout
        self._trust = trust
        self._source_name = source_name  # (in words: "listener", "replication stream")
        self._connected_before = False
        self._told_connected: list[Callable[[], None]] = []
        self._told_reload: list[Callable[[str], None]] = []
        self._check_catalog: Callable[[], Awaitable[None]] | None = None
        self._schema_batch = 0  # the newest batch of a reload or failure for a schema change
        self.numbered_apart = 0  # commits numbered past their log position (see _numbered_apart)

    @property
    def stats(self) -> RouterStats:
        return self._router.stats

    def hears(self, schema: str, table: str) -> bool:
        """Whether changes of PostgreSQL table ``schema.table`` matter to a cached table."""
        return self._router.hears(schema, table)

    def attach(
        self,
        source: TokenSender,
        barrier_timeout: float = 30.0,
        check_catalog: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Read barriers go through ``source``: its tokens come back ordered with its changes.
        With ``check_catalog`` (``CatalogWatch.verify``), each round also checks the catalog:
        DDL sends no notification."""
        self._check_catalog = check_catalog
        check = self._barrier_check if check_catalog is not None else None
        self._trust.use_barrier(Barrier(source.send_token, timeout=barrier_timeout, check=check))

    async def _barrier_check(self) -> int:
        """A barrier round's catalog check; the newest batch a schema change made (the
        round covers it: a reload the check started, or one a check under way started)."""
        assert self._check_catalog is not None
        await self._check_catalog()
        return self._schema_batch

    def on_reload(self, callback: Callable[[str], None]) -> None:
        """Call ``callback`` with a table's name each time it is reloaded for a schema change
        (a source that builds rows describes the table again)."""
        self._told_reload.append(callback)

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each (re)connection's rebuild has begun."""
        self._told_connected.append(callback)

    # ------------------------------------------------------------ the source's side (source.ChangeSink)

    def source_connected(self, at: int | None = None, exact: bool = False, epoch: str | None = None) -> None:
        """LISTEN is active: (re)build every table, in a new epoch.

        Notifications sent while no connection listened are lost, so memory
        is rebuilt from scratch: full tables reload, lazy tables empty. A source
        that numbers changes by their position in its log gives the position the
        rebuild is at (``at``); ``exact``: the loads read the database exactly as of
        it (an exported snapshot), so tables whose changes bring rows store them.
        Such a source may also give the ``epoch`` (its log's history, the same on every
        sidecar reading it): a rebuild then keeps it, and only the Watch history starts
        again at ``at`` (every subscriber is still reset: its stream broke here).
        """
        rebuild = self._connected_before
        self._connected_before = True
        before = self._revisions.epoch
        seq = self._revisions.begin_epoch(rebuild, at, epoch)
        epoch = self._revisions.epoch
        if rebuild:
            log.info(
                "rebuilding every table after reconnect (%s epoch %s, history from revision %d)",
                "same" if epoch == before else "new",
                epoch,
                seq,
                extra={"event": "rebuild", "epoch": epoch},
            )
        self._trust.set_up(True)
        self._fanout.start(epoch, seq, f"cache rebuilt after the {self._source_name} reconnected" if rebuild else None)
        for table in self._tables.values():
            if isinstance(table, FullTable):
                table.rebuild(seq, exact)
            else:
                table.rebuild(seq)
        self._revisions.advance()
        for callback in self._told_connected:
            callback()

    def source_lost(self, reason: str) -> None:
        """Notifications may be missed from now on: stop trusting memory.

        Waiting readers are released to read from the database (which is
        fresher than any revision they waited for); barriers fail.
        """
        self._trust.lost(f"{self._source_name} down ({reason})")
        for full in self._full.values():
            full.reroute()
        self._revisions.release_all()

    def handle(self, event: Event) -> None:
        """Apply one parsed notification (called synchronously by the listener)."""
        if isinstance(event, SyncToken):
            barrier = self._trust.barrier
            if barrier is not None and barrier.token_received(event.token, self._revisions.seq):
                self._revisions.advance()
            return
        self._router.route(event)
        self._revisions.advance()

    def transaction(self, position: int, xid: int, events: Sequence[Event]) -> None:
        """One committed transaction's events, whole, numbered by its commit ``position``
        (a source that sees transactions whole: logical decoding). A read barrier's token
        among them counts from the transaction before."""
        revisions, route = self._revisions, self._router.route
        opened = False
        tokens: list[SyncToken] = []
        for event in events:  # (one pass: this runs for every transaction of the stream)
            if isinstance(event, (RowChange, TableChange)):
                if not opened:
                    if revisions.open_commit(position, xid) != position:
                        self._numbered_apart(position)
                    opened = True
                route(event)
            elif isinstance(event, SyncToken):
                tokens.append(event)
        if opened:
            revisions.close_commit()
        for token in tokens:
            self.handle(token)

    def _numbered_apart(self, position: int) -> None:
        """A commit could not be numbered by its log position: batches of the sidecar's own
        since the last commit (reloads, invalidations) took numbers up to it. This sidecar's
        own history stays consistent, but its numbers from here on are not other sidecars'
        of the same history: said loudly, counted (``numbered_apart``)."""
        self.numbered_apart += 1
        log.warning(
            "commit at %s numbered %s: batches of the sidecar's own reached its log position, so "
            "revisions here no longer match other sidecars decoding the same database (a follower "
            "switching hubs may rebuild or miss changes until this sidecar restarts its stream)",
            position,
            self._revisions.seq,
            extra={"event": "numbered_apart", "position": position, "revision": self._revisions.seq},
        )

    def streamed(self, name: str) -> bool:
        """Whether the changes of cached table ``name`` should bring their rows (a full
        table read whole, not a relation or a filtered one) -- the source decides whether
        it can build them."""
        table = self._full.get(name)
        return table is not None and not table.schema.config.is_relation and not table.schema.config.where

    def take_rows(self, name: str, on: bool) -> None:
        """Whether the next exact rebuild lets full table ``name`` store the rows its
        changes bring (the source can build them exactly) or refetch them."""
        table = self._full.get(name)
        if table is not None:
            table.streams = on

    def cached_row(self, name: str, key: Key) -> bytes | None:
        """The row (cache entry) a full table holds for ``key`` while it takes rows from
        its changes (what an UPDATE that did not send an unchanged TOASTed value keeps)."""
        table = self._full.get(name)
        return table.row_before(key) if table is not None else None

    async def until_loaded(self) -> None:
        """Return once every full table's (re)load asked for before the call has landed
        (or failed as it would again)."""
        for table in self._full.values():
            while table.reloading and table.problem is None:
                with contextlib.suppress(Unavailable, Rerouted):  # (a failed attempt is retried)
                    await table.until_reloaded()

    # ------------------------------------------------------------ the sidecar's own changes

    async def invalidate(
        self,
        table: TableCache,
        raw_keys: Sequence[Sequence[Any]] | None,
        keys: list[Key] | None,
        refresh: bool,
        credentials: tuple[str, ...],
    ) -> Revision | None:
        """Drop cached rows of ``table`` (all of them when ``keys`` is None), as a batch of
        the sidecar's own; with ``refresh``, return once they are read again."""
        full = self._full.get(table.schema.qualified)
        if full is not None and full.streamed:
            # Its rows come with every change in the log, in commit order: nothing can have
            # been missed, so nothing is dropped (a refetch would end taking rows from the
            # stream). Watchers still hear of it; ``refresh`` returns once every commit
            # before the call is applied, which is what a refetch would have shown.
            self._router.invalidate(full, keys, drop=False)
            self._revisions.advance()
            barrier = self._trust.barrier
            if refresh and self._trust.up and barrier is not None:
                await barrier.wait()
            return None
        self._router.invalidate(self._tables[table.schema.qualified], keys)
        self._revisions.advance()
        if refresh and self._trust.up and table.loaded and (keys or table.holds_all_rows):
            try:
                await table.get_many(keys or [])
            except Reloading:  # (a whole-table refresh: reads do not wait for it, this does)
                await self._full[table.schema.qualified].until_reloaded()
        return None  # (applied here already: nothing to wait for)

    def reload_table(self, name: str, why: str) -> None:
        """Reload a cached table from scratch (its definition changed, or it can be served again)."""
        self._router.reload(name, why)
        self._schema_batch = self._revisions.seq
        self._revisions.advance()
        for callback in self._told_reload:
            callback(name)

    def fail_table(self, name: str, problem: str) -> None:
        """Stop serving a cached table from memory (reads go to the database) because of ``problem``."""
        seq = self._revisions.seq
        self._router.fail(name, problem)
        if self._revisions.seq != seq:  # (no batch when the table was not served for that already)
            self._schema_batch = self._revisions.seq
        self._revisions.advance()

    def problem(self, name: str) -> str | None:
        return self._tables[name].problem

    async def close(self) -> None:
        for table in self._tables.values():
            await table.close()

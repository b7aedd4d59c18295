"""An upstream sidecar as a change source (``source.ChangeSource`` for a follower).

The follower streams the upstream's ``Watch``: ``initial_state`` first (every
full table's rows at one revision), then its change batches, which carry rows,
so no row is fetched twice. The batches come numbered and the numbers are kept
(``source.NumberedSink``): a follower's revisions are its upstream's.

Losing the stream (an error, the upstream ending it, or silence: with a
progress interval asked for, no message for ``stall_timeout`` seconds means the
link is dead) stops trusting memory, then the stream is resumed from the last
applied revision -- on whichever upstream answers: one of the same epoch (in
logical capture every hub of the same database's history) resumes it, after
catching up if it was behind; if the upstream no longer has it (``OUT_OF_RANGE``,
a reset, another epoch) the follower rebuilds from a new initial state (never one
older than what it served) and resets its own watchers. It follows again (health SERVING) once it has applied the
upstream's revision of the moment it reconnected.

A read barrier is one ``Sync`` on the upstream (the same channel as the
stream), then waiting until the stream has brought that revision; the engine's
``Barrier`` shares rounds between callers.

A whole-table change of a full table (TRUNCATE, a bulk statement, an
invalidation, a reload) carries no rows: the table's rows are read again from
a second ``Watch(initial_state)`` of just that table, and the batches up to
that snapshot's revision change its rows no more (theirs are older). The
upstream sends those rows only once its own reload of the table landed, so
that stream's silence is no stall while the upstream answers ListTables (for
up to ``cache.stall_seconds``, when the upstream's health gives up too): the
follower keeps serving meanwhile.

Each hub also makes batches of its own, numbered after the last commit it had: a
table reloaded for a schema change its catalog check found, one it stops serving,
one it can serve again. Another hub of the same history makes them at other
numbers (or not yet), so a follower resumed on another hub may have missed one;
``UpstreamSource._reconcile`` makes up for it from the new upstream's ListTables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core.aio import backoff_delay
from sidecar.core.fanout import SNAPSHOT, TABLE_CHANGED, TABLE_WIDE
from sidecar.core.keys import coerce_single
from sidecar.core.revisions import Revision
from sidecar.core.schema import TableSchema
from sidecar.core.source import FollowState, NumberedSink, Rows, SourceBatch, SourceChange
from sidecar.core.wire import entry
from sidecar.errors import InvalidKey, SchemaError, SidecarError, Unavailable
from sidecar.fleet.upstream import Upstream, UpstreamDatabase, key_of, revision_of, table_schema

log = logging.getLogger(__name__)

MAX_EVENTS = 1_000_000  # more events than this in one message is no sidecar's


@dataclass(frozen=True)
class Reread:
    """A full table's every row again, as the upstream sent them."""

    rows: Rows
    at: int  # the upstream's revision they are as of
    problem: str | None  # the upstream does not serve the table from memory (then no rows)
    definition: str  # the upstream's definition of the table when they were read


def _shape(schema: TableSchema) -> tuple[Any, ...]:
    """What a follower's cache of a table is built on: its mode, key and indexes, and the
    columns they read, typed (``table_schema`` of the upstream's listing)."""

    def typed(columns: Any) -> tuple[tuple[str, str, str, bool], ...]:
        return tuple((c.name, c.type_name, c.sql_type, c.enum) for c in columns)

    config = schema.config
    return (
        config.mode,
        typed(schema.key_columns),
        typed(c for _, c in sorted(schema.columns.items())),
        config.indexes,
    )


class Lost(Exception):
    """The stream broke; resume it from the last applied revision."""


class Rebuild(Exception):
    """The upstream cannot resume from our revision: start over from its initial state."""


class UpstreamSource:
    """``source.ChangeSource`` over an upstream sidecar's Watch, Sync and reads."""

    def __init__(
        self,
        upstream: Upstream,
        schemas: Mapping[str, TableSchema],
        *,
        progress_interval: float = 1.0,
        stall_timeout: float = 5.0,
        reconnect_min_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        reread_patience: float = 30.0,
    ) -> None:
        self.upstream = upstream
        self._schemas = dict(schemas)
        self.progress_interval = progress_interval
        self.stall_timeout = stall_timeout
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        # A table read again waits for the upstream's reload of it, silently: not a stall
        # while the upstream answers, up to this long (its own health gives up then too).
        self.reread_patience = reread_patience
        self._database = UpstreamDatabase(upstream, strong=True)
        self._sink: NumberedSink | None = None
        self.epoch = ""  # the upstream's epoch we follow ("" before the first initial state)
        self.received = 0  # its last revision received (and applied: batches apply as they come)
        self.stream_up = False
        self.following = False
        self._caught_up_at: int | None = None  # following again once this revision is received
        self._head: Revision | None = None  # the newest upstream revision known of
        self._behind_since: float | None = None  # following, but not applied the head yet since
        self._lost_at: float | None = time.monotonic()  # not following since
        self._fresh: dict[str, int] = {}  # full table -> revision its rows were sent again at
        # Full table -> the upstream's definition (ListTables) when its rows were read; shared
        # with the core, whose ListTables passes it on (a follower may have followers).
        self.definitions: dict[str, str] = {}
        self._unserved: dict[str, str] = {}  # full tables not served from memory, and why
        self._untold: set[str] = set()  # tables reconciled at a resume: watchers hear of it next batch
        self.reconciled = 0  # tables read again or stopped serving by ``_reconcile``
        self._arrivals: list[tuple[Revision, asyncio.Future[None]]] = []
        self._progressed = False  # the current stream brought something
        self.resumes = 0
        self.rebuilds = 0

    @property
    def database(self) -> UpstreamDatabase:
        """Pass-through reads (memory not trusted): the upstream's, behind its read barrier."""
        return self._database

    def state(self) -> FollowState:
        head = self._head.number if self._head is not None and self._head.epoch == self.epoch else self.received
        since = self._behind_since if self.following else self._lost_at
        return FollowState(
            target=self.upstream.target,
            stream_up=self.stream_up,
            following=self.following,
            epoch=self.epoch,
            upstream_revision=max(head, self.received),
            behind_revisions=max(0, head - self.received),
            behind_seconds=0.0 if since is None else time.monotonic() - since,
            resumes=self.resumes,
            rebuilds=self.rebuilds,
        )

    # ------------------------------------------------------------ following

    async def follow(self, sink: NumberedSink) -> None:
        self._sink = sink
        attempt = 0
        rebuild: str | None = None  # why the next stream starts over (None: resume, if there is an epoch)
        while True:
            self._progressed = False
            try:
                if not self.epoch or rebuild is not None:
                    await self._stream(None, rebuild)
                else:
                    await self._stream(Revision(self.epoch, self.received), None)
                why = "the upstream ended the stream"
            except Rebuild as exc:
                rebuild = str(exc)
                self._lose(rebuild)
                log.warning(
                    "rebuilding from %s's initial state: %s",
                    self.upstream.target,
                    rebuild,
                    extra={"event": "upstream_rebuild", "reason": rebuild},
                )
                continue
            except Lost as exc:
                why = str(exc)
            except grpc.aio.AioRpcError as exc:
                # (a stream that was up lost its connection: no handshake to blame)
                why = self.upstream.explain(exc, established=self.stream_up)
            except SidecarError as exc:  # (the upstream's answers: unreachable, refused, not a sidecar's)
                why = str(exc)
            if self._progressed:  # (a stream that brought something: the next try is a fresh start)
                attempt = 0
                rebuild = None
            self._lose(why)
            delay = backoff_delay(attempt, self.reconnect_min_delay, self.reconnect_max_delay)
            attempt += 1
            log.warning(
                "lost the stream from %s (%s); resuming in %.2fs",
                self.upstream.target,
                why,
                delay,
                extra={"event": "upstream_lost", "reason": why},
            )
            await asyncio.sleep(delay)
            if await self.upstream.renew_if_rotated():
                log.info(
                    "the certificate files for %s changed: connecting with the new ones",
                    self.upstream.target,
                    extra={"event": "upstream_certificates_renewed"},
                )

    def _lose(self, reason: str) -> None:
        was = self.stream_up or self.following
        if self.following:
            self._lost_at = time.monotonic()
        self.stream_up = False
        self.following = False
        self._caught_up_at = None
        for _, future in self._arrivals:
            if not future.done():
                future.set_exception(Unavailable(f"lost the stream from {self.upstream.target}: {reason}"))
        self._arrivals = []
        if was and self._sink is not None:
            self._sink.source_lost(reason)

    async def _stream(self, start: Revision | None, reason: str | None) -> None:
        """One Watch stream: from the initial state (``start`` None) or resumed after ``start``,
        until it breaks (``_progressed`` says whether it brought anything)."""
        assert self._sink is not None
        names = list(self._schemas)
        request = pb.WatchRequest(
            tables=names, progress_interval_ms=max(1, int(self.progress_interval * 1000)), accept_batches=True
        )
        listed: dict[str, pb.TableInfo] = {}
        if start is None:
            request.initial_state = True
            listed = await self._served()
        else:
            request.start_revision.CopyFrom(pb.Revision(epoch=start.epoch, number=start.number))
        call = self.upstream.stub.Watch(request)
        try:
            await self._established(call, start)
            snapshot: dict[str, Rows] | None = None
            if start is None:
                snapshot = {
                    n: {}
                    for n, s in self._schemas.items()
                    if s.config.mode == "full" and n in listed and not listed[n].problem
                }
            else:
                # Following again once it has what the upstream had when the stream was back.
                listing = await self.upstream.list_tables()
                head = revision_of(listing.revision)
                if head.epoch != self.epoch:
                    raise Rebuild(f"the upstream is in another epoch now ({self.epoch} -> {head.epoch})")
                self._learn(head)
                await self._reconcile(listing)
                self._caught_up_at = head.number
                self._check_caught_up()
            async for message in self._messages(call):
                kind = message.WhichOneof("kind")
                if kind == "changes":
                    if snapshot is not None:
                        self._snapshot_rows(snapshot, message.changes)
                    else:
                        await self._batch(message.changes)
                        self._progressed = True
                elif kind == "initial_state_done":
                    if snapshot is None:
                        raise Lost("the upstream sent an initial state nobody asked for")
                    self._began(revision_of(message.initial_state_done.revision), snapshot, listed, reason)
                    snapshot = None
                    self._progressed = True
                elif kind == "progress":
                    self._progress(revision_of(message.progress.revision))
                    self._progressed = True
                elif kind == "reset":  # (on any stream: its initial state again, from a new listing)
                    raise Rebuild(f"the upstream was rebuilt ({message.reset.reason[:200]})")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise Rebuild(
                    f"the upstream cannot resume from {self.epoch}/{self.received}: {exc.details()}"
                ) from None
            raise
        finally:
            call.cancel()

    async def _served(self) -> dict[str, pb.TableInfo]:
        """The upstream's listing of the followed tables, once it has loaded them (its initial
        state waits for that, silently: longer than a stall); those without a problem it
        serves from memory."""
        while True:
            listing = await self.upstream.list_tables()
            infos = [t for t in listing.tables if t.name in self._schemas]
            if all(t.loaded or t.problem for t in infos):
                return {t.name: t for t in infos}
            log.info("waiting for %s to load its tables", self.upstream.target)
            await asyncio.sleep(self.progress_interval)

    async def _established(self, call: Any, start: Revision | None) -> None:
        """The stream's headers came (it is subscribed), or the upstream refused it."""
        try:
            async with asyncio.timeout(self.stall_timeout + self.upstream.timeout):
                metadata = await call.initial_metadata()
        except TimeoutError:
            raise Lost(f"no answer from {self.upstream.target} to Watch") from None
        if not any(key == "cachesidecar-epoch" for key, _ in metadata or ()):
            code = await call.code()
            details = await call.details()
            if code == grpc.StatusCode.OUT_OF_RANGE and start is not None:
                raise Rebuild(f"the upstream cannot resume from {start}: {details}")
            if code == grpc.StatusCode.OK:
                raise Lost(f"{self.upstream.target} does not speak the Watch protocol (no epoch header)")
            raise Lost(f"Watch refused: {code.name}: {details}")
        self.stream_up = True
        if start is not None:
            log.info(
                "resuming the stream from %s at revision %s",
                self.upstream.target,
                start,
                extra={"event": "upstream_resume", "revision": str(start)},
            )

    async def _messages(self, call: Any, patient: bool = False) -> Any:
        """The stream's messages (the one place that reads Watch); silence beyond the
        stall timeout is a dead link -- unless ``patient`` (a table read again: the
        upstream sends its rows once its reload of them landed) and the upstream answers."""
        while True:
            try:
                if patient:
                    message = await self._patiently(call)
                else:
                    async with asyncio.timeout(self.stall_timeout):
                        message = await call.read()
            except TimeoutError:
                raise Lost(f"no message for {self.stall_timeout:g}s (the stream stalled)") from None
            if message is grpc.aio.EOF:
                code = await call.code()
                raise Lost(f"the stream ended: {code.name}: {await call.details()}")
            if message.WhichOneof("kind") == "batches":  # (several at once: a follower behind, or under load)
                for batch in message.batches.batches:
                    yield pb.WatchResponse(changes=batch)
                continue
            yield message

    async def _patiently(self, call: Any) -> Any:
        """The next message, however long it takes while the upstream answers ListTables
        each stall timeout (up to ``reread_patience``). The read is never cancelled
        meanwhile: cancelling a read cancels the call."""
        read = asyncio.ensure_future(call.read())
        began = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=self.stall_timeout)
                if done:
                    return read.result()
                waited = time.monotonic() - began
                if waited > self.reread_patience:
                    raise Lost(f"no rows for {waited:.0f}s while reading a table again")
                try:
                    await self.upstream.list_tables()  # (it is reloading the table, or it is gone)
                except SidecarError as exc:
                    raise Lost(f"no message for {self.stall_timeout:g}s, and no answer: {exc}") from None
        finally:
            if not read.done():
                read.cancel()

    # ------------------------------------------------------------ what comes

    def _began(
        self, revision: Revision, snapshot: dict[str, Rows], listed: Mapping[str, pb.TableInfo], reason: str | None
    ) -> None:
        assert self._sink is not None
        first = not self.epoch
        if revision.epoch == self.epoch and revision.number < self.received:
            # Another upstream of the same history (a hub behind the one followed before):
            # rebuilding from its state would take back revisions served already.
            raise Lost(
                f"the upstream's initial state is at {revision}, behind revision {self.received} of the "
                "same epoch that this follower served already; trying again"
            )
        self.epoch, self.received = revision.epoch, revision.number
        self._fresh.clear()
        self._untold.clear()
        self._unserved.clear()
        self.definitions.clear()
        for name, schema in self._schemas.items():
            if schema.config.mode != "full":
                continue
            if name in snapshot:  # (the listing came before the rows: at worst, an older definition)
                self.definitions[name] = listed[name].definition
            else:
                self._unserved[name] = "the upstream does not serve it from memory"
        self._learn(revision)
        if not first:
            self.rebuilds += 1
        self._sink.epoch_began(revision.epoch, revision.number, snapshot, None if first else reason or "rebuilt")
        self.following = True
        self._lost_at = None
        self._caught_up_at = None
        self._arrived()
        log.info(
            "following %s from its revision %s (%d rows)",
            self.upstream.target,
            revision,
            sum(len(rows) for rows in snapshot.values()),
            extra={"event": "upstream_following", "revision": str(revision)},
        )

    def _snapshot_rows(self, snapshot: dict[str, Rows], batch: pb.ChangeBatch) -> None:
        events = batch.events
        if len(events) > MAX_EVENTS:
            raise Lost(f"a message of {len(events)} events")
        # A one-column key's values are gathered and coerced a message at a time (an
        # initial state is a million of them); other keys one by one.
        single: dict[str, tuple[list[Any], list[bytes]]] = {}
        table = ""
        try:
            for event in events:
                table = event.table
                schema = self._schemas.get(table)
                if schema is None or event.operation != SNAPSHOT or not event.has_row:
                    continue
                parts = event.key.parts
                if len(schema.key_columns) == 1 and len(parts) == 1:
                    part = parts[0]
                    kind = part.WhichOneof("kind")
                    if kind is None:
                        raise InvalidKey("a key part without a value")
                    values, rows = single.setdefault(table, ([], []))
                    values.append(getattr(part, kind))
                    rows.append(event.row)
                else:
                    snapshot.setdefault(table, {})[key_of(schema.key_columns, event.key)] = entry(event.row)
            for table, (values, rows) in single.items():
                keys = coerce_single(self._schemas[table].key_columns, values)
                snapshot.setdefault(table, {}).update(zip(keys, map(entry, rows), strict=True))
        except InvalidKey as exc:
            raise Lost(f"the upstream sent a key of {table} that does not fit: {exc}") from None

    async def _batch(self, batch: pb.ChangeBatch) -> None:
        assert self._sink is not None
        revision = revision_of(batch.revision)
        if revision.epoch != self.epoch:
            raise Rebuild(f"the upstream's batch {revision} is of another epoch than {self.epoch}")
        if revision.number <= self.received:
            return  # (already applied)
        if len(batch.events) > MAX_EVENTS:
            raise Lost(f"a message of {len(batch.events)} events")
        out = SourceBatch(revision.number, batch.xid)
        again: set[str] = set()
        for event in batch.events:
            schema = self._schemas.get(event.table)
            if schema is None:
                continue
            full = schema.config.mode == "full"
            op = event.operation
            try:
                key = key_of(schema.key_columns, event.key) if event.HasField("key") else None
                old_key = key_of(schema.key_columns, event.old_key) if event.HasField("old_key") else None
            except InvalidKey as exc:
                log.warning("%s: the upstream sent a key that does not fit (%s); reloading it", event.table, exc)
                out.changes.append(SourceChange(event.table, TABLE_CHANGED))
                if full:
                    again.add(event.table)
                continue
            if full and (key is None or op in TABLE_WIDE):
                again.add(event.table)  # no rows come with these: the table is sent again
            # (a keyed INVALIDATE of a full table carries the row refetched since, as any change)
            fresh = self._fresh.get(event.table, -1) >= revision.number or event.table in again
            row = entry(event.row) if full and event.has_row else None
            out.changes.append(SourceChange(event.table, op, key, old_key, row, apply=not fresh, ahead=event.ahead))
        reread: dict[str, Reread] = {}
        for name in again:
            reread[name] = got = await self._reload(name)
            if got.problem is not None:
                out.failed[name] = got.problem
            else:
                out.reloaded[name] = got.rows
            self._fresh[name] = got.at
        self._tell_reconciled(out)
        self._sink.batch(out)
        self._held(reread)
        self.received = revision.number
        self._learn(revision)
        self._arrived()
        self._check_caught_up()

    def _progress(self, revision: Revision) -> None:
        assert self._sink is not None
        if revision.epoch != self.epoch:
            raise Rebuild(f"the upstream's progress mark {revision} is of another epoch than {self.epoch}")
        if revision.number > self.received:
            self.received = revision.number
            told = SourceBatch(revision.number)
            if self._tell_reconciled(told):  # (a revision of the upstream's to tell watchers at)
                self._sink.batch(told)
            else:
                self._sink.progress(revision.number)
        self._learn(revision)
        self._arrived()
        self._check_caught_up()

    async def _reload(self, name: str) -> Reread:
        """A full table's every row again (a second Watch of just it, on the same channel)."""
        # (its definition listed before the rows are read: at worst an older one, read again later)
        try:
            listed = await self.upstream.list_tables()
        except SidecarError as exc:
            raise Lost(f"no answer before reading {name} again: {exc}") from None
        definition = next((t.definition for t in listed.tables if t.name == name), "")
        request = pb.WatchRequest(tables=[name], initial_state=True, accept_batches=True)
        call = self.upstream.stub.Watch(request)
        rows: dict[str, Rows] = {name: {}}
        try:
            await self._established(call, None)
            async for message in self._messages(call, patient=True):
                kind = message.WhichOneof("kind")
                if kind == "changes":
                    self._snapshot_rows(rows, message.changes)
                elif kind == "initial_state_done":
                    at = revision_of(message.initial_state_done.revision)
                    if at.epoch != self.epoch:
                        raise Rebuild(f"the upstream is in another epoch now ({self.epoch} -> {at.epoch})")
                    break
                elif kind == "reset":
                    raise Rebuild(f"the upstream was rebuilt ({message.reset.reason[:200]})")
        finally:
            call.cancel()
        # An empty answer is an empty table, or one the upstream stopped serving: it says which.
        listing = await self.upstream.list_tables()
        info = next((t for t in listing.tables if t.name == name), None)
        problem = None
        if info is None:
            problem = "the upstream no longer serves it"
        elif info.problem:
            problem = f"the upstream does not serve it from memory: {info.problem[:500]}"
        log.info(
            "%s: its rows came again from %s (%d rows at revision %s)",
            name,
            self.upstream.target,
            len(rows[name]),
            at,
            extra={"event": "table_reloaded", "table": name},
        )
        return Reread(rows[name], at.number, problem, definition)

    def _held(self, reread: Mapping[str, Reread]) -> None:
        """Tables read again (or found not served) are now so in the core's memory."""
        for name, got in reread.items():
            if got.problem is not None:
                self._unserved[name] = got.problem
                self.definitions.pop(name, None)
            else:
                self._unserved.pop(name, None)
                self.definitions[name] = got.definition

    # ------------------------------------------------------------ resuming on another upstream

    async def _reconcile(self, listing: pb.ListTablesResponse) -> None:
        """Make memory agree with the upstream the stream resumed on, before following it again.

        Besides the commits of the database's log, each hub numbers batches of its own
        making, after the last commit it had: a table reloaded for a schema change its
        catalog check found, one it stopped serving, one it serves again. Those are that
        hub's alone, made when it chooses: another hub of the same history made them at
        other numbers, or not yet. A follower resumed on another hub from its last revision
        may so have missed one whose number is below it (it would then serve a table's rows
        without a column added, until each row changes; or a table the upstream no longer
        serves, from memory, with no end). So the upstream's ListTables is compared with
        what memory holds: a full table it does not serve (or whose key or indexes are not
        the ones this follower was built for) stops being served here too, as its fail batch
        would do; one it serves whose ``definition`` differs from the one its rows were read
        with, or that this follower does not serve, is read again (``_reload``).

        Ordering: a listing may be older than this follower's memory (the hub's catalog check
        not yet run since a DDL another hub acted on; the hub behind this follower's
        revision). So when anything differs, one Sync on the upstream first -- its barrier
        acts on every DDL committed before it began and applies every commit before it --
        and a listing after it is what counts (else, back on a hub that has not checked its
        catalog yet, the follower would read again rows that hub is about to reload; trusting
        memory again waits for a barrier round anyway, which would bring that reload). Rows
        read again are as of a revision not below what this follower served (else the stream
        is given up and resumed later); batches up to that revision apply none of their rows
        to the table (``_fresh``). Memory changes now, while reads still pass through to the
        upstream; watchers hear a whole-table change of each table with the next revision
        the upstream sends (no number of this follower's own: the upstream's next batch may have it)."""
        assert self._sink is not None
        if not self._differences(listing):
            return
        await self.upstream.sync(self.upstream.timeout)
        listing = await self.upstream.list_tables()
        head = revision_of(listing.revision)
        if head.epoch != self.epoch:
            raise Rebuild(f"the upstream is in another epoch now ({self.epoch} -> {head.epoch})")
        self._learn(head)
        reread: dict[str, Reread] = {}
        for name, problem in self._differences(listing).items():
            if problem is not None:
                reread[name] = Reread({}, self.received, problem, "")
                continue
            got = await self._reload(name)
            if got.at < self.received:
                raise Lost(
                    f"the upstream sent {name} again as of revision {got.at}, behind revision {self.received} "
                    "that this follower served already; trying again"
                )
            reread[name] = got
        if not reread:
            return
        for name, got in reread.items():
            if got.problem is None:
                self._fresh[name] = got.at
        self._sink.reconciled(
            {name: got.rows for name, got in reread.items() if got.problem is None},
            {name: got.problem for name, got in reread.items() if got.problem is not None},
        )
        self._held(reread)
        self._untold.update(reread)
        self.reconciled += len(reread)
        log.warning(
            "resumed on %s, which serves %s otherwise than memory held: %s",
            self.upstream.target,
            ", ".join(sorted(reread)),
            "; ".join(
                f"{name}: {'read again' if got.problem is None else 'not served: ' + got.problem}"
                for name, got in sorted(reread.items())
            ),
            extra={"event": "upstream_reconciled", "tables": sorted(reread)},
        )

    def _differences(self, listing: pb.ListTablesResponse) -> dict[str, str | None]:
        """Full tables memory holds otherwise than ``listing`` says the upstream serves them:
        each with why it is not to be served (None: to be read again)."""
        infos = {t.name: t for t in listing.tables}
        differ: dict[str, str | None] = {}
        for name, schema in self._schemas.items():
            if schema.config.mode != "full":
                continue  # (a lazy table's rows are the upstream's answers: nothing held to differ)
            info = infos.get(name)
            problem: str | None = None
            if info is None:
                problem = "the upstream no longer serves it"
            elif info.problem:
                problem = f"the upstream does not serve it from memory: {info.problem[:500]}"
            else:
                try:
                    theirs = _shape(table_schema(info))
                except SchemaError as exc:
                    problem = f"the upstream lists it so that it cannot be followed: {exc}"
                else:
                    if theirs != _shape(schema):
                        problem = (
                            "its key, indexes or their columns on the upstream are not the ones this follower "
                            "was started with; restart the follower to cache the new shape"
                        )
            if problem is not None:
                if name not in self._unserved:
                    differ[name] = problem
            elif name in self._unserved or (
                info is not None
                and info.definition
                and info.definition != (self.definitions.get(name) or info.definition)
            ):
                differ[name] = None
        return differ

    def _tell_reconciled(self, out: SourceBatch) -> bool:
        """The whole-table changes a resume's reconciling made, told in ``out`` (whether any)."""
        if not self._untold:
            return False
        out.changes[:0] = [SourceChange(name, TABLE_CHANGED, apply=False) for name in sorted(self._untold)]
        self._untold.clear()
        return True

    # ------------------------------------------------------------ progress and barriers

    def _learn(self, revision: Revision) -> None:
        """The upstream has reached ``revision``."""
        if revision.epoch != self.epoch:
            return
        if self._head is None or self._head.epoch != revision.epoch or revision.number > self._head.number:
            self._head = revision
        if self.received < self._head.number:
            if self._behind_since is None:
                self._behind_since = time.monotonic()
        else:
            self._behind_since = None

    def _check_caught_up(self) -> None:
        if self._caught_up_at is not None and self.received >= self._caught_up_at:
            self._caught_up_at = None
            self.following = True
            self._lost_at = None
            self.resumes += 1
            assert self._sink is not None
            self._sink.resumed()
            log.info(
                "following %s again at revision %s/%d (resumed: nothing missed, no rebuild)",
                self.upstream.target,
                self.epoch,
                self.received,
                extra={"event": "upstream_resumed", "revision": f"{self.epoch}/{self.received}"},
            )

    def _arrived(self) -> None:
        waiting = []
        for revision, future in self._arrivals:
            if future.done():
                continue
            if revision.epoch == self.epoch and self.received >= revision.number:
                future.set_result(None)
            else:
                waiting.append((revision, future))
        self._arrivals = waiting

    async def send_token(self, token: str) -> None:
        """One Sync on the upstream, then the token comes back once the stream brought
        that revision (the barrier then waits until it is applied)."""
        assert self._sink is not None
        revision = await self.upstream.sync(self.upstream.timeout)
        if revision.epoch == self.epoch:
            self._learn(revision)
        if not (revision.epoch == self.epoch and self.received >= revision.number):
            # (another epoch: the stream is about to say so, and the follower to rebuild into it)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._arrivals.append((revision, future))
            await future
        self._sink.token_received(token)

"""PostgreSQL as a change source by logical decoding: one replication connection
streaming ``pgoutput`` from a temporary slot, the query pool for loads, barriers and
the rows a change cannot bring.

Why psycopg2 for the stream: it is the one maintained Python client of PostgreSQL's
replication protocol (asyncpg and psycopg 3 have none). It is used here only for the
replication connection: ``CREATE_REPLICATION_SLOT`` and ``START_REPLICATION`` run in a
thread (they block), then its socket is read from the event loop (``add_reader`` and
the non-blocking ``read_message``); everything else stays on asyncpg.

A start, gap-free: the slot is created with an exported snapshot; every full table
loads under that snapshot (``PgDatabase.snapshot``) while the replication connection
stays idle (the snapshot lives until it runs another command); then the stream starts
at the slot's consistent point. Memory is then exactly the database at that position,
and every transaction after it arrives once, whole, at its commit, in commit order.

A transaction's changes become events (keys, and for full tables read whole the rows
as ``row_to_json`` would make them, built by ``rowjson`` with no query), handed to the
sink at the commit, numbered by the commit's LSN (``NoticeIngest.transaction``). A
value that cannot be converted exactly, an unchanged TOASTed value the cached row does
not have, a column list that is not the cached table's: the change goes without rows,
and the table refetches from then on (see ``FullTable.streamed``).

A read barrier is a transactional ``pg_logical_emit_message`` carrying the token,
committed with ``synchronous_commit = on`` (its commit flushes the WAL before it: the
walsender sends only flushed WAL, so everything committed before the barrier comes
before the token, whatever writers' ``synchronous_commit`` says). A lost replication
connection is a lost listener: memory stops being trusted, and the next connection
rebuilds everything from a new slot. The epoch is the database's history
(``IDENTIFY_SYSTEM``: system identifier, database, timeline), not this process's:
every sidecar decoding the same database numbers the same commit alike, and a
rebuild keeps the epoch (only the Watch history starts again, at the new slot).

Everything the stream says is checked as it is read (``pgoutput`` raises on any
malformed message); a message this code does not expect ends the connection (a rebuild
follows) rather than being guessed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import asyncpg

from sidecar.core.aio import backoff_delay
from sidecar.core.events import Event, Op, RowChange, SyncToken, TableChange
from sidecar.core.jsonread import loads
from sidecar.core.keys import Key, KeyColumn, coerce_key
from sidecar.core.revisions import history_epoch
from sidecar.core.schema import TableSchema
from sidecar.core.wire import entry
from sidecar.core.wire import row_json as entry_row
from sidecar.core.xids import Visibility
from sidecar.errors import InvalidKey, Unavailable
from sidecar.identifiers import qualified_name
from sidecar.pg import pgoutput, rowjson
from sidecar.pg.db import CONNECTION_ERRORS, PINNED_SETTINGS, PgDatabase
from sidecar.pg.primary import Primary, replayed

log = logging.getLogger(__name__)

MESSAGE_PREFIX = "cache_sidecar_sync"  # pg_logical_emit_message's prefix of barrier tokens
MAX_TOKEN_BYTES = 64
# Row changes of one table buffered in one transaction before it counts as a bulk change
# (the table is then reloaded once, as a bulk statement's trigger asks in NOTIFY mode).
MAX_TRANSACTION_ROWS = 100_000
FEEDBACK_INTERVAL = 1.0  # seconds between standby status updates (the slot's confirmed position)
# Seconds between checks that the column types rows are built with are still the catalog's
# (a composite's field renamed sends no Relation message for the tables using it).
TYPES_CHECK_INTERVAL = 10.0
YIELD_EVERY = 500  # messages read in a row before other tasks get a turn
# Seconds of reading a backlog before other tasks get a turn (readers waiting for the commits
# applied meanwhile, barriers): a turn costs an event loop round, too much to give one per
# single-row transaction.
YIELD_INTERVAL = 0.001
# Seconds a slot's creation on a standby waits before (again) asking the primary for the
# running-transactions record it waits for.
NUDGE_INTERVAL = 1.0
FIRST_NUDGE_DELAY = 0.1
SLOT_CHECK_INTERVAL = 10.0  # seconds between reads of the slot's wal_status (max_slot_wal_keep_size)
# wal_status values of a slot past max_slot_wal_keep_size: the server invalidates it (at its
# next checkpoint) by ending its walsender, which looks to us like any terminated connection.
_PAST_KEEP_SIZE = ("unreserved", "lost")


class LogicalSink(Protocol):
    """What the stream tells the core (``notices.NoticeIngest``)."""

    def source_connected(self, at: int | None = None, exact: bool = False, epoch: str | None = None) -> None: ...
    def source_lost(self, reason: str) -> None: ...
    def transaction(self, position: int, xid: int, events: Sequence[Event]) -> None: ...
    def streamed(self, name: str) -> bool: ...
    def take_rows(self, name: str, on: bool) -> None: ...
    def reload_table(self, name: str, why: str) -> None: ...
    def on_reload(self, callback: Callable[[str], None]) -> None: ...
    def cached_row(self, name: str, key: Key) -> bytes | None: ...
    async def until_loaded(self) -> None: ...


@dataclass
class _Table:
    """What the stream needs to know of one published table the cache hears of."""

    schema: str
    name: str
    key: tuple[KeyColumn, ...]  # the columns an event's keys are made of (as the triggers' keys)
    qualified: str = ""  # the cached full table whose rows changes bring ("" : none now)
    candidate: str = ""  # the cached full table read whole of this name, if any
    relation: tuple[tuple[str, int], ...] = ()  # its columns as the stream's last Relation message said
    recheck: bool = False  # describe it again before the next message (its schema changed)
    columns: tuple[tuple[str, int], ...] = ()  # its columns (name, type) as row_to_json reads them
    types: dict[int, rowjson.TypeInfo] = field(default_factory=dict)
    label: str = ""  # schema.name, as logs name it
    # how a row of ``columns`` and ``types`` is built: per column, its '"name":' and its
    # conversion (made again when either is replaced: see ``_plan``)
    plan: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = ()
    plan_of: tuple[Any, Any] = (None, None)

    def __post_init__(self) -> None:
        self.label = f"{self.schema}.{self.name}"


@dataclass
class _Decoder:
    """One Relation message of a table the cache hears of, ready to turn tuples into events."""

    table: _Table
    relation: pgoutput.Relation
    key_positions: tuple[int, ...] | None  # the key columns in the tuple (None: not all there)
    key_in_identity: bool  # every key column is in the replica identity (old keys are sent)
    rows: bool  # build rows: the Relation's columns are the cached table's
    why_no_rows: str | None = None
    empties: bool = False  # a Truncate of it leaves the cached table empty


@dataclass
class _Transaction:
    xid: int
    position: int  # the commit's LSN (Begin's final LSN)
    events: list[Event] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # row changes per table
    bulk: set[str] = field(default_factory=set)  # tables past MAX_TRANSACTION_ROWS
    # rows so far, by table and key parts as sent (the newest last)
    latest: dict[tuple[str, tuple[Any, ...]], bytes | None] = field(default_factory=dict)


@dataclass
class SlotState:
    """The slot, for metrics and ListTables."""

    name: str = ""
    streaming: bool = False
    confirmed: int = 0  # the position confirmed to the server (applied)
    server_end: int = 0  # the server's end of WAL as last told
    received: int = 0  # the end of the last message received
    heard: float = 0.0  # time.monotonic() the server last sent anything (a change or a keepalive)
    wal_status: str = ""  # pg_replication_slots.wal_status as last read (checked every SLOT_CHECK_INTERVAL)


class LogicalSource:
    """``source.ChangeSource`` over a pgoutput stream and an asyncpg pool."""

    def __init__(
        self,
        database: PgDatabase,
        *,
        conninfo: str | None,
        publication: str,
        tables: Mapping[tuple[str, str], TableSchema],
        query_timeout: float,
        read_on_change: Collection[tuple[str, str]] = (),
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        reconnect_min_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        connect_timeout: float = 10.0,
        redact: Callable[[str], str] = lambda text: text,
        application_name: str = "cache-sidecar replication",
        primary: Primary | None = None,
    ) -> None:
        self._database = database
        # database.dsn is a hot standby: barrier tokens go to the primary, which replicates
        # them to the standby in WAL order (see primary.py); None: database.dsn is the primary.
        self._primary = primary
        self._fresh_next: asyncio.Future[None] | None = None  # database_fresh's round taking callers
        self._conninfo = conninfo or ""
        self.publication = publication
        self._heard = {name: _Table(name[0], name[1], schema.key_columns) for name, schema in tables.items()}
        # Tables a change of which makes the cache read the database (a relation's sources:
        # their refresh), besides changes that come without rows.
        self._read_on_change = frozenset(read_on_change)
        self.visibility_waits = 0  # transactions waited for until other sessions saw them
        self.query_timeout = query_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.connect_timeout = connect_timeout
        self._redact = redact
        self._application_name = application_name
        self.slot = SlotState()
        self.connects = 0
        self.losses = 0
        self.transactions = 0
        self._sink: LogicalSink | None = None
        self._conn: Any = None
        self._cursor: Any = None
        self._up = False
        self._readable: asyncio.Future[None] | None = None
        self._busy = False  # a command runs on the replication connection in a thread
        self.slot_check_interval = SLOT_CHECK_INTERVAL

    @property
    def database(self) -> PgDatabase:
        return self._database

    @property
    def up(self) -> bool:
        return self._up

    async def close(self) -> None:
        await self._close_connection()

    # ------------------------------------------------------------ the barrier

    async def send_token(self, token: str) -> None:
        """Emit ``token`` into the WAL (transactional, flushed): it comes back in the stream
        after every transaction committed before this call."""
        if not self._up:
            raise Unavailable("the replication stream is down")
        if self._primary is not None:
            await self._primary.emit(MESSAGE_PREFIX, token)
            return
        try:
            async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
                # One statement, one transaction, one round trip; its commit flushes the WAL
                # whatever synchronous_commit the role or database has (set for it alone).
                await conn.execute(_EMIT_SQL, MESSAGE_PREFIX, token, timeout=self.query_timeout)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise Unavailable(f"sending a barrier token: {type(exc).__name__}: {exc}") from None

    async def database_fresh(self) -> None:
        """Make the database (the query pool's) hold every commit completed before this
        call, for the reads it answers while the stream is down: at once on a primary; a
        standby is waited for until it has replayed the primary's WAL as of now (one
        statement on the primary; ``Unavailable`` after query_timeout)."""
        primary = self._primary
        if primary is None:
            return
        # Reads that come together share one round (one statement on the primary): a round
        # takes callers until it sends its statement, so it covers each of them.
        round_ = self._fresh_next
        if round_ is None:
            round_ = self._fresh_next = asyncio.ensure_future(self._fresh_round(primary))
        await asyncio.shield(round_)

    async def _fresh_round(self, primary: Primary) -> None:
        try:
            await asyncio.sleep(0)  # (the callers of this turn of the event loop join it)
        finally:
            self._fresh_next = None  # (callers from now on need a later round)
        await replayed(self._database.pool, await primary.current_position(), self.query_timeout)

    def promoted(self) -> None:
        """database.dsn is no longer a standby (promoted): barrier tokens are emitted there
        from now on. (Until this is known, a token sent to the former primary never reaches
        the stream: the barrier times out, nothing is answered stale.)"""
        if self._primary is not None:
            self._primary = None
            log.warning(
                "database.dsn was promoted: read barriers go to it now, not to database.primary_dsn",
                extra={"event": "standby_promoted"},
            )

    # ------------------------------------------------------------ following

    async def follow(self, sink: LogicalSink) -> None:
        """Stream until cancelled; each connection starts from a new slot and a rebuild."""
        if self._sink is None:
            sink.on_reload(self._schema_changed)
        self._sink = sink
        attempt = 0
        try:
            while True:
                try:
                    await self._run_once(sink)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # (any failure of the connection: a rebuild follows)
                    reason = self._redact(f"{type(exc).__name__}: {str(exc).strip()}".splitlines()[0][:300])
                    if self.slot.wal_status in _PAST_KEEP_SIZE:
                        reason += f" (slot {self.slot.name} had passed max_slot_wal_keep_size: invalidated)"
                    if self._up or attempt == 0:
                        log.warning(
                            "replication stream lost: %s", reason, extra={"event": "listener_down", "reason": reason}
                        )
                    else:
                        log.info("replication stream not connected: %s", reason)
                    # A stream that streamed was a success, as a LISTEN connection that connected
                    # is (listener.py): its loss waits the shortest delay, however many came before.
                    # Failures before streaming (slot, load, start) keep backing off.
                    if self.slot.streaming:
                        attempt = 0
                    self._lose(sink, reason)
                await asyncio.sleep(backoff_delay(attempt, self.reconnect_min_delay, self.reconnect_max_delay))
                attempt += 1
        finally:
            self._lose(sink, "stopped")
            await self._close_connection()

    def _lose(self, sink: LogicalSink, reason: str) -> None:
        was_up = self._up
        self._up = False
        self.slot.streaming = False
        self._database.snapshot = None
        if was_up or self.connects:
            self.losses += was_up
            sink.source_lost(reason)

    async def _run_once(self, sink: LogicalSink) -> None:
        await self._close_connection()
        self._conn, self._cursor = await asyncio.to_thread(self._connect)
        # (the columns before the snapshot: a change of them in between makes the stream's
        # Relation differ from them, and such a table refetches, rather than the other way)
        await self._prepare_tables()
        epoch = await self._blocking(self._identify)
        slot = f"cache_sidecar_{os.getpid()}_{secrets.token_hex(4)}"
        position, snapshot = await self._created(slot)
        self.slot = SlotState(name=slot, confirmed=position, received=position)
        # Every full table loads under the slot's snapshot: memory is then the database
        # exactly at ``position``, where the stream starts.
        self._database.snapshot = snapshot
        self.connects += 1
        self._up = True
        sink.source_connected(at=position, exact=True, epoch=epoch)
        try:
            await sink.until_loaded()
        finally:
            self._database.snapshot = None
        await self._blocking(self._start, slot, position)
        self.slot.streaming = True
        log.info(
            "streaming changes from slot %s at %s (publication %s)",
            slot,
            pgoutput.format_lsn(position),
            self.publication,
            extra={"event": "listener_up", "slot": slot},
        )
        checking = asyncio.create_task(self._check_slot(slot), name=f"wal_status of slot {slot}")
        try:
            await self._stream(sink)
        finally:
            checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checking

    # ------------------------------------------------------------ the replication connection (threads)

    def _connect(self) -> tuple[Any, Any]:
        import psycopg2  # type: ignore[import-untyped]
        import psycopg2.extras  # type: ignore[import-untyped]

        settings = {**PINNED_SETTINGS, "client_encoding": "UTF8"}
        options = " ".join(f"-c {name}={_escape_option(value)}" for name, value in settings.items())
        conn = psycopg2.connect(
            self._conninfo,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            application_name=self._application_name,
            connect_timeout=max(1, int(self.connect_timeout)),
            options=options,
            keepalives=1,
            keepalives_idle=max(1, int(self.ping_interval)),
            keepalives_interval=max(1, int(self.ping_timeout)),
            keepalives_count=3,
        )
        return conn, conn.cursor()

    def _identify(self) -> str:
        """The epoch of the history this connection decodes (``revisions.history_epoch``:
        the cluster's system identifier, the database, the timeline): commit LSNs mean the
        same on every sidecar decoding it, so its revisions are theirs too."""
        self._cursor.execute("IDENTIFY_SYSTEM")
        row = self._cursor.fetchone()
        if row is None or len(row) < 4 or not isinstance(row[1], int) or not isinstance(row[3], str):
            raise ValueError(f"IDENTIFY_SYSTEM answered {str(row)[:200]!r}, not (systemid, timeline, xlogpos, dbname)")
        return history_epoch(str(row[0]), row[3], row[1])

    def _create_slot(self, slot: str) -> tuple[int, str]:
        self._cursor.execute(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')")
        row = self._cursor.fetchone()
        return pgoutput.parse_lsn(row[1]), str(row[2])

    async def _created(self, slot: str) -> tuple[int, str]:
        """The slot, made; on a standby, the primary is nudged meanwhile: the slot becomes
        consistent at the primary's next running-transactions record (see primary.py)."""
        primary = self._primary
        if primary is None:
            return await self._blocking(self._create_slot, slot)
        creating = asyncio.ensure_future(self._blocking(self._create_slot, slot))
        wait = FIRST_NUDGE_DELAY  # (a record written before the slot reserved its WAL would not do)
        try:
            while True:
                done, _ = await asyncio.wait({creating}, timeout=wait)
                if done:
                    return creating.result()
                await primary.nudge()
                wait = NUDGE_INTERVAL
        finally:
            if not creating.done():
                creating.cancel()  # (_close_connection cancels the command itself)

    def _start(self, slot: str, position: int) -> None:
        version = self._conn.server_version
        proto = 4 if version >= 160000 else 3 if version >= 150000 else 2 if version >= 140000 else 1
        self._cursor.start_replication(
            slot_name=slot,
            decode=False,
            start_lsn=position,
            options={"proto_version": str(proto), "publication_names": self.publication, "messages": "true"},
        )

    async def _check_slot(self, slot: str) -> None:
        """Read the slot's ``wal_status`` now and then: past ``max_slot_wal_keep_size`` the
        server will invalidate the slot, and only this tells that the connection's end,
        when it comes, is that (a temporary slot leaves nothing to look at after)."""
        while True:
            await asyncio.sleep(self.slot_check_interval)
            try:
                async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
                    status = await conn.fetchval(
                        "SELECT wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                        slot,
                        timeout=self.query_timeout,
                    )
            except Exception as exc:  # (best effort: the stream's own checks decide what is lost)
                log.debug("reading the wal_status of slot %s: %s", slot, exc)
                continue
            if status is None:
                continue  # (gone: its walsender ended -- the last status read tells why)
            status = str(status)
            if status != self.slot.wal_status and status in _PAST_KEEP_SIZE:
                log.warning(
                    "slot %s retains more WAL than max_slot_wal_keep_size (wal_status %s): the server "
                    "invalidates it at its next checkpoint, and every table is rebuilt then",
                    slot,
                    status,
                    extra={"event": "slot_past_keep_size", "slot": slot},
                )
            if self.slot.name == slot:
                self.slot.wal_status = status

    async def _blocking(self, command: Callable[..., _T], *args: Any) -> _T:
        """``command`` (a blocking one on the replication connection) in a thread."""

        def run() -> _T:
            self._busy = True
            try:
                return command(*args)
            finally:
                self._busy = False

        return await asyncio.to_thread(run)

    async def _close_connection(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(conn.fileno())
        if self._busy:
            # A thread's command holds the connection (a slot creation waits for every
            # older transaction to end: it may wait hours), and close() would wait for it
            # with the event loop frozen. Cancel the command, and close, off the loop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(conn.cancel), self.connect_timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(conn.close), self.connect_timeout)
            return
        with contextlib.suppress(Exception):
            conn.close()  # (the temporary slot goes with the session)

    # ------------------------------------------------------------ the stream (event loop)

    async def _stream(self, sink: LogicalSink) -> None:
        loop = asyncio.get_running_loop()
        cursor = self._cursor
        fd = self._conn.fileno()
        loop.add_reader(fd, self._wake)
        decoder = pgoutput.StreamDecoder()
        relations: dict[int, list[_Decoder]] = {}
        transaction: _Transaction | None = None
        last_feedback = last_heard = types_checked = self.slot.heard = time.monotonic()
        asked_at: float | None = None
        read = 0
        yielded = last_heard
        try:
            while True:
                if transaction is None and any(t.recheck for t in self._heard.values()):
                    await self._recheck(sink)
                message = cursor.read_message()
                now = time.monotonic()
                if message is None:
                    heard = _server_spoke(cursor)
                    if heard is not None:
                        last_heard = max(last_heard, now - max(0.0, time.time() - heard))
                    self.slot.heard = last_heard
                    if asked_at is not None and last_heard >= asked_at:
                        asked_at = None
                    if asked_at is not None and now - asked_at > self.ping_timeout:
                        raise TimeoutError(f"the server did not answer a status request in {self.ping_timeout:g}s")
                    server_end = int(cursor.wal_end or 0)
                    self.slot.server_end = max(self.slot.server_end, server_end)
                    if transaction is None and server_end > self.slot.confirmed:
                        # Everything the server had for us up to its end of WAL has come and
                        # is applied: confirm it, or the slot would hold the WAL of every
                        # other table's writes while ours stay quiet.
                        self.slot.confirmed = server_end
                    if now - last_feedback >= FEEDBACK_INTERVAL or (
                        asked_at is None and now - last_heard >= self.ping_interval
                    ):
                        ask = asked_at is None and now - last_heard >= self.ping_interval
                        confirmed = self.slot.confirmed
                        cursor.send_feedback(
                            write_lsn=confirmed, flush_lsn=confirmed, apply_lsn=confirmed, reply=ask, force=True
                        )
                        last_feedback = now
                        if ask:
                            asked_at = now
                    if transaction is None and now - types_checked >= TYPES_CHECK_INTERVAL:
                        types_checked = now
                        await self._check_types(sink)
                    await self._wait_readable(min(FEEDBACK_INTERVAL, self.ping_interval))
                    yielded = time.monotonic()
                    continue
                slot = self.slot
                last_heard = slot.heard = now
                read += 1
                if read % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # (a big transaction: readers and barriers get their turn)
                if (start := message.data_start) > slot.received:
                    slot.received = int(start)
                if (end := message.wal_end) > slot.server_end:
                    slot.server_end = int(end)
                parsed = decoder.feed(message.payload)
                # (the common messages first, by their exact type)
                if type(parsed) is pgoutput.Begin:
                    transaction = _Transaction(parsed.xid, parsed.final_lsn)
                elif type(parsed) is pgoutput.Commit:
                    if transaction is None:
                        raise pgoutput.ProtocolError("a Commit outside a transaction")
                    if self._reads_after(transaction):
                        await self._until_visible(transaction.xid)
                    self._commit(sink, transaction, parsed)
                    transaction = None
                    if now - yielded >= YIELD_INTERVAL:
                        await asyncio.sleep(0)  # (a long backlog: readers and barriers get their turn)
                        yielded = time.monotonic()
                elif (
                    type(parsed) is pgoutput.Update
                    or type(parsed) is pgoutput.Insert
                    or type(parsed) is pgoutput.Delete
                ):
                    if transaction is None:
                        raise pgoutput.ProtocolError("a row change outside a transaction")
                    decoders = relations.get(parsed.relation_id)
                    if decoders is None:
                        raise pgoutput.ProtocolError(f"a change of relation {parsed.relation_id} before its Relation")
                    for relation in decoders:
                        self._row_change(sink, transaction, relation, parsed)
                elif isinstance(parsed, pgoutput.Relation):
                    relations[parsed.relation_id] = await self._decoders(parsed)
                elif isinstance(parsed, pgoutput.Truncate):
                    if transaction is None:
                        raise pgoutput.ProtocolError("a Truncate outside a transaction")
                    for relation_id in parsed.relation_ids:
                        for relation in relations.get(relation_id, ()):
                            table = relation.table
                            # (a partition's or child's emptied: its ancestor's cache reloads)
                            transaction.events.append(
                                TableChange(
                                    table.schema, table.name, Op.TRUNCATE, transaction.xid, "truncate", relation.empties
                                )
                            )
                elif isinstance(parsed, pgoutput.LogicalMessage):
                    if (
                        transaction is not None
                        and parsed.transactional
                        and parsed.prefix == MESSAGE_PREFIX
                        and len(parsed.content) <= MAX_TOKEN_BYTES
                    ):
                        with contextlib.suppress(UnicodeDecodeError):
                            transaction.events.append(SyncToken(parsed.content.decode()))
                elif isinstance(parsed, pgoutput.Type | pgoutput.Origin):
                    pass
                else:  # streamed or prepared transactions: not asked for
                    raise pgoutput.ProtocolError(f"an unexpected {type(parsed).__name__} message")
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)

    def _wake(self) -> None:
        readable = self._readable
        if readable is not None and not readable.done():
            readable.set_result(None)

    async def _wait_readable(self, timeout: float) -> None:
        """Until the connection's socket is readable, or ``timeout`` seconds passed. (A timer
        that wakes the same way, not ``asyncio.timeout``: this runs for every wake-up of a
        stream that keeps up, and a timeout context costs several times a timer.)"""
        loop = asyncio.get_running_loop()
        self._readable = readable = loop.create_future()
        timer = loop.call_later(timeout, self._wake)
        try:
            await readable
        finally:
            timer.cancel()
            self._readable = None

    def _reads_after(self, transaction: _Transaction) -> bool:
        """Whether applying the transaction makes the cache read the database (a refetch,
        a reload, a relation refresh, a lazy table's next fill)."""
        read_on_change = self._read_on_change
        for event in transaction.events:
            if isinstance(event, SyncToken):
                continue
            if read_on_change and (event.schema, event.table) in read_on_change:
                return True
            if isinstance(event, RowChange) and event.rows is None:
                return True
            if isinstance(event, TableChange) and not event.emptied:
                return True
        return False

    async def _until_visible(self, xid: int) -> None:
        """Wait until other sessions see transaction ``xid``: the walsender sends a commit
        once its WAL is flushed, a moment before the transaction is visible, and a read the
        change starts must not miss it (it would keep the row as it was)."""
        deadline = time.monotonic() + self.query_timeout
        try:
            async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
                while True:
                    snapshot = await conn.fetchval(_SNAPSHOT_SQL, timeout=self.query_timeout)
                    if Visibility.parse(str(snapshot)).saw(xid):
                        return
                    self.visibility_waits += 1
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"transaction {xid} not visible after {self.query_timeout:g}s")
                    await asyncio.sleep(0.001)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            # (a read that cannot be made now fails and is retried: it sees the transaction then)
            log.debug("waiting for transaction %d to be visible: %s", xid, exc)

    def _commit(self, sink: LogicalSink, transaction: _Transaction, commit: pgoutput.Commit) -> None:
        if transaction.events:
            self.transactions += 1
            sink.transaction(transaction.position, transaction.xid, transaction.events)
        self.slot.confirmed = max(self.slot.confirmed, commit.end_lsn)

    # ------------------------------------------------------------ tables

    async def _prepare_tables(self) -> None:
        """For each cached full table read whole: its columns and their types, to build its
        rows from the stream (told to the sink: ``take_rows``), or why that cannot be."""
        sink = self._sink
        assert sink is not None
        async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
            for (schema, name), table in self._heard.items():
                qualified = _qualified(schema, name)
                table.qualified, table.columns, table.types = "", (), {}
                table.candidate = qualified if sink.streamed(qualified) else ""
                if not table.candidate:
                    continue
                columns, types, why = await self._described(conn, table)
                if why is None:
                    table.qualified, table.columns, table.types = qualified, columns, types
                    sink.take_rows(qualified, True)
                else:
                    log.info("%s: its changes are refetched in logical mode (%s)", qualified, why)
                    sink.take_rows(qualified, False)

    async def _described(
        self, conn: Any, table: _Table
    ) -> tuple[tuple[tuple[str, int], ...], dict[int, Any], str | None]:
        """The table's columns and their types as the catalog has them now, or why its rows
        cannot be built from the stream."""
        rows = await conn.fetch(_COLUMNS_SQL, table.schema, table.name, timeout=self.query_timeout)
        if not rows:
            return (), {}, "not found in the catalog"
        if any(r["generated"] for r in rows):
            return (), {}, "it has generated columns, which pgoutput does not send"
        columns = tuple((str(r["name"]), int(r["type"])) for r in rows)
        found = await conn.fetch(rowjson.CATALOG_QUERY, [t for _, t in columns], timeout=self.query_timeout)
        types = rowjson.types_from_catalog(found)
        for column, type_oid in columns:
            if (problem := rowjson.describes(type_oid, types)) is not None:
                return columns, types, f"column {column}: {problem}"
        return columns, types, None

    def _schema_changed(self, name: str) -> None:
        """The catalog check reloads ``name`` for a schema change: describe it again before
        building another row of it (a composite's fields renamed keep the Relation as is)."""
        for table in self._heard.values():
            if table.candidate == name:
                table.recheck = True

    async def _check_types(self, sink: LogicalSink) -> None:
        """Now and then, every table rows are built for, as ``_recheck`` does."""
        for table in self._heard.values():
            if table.candidate:
                table.recheck = True
        await self._recheck(sink)

    async def _recheck(self, sink: LogicalSink) -> None:
        """Describe the tables marked again: the same columns and types, nothing to do;
        others (the catalog's columns the stream's last Relation's) are built with the new
        ones after a reload of the table (the rows held are of the old shape); rows are not
        built while the two differ (a change of columns under way)."""
        tables = [table for table in self._heard.values() if table.recheck]
        try:
            async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
                for table in tables:
                    columns, types, why = await self._described(conn, table)
                    table.recheck = False
                    current = table.qualified and (columns, types) == (table.columns, table.types)
                    if why is None and current:
                        continue
                    if why is None and (not table.relation or columns == table.relation):
                        table.qualified, table.columns, table.types = table.candidate, columns, types
                        sink.take_rows(table.candidate, True)
                        sink.reload_table(table.candidate, "its columns or their types changed")
                    elif table.qualified:
                        table.qualified = ""
                        log.info(
                            "%s: its changes are refetched (%s)", table.candidate, why or "its columns are changing"
                        )
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            for table in tables:
                table.recheck = True
            log.debug("describing tables again: %s", exc)  # (the next round tries again)

    async def _decoders(self, relation: pgoutput.Relation) -> list[_Decoder]:
        """Who hears of a published table's changes: its own cache, and the caches of its
        ancestors (a partition's changes are published under the partition's name -- not
        via the root: pgoutput then leaves a partition's TRUNCATE out --, an inheritance
        child's under the child's)."""
        own = self._heard.get((relation.namespace or "pg_catalog", relation.name))
        tables = [own] if own is not None else []
        async with self._database.pool.acquire(timeout=self.query_timeout) as conn:
            ancestors = await conn.fetch(_ANCESTORS_SQL, relation.relation_id, timeout=self.query_timeout)
            parent = bool(await conn.fetchval(_PARENT_SQL, relation.relation_id, timeout=self.query_timeout))
        if own is not None and own.candidate:
            own.relation = _columns(relation)
            if own.relation != own.columns:
                own.recheck = True
                await self._recheck(self._sink_or_fail())
        for row in ancestors:
            heard = self._heard.get((str(row["schema"]), str(row["name"])))
            if heard is not None and heard not in tables:
                tables.append(heard)
        decoders = [self._decoder(relation, table) for table in tables]
        for decoder in decoders:
            # A TRUNCATE of the table itself empties its cache, unless the table has
            # children (TRUNCATE ONLY leaves theirs, which its cache holds too): a reload then.
            decoder.empties = decoder.table is own and not parent
        return decoders

    def _sink_or_fail(self) -> LogicalSink:
        assert self._sink is not None
        return self._sink

    def _decoder(self, relation: pgoutput.Relation, table: _Table) -> _Decoder:
        names = [c.name for c in relation.columns]
        positions = []
        for column in table.key:
            if column.name not in names:
                break
            positions.append(names.index(column.name))
        key_positions = tuple(positions) if len(positions) == len(table.key) else None
        key_in_identity = key_positions is not None and (
            relation.replica_identity == "f" or all(relation.columns[p].is_key for p in key_positions)
        )
        why = None
        if not table.qualified:
            why = "not a full table read whole"
        elif _columns(relation) != table.columns:
            why = f"the columns of {relation.namespace}.{relation.name} are not the ones loaded"
        if why is not None and table.qualified:
            log.info("%s: changes come without rows from now on (%s)", table.qualified, why)
        return _Decoder(table, relation, key_positions, key_in_identity, why is None, why)

    # ------------------------------------------------------------ one row change

    def _row_change(
        self,
        sink: LogicalSink,
        transaction: _Transaction,
        decoder: _Decoder,
        change: pgoutput.Insert | pgoutput.Update | pgoutput.Delete,
    ) -> None:
        table = decoder.table
        label = table.label
        if label in transaction.bulk:
            return
        count = transaction.counts[label] = transaction.counts.get(label, 0) + 1
        if count > MAX_TRANSACTION_ROWS:  # one reload instead of holding every row of it
            transaction.bulk.add(label)
            transaction.events = [
                e
                for e in transaction.events
                if not (isinstance(e, RowChange) and (e.schema, e.table) == (table.schema, table.name))
            ]
            transaction.events.append(TableChange(table.schema, table.name, Op.UPDATE, transaction.xid, "bulk change"))
            return
        xid = transaction.xid
        try:
            event = self._event(sink, transaction, decoder, change)
        except (InvalidKey, rowjson.Unconvertible, ValueError) as exc:
            log.warning("%s: a change cannot be read (%s); reloading the table", label, exc)
            event = TableChange(table.schema, table.name, Op.UPDATE, xid, "unreadable change")
        transaction.events.append(event)

    def _event(
        self,
        sink: LogicalSink,
        transaction: _Transaction,
        decoder: _Decoder,
        change: pgoutput.Insert | pgoutput.Update | pgoutput.Delete,
    ) -> Event:
        table, xid = decoder.table, transaction.xid
        if decoder.key_positions is None:
            return TableChange(table.schema, table.name, Op.UPDATE, xid, "the key columns are not in the change")
        if isinstance(change, pgoutput.Delete):
            if not decoder.key_in_identity:
                return TableChange(table.schema, table.name, Op.DELETE, xid, "a delete not naming the cached key")
            key = self._key(decoder, change.old)
            rows = (None,) if decoder.rows and table.qualified else None
            if rows is not None:
                _remember(transaction, table.qualified, key, None)
            return RowChange(table.schema, table.name, Op.DELETE, xid, (key,), (), rows)
        # (a key stored out of line and not changed comes as "unchanged": the old key has it)
        key = self._key(decoder, change.new, change.old if isinstance(change, pgoutput.Update) else None)
        old: tuple[Any, ...] | None = None
        if isinstance(change, pgoutput.Update):
            if change.old is not None:
                if not decoder.key_in_identity:
                    return TableChange(table.schema, table.name, Op.UPDATE, xid, "an update not naming the cached key")
                old = self._key(decoder, change.old)
                if old == key:
                    old = None
            elif not decoder.key_in_identity:
                return TableChange(table.schema, table.name, Op.UPDATE, xid, "an update not naming the cached key")
        op = Op.INSERT if isinstance(change, pgoutput.Insert) else Op.UPDATE
        old_keys = (old,) if old is not None else ()
        if not decoder.rows or not table.qualified:
            return RowChange(table.schema, table.name, op, xid, (key,), old_keys)
        row = self._row(sink, transaction, decoder, change.new, old if old is not None else key)
        if row is None:
            return RowChange(table.schema, table.name, op, xid, (key,), old_keys)
        cached = entry(row)
        _remember(transaction, table.qualified, key, cached)
        if old is not None:
            _remember(transaction, table.qualified, old, None)
        return RowChange(table.schema, table.name, op, xid, (key,), old_keys, (cached,))

    def _key(
        self, decoder: _Decoder, values: Sequence[pgoutput.Datum], old: Sequence[pgoutput.Datum] | None = None
    ) -> tuple[Any, ...]:
        """A key's parts as the triggers send them (each column's JSON, read); a part sent
        as an unchanged TOASTed value is taken from the ``old`` tuple, if one came."""
        assert decoder.key_positions is not None
        parts = []
        for position in decoder.key_positions:
            value = values[position] if position < len(values) else None
            if value is pgoutput.UNCHANGED and old is not None and position < len(old):
                value = old[position]
            column = decoder.relation.columns[position]
            if not isinstance(value, pgoutput.Text):
                raise ValueError(f"key column {column.name} was not sent as text")
            if column.type_oid in _INTEGERS:  # (the common key: its JSON is its text)
                parts.append(int(value.data))
            else:
                parts.append(loads(rowjson.value_json(value.data, column.type_oid, decoder.table.types)))
        return tuple(parts)

    @staticmethod
    def _coerced(table: _Table, parts: tuple[Any, ...]) -> Key:
        return coerce_key(table.key, parts)

    def _row(
        self,
        sink: LogicalSink,
        transaction: _Transaction,
        decoder: _Decoder,
        values: Sequence[pgoutput.Datum],
        previous_key: tuple[Any, ...],
    ) -> bytes | None:
        """The row's ``row_to_json`` bytes, or None when they cannot be built exactly (the
        change then goes without rows: the table refetches)."""
        table = decoder.table
        columns = table.columns
        if len(values) != len(columns):
            return None
        plan = _plan(table)
        previous: list[bytes] | None = None
        parts: list[bytes] = []
        append = parts.append
        text = pgoutput.Text
        try:
            for index, ((name, convert), value) in enumerate(zip(plan, values, strict=True)):
                if value.__class__ is text:
                    append(name + convert(value.data))
                elif value is None:
                    append(name + b"null")
                elif value is pgoutput.UNCHANGED:
                    if previous is None:
                        previous = self._previous(sink, transaction, table, previous_key)
                        if previous is None or len(previous) != len(columns):
                            log.debug("%s: an unchanged TOASTed value with no cached row", table.qualified)
                            return None
                    append(name + previous[index])
                else:
                    return None  # (binary: not asked for)
        except rowjson.Unconvertible as exc:
            log.info("%s: a value cannot be converted exactly (%s)", table.qualified, exc)
            return None
        return b"{" + b",".join(parts) + b"}"

    def _previous(
        self, sink: LogicalSink, transaction: _Transaction, table: _Table, parts: tuple[Any, ...]
    ) -> list[bytes] | None:
        # (``latest`` is by the parts as sent: the same parts are the same key; other parts
        # may be the same key too -- numeric 1.0 and 1.00 -- unless the key's types have one
        # text per value)
        held = transaction.latest.get((table.qualified, parts), _ABSENT)
        key = self._coerced(table, parts)
        if held is _ABSENT and not all(c.type_name in _ONE_TEXT_PER_VALUE for c in table.key):
            for (name, other), row in reversed(transaction.latest.items()):
                if name == table.qualified and self._coerced(table, other) == key:
                    held = row
                    break
        if held is _ABSENT:
            held = sink.cached_row(table.qualified, key)
        if not isinstance(held, bytes):
            return None
        return rowjson.object_values(entry_row(held))


_ABSENT: Any = object()


def _remember(transaction: _Transaction, table: str, parts: tuple[Any, ...], row: bytes | None) -> None:
    """The row of ``parts`` so far in the transaction, kept the newest last."""
    transaction.latest.pop((table, parts), None)
    transaction.latest[(table, parts)] = row


_INTEGERS = frozenset({20, 21, 23})  # int8, int2, int4
_ONE_TEXT_PER_VALUE = frozenset({"int2", "int4", "int8", "text", "varchar", "uuid", "bool"})
_T = TypeVar("_T")


@functools.lru_cache(maxsize=4096)
def _name(name: str) -> bytes:
    return rowjson.value_json(name.encode(), 25, {}) + b":"


def _plan(table: _Table) -> tuple[tuple[bytes, Callable[[bytes], bytes]], ...]:
    """How a row of the table's columns is built (made once per columns and types)."""
    columns, types = table.columns, table.types
    if table.plan_of[0] is not columns or table.plan_of[1] is not types:
        table.plan = tuple((_name(name), rowjson.converter(type_oid, types)) for name, type_oid in columns)
        table.plan_of = (columns, types)
    return table.plan


def _qualified(schema: str, name: str) -> str:
    return qualified_name(schema, name)


def _columns(relation: pgoutput.Relation) -> tuple[tuple[str, int], ...]:
    return tuple((c.name, c.type_oid) for c in relation.columns)


def _escape_option(value: str) -> str:
    """A value inside libpq's ``options`` (spaces and backslashes escaped)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _server_spoke(cursor: Any) -> float | None:
    """When the server last sent something that ``read_message`` consumed itself (a
    keepalive, the answer to a status request), as ``time.time()`` seconds; None if
    unknown. psycopg2's ``io_timestamp`` moves with our own feedback too (it is set to
    ``feedback_timestamp`` when one is sent): only when it is later than that does it
    tell of the server -- else our feedback alone would keep a stalled stream "alive"."""
    spoke, sent = cursor.io_timestamp, cursor.feedback_timestamp
    if spoke is None or (sent is not None and spoke <= sent):
        return None
    return _seconds(spoke)


def _seconds(moment: Any) -> float | None:
    with contextlib.suppress(Exception):
        return float(moment.timestamp())
    return None


_EMIT_SQL = """
SELECT pg_catalog.set_config('synchronous_commit', 'on', true),
    pg_catalog.pg_logical_emit_message(true, $1::pg_catalog.text, $2::pg_catalog.text)
"""

_SNAPSHOT_SQL = "SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text"

_PARENT_SQL = "SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits i WHERE i.inhparent = $1::pg_catalog.oid)"

_ANCESTORS_SQL = """
WITH RECURSIVE up(oid, depth) AS (
    SELECT i.inhparent, 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = $1::pg_catalog.oid
  UNION
    SELECT i.inhparent, up.depth + 1 FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid
    WHERE up.depth < 64
)
SELECT n.nspname::pg_catalog.text AS schema, c.relname::pg_catalog.text AS name
FROM up JOIN pg_catalog.pg_class c ON c.oid = up.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""

_COLUMNS_SQL = """
SELECT a.attname::pg_catalog.text AS name, a.atttypid::pg_catalog.int8 AS type, a.attgenerated <> '' AS generated
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

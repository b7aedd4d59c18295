"""The gRPC ``cachesidecar.v1.Cache`` service: validate, call the engine, map
domain errors to status codes. Nothing else lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core import jsonread, wire
from sidecar.core.assembly import Core
from sidecar.core.cache import TableCache
from sidecar.core.engine import Revision
from sidecar.core.fanout import (
    SNAPSHOT,
    FellBehind,
    Filter,
    OutOfRange,
    ShuttingDown,
    Stalled,
    Subscription,
    TooManyStreams,
)
from sidecar.core.keys import Key, KeyColumn, coerce_key
from sidecar.core.progress import LoadProgress
from sidecar.core.wire import TooLarge, row_too_large
from sidecar.edge.names import SERVICE_NAME
from sidecar.errors import (
    InvalidKey,
    InvalidRequest,
    QueryFailed,
    SidecarError,
    Unauthenticated,
    Unavailable,
    UnknownTable,
    UpstreamFailed,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_OF: tuple[tuple[type[SidecarError], grpc.StatusCode], ...] = (
    (UnknownTable, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (QueryFailed, grpc.StatusCode.FAILED_PRECONDITION),  # the same call fails until someone changes something
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (FellBehind, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (TooLarge, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)
MAX_PROGRESS_INTERVAL_MS = 3_600_000
MAX_WAIT = 30.0  # seconds: the longest a read waits for its consistency (STRONG, min_revision, Sync)
AUTHORIZATION = "authorization"  # the metadata key of a caller's bearer token
WATCH_OPERATIONS = frozenset(v for v in pb.Operation.values() if v not in (pb.OPERATION_UNSPECIFIED, SNAPSHOT))


def status_of(exc: SidecarError) -> grpc.StatusCode:
    if isinstance(exc, (UpstreamFailed, UpstreamUnavailable)):
        # A follower's upstream answered with this: the caller gets it as it was (a hub's
        # PERMISSION_DENIED is the caller's to see). CANCELLED is the follower's own call's
        # end (its channel closing), not the upstream's answer.
        code = getattr(grpc.StatusCode, exc.status, None)
        if isinstance(code, grpc.StatusCode) and code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return code
        return grpc.StatusCode.UNAVAILABLE
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def key_parts(key: pb.Key, where: str = "key") -> list[Any]:
    """A request Key as Python values (coerced to column types later)."""
    parts: list[Any] = []
    for part in key.parts:
        kind = part.WhichOneof("kind")
        if kind is None:
            raise InvalidKey(f"{where}: part {len(parts)} has no value")
        parts.append(getattr(part, kind))
    if not parts:
        raise InvalidKey(f"{where}: empty (give one part per primary-key column)")
    return parts


def keys_parts(keys: Sequence[pb.Key], field: str) -> list[list[Any]]:
    """Request Keys as Python values; an error names the key (``keys[3]``)."""
    return [key_parts(key, f"{field}[{index}]") for index, key in enumerate(keys)]


def single_parts(keys: Sequence[pb.Key]) -> list[Any] | None:
    """The values of Keys that each have exactly one part with a value, else None
    (then ``keys_parts`` reads them again, to name what is wrong).

    The common BatchGet form for a one-column key, read without a list per key:
    reading a protobuf field makes a Python object, so each is read once."""
    values: list[Any] = []
    append = values.append
    for key in keys:
        parts = key.parts
        if len(parts) != 1:
            return None
        part = parts[0]
        kind = part.WhichOneof("kind")
        if kind is None:
            return None
        append(getattr(part, kind))
    return values


def bound(interval: pb.Range, name: str) -> Any:
    """A range bound's value, ``None`` when unbounded."""
    if not interval.HasField(name):
        return None
    part: pb.KeyPart = getattr(interval, name)
    kind = part.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest(f"range.{name}: set but has no value (leave it unset for unbounded)")
    return getattr(part, kind)


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


# Seconds a stream's final status may take to be handed over once its client stopped
# reading: it queues behind the data the client has not taken (and reaches the client
# if it ever reads on), so the handler does not wait for it longer.
STATUS_WAIT = 1.0


async def send_within(context: grpc.aio.ServicerContext, message: Any, timeout: float) -> bool:
    """Send one stream message; False when the client took none of it within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            await context.write(message)
    except TimeoutError:
        return False
    return True


async def end_stream(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a stream with ``code``; always raises (grpc's abort error, or, when the status
    cannot be handed over within ``STATUS_WAIT``, a cancellation: the handler ends, the
    status stays queued)."""
    try:
        async with asyncio.timeout(STATUS_WAIT):
            await context.abort(code, details)
    except TimeoutError:
        raise asyncio.CancelledError from None


class _CallExpired(Exception):
    """The call's deadline passed: grpc core has ended it (DEADLINE_EXCEEDED) already."""


class CacheService:
    """Thin adapter from gRPC to ``Engine``.

    Get, BatchGet and Query answer with bytes already in protobuf encoding (rows are
    cached encoded, see ``wire.py``); ``add_to_server`` registers them with a
    pass-through serializer.
    """

    def __init__(
        self,
        core: Core,
        observe: Callable[[str, float], None] | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.engine = core.engine  # reads' consistency, Watch, Invalidate
        self._reads = core.reads  # keys coerced, rows and index queries read
        self._core = core
        self.max_batch_keys = core.options.max_batch_keys
        self.send_timeout = core.options.watch_send_timeout  # of each Watch message
        self._revisions = wire.RevisionField()
        self._observe = observe  # told each call's method and duration (metrics)
        self.max_message_bytes = max_message_bytes  # the server's send limit

    def _check_count(self, count: int, what: str = "keys requested") -> None:
        """Bound a repeated field before any per-element work (parsing, coercing)."""
        limit = self.max_batch_keys
        if count > limit:
            raise InvalidRequest(f"{count} {what}; at most {limit} per call (server.max_batch_keys)")

    def _fits(self, answer: bytes, table: str, rows: Callable[[], list[tuple[Key | None, bytes]]]) -> bytes:
        """``answer`` if it is within the send limit, else ``TooLarge`` naming the largest row."""
        limit = self.max_message_bytes
        if len(answer) <= limit:
            return answer
        key, entry = max(rows(), key=lambda pair: len(pair[1]))
        if len(entry) + 64 > limit:  # (64: the revision field and framing)
            raise row_too_large(table, key, len(entry), limit)
        raise TooLarge(
            f"the answer is {len(answer)} bytes, more than the {limit} one message may carry; ask for fewer rows"
        )

    def _current(self) -> wire.RevisionField:
        revision = self.engine.revision
        self._revisions.update(revision.epoch, revision.number)
        return self._revisions

    def _revision(self) -> pb.Revision:
        return self._current().message

    def _answered_at(self, start: Revision) -> wire.RevisionField:
        """The revision a read's answer carries: the current one -- unless the epoch changed
        while it was read. Then the answer came from the database (memory was being rebuilt)
        and carries the revision the read began at: a revision of the new epoch would tell the
        client that rows the rebuilt memory serves next are at least as new, and they may not
        be (a later EVENTUAL read would seem to go back in time within one epoch)."""
        if self.engine.revision.epoch == start.epoch:
            return self._current()
        revisions = wire.RevisionField()
        revisions.update(start.epoch, start.number)
        return revisions

    async def _call(self, context: grpc.aio.ServicerContext, method: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` bounded by the call's deadline; turn errors into statuses.

        Once the deadline has passed, grpc core has ended the call with
        DEADLINE_EXCEEDED: answering (or aborting) then fails inside grpc,
        which logs an ERROR traceback for what is the client's ordinary
        timeout. So an expired call ends as a cancelled one instead (grpc logs
        that at DEBUG), sending nothing.
        """
        observe = self._observe
        started = time.perf_counter() if observe is not None else 0.0
        try:
            try:
                remaining = context.time_remaining()
                if remaining is None:
                    answer = await work()
                else:
                    if remaining <= 0:
                        raise _CallExpired
                    async with asyncio.timeout(remaining):
                        answer = await work()
                if _expired(context):
                    raise _CallExpired
                return answer
            except SidecarError as exc:
                await self._abort(context, status_of(exc), str(exc))
            except TimeoutError:
                await self._abort(
                    context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the cache could answer"
                )
        except _CallExpired:
            raise asyncio.CancelledError from None
        finally:
            if observe is not None:
                observe(method, time.perf_counter() - started)
        raise AssertionError("unreachable")  # context.abort raises

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
        if _expired(context):
            raise _CallExpired
        await context.abort(code, details)

    async def _prepare(self, options: pb.ReadOptions, table: TableCache) -> None:
        strong = options.consistency == pb.STRONG
        min_revision = None
        if options.HasField("min_revision"):
            if not options.min_revision.epoch:
                raise InvalidRequest("min_revision needs the epoch of the revision it came from")
            min_revision = Revision(options.min_revision.epoch, options.min_revision.number)
        if strong or min_revision is not None:
            async with asyncio.timeout(MAX_WAIT):
                await self.engine.prepare_read(strong, min_revision, table)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Answers an encoded GetResponse."""

        async def work() -> bytes:
            parts = key_parts(request.key)
            options = request.options
            if options.consistency == pb.STRONG or options.HasField("min_revision"):
                await self._prepare(options, self.engine.table(request.table))
            start = self.engine.revision
            row = await self.engine.get(request.table, parts, options.allow_stale)
            answer = wire.get_response(row, self._answered_at(start))
            if len(answer) > self.max_message_bytes:
                table = self.engine.table(request.table)
                key = coerce_key(table.schema.key_columns, parts)
                return self._fits(answer, table.schema.qualified, lambda: [(key, row or b"")])
            return answer

        return await self._call(context, "Get", work)

    async def BatchGet(self, request: pb.BatchGetRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Answers an encoded BatchGetResponse."""

        async def work() -> bytes:
            engine = self.engine
            table = engine.table(request.table)
            keys = self._batch_keys(table, request)
            options = request.options
            if options.consistency == pb.STRONG or options.HasField("min_revision"):
                await self._prepare(options, table)
            start = engine.revision
            rows = await self._reads.read(table, keys, options.allow_stale)
            answer = wire.batch_get_response(rows, self._answered_at(start))
            if len(answer) > self.max_message_bytes:
                found: list[tuple[Key | None, bytes]] = [(k, e) for k, e in zip(keys, rows, strict=True) if e]
                return self._fits(answer, table.schema.qualified, lambda: found)
            return answer

        return await self._call(context, "BatchGet", work)

    def _batch_keys(self, table: TableCache, request: pb.BatchGetRequest) -> list[Key]:
        """The keys of a BatchGet, coerced: bounded before any per-key work."""
        keys, int_keys, string_keys = request.keys, request.int_keys, request.string_keys
        sizes = len(keys), len(int_keys), len(string_keys)
        if sizes.count(0) < 2:
            forms = [form for form, size in zip(("keys", "int_keys", "string_keys"), sizes, strict=True) if size]
            raise InvalidRequest(f"give one of keys, int_keys and string_keys, not {' and '.join(forms)}")
        self._check_count(sum(sizes))
        if int_keys:
            return self._reads.single_keys(table, int_keys)
        if string_keys:
            return self._reads.single_keys(table, string_keys)
        if len(table.schema.key_columns) == 1:
            values = single_parts(keys)
            if values is not None:
                return self._reads.single_keys(table, values)
        return self._reads.keys(table, keys_parts(keys, "keys"))

    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Answers an encoded QueryResponse."""

        async def work() -> bytes:
            table = self.engine.table(request.table)
            if not request.index:
                raise InvalidRequest("index: give the name of one of the table's indexes")
            has_range = request.HasField("range")
            if has_range == bool(request.values):
                raise InvalidRequest("give values (equality) or range, exactly one of them")
            self._check_count(len(request.values), "values requested")
            values = keys_parts(request.values, "values") if request.values else None
            bounds = request.range
            query = self._reads.plan_query(
                table,
                request.index,
                values,
                bound(bounds, "lower"),
                bound(bounds, "upper"),
                low_open=bounds.lower_exclusive,
                high_open=bounds.upper_exclusive,
                limit=request.limit,
                descending=request.descending,
            )
            await self._prepare(request.options, table)
            start = self.engine.revision
            entries, truncated = await self._reads.query(table, query, request.options.allow_stale)
            answer = wire.query_response(entries, truncated, self._answered_at(start))
            columns = [c.name for c in table.schema.key_columns]
            return self._fits(answer, table.schema.qualified, lambda: [(_key_of(e, columns), e) for e in entries])

        return await self._call(context, "Query", work)

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InvalidateResponse:
        async def work() -> pb.InvalidateResponse:
            if request.all_rows and request.keys:
                raise InvalidRequest("give keys or all_rows, not both")
            if not request.all_rows and not request.keys:
                raise InvalidRequest("nothing to invalidate: give keys or set all_rows")
            self._check_count(len(request.keys), "keys to invalidate")
            keys = None if request.all_rows else keys_parts(request.keys, "keys")
            # (a follower forwards it with the caller's own credential, never with its own)
            credentials = tuple(v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION)
            await self.engine.invalidate(request.table, keys, request.refresh, credentials)
            return pb.InvalidateResponse(revision=self._revision())

        return await self._call(context, "Invalidate", work)

    async def Sync(self, request: pb.SyncRequest, context: grpc.aio.ServicerContext) -> pb.SyncResponse:
        async def work() -> pb.SyncResponse:
            async with asyncio.timeout(MAX_WAIT):  # also without a client deadline
                await self.engine.sync()
            return pb.SyncResponse(revision=self._revision())

        return await self._call(context, "Sync", work)

    async def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTablesResponse:
        revision = self._revision()
        tables = []
        for table in self.engine.listing():
            tables.append(
                pb.TableInfo(
                    name=table.schema.qualified,
                    key_columns=[_column(c) for c in table.schema.key_columns],
                    mode=pb.FULL if table.mode == "full" else pb.LAZY,
                    row_count=table.row_count,
                    loaded=table.loaded,
                    revision=revision,
                    max_rows=table.max_rows,
                    bytes=table.byte_count(),
                    indexes=[
                        pb.IndexInfo(name=i.name, columns=i.columns, unique=i.unique, range=i.range)
                        for i in table.schema.config.indexes
                    ],
                    problem=table.problem or "",
                    indexed_columns=[_column(c) for _, c in sorted(table.schema.columns.items())],
                    load=_load_info(table.load_progress),
                    definition=self._core.definitions.get(table.schema.qualified, ""),
                )
            )
        answer = pb.ListTablesResponse(tables=tables, revision=revision)
        state = self._core.upstream_state()
        if state is not None:
            answer.upstream.CopyFrom(
                pb.UpstreamInfo(
                    target=state.target,
                    following=state.following,
                    upstream_revision=pb.Revision(epoch=state.epoch, number=state.upstream_revision),
                    behind_revisions=state.behind_revisions,
                    behind_seconds=state.behind_seconds,
                )
            )
        lag = self._core.standby_state()
        if lag is not None:
            answer.standby.CopyFrom(
                pb.StandbyInfo(
                    replay_lag_bytes=lag.behind_bytes, replay_lag_seconds=lag.behind_seconds, receiving=lag.receiving
                )
            )
        return answer

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams encoded WatchResponse messages (see the README's Watch contract), each
        sent within the hub's ``send_timeout`` (a client that takes none for longer is ended:
        it would hold its stream and the snapshot it reads for as long as it likes)."""
        engine = self.engine
        await engine.started()  # no epoch before the listener first connects
        try:
            subscription = await self._subscribe(request, _connection(context.peer()))
        except SidecarError as exc:
            if isinstance(exc, OutOfRange):
                context.set_trailing_metadata((("cachesidecar-oldest-revision", engine.oldest_revision),))
            await context.abort(status_of(exc), str(exc))
        try:
            # Headers now: the client knows the stream is established, and where it starts
            # (so it can resume from there even if it is cut before any message).
            await context.send_initial_metadata(
                (("cachesidecar-epoch", subscription.epoch), ("cachesidecar-revision", subscription.last_revision))
            )
            async with contextlib.aclosing(subscription.messages(engine.until_ready)) as messages:
                async for message in messages:
                    for encoded in wire.watch_messages(message, self.max_message_bytes):
                        if not await send_within(context, encoded, self.send_timeout):
                            raise subscription.stalled()
        except (FellBehind, ShuttingDown, TooLarge) as exc:
            if isinstance(exc, Stalled):
                log.info("%s: %s", context.peer(), exc, extra={"event": "watch_stalled"})
            context.set_trailing_metadata((("cachesidecar-last-revision", subscription.last_revision),))
            await end_stream(context, status_of(exc), str(exc))
        finally:
            subscription.close()

    async def _subscribe(self, request: pb.WatchRequest, connection: str | None) -> Subscription:
        engine = self.engine
        self._check_count(len(request.keys), "keys in the key filter")
        self._check_count(len(request.tables), "tables named")
        self._check_count(len(request.operations), "operations named")
        tables = [engine.table(name) for name in request.tables]
        names = frozenset(t.schema.qualified for t in tables)
        keys: frozenset[Any] = frozenset()
        if request.keys:
            if len(tables) != 1:
                raise InvalidRequest("a key filter needs exactly one table")
            columns = tables[0].schema.key_columns
            keys = frozenset(coerce_key(columns, key_parts(k, f"keys[{i}]")) for i, k in enumerate(request.keys))
        unknown = [op for op in request.operations if op not in WATCH_OPERATIONS]
        if unknown:
            raise InvalidRequest(f"operations: {unknown} are not operations one can watch")
        if request.progress_interval_ms > MAX_PROGRESS_INTERVAL_MS:
            raise InvalidRequest(f"progress_interval_ms: at most {MAX_PROGRESS_INTERVAL_MS}")
        start = None
        if request.HasField("start_revision"):
            if not request.start_revision.epoch:
                raise InvalidRequest("start_revision needs the epoch of the revision it came from")
            if request.initial_state:
                raise InvalidRequest("give start_revision (resume) or initial_state (start over), not both")
            start = (request.start_revision.epoch, request.start_revision.number)
        # (a revision ahead of this sidecar, of its epoch, is waited for: another of the same history was ahead)
        beyond = start is not None and await engine.until_resumable(*start)
        return engine.subscribe(
            Filter(names, keys, frozenset(request.operations)),
            start=start,
            initial_state=request.initial_state,
            progress_interval=request.progress_interval_ms / 1000,
            connection=connection,
            several=request.accept_batches,
            beyond=beyond,
        )


def _column(column: KeyColumn) -> pb.Column:
    return pb.Column(name=column.name, type=column.sql_type, type_name=column.type_name, enum=column.enum)


def _connection(peer: str) -> str | None:
    """The client connection a call came on, as grpc names it ("ipv4:127.0.0.1:50123"),
    or None where grpc cannot tell connections apart (every Unix-socket client is "unix:")."""
    if not peer or peer.startswith("unix"):
        return None
    return peer


def _key_of(entry: bytes, columns: list[str]) -> Key | None:
    """The key of a row, read back from its entry (only to name a row in an error)."""
    try:
        row = jsonread.loads(wire.row_json(entry))  # (any depth, any length of integer)
        return tuple(row[name] for name in columns)
    except (ValueError, KeyError, TypeError):
        return None


def add_to_server(service: CacheService, server: grpc.aio.Server) -> None:
    """Register the Cache service (as the generated code would, but with
    Get, BatchGet and Query answering pre-encoded bytes)."""

    def unary(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        serializer = None if response is None else response.SerializeToString
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request.FromString, response_serializer=serializer
        )

    handlers = {
        "Get": unary(service.Get, pb.GetRequest, None),
        "BatchGet": unary(service.BatchGet, pb.BatchGetRequest, None),
        "Invalidate": unary(service.Invalidate, pb.InvalidateRequest, pb.InvalidateResponse),
        "Sync": unary(service.Sync, pb.SyncRequest, pb.SyncResponse),
        "ListTables": unary(service.ListTables, pb.ListTablesRequest, pb.ListTablesResponse),
        "Query": unary(service.Query, pb.QueryRequest, None),
        "Watch": grpc.unary_stream_rpc_method_handler(
            service.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=None
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name["Cache"].methods_by_name) - set(handlers)
    assert not missing, f"unregistered RPCs: {missing}"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _load_info(progress: LoadProgress | None) -> pb.LoadProgress | None:
    if progress is None:
        return None
    state = progress.state()
    return pb.LoadProgress(
        running=state.running,
        rows=state.rows,
        expected_rows=state.expected or 0,
        seconds=state.seconds,
        rows_per_second=state.rate,
        eta_seconds=state.eta or 0.0,
        completed=state.completed,
    )

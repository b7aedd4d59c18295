"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the cache-sidecar.

Both take a gRPC target: ``"127.0.0.1:50051"`` or ``"unix:///run/cache-sidecar/grpc.sock"``.
Rows come back as dicts (decoded from the row JSON), missing rows as ``None``.
A key is a scalar for a one-column primary key, a tuple for a composite one.
Every call has a deadline (``timeout`` seconds, default the client's); calls
that fail ``UNAVAILABLE`` are retried with backoff within that deadline (all
of them are safe to repeat).

``near_cache={"public.patron": 10_000}`` keeps rows of those tables in this
process, coherent through a Watch stream (see ``near.py``): a hit costs
microseconds instead of a round trip.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from cache_sidecar_client._convert import (
    Consistency,
    Decoder,
    QueryResult,
    Revision,
    TableInfo,
    batch_keys,
    default_decoder,
    query_request,
    read_options,
    table_info,
    to_key,
)
from cache_sidecar_client.api.v1 import cache_pb2 as pb
from cache_sidecar_client.api.v1 import cache_pb2_grpc as pb_grpc
from cache_sidecar_client.errors import UndecodableRow, from_rpc_error
from cache_sidecar_client.near import FillTicket, NearCache, near_cache_tables
from cache_sidecar_client.shared_memory import POLL, WAIT, Answer, SharedMemory, store_target
from cache_sidecar_client.watch import (
    Change,
    ChangeBatch,
    Event,
    InitialStateDone,
    Progress,
    Reset,
    Resumer,
    resumable,
)
from cache_sidecar_client.watch import events as watch_events
from cache_sidecar_client.watch import request as watch_request

DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_ABSENT = object()  # a near-cached "no such row"
NEAR_CACHE_PROGRESS = 5.0  # seconds: position marks while the near-cached tables are quiet


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


CONNECTED = _Marker("CONNECTED")  # internal: a watch stream is established
DISCONNECTED = _Marker("DISCONNECTED")  # internal: it broke (it will be resumed)


class _Core:
    """Request building, response decoding and near-cache bookkeeping shared by both clients."""

    def __init__(
        self, decoder: Decoder, timeout: float, retries: int, near_cache: Mapping[str, int] | Iterable[str] | None
    ) -> None:
        self.decode = decoder
        self.timeout = timeout
        self.retries = retries
        self.last_revision: Revision | None = None
        tables = near_cache_tables(near_cache)
        self.near = NearCache(tables) if tables else None

    def seen(self, revision: pb.Revision) -> Revision:
        seen = Revision.from_pb(revision)
        self.last_revision = seen
        return seen

    def row(self, reply: pb.GetResponse | pb.RowResult, table: str, key: Any) -> Any:
        """The decoded row (None if not found); ``UndecodableRow`` if the decoder fails."""
        if not reply.found:
            return None
        try:
            return self.decode(reply.row)
        except Exception as exc:  # (whatever the decoder raises: the caller's own, maybe)
            raise UndecodableRow(table, key, exc) from exc

    def from_store(self, store: SharedMemory, table: str, keys: Sequence[Any], allow_stale: bool) -> list[Any] | None:
        """An EVENTUAL read without ``min_revision``, answered by the store at once (there is
        no revision to wait for), decoded; None: ask over gRPC. (The common read: no
        ``_StoreRead`` and its decisions, a microsecond of a few.)"""
        answer = store.read(table, keys, None, allow_stale)
        return None if answer is None else self.stored_rows(answer)

    def stored_rows(self, answer: Answer) -> list[Any]:
        """The rows of a store's answer, decoded; its revision noted."""
        last = self.last_revision
        if last is None or last.number != answer.revision or last.epoch != answer.epoch:
            self.last_revision = Revision(answer.epoch, answer.revision)
        decode = self.decode
        return [None if row is None else decode(row) for row in answer.rows]

    def uses_near_cache(self, table: str, min_revision: Revision | None, allow_stale: bool) -> bool:
        return self.near is not None and self.near.serves(table) and min_revision is None and not allow_stale

    def min_revision(self, table: str, min_revision: Revision | None) -> Revision | None:
        """Reads of near-cached tables never go behind what the stream has applied."""
        if min_revision is None and self.near is not None and table in self.near.limits:
            return self.near.position
        return min_revision

    def learn_keys(self, tables: Iterable[TableInfo]) -> None:
        """The near-cached tables' key column types: only keys in their stream form are held."""
        near = self.near
        assert near is not None
        for info in tables:
            if info.name in near.limits:
                near.learn(info.name, [sql_type for _, sql_type in info.key_columns])

    def follow(self, item: Any) -> None:
        """Apply one item of the near-cache's watch stream."""
        near = self.near
        assert near is not None
        if item is CONNECTED:
            near.connect()
        elif item is DISCONNECTED:
            near.disconnect()
        elif isinstance(item, Reset):
            near.reset(item.revision)
        elif isinstance(item, ChangeBatch):
            near.apply(item)
        elif isinstance(item, Progress | InitialStateDone):
            near.mark(item.revision)

    def query(self, table: str, index: str, values: Iterable[Any] | None, *args: Any) -> pb.QueryRequest | QueryResult:
        """The request of an index query, or its answer when there is nothing to ask."""
        if values is not None:
            values = list(values)
            if not values:
                return QueryResult([], False, self.last_revision)
        return query_request(table, index, values, *args)

    def query_result(self, reply: pb.QueryResponse, table: str) -> QueryResult:
        revision = self.seen(reply.revision)
        return QueryResult([self.row(r, table, None) for r in reply.rows], reply.truncated, revision)

    def invalidate(self, table: str, keys: Sequence[Any] | None, refresh: bool) -> pb.InvalidateRequest:
        if keys is None:
            return pb.InvalidateRequest(table=table, all_rows=True, refresh=refresh)
        return pb.InvalidateRequest(table=table, keys=[to_key(k) for k in keys], refresh=refresh)

    def retry_delay(self, attempt: int) -> float:
        ceiling = 0.05 * float(1 << min(attempt, 20))
        return ceiling / 2 + random.random() * ceiling / 2

    def retry(self, exc: grpc.RpcError, attempt: int, deadline: float) -> float:
        """The delay before retrying a failed call; raises the client's error when it must not be."""
        delay = self.retry_delay(attempt)
        if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries or time.monotonic() + delay >= deadline:
            raise from_rpc_error(exc) from None
        return delay

    def deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)


class _PointRead:
    """One Get through the near-cache: a hit answered at once, else asked for (with a
    fill ticket, so a change racing the answer is never stored)."""

    def __init__(
        self,
        core: _Core,
        table: str,
        key: Any,
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
    ) -> None:
        self.core, self.table, self.key = core, table, key
        near = core.near if core.uses_near_cache(table, min_revision, allow_stale) else None
        self.near = near if near is not None and near.holds(table, key) else None
        self.result: dict[str, Any] | None = None
        self.request: pb.GetRequest | None = None
        self.ticket: FillTicket | None = None
        if self.near is not None and consistency == "eventual":
            hit, held = self.near.lookup(table, key)
            if hit:
                self.result = _copy(held)
                return
        if self.near is not None:
            self.ticket = self.near.begin_fill(table, key)
        self.request = pb.GetRequest(
            table=table,
            key=to_key(key),
            options=read_options(consistency, core.min_revision(table, min_revision), allow_stale),
        )

    def abandon(self) -> None:
        if self.near is not None and self.ticket is not None:
            self.near.end_fill(self.table, self.key, self.ticket, None, None)

    def finish(self, reply: pb.GetResponse) -> dict[str, Any] | None:
        revision = self.core.seen(reply.revision)
        try:
            row: dict[str, Any] | None = self.core.row(reply, self.table, self.key)
        except UndecodableRow:
            self.abandon()  # (the fill ticket is released: later reads of the key fill it)
            raise
        if self.near is not None and self.ticket is not None:
            self.near.end_fill(self.table, self.key, self.ticket, _ABSENT if row is None else row, revision)
            return _copy(row) if row is not None else None
        return row


class _StreamStep:
    """What a Watch stream does once a call of it ended: yield ``items``, then ``action``."""

    def __init__(self, items: list[Any], action: str, delay: float = 0.0) -> None:
        self.items, self.action, self.delay = items, action, delay  # action: raise, return, retry


def _stream_step(resumer: Resumer, resume: bool, error: grpc.RpcError | None, connected: bool) -> _StreamStep:
    """After a Watch call ended (``error`` None: the server closed it): resume, resync or raise."""
    if error is not None:
        code = error.code()
        if resume and code == grpc.StatusCode.OUT_OF_RANGE:
            items: list[Any] = [DISCONNECTED] if connected else []
            items.append(resumer.out_of_range(error.details()))
            return _StreamStep(items, "retry", resumer.delay())
        if not resume or not resumable(code, connected):
            return _StreamStep([], "raise")
    if not resume:
        return _StreamStep([], "return")
    items = [DISCONNECTED] if connected else []
    reset = resumer.interrupted()
    if reset is not None:
        items.append(reset)
    return _StreamStep(items, "retry", resumer.delay())


def _accepted(resumer: Resumer, response: pb.WatchResponse, decode: Decoder) -> list[Event]:
    """A stream message's events, less those already delivered (after a resume)."""
    accepted = []
    for item in watch_events(response, decode):
        if resumer.duplicate(item):
            continue
        resumer.seen(item)
        accepted.append(item)
    return accepted


class _StoreRead:
    """One read from the shared-memory store, its decisions in one place (the two shells only
    Sync and sleep): whether the store may answer, the revision it must reach, the retries
    until the deadline, and the rows decoded. ``done`` False: not answered yet (retry after
    ``POLL``); ``rows`` None: ask over gRPC."""

    def __init__(
        self,
        core: _Core,
        store: SharedMemory,
        table: str,
        keys: Sequence[Any],
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
        timeout: float | None,
    ) -> None:
        self.core, self.store, self.table, self.keys, self.allow_stale = core, store, table, keys, allow_stale
        self.strong = consistency == "strong"
        self.min_revision = min_revision
        self.timeout = timeout
        # (a STRONG read the store cannot answer now is not worth a barrier of our own)
        self.possible = not (self.strong and store.refusal(table, allow_stale) is not None)
        self.rows: list[Any] | None = None
        self._target: Any = None
        self._deadline: float | None = None

    def aim(self, synced: Revision | None) -> None:
        """The revision the store must hold: the Sync's for a STRONG read, else ``min_revision``."""
        self._target = store_target(synced if self.strong else self.min_revision)

    def attempt(self) -> bool:
        """Read once; True when done (``rows`` the answer, or None: ask over gRPC)."""
        answer = self.store.read(self.table, self.keys, self._target, self.allow_stale)
        if answer is WAIT:
            if self._deadline is None:
                self._deadline = self.core.deadline(self.timeout)
            return time.monotonic() >= self._deadline
        if answer is not None:
            self.rows = self.core.stored_rows(answer)
        return True


class _BatchRead:
    """One BatchGet through the near-cache: hits answered at once, the rest asked for
    (with fill tickets, so a change racing the answer is never stored)."""

    def __init__(
        self,
        core: _Core,
        table: str,
        keys: list[Any],
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
    ) -> None:
        self.core, self.table = core, table
        self.near = core.near if core.uses_near_cache(table, min_revision, allow_stale) else None
        self.results: list[Any] = [None] * len(keys)
        self.missing = list(range(len(keys)))
        near = self.near
        if near is not None and consistency == "eventual":
            self.missing = []
            for index, key in enumerate(keys):
                hit, row = near.lookup(table, key) if near.holds(table, key) else (False, None)
                if hit:
                    self.results[index] = _copy(row)
                else:
                    self.missing.append(index)
        self.wanted = [keys[i] for i in self.missing]
        self.tickets: list[FillTicket | None] = [
            near.begin_fill(table, k) if near is not None and near.holds(table, k) else None for k in self.wanted
        ]
        self.request: pb.BatchGetRequest | None = None
        if self.wanted:
            self.request = pb.BatchGetRequest(
                table=table,
                options=read_options(consistency, core.min_revision(table, min_revision), allow_stale),
                **batch_keys(self.wanted),
            )

    def abandon(self) -> None:
        if self.near is not None:
            for key, ticket in zip(self.wanted, self.tickets, strict=True):
                if ticket is not None:
                    self.near.end_fill(self.table, key, ticket, None, None)

    def finish(self, reply: pb.BatchGetResponse) -> list[dict[str, Any] | None]:
        revision = self.core.seen(reply.revision)
        failed: UndecodableRow | None = None
        for index, key, reply_row, ticket in zip(self.missing, self.wanted, reply.rows, self.tickets, strict=True):
            try:
                row = self.core.row(reply_row, self.table, key)
            except UndecodableRow as exc:
                failed = failed or exc
                if self.near is not None and ticket is not None:  # (released, not filled)
                    self.near.end_fill(self.table, key, ticket, None, None)
                continue
            if self.near is not None and ticket is not None:
                self.near.end_fill(self.table, key, ticket, _ABSENT if row is None else row, revision)
                row = _copy(row) if row is not None else None
            self.results[index] = row
        if failed is not None:  # (every ticket is ended first: the other rows are near-cached)
            raise failed
        return self.results


def _copy(row: Any) -> Any:
    """Near-cached rows are shared: callers get their own top-level copy."""
    if row is _ABSENT:
        return None
    return dict(row) if isinstance(row, dict) else row


def _established(metadata: Any) -> bool:
    return any(key == "cachesidecar-epoch" for key, _ in (metadata or ()))


class Client:
    """Blocking client. Thread-safe; use one per process."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        decoder: Decoder = default_decoder,
        near_cache: Mapping[str, int] | Iterable[str] | None = None,
        shared_memory: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self._channel = channel or grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        # Reads of the sidecar's shared-memory store in this directory (docs/shared-memory.md).
        self._store = SharedMemory(shared_memory) if shared_memory is not None else None
        self._stub = pb_grpc.CacheStub(self._channel)
        self._core = _Core(decoder, timeout, retries, near_cache)
        self._closed = threading.Event()
        self._calls: set[Any] = set()
        self._calls_lock = threading.Lock()
        self._follower: threading.Thread | None = None
        if self._core.near is not None:
            self._follower = threading.Thread(target=self._follow, name="cache-sidecar near-cache", daemon=True)
            self._follower.start()

    @property
    def last_revision(self) -> Revision | None:
        """The revision of the newest answer this client received."""
        return self._core.last_revision

    @property
    def near_cache(self) -> NearCache | None:
        """The near-cache (its ``stats`` count hits and misses), if configured."""
        return self._core.near

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = self._core.deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as exc:
                delay = self._core.retry(exc, attempt, deadline)
            attempt += 1
            time.sleep(delay)

    def get(
        self,
        table: str,
        key: Any,
        *,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        """One row by primary key, or ``None``. ``consistency="strong"`` passes the read
        barrier (and bypasses the near-cache)."""
        if self._store is not None:
            if consistency == "eventual" and min_revision is None:
                stored = self._core.from_store(self._store, table, (key,), allow_stale)
            else:
                stored = self._from_store(table, (key,), consistency, min_revision, allow_stale, timeout)
            if stored is not None:
                return stored[0]  # type: ignore[no-any-return]
        read = _PointRead(self._core, table, key, consistency, min_revision, allow_stale)
        if read.request is None:
            return read.result
        try:
            reply = self._call(self._stub.Get, read.request, timeout)
        except BaseException:
            read.abandon()
            raise
        return read.finish(reply)

    def batch_get(
        self,
        table: str,
        keys: Iterable[Any],
        *,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, Any] | None]:
        """Rows in the order of ``keys`` (``None`` where there is none)."""
        keys = list(keys)
        if self._store is not None:
            if consistency == "eventual" and min_revision is None:
                stored = self._core.from_store(self._store, table, keys, allow_stale)
            else:
                stored = self._from_store(table, keys, consistency, min_revision, allow_stale, timeout)
            if stored is not None:
                return stored
        read = _BatchRead(self._core, table, keys, consistency, min_revision, allow_stale)
        if read.request is None:
            return read.results
        try:
            reply = self._call(self._stub.BatchGet, read.request, timeout)
        except BaseException:
            read.abandon()
            raise
        return read.finish(reply)

    def _from_store(
        self,
        table: str,
        keys: Sequence[Any],
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
        timeout: float | None,
    ) -> list[Any] | None:
        """Rows read from the shared-memory store, or None: ask over gRPC. A STRONG read
        is one Sync, then a wait until the store holds its revision, then the read."""
        assert self._store is not None
        read = _StoreRead(self._core, self._store, table, keys, consistency, min_revision, allow_stale, timeout)
        if not read.possible:
            return None
        read.aim(self.sync(timeout=timeout) if read.strong else None)
        while not read.attempt():
            time.sleep(POLL)
        return read.rows

    def query(
        self,
        table: str,
        index: str,
        values: Iterable[Any] | None = None,
        *,
        lower: Any = None,
        upper: Any = None,
        lower_exclusive: bool = False,
        upper_exclusive: bool = False,
        limit: int = 0,
        descending: bool = False,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> QueryResult:
        """Rows of ``table`` by one of its secondary indexes (declared in the sidecar's
        config): those whose index columns equal one of ``values`` (each a scalar, or a
        tuple for a several-column index), in primary-key order; or, without ``values``,
        those whose (range) index column lies between ``lower`` and ``upper`` (``None``:
        unbounded; both included unless ``*_exclusive``), in index order. At most
        ``limit`` rows (0: the sidecar's maximum); ``truncated`` tells that more matched."""
        request = self._core.query(
            table, index, values, lower, upper, lower_exclusive, upper_exclusive, limit, descending,
            read_options(consistency, self._core.min_revision(table, min_revision), allow_stale),
        )  # fmt: skip
        if isinstance(request, QueryResult):
            return request
        return self._core.query_result(self._call(self._stub.Query, request, timeout), table)

    def invalidate(
        self, table: str, keys: Sequence[Any] | None = None, *, refresh: bool = False, timeout: float | None = None
    ) -> Revision:
        """Drop cached rows (all of the table's when ``keys`` is None); ``refresh`` refetches now."""
        reply = self._call(self._stub.Invalidate, self._core.invalidate(table, keys, refresh), timeout)
        return self._core.seen(reply.revision)

    def sync(self, *, timeout: float | None = None) -> Revision:
        """Read barrier: returns once every commit before the call is in the cache."""
        return self._core.seen(self._call(self._stub.Sync, pb.SyncRequest(), timeout).revision)

    def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        reply = self._call(self._stub.ListTables, pb.ListTablesRequest(), timeout)
        self._core.seen(reply.revision)
        return [table_info(t) for t in reply.tables]

    def watch(
        self,
        tables: Sequence[str] = (),
        *,
        keys: Iterable[Any] | None = None,
        operations: Iterable[str] | None = None,
        start_revision: Revision | None = None,
        initial_state: bool = False,
        progress_interval: float | None = None,
        resume: bool = True,
    ) -> Iterator[Event]:
        """Follow changes (see ``cache_sidecar_client.watch``); close the iterator to stop."""
        request = watch_request(tables, keys, operations, start_revision, initial_state, progress_interval)
        for item in self._stream(request, resume):
            if not isinstance(item, _Marker):
                yield item

    def changes(
        self, tables: Sequence[str] = (), *, operations: Iterable[str] | None = None
    ) -> Iterator[Change | Reset]:
        """Every change of these tables (and operations) as it commits, for event-driven code.
        A ``Reset`` means changes may have been missed: resynchronise whatever depends on them."""
        for item in self.watch(tables, operations=operations):
            if isinstance(item, ChangeBatch):
                yield from item.changes
            elif isinstance(item, Reset):
                yield item

    def _stream(self, request: pb.WatchRequest, resume: bool) -> Iterator[Event | _Marker]:
        resumer = Resumer(request)
        while not self._closed.is_set():
            call = self._stub.Watch(resumer.next_request())
            with self._calls_lock:
                self._calls.add(call)
            connected, error = False, None
            try:
                metadata = call.initial_metadata()
                if _established(metadata):
                    connected = True
                    resumer.established(metadata)
                    yield CONNECTED
                for response in call:
                    yield from _accepted(resumer, response, self._core.decode)
            except grpc.RpcError as exc:
                error = exc
            finally:
                call.cancel()
                with self._calls_lock:
                    self._calls.discard(call)
            if self._closed.is_set():
                return
            step = _stream_step(resumer, resume, error, connected)
            yield from step.items
            if step.action == "raise":
                assert error is not None
                raise from_rpc_error(error) from None
            if step.action == "return":
                return
            self._closed.wait(step.delay)

    def _follow(self) -> None:
        near = self._core.near
        assert near is not None
        request = watch_request(near.tables, None, None, None, False, NEAR_CACHE_PROGRESS)
        while not self._closed.is_set():
            try:
                self._core.learn_keys(self.list_tables())
                for item in self._stream(request, resume=True):
                    self._core.follow(item)
            except Exception:  # e.g. a table this sidecar does not cache: retry, reads go to the sidecar
                near.disconnect()
                self._closed.wait(1.0)

    def close(self) -> None:
        self._closed.set()
        with self._calls_lock:
            for call in list(self._calls):
                call.cancel()
        if self._follower is not None:
            self._follower.join(5)
        if self._store is not None:
            self._store.close()
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client. Create it inside a running event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        decoder: Decoder = default_decoder,
        near_cache: Mapping[str, int] | Iterable[str] | None = None,
        shared_memory: str | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self._channel = channel or grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        # Reads of the sidecar's shared-memory store in this directory (docs/shared-memory.md).
        self._store = SharedMemory(shared_memory) if shared_memory is not None else None
        self._stub = pb_grpc.CacheStub(self._channel)
        self._core = _Core(decoder, timeout, retries, near_cache)
        self._closed = False
        self._follower: asyncio.Task[None] | None = None
        if self._core.near is not None:
            self._follower = asyncio.get_running_loop().create_task(self._follow(), name="cache-sidecar near-cache")

    @property
    def last_revision(self) -> Revision | None:
        return self._core.last_revision

    @property
    def near_cache(self) -> NearCache | None:
        return self._core.near

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = self._core.deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=max(0.001, deadline - time.monotonic()))
            except grpc.RpcError as exc:
                delay = self._core.retry(exc, attempt, deadline)
            attempt += 1
            await asyncio.sleep(delay)

    async def get(
        self,
        table: str,
        key: Any,
        *,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        if self._store is not None:
            if consistency == "eventual" and min_revision is None:
                stored = self._core.from_store(self._store, table, (key,), allow_stale)
            else:
                stored = await self._from_store(table, (key,), consistency, min_revision, allow_stale, timeout)
            if stored is not None:
                return stored[0]  # type: ignore[no-any-return]
        read = _PointRead(self._core, table, key, consistency, min_revision, allow_stale)
        if read.request is None:
            return read.result
        try:
            reply = await self._call(self._stub.Get, read.request, timeout)
        except BaseException:
            read.abandon()
            raise
        return read.finish(reply)

    async def batch_get(
        self,
        table: str,
        keys: Iterable[Any],
        *,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, Any] | None]:
        keys = list(keys)
        if self._store is not None:
            if consistency == "eventual" and min_revision is None:
                stored = self._core.from_store(self._store, table, keys, allow_stale)
            else:
                stored = await self._from_store(table, keys, consistency, min_revision, allow_stale, timeout)
            if stored is not None:
                return stored
        read = _BatchRead(self._core, table, keys, consistency, min_revision, allow_stale)
        if read.request is None:
            return read.results
        try:
            reply = await self._call(self._stub.BatchGet, read.request, timeout)
        except BaseException:
            read.abandon()
            raise
        return read.finish(reply)

    async def _from_store(
        self,
        table: str,
        keys: Sequence[Any],
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
        timeout: float | None,
    ) -> list[Any] | None:
        """As ``Client._from_store``."""
        assert self._store is not None
        read = _StoreRead(self._core, self._store, table, keys, consistency, min_revision, allow_stale, timeout)
        if not read.possible:
            return None
        read.aim(await self.sync(timeout=timeout) if read.strong else None)
        while not read.attempt():  # noqa: ASYNC110 (the store is another process's: nothing to await but time)
            await asyncio.sleep(POLL)
        return read.rows

    async def query(
        self,
        table: str,
        index: str,
        values: Iterable[Any] | None = None,
        *,
        lower: Any = None,
        upper: Any = None,
        lower_exclusive: bool = False,
        upper_exclusive: bool = False,
        limit: int = 0,
        descending: bool = False,
        consistency: Consistency = "eventual",
        min_revision: Revision | None = None,
        allow_stale: bool = False,
        timeout: float | None = None,
    ) -> QueryResult:
        request = self._core.query(
            table, index, values, lower, upper, lower_exclusive, upper_exclusive, limit, descending,
            read_options(consistency, self._core.min_revision(table, min_revision), allow_stale),
        )  # fmt: skip
        if isinstance(request, QueryResult):
            return request
        return self._core.query_result(await self._call(self._stub.Query, request, timeout), table)

    async def invalidate(
        self, table: str, keys: Sequence[Any] | None = None, *, refresh: bool = False, timeout: float | None = None
    ) -> Revision:
        reply = await self._call(self._stub.Invalidate, self._core.invalidate(table, keys, refresh), timeout)
        return self._core.seen(reply.revision)

    async def sync(self, *, timeout: float | None = None) -> Revision:
        return self._core.seen((await self._call(self._stub.Sync, pb.SyncRequest(), timeout)).revision)

    async def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        reply = await self._call(self._stub.ListTables, pb.ListTablesRequest(), timeout)
        self._core.seen(reply.revision)
        return [table_info(t) for t in reply.tables]

    async def watch(
        self,
        tables: Sequence[str] = (),
        *,
        keys: Iterable[Any] | None = None,
        operations: Iterable[str] | None = None,
        start_revision: Revision | None = None,
        initial_state: bool = False,
        progress_interval: float | None = None,
        resume: bool = True,
    ) -> AsyncIterator[Event]:
        """Follow changes (see ``cache_sidecar_client.watch``); stop with ``aclose()`` or by breaking out."""
        request = watch_request(tables, keys, operations, start_revision, initial_state, progress_interval)
        async for item in self._stream(request, resume):
            if not isinstance(item, _Marker):
                yield item

    async def changes(
        self, tables: Sequence[str] = (), *, operations: Iterable[str] | None = None
    ) -> AsyncIterator[Change | Reset]:
        """Every change of these tables (and operations) as it commits; a ``Reset`` means
        changes may have been missed."""
        async for item in self.watch(tables, operations=operations):
            if isinstance(item, ChangeBatch):
                for change in item.changes:
                    yield change
            elif isinstance(item, Reset):
                yield item

    async def _stream(self, request: pb.WatchRequest, resume: bool) -> AsyncIterator[Event | _Marker]:
        resumer = Resumer(request)
        while not self._closed:
            call = self._stub.Watch(resumer.next_request())
            connected, error = False, None
            try:
                metadata = await call.initial_metadata()
                if _established(metadata):
                    connected = True
                    resumer.established(metadata)
                    yield CONNECTED
                async for response in call:
                    for item in _accepted(resumer, response, self._core.decode):
                        yield item
            except grpc.RpcError as exc:
                error = exc
            finally:
                call.cancel()
            if self._closed:
                return
            step = _stream_step(resumer, resume, error, connected)
            for item in step.items:
                yield item
            if step.action == "raise":
                assert error is not None
                raise from_rpc_error(error) from None
            if step.action == "return":
                return
            await asyncio.sleep(step.delay)

    async def _follow(self) -> None:
        near = self._core.near
        assert near is not None
        request = watch_request(near.tables, None, None, None, False, NEAR_CACHE_PROGRESS)
        while not self._closed:
            try:
                self._core.learn_keys(await self.list_tables())
                async for item in self._stream(request, resume=True):
                    self._core.follow(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                near.disconnect()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        self._closed = True
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if self._store is not None:
            self._store.close()
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

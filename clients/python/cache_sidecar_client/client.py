"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for the cache-sidecar.

Both take a gRPC target: ``"127.0.0.1:50051"`` or ``"unix:///run/cache-sidecar/grpc.sock"``.
Rows come back as dicts (decoded from the row JSON), missing rows as ``None``.
A key is a scalar for a one-column primary key, a tuple for a composite one.
Every call has a deadline (``timeout`` seconds, default the client's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from cache_sidecar_client._convert import (
    Consistency,
    Decoder,
    Revision,
    TableInfo,
    default_decoder,
    read_options,
    table_info,
    to_key,
)
from cache_sidecar_client.api.v1 import cache_pb2 as pb
from cache_sidecar_client.api.v1 import cache_pb2_grpc as pb_grpc
from cache_sidecar_client.errors import from_rpc_error
from cache_sidecar_client.watch import RESUMABLE, Event, Resumer
from cache_sidecar_client.watch import event as watch_event
from cache_sidecar_client.watch import request as watch_request

DEFAULT_TIMEOUT = 5.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class _Requests:
    """Request building and response decoding shared by both clients."""

    def __init__(self, decoder: Decoder) -> None:
        self.decode = decoder
        self.last_revision: Revision | None = None

    def _seen(self, revision: pb.Revision) -> Revision:
        seen = Revision.from_pb(revision)
        self.last_revision = seen
        return seen

    def get(
        self, table: str, key: Any, consistency: Consistency, min_revision: Revision | None, allow_stale: bool
    ) -> pb.GetRequest:
        return pb.GetRequest(table=table, key=to_key(key), options=read_options(consistency, min_revision, allow_stale))

    def got(self, reply: pb.GetResponse) -> Any:
        self._seen(reply.revision)
        return self.decode(reply.row) if reply.found else None

    def batch_get(
        self,
        table: str,
        keys: Iterable[Any],
        consistency: Consistency,
        min_revision: Revision | None,
        allow_stale: bool,
    ) -> pb.BatchGetRequest:
        return pb.BatchGetRequest(
            table=table,
            keys=[to_key(k) for k in keys],
            options=read_options(consistency, min_revision, allow_stale),
        )

    def got_batch(self, reply: pb.BatchGetResponse) -> list[Any]:
        self._seen(reply.revision)
        decode = self.decode
        return [decode(r.row) if r.found else None for r in reply.rows]

    def invalidate(self, table: str, keys: Sequence[Any] | None, refresh: bool) -> pb.InvalidateRequest:
        if keys is None:
            return pb.InvalidateRequest(table=table, all_rows=True, refresh=refresh)
        return pb.InvalidateRequest(table=table, keys=[to_key(k) for k in keys], refresh=refresh)

    def tables(self, reply: pb.ListTablesResponse) -> list[TableInfo]:
        self._seen(reply.revision)
        return [table_info(t) for t in reply.tables]


class Client:
    """Blocking client. Thread-safe; use one per process."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        decoder: Decoder = default_decoder,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheStub(self._channel)
        self._r = _Requests(decoder)

    @property
    def last_revision(self) -> Revision | None:
        """The revision of the newest answer this client received."""
        return self._r.last_revision

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
        """One row by primary key, or ``None``."""
        request = self._r.get(table, key, consistency, min_revision, allow_stale)
        return self._r.got(self._call(self._stub.Get, request, timeout))  # type: ignore[no-any-return]

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
        request = self._r.batch_get(table, keys, consistency, min_revision, allow_stale)
        return self._r.got_batch(self._call(self._stub.BatchGet, request, timeout))

    def invalidate(
        self,
        table: str,
        keys: Sequence[Any] | None = None,
        *,
        refresh: bool = False,
        timeout: float | None = None,
    ) -> Revision:
        """Drop cached rows (all of the table's when ``keys`` is None); ``refresh`` refetches now."""
        reply = self._call(self._stub.Invalidate, self._r.invalidate(table, keys, refresh), timeout)
        return self._r._seen(reply.revision)

    def sync(self, *, timeout: float | None = None) -> Revision:
        """Read barrier: returns once every commit before the call is in the cache."""
        return self._r._seen(self._call(self._stub.Sync, pb.SyncRequest(), timeout).revision)

    def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        return self._r.tables(self._call(self._stub.ListTables, pb.ListTablesRequest(), timeout))

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
        resumer = Resumer(watch_request(tables, keys, operations, start_revision, initial_state, progress_interval))
        while True:
            call = self._stub.Watch(resumer.next_request())
            try:
                for response in call:
                    item = watch_event(response, self._r.decode)
                    resumer.seen(item)
                    yield item
            except grpc.RpcError as exc:
                code = exc.code()
                if resume and code == grpc.StatusCode.OUT_OF_RANGE:
                    yield resumer.out_of_range(exc.details())
                    continue
                if not resume or code not in RESUMABLE:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            if not resume:
                return
            reset = resumer.interrupted()
            if reset is not None:
                yield reset
            time.sleep(resumer.delay())

    def close(self) -> None:
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
        decoder: Decoder = default_decoder,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = channel or grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheStub(self._channel)
        self._r = _Requests(decoder)

    @property
    def last_revision(self) -> Revision | None:
        return self._r.last_revision

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
        request = self._r.get(table, key, consistency, min_revision, allow_stale)
        return self._r.got(await self._call(self._stub.Get, request, timeout))  # type: ignore[no-any-return]

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
        request = self._r.batch_get(table, keys, consistency, min_revision, allow_stale)
        return self._r.got_batch(await self._call(self._stub.BatchGet, request, timeout))

    async def invalidate(
        self,
        table: str,
        keys: Sequence[Any] | None = None,
        *,
        refresh: bool = False,
        timeout: float | None = None,
    ) -> Revision:
        reply = await self._call(self._stub.Invalidate, self._r.invalidate(table, keys, refresh), timeout)
        return self._r._seen(reply.revision)

    async def sync(self, *, timeout: float | None = None) -> Revision:
        return self._r._seen((await self._call(self._stub.Sync, pb.SyncRequest(), timeout)).revision)

    async def list_tables(self, *, timeout: float | None = None) -> list[TableInfo]:
        return self._r.tables(await self._call(self._stub.ListTables, pb.ListTablesRequest(), timeout))

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
        resumer = Resumer(watch_request(tables, keys, operations, start_revision, initial_state, progress_interval))
        while True:
            call = self._stub.Watch(resumer.next_request())
            try:
                async for response in call:
                    item = watch_event(response, self._r.decode)
                    resumer.seen(item)
                    yield item
            except grpc.RpcError as exc:
                code = exc.code()
                if resume and code == grpc.StatusCode.OUT_OF_RANGE:
                    yield resumer.out_of_range(exc.details())
                    continue
                if not resume or code not in RESUMABLE:
                    raise from_rpc_error(exc) from None
            finally:
                call.cancel()
            if not resume:
                return
            reset = resumer.interrupted()
            if reset is not None:
                yield reset
            await asyncio.sleep(resumer.delay())

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

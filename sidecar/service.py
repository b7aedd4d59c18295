"""The gRPC ``cachesidecar.v1.Cache`` service: validate, call the engine, map
domain errors to status codes. Nothing else lives here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.engine import Engine, Revision
from sidecar.errors import InvalidKey, InvalidRequest, SidecarError, Unavailable, UnknownTable

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_OF: tuple[tuple[type[SidecarError], grpc.StatusCode], ...] = (
    (UnknownTable, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: SidecarError) -> grpc.StatusCode:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def key_parts(key: pb.Key, where: str = "key") -> list[Any]:
    """A request Key as Python values (coerced to column types later)."""
    parts = []
    for index, part in enumerate(key.parts):
        kind = part.WhichOneof("kind")
        if kind is None:
            raise InvalidKey(f"{where}: part {index} has no value")
        parts.append(getattr(part, kind))
    if not parts:
        raise InvalidKey(f"{where}: empty (give one part per primary-key column)")
    return parts


class CacheService(pb_grpc.CacheServicer):
    """Thin adapter from gRPC to ``Engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._revision_key: Revision | None = None
        self._revision_msg = pb.Revision()

    def _revision(self) -> pb.Revision:
        revision = self.engine.revision
        if revision != self._revision_key:  # built once per revision, not per call
            self._revision_key = revision
            self._revision_msg = pb.Revision(epoch=revision.epoch, number=revision.number)
        return self._revision_msg

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` bounded by the call's deadline; turn errors into statuses."""
        try:
            remaining = context.time_remaining()
            if remaining is None:
                return await work()
            async with asyncio.timeout(remaining):
                return await work()
        except SidecarError as exc:
            await context.abort(status_of(exc), str(exc))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the cache could answer"
            )
        raise AssertionError("unreachable")  # context.abort raises

    async def _prepare(self, options: pb.ReadOptions) -> None:
        strong = options.consistency == pb.STRONG
        min_revision = None
        if options.HasField("min_revision"):
            if not options.min_revision.epoch:
                raise InvalidRequest("min_revision needs the epoch of the revision it came from")
            min_revision = Revision(options.min_revision.epoch, options.min_revision.number)
        if strong or min_revision is not None:
            async with asyncio.timeout(self.engine.max_wait):
                await self.engine.prepare_read(strong, min_revision)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:
        async def work() -> pb.GetResponse:
            parts = key_parts(request.key)
            options = request.options
            if options.consistency == pb.STRONG or options.HasField("min_revision"):
                await self._prepare(options)
            row = await self.engine.get(request.table, parts, options.allow_stale)
            if row is None:
                return pb.GetResponse(found=False, revision=self._revision())
            return pb.GetResponse(found=True, row=row, revision=self._revision())

        return await self._call(context, work)

    async def BatchGet(
        self, request: pb.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetResponse:
        async def work() -> pb.BatchGetResponse:
            keys = [key_parts(key, f"keys[{i}]") for i, key in enumerate(request.keys)]
            await self._prepare(request.options)
            rows = await self.engine.get_many(request.table, keys, request.options.allow_stale)
            return pb.BatchGetResponse(
                rows=[
                    pb.RowResult(found=True, row=row) if row is not None else pb.RowResult() for row in rows
                ],
                revision=self._revision(),
            )

        return await self._call(context, work)

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InvalidateResponse:
        async def work() -> pb.InvalidateResponse:
            if request.all_rows and request.keys:
                raise InvalidRequest("give keys or all_rows, not both")
            if not request.all_rows and not request.keys:
                raise InvalidRequest("nothing to invalidate: give keys or set all_rows")
            keys = (
                None
                if request.all_rows
                else [key_parts(key, f"keys[{i}]") for i, key in enumerate(request.keys)]
            )
            await self.engine.invalidate(request.table, keys, request.refresh)
            return pb.InvalidateResponse(revision=self._revision())

        return await self._call(context, work)

    async def Sync(self, request: pb.SyncRequest, context: grpc.aio.ServicerContext) -> pb.SyncResponse:
        async def work() -> pb.SyncResponse:
            await self.engine.sync()
            return pb.SyncResponse(revision=self._revision())

        return await self._call(context, work)

    async def ListTables(
        self, request: pb.ListTablesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTablesResponse:
        revision = self._revision()
        tables = []
        for name, table in self.engine.tables.items():
            tables.append(
                pb.TableInfo(
                    name=name,
                    key_columns=[pb.Column(name=c.name, type=c.sql_type) for c in table.schema.key_columns],
                    mode=pb.FULL if table.mode == "full" else pb.LAZY,
                    row_count=table.row_count,
                    loaded=table.loaded,
                    revision=revision,
                    max_rows=getattr(table, "max_rows", 0) if table.mode == "lazy" else 0,
                    bytes=table.byte_count(),
                )
            )
        return pb.ListTablesResponse(tables=tables, revision=revision)

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not implemented yet")
        yield pb.WatchResponse()  # pragma: no cover - makes this an async generator

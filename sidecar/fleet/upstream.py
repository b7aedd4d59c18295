"""A follower's upstream sidecar, as the core needs it: the one channel to it,
its tables (``ListTables`` -> ``TableSchema``), and ``UpstreamDatabase``, the
``source.Database`` whose rows come from its ``BatchGet`` and ``Query``.

Everything the upstream sends is untrusted input: names, types and keys are
checked here, and gRPC errors are translated to the daemon's own
(``Unavailable`` for what may pass, ``QueryFailed`` for what would repeat), so
the core never sees grpc's.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.config import IndexConfig, TableConfig, TableMode
from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key, KeyColumn, coerce_key, part_kind
from sidecar.core.revisions import Revision
from sidecar.core.schema import TableSchema
from sidecar.core.source import Rows
from sidecar.core.wire import entry
from sidecar.errors import (
    ConfigError,
    InvalidKey,
    QueryFailed,
    SchemaError,
    Unauthenticated,
    Unavailable,
    UpstreamFailed,
    UpstreamUnavailable,
)
from sidecar.fleet.channels import CertificateSnapshot, UpstreamSecurity, aio_channel, explain
from sidecar.identifiers import parse_table_name

MAX_RECEIVE_BYTES = 64 * 1024 * 1024  # what a sidecar may send (server.MAX_SEND_BYTES)
FETCH_CHUNK = 500  # keys per upstream BatchGet (below any sane server.max_batch_keys)
MAX_TABLES = 10_000  # more tables than this in a ListTables answer is no sidecar's
# Codes that a call sent again may not meet (the upstream, or the way to it, is away).
PASSING = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


def upstream_channel(target: str, security: UpstreamSecurity | None = None) -> grpc.aio.Channel:
    """The channel to the upstream: every call of a follower goes through this one, so that
    its Sync, reads and Watch reach the same upstream sidecar (TLS and a token as ``security``
    says: the ``upstream.*`` settings)."""
    return aio_channel(
        target,
        security,
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_BYTES),
        ],
    )


@contextlib.contextmanager
def translated(what: str, upstream: Upstream, *, callers: bool = False) -> Iterator[None]:
    """gRPC errors as the daemon's own, saying what the likely cause is and carrying the
    upstream's status code (a follower's caller gets it unchanged). ``callers``: the call
    went with the caller's credential, not the follower's (whose files explain nothing)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if callers:
            text = f"{what} (with the caller's credential): {upstream.target}: {exc.code().name}: {exc.details()}"
        else:
            text = f"{what}: {upstream.explain(exc)}"
        if exc.code() in PASSING:
            raise UpstreamUnavailable(text, exc.code().name) from None
        raise UpstreamFailed(text, exc.code().name) from None


def key_message(key: Sequence[Any]) -> pb.Key:
    parts = []
    for value in key:
        kind, sent = part_kind(value)
        parts.append(pb.KeyPart(**{kind: sent}))
    return pb.Key(parts=parts)


def key_of(columns: Sequence[KeyColumn], key: pb.Key) -> Key:
    """A key the upstream sent, coerced to the table's columns (``InvalidKey`` if it does not fit)."""
    parts = []
    for part in key.parts:
        kind = part.WhichOneof("kind")
        if kind is None:
            raise InvalidKey("a key part without a value")
        parts.append(getattr(part, kind))
    return coerce_key(columns, parts)


def revision_of(message: pb.Revision) -> Revision:
    return Revision(message.epoch, message.number)


@dataclass
class Upstream:
    """The upstream sidecar's calls, on one channel."""

    target: str
    channel: grpc.aio.Channel
    timeout: float = 10.0
    security: UpstreamSecurity = field(default_factory=UpstreamSecurity)
    invalidate_with_own_token: bool = False  # (upstream.invalidate_with_own_token)

    def __post_init__(self) -> None:
        self._certificates = CertificateSnapshot(self.security)

    @classmethod
    def connect(
        cls,
        target: str,
        timeout: float = 10.0,
        security: UpstreamSecurity | None = None,
        invalidate_with_own_token: bool = False,
    ) -> Upstream:
        security = security or UpstreamSecurity()
        return cls(target, upstream_channel(target, security), timeout, security, invalidate_with_own_token)

    async def renew_if_rotated(self) -> bool:
        """A new channel if a certificate file (CA, client certificate or key) changed
        since this one was made (a rotation); the token is re-read on every call anyway."""
        if not self._certificates.changed():
            return False
        self._certificates = CertificateSnapshot(self.security)
        old, self.channel = self.channel, upstream_channel(self.target, self.security)
        await old.close()
        return True

    def explain(self, error: grpc.aio.AioRpcError, established: bool = False) -> str:
        """A failed call as a sentence naming the likely cause (wrong CA, token, not a sidecar...);
        ``established``: of a call that had been answered."""
        return explain(error, self.target, self.security, established)

    @property
    def stub(self) -> pb_grpc.CacheStub:
        return pb_grpc.CacheStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def list_tables(self) -> pb.ListTablesResponse:
        with translated("ListTables", self):
            answer: pb.ListTablesResponse = await self.stub.ListTables(pb.ListTablesRequest(), timeout=self.timeout)
        if len(answer.tables) > MAX_TABLES:
            raise QueryFailed(f"{self.target} lists {len(answer.tables)} tables: not a sidecar's answer")
        return answer

    async def sync(self, timeout: float) -> Revision:
        with translated("Sync", self):
            answer: pb.SyncResponse = await self.stub.Sync(pb.SyncRequest(), timeout=timeout)
        return revision_of(answer.revision)

    async def invalidate(
        self, table: str, raw_keys: Sequence[Sequence[Any]] | None, refresh: bool, credentials: tuple[str, ...] = ()
    ) -> Revision:
        """Invalidate on the upstream, with the caller's own ``credentials`` (its 'authorization'
        values) in place of this follower's token: the upstream judges the caller's scope, and a
        caller without one gets nothing of the follower's (``invalidate_with_own_token`` says
        otherwise)."""
        request = pb.InvalidateRequest(table=table, refresh=refresh, all_rows=raw_keys is None)
        if raw_keys is not None:
            request.keys.extend(key_message(key) for key in raw_keys)
        metadata: tuple[tuple[str, str], ...] | None = None
        if not self.invalidate_with_own_token:
            if credentials:
                metadata = tuple(("authorization", value) for value in credentials)
            elif self.security.token_file is not None:
                raise Unauthenticated(
                    "a follower forwards Invalidate to its upstream with the caller's own token only: send "
                    "'authorization: Bearer <an admin token of the upstream>' (or set "
                    "upstream.invalidate_with_own_token on this follower)"
                )
        with translated("Invalidate", self, callers=metadata is not None):
            answer: pb.InvalidateResponse = await self.stub.Invalidate(request, timeout=self.timeout, metadata=metadata)
        return revision_of(answer.revision)


# ---------------------------------------------------------------- tables


def _column(table: str, column: pb.Column) -> KeyColumn:
    if not column.type_name:
        raise SchemaError(
            f"the upstream does not say the base type of {table}.{column.name} (a sidecar older than "
            "this one?): a follower needs it to read keys; upgrade the upstream first"
        )
    return KeyColumn.create(column.name, column.type_name, column.type, column.enum)


def table_schema(info: pb.TableInfo) -> TableSchema:
    """A follower's schema of one upstream table (its mode, key, indexes and their columns)."""
    schema_name, relname = parse_table_name(info.name, "the upstream's ListTables")
    mode: TableMode = "lazy" if info.mode == pb.LAZY else "full"
    indexes = tuple(IndexConfig(i.name, tuple(i.columns), i.unique, i.range) for i in info.indexes)
    config = TableConfig(
        schema=schema_name,
        name=relname,
        mode=mode,
        max_rows=info.max_rows or 100_000,
        indexes=indexes if mode == "full" else (),
    )
    if not info.key_columns:
        raise SchemaError(f"the upstream lists {info.name} without key columns")
    keys = tuple(_column(info.name, c) for c in info.key_columns)
    columns = {c.name: _column(info.name, c) for c in info.indexed_columns}
    schema = TableSchema(config=config, key_columns=keys, columns=columns)
    for index in indexes:
        for name in index.columns:
            try:
                schema.column(name)
            except KeyError:
                raise SchemaError(
                    f"the upstream's index {index.name} of {info.name} reads column {name}, whose type it "
                    "does not say (a sidecar older than this one?)"
                ) from None
    return schema


def follower_schemas(listing: pb.ListTablesResponse, wanted: Sequence[TableConfig]) -> list[TableSchema]:
    """The upstream's tables, all of them or the ``wanted`` ones (a start-up error names any it lacks)."""
    served = {info.name: info for info in listing.tables}
    if wanted:
        missing = [t.qualified for t in wanted if t.qualified not in served]
        if missing:
            raise ConfigError(
                "tables",
                f"the upstream does not serve {', '.join(missing)} (it serves: {', '.join(served) or 'nothing'})",
            )
        infos = [served[t.qualified] for t in wanted]
    else:
        infos = list(served.values())
    if not infos:
        raise ConfigError("tables", "the upstream serves no tables")
    return [table_schema(info) for info in infos]


# ---------------------------------------------------------------- rows


class UpstreamDatabase:
    """``source.Database`` over the upstream's reads: ``fetch`` is its BatchGet, ``query``
    its Query; ``strong`` ones pass its read barrier first (pass-through reads, which
    must be as fresh as a read of PostgreSQL would be)."""

    def __init__(self, upstream: Upstream, *, strong: bool) -> None:
        self.upstream = upstream
        self.options = pb.ReadOptions(consistency=pb.STRONG if strong else pb.EVENTUAL)
        self.calls = 0

    async def describe(self, table: TableConfig) -> TableSchema:
        raise SchemaError("a follower has no database to describe tables with")

    async def estimate(self, schema: TableSchema) -> int | None:
        return None  # (a follower loads no table: its rows come with the upstream's stream)

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        raise QueryFailed(f"{schema.qualified}: a follower's full tables come from its upstream's Watch")
        yield {}  # pragma: no cover (an async generator)

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        rows: Rows = {}
        for start in range(0, len(keys), FETCH_CHUNK):
            chunk = keys[start : start + FETCH_CHUNK]
            request = pb.BatchGetRequest(table=schema.qualified, options=self.options)
            request.keys.extend(key_message(key) for key in chunk)
            self.calls += 1
            with translated(f"reading {schema.qualified}", self.upstream):
                answer: pb.BatchGetResponse = await self.upstream.stub.BatchGet(request, timeout=self.upstream.timeout)
            if len(answer.rows) != len(chunk):
                raise Unavailable(f"{self.upstream.target} answered {len(answer.rows)} rows for {len(chunk)} keys")
            for key, result in zip(chunk, answer.rows, strict=True):
                if result.found:
                    rows[key] = entry(result.row)
        return rows

    async def fetch_matching(self, schema: TableSchema, columns: Sequence[str], values: Sequence[Key]) -> Rows:
        raise QueryFailed(f"{schema.qualified}: a follower refreshes no relation (its upstream sends the rows)")

    async def query(self, schema: TableSchema, query: IndexQuery) -> Rows:
        """The rows in order; one more than ``query.limit`` when the upstream says more matched
        (keys are positions: the read path wants the rows and their count)."""
        request = pb.QueryRequest(
            table=schema.qualified,
            index=query.index,
            limit=query.limit,
            descending=query.descending,
            options=self.options,
        )
        if query.values is not None:
            request.values.extend(key_message(value) for value in query.values)
        else:
            request.range.SetInParent()
            for name, bound, exclusive in (
                ("lower", query.low, query.low_open),
                ("upper", query.high, query.high_open),
            ):
                if bound is not None:
                    kind, sent = part_kind(bound)
                    getattr(request.range, name).CopyFrom(pb.KeyPart(**{kind: sent}))
                    setattr(request.range, f"{name}_exclusive", exclusive)
        self.calls += 1
        with translated(f"querying {schema.qualified}", self.upstream):
            answer: pb.QueryResponse = await self.upstream.stub.Query(request, timeout=self.upstream.timeout)
        counter = itertools.count()
        rows: Rows = {(next(counter),): entry(result.row) for result in answer.rows}
        if answer.truncated:
            rows[(next(counter),)] = b""  # (cut off by the read path: it only says "more matched")
        return rows

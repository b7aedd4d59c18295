"""Python values <-> API messages: keys, rows, revisions, read options."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from cache_sidecar_client import _json
from cache_sidecar_client.api.v1 import cache_pb2 as pb

Consistency = Literal["eventual", "strong"]
Row = dict[str, Any]
Decoder = Callable[[bytes], Any]

_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Revision:
    """A position in the sidecar's stream of applied changes (see the API docs)."""

    epoch: str
    number: int

    @classmethod
    def from_pb(cls, message: pb.Revision) -> Revision:
        return cls(message.epoch, message.number)

    def to_pb(self) -> pb.Revision:
        return pb.Revision(epoch=self.epoch, number=self.number)


@dataclass(frozen=True)
class TableInfo:
    name: str
    key_columns: tuple[tuple[str, str], ...]  # (name, type)
    mode: str  # "full" | "lazy"
    row_count: int
    loaded: bool
    max_rows: int
    bytes: int
    indexes: tuple[IndexInfo, ...] = ()
    problem: str = ""  # set while the table is not served from memory, saying why


@dataclass(frozen=True)
class IndexInfo:
    """A secondary index ``query`` can use."""

    name: str
    columns: tuple[str, ...]
    unique: bool
    range: bool


@dataclass(frozen=True)
class QueryResult:
    """What an index query matched: rows in order, and whether more matched than the limit."""

    rows: list[Any]
    truncated: bool
    revision: Revision | None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def query_request(
    table: str,
    index: str,
    values: Iterable[Any] | None,
    lower: Any,
    upper: Any,
    lower_exclusive: bool,
    upper_exclusive: bool,
    limit: int,
    descending: bool,
    options: pb.ReadOptions | None,
) -> pb.QueryRequest:
    """A QueryRequest: equality on ``values`` (each a scalar, or a tuple for a
    several-column index), else a range between the bounds (``None``: unbounded)."""
    request = pb.QueryRequest(table=table, index=index, limit=limit, descending=descending, options=options)
    if values is not None:
        if lower is not None or upper is not None:
            raise ValueError("give values (equality) or lower/upper (a range), not both")
        request.values.extend(to_key(value) for value in values)
        return request
    request.range.SetInParent()
    if lower is not None:
        request.range.lower.CopyFrom(key_part(lower))
    if upper is not None:
        request.range.upper.CopyFrom(key_part(upper))
    request.range.lower_exclusive = lower_exclusive
    request.range.upper_exclusive = upper_exclusive
    return request


def key_part(value: Any) -> pb.KeyPart:
    if isinstance(value, bool):
        return pb.KeyPart(bool_value=value)
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return pb.KeyPart(int_value=value)
        return pb.KeyPart(string_value=str(value))
    if isinstance(value, str):
        return pb.KeyPart(string_value=value)
    if isinstance(value, float):
        return pb.KeyPart(double_value=value)
    if isinstance(value, bytes | bytearray | memoryview):
        return pb.KeyPart(bytes_value=bytes(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return pb.KeyPart(string_value=value.isoformat())
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return pb.KeyPart(string_value=str(value))
    raise TypeError(f"cannot send {type(value).__name__} as a key part")


def to_key(key: Any) -> pb.Key:
    """A scalar for one key column, a tuple (or list) for a composite key."""
    parts = key if isinstance(key, tuple | list) else (key,)
    return pb.Key(parts=[key_part(part) for part in parts])


def batch_keys(keys: list[Any]) -> dict[str, Any]:
    """BatchGetRequest key fields: the compact lists when every key is a plain
    int (or str) of a one-column key, Key messages otherwise."""
    if keys and all(type(k) is int and _INT64[0] <= k <= _INT64[1] for k in keys):
        return {"int_keys": keys}
    if keys and all(type(k) is str for k in keys):
        return {"string_keys": keys}
    return {"keys": [to_key(k) for k in keys]}


def from_key(key: pb.Key) -> Any:
    """An event's key as Python: a scalar for one column, a tuple for several."""
    values = tuple(getattr(part, part.WhichOneof("kind") or "string_value") for part in key.parts)
    return values[0] if len(values) == 1 else values


def read_options(consistency: Consistency, min_revision: Revision | None, allow_stale: bool) -> pb.ReadOptions | None:
    if consistency == "eventual" and min_revision is None and not allow_stale:
        return None
    if consistency not in ("eventual", "strong"):
        raise ValueError(f"consistency must be 'eventual' or 'strong', not {consistency!r}")
    return pb.ReadOptions(
        consistency=pb.STRONG if consistency == "strong" else pb.EVENTUAL,
        min_revision=min_revision.to_pb() if min_revision else None,
        allow_stale=allow_stale,
    )


def table_info(message: pb.TableInfo) -> TableInfo:
    return TableInfo(
        name=message.name,
        key_columns=tuple((c.name, c.type) for c in message.key_columns),
        mode=pb.TableMode.Name(message.mode).lower(),
        row_count=message.row_count,
        loaded=message.loaded,
        max_rows=message.max_rows,
        bytes=message.bytes,
        indexes=tuple(IndexInfo(i.name, tuple(i.columns), i.unique, i.range) for i in message.indexes),
        problem=message.problem,
    )


_DECODER = json.JSONDecoder()


def default_decoder(data: bytes) -> Any:
    """Row JSON as Python, exactly: integers of any length as ``int``, nesting of any depth
    (``json.loads`` refuses both beyond its limits; such rows are read by ``_json.loads``)."""
    # The sidecar's rows are UTF-8 JSON and nothing else: one scan of the text, a microsecond
    # less than json.loads (its encoding detection and the calls around the scanner: half of a
    # store read). Anything else takes json.loads's path and gets its answer or its error.
    try:
        text = data.decode()
        value, end = _DECODER.raw_decode(text)
        if end == len(text):
            return value
    except (ValueError, RecursionError, AttributeError):
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _json.loads(data)  # (and if this fails too, the row is not JSON)

"""Typed change events, parsed from NOTIFY payloads at the edge.

The triggers (``triggers.py``) send compact JSON:

    {"v":1,"s":"public","t":"patron","x":7301,"op":"U","k":[[1],[2]],"o":[[9]]}
    {"v":1,"s":"public","t":"patron","x":7302,"op":"T","all":"truncate"}

``k`` are the keys the statement wrote (or deleted), ``o`` the keys an UPDATE
moved away from, ``all`` a reason the whole table changed. The sidecar's own
read-barrier tokens travel on the same channel as ``{"v":1,"sync":"<token>"}``
so that they are ordered with the changes.
"""

from __future__ import annotations

import decimal
import enum
import json
from dataclasses import dataclass
from typing import Any

from sidecar.errors import PayloadError

PAYLOAD_VERSION = 1
MAX_PAYLOAD_BYTES = 8000  # PostgreSQL's own limit; anything longer did not come from it
MAX_XID = 2**64 - 1  # revisions carry the xid as uint64
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: longer names are no catalog's


class Op(enum.Enum):
    INSERT = "I"
    UPDATE = "U"
    DELETE = "D"
    TRUNCATE = "T"


@dataclass(frozen=True, slots=True)
class RowChange:
    """A statement changed these rows (keys as raw JSON parts, not yet coerced)."""

    schema: str
    table: str
    op: Op
    xid: int
    keys: tuple[tuple[Any, ...], ...]
    old_keys: tuple[tuple[Any, ...], ...] = ()
    # The rows now, one per key of ``keys`` (cache entries; None: deleted), when the change
    # came with them (logical decoding); None: refetch them.
    rows: tuple[bytes | None, ...] | None = None


@dataclass(frozen=True, slots=True)
class TableChange:
    """Too much changed to name the rows (TRUNCATE, a bulk statement, an oversized key)."""

    schema: str
    table: str
    op: Op
    xid: int
    reason: str
    # The change stream brought the outcome: the table is empty now (a TRUNCATE decoded
    # from the WAL), nothing to reload.
    emptied: bool = False


@dataclass(frozen=True, slots=True)
class SyncToken:
    """A read-barrier token the sidecar sent itself."""

    token: str


Event = RowChange | TableChange | SyncToken


def parse(payload: str) -> Event:
    """Parse one payload; raise ``PayloadError`` saying what is wrong.

    Any role that can connect may NOTIFY our channel, so every field is checked
    here; key parts are only known to be JSON scalars until the engine coerces
    them to their columns' types.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"longer than {MAX_PAYLOAD_BYTES} characters")
    try:
        data = json.loads(payload, parse_float=decimal.Decimal)
    except (ValueError, RecursionError) as exc:  # (deep nesting: RecursionError)
        raise PayloadError(f"not JSON: {type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(data, dict):
        raise PayloadError("not a JSON object")
    if data.get("v") != PAYLOAD_VERSION:
        raise PayloadError(f"unsupported payload version {data.get('v')!r}")
    if "sync" in data:
        token = data["sync"]
        if not isinstance(token, str):
            raise PayloadError("sync token is not a string")
        return SyncToken(token)

    schema, table, xid = data.get("s"), data.get("t"), data.get("x")
    if not isinstance(schema, str) or not isinstance(table, str):
        raise PayloadError("missing schema or table name")
    if not _is_name(schema) or not _is_name(table):
        raise PayloadError("schema or table name is not a PostgreSQL name")
    if not isinstance(xid, int) or isinstance(xid, bool):
        raise PayloadError("missing transaction id")
    if not 0 <= xid <= MAX_XID:
        raise PayloadError(f"transaction id {xid} is out of range")
    try:
        op = Op(data.get("op"))
    except ValueError:
        raise PayloadError(f"unknown operation {data.get('op')!r}") from None

    if "all" in data:
        reason = data["all"]
        if not isinstance(reason, str):
            raise PayloadError("'all' is not a string")
        return TableChange(schema, table, op, xid, reason[:100])
    if op is Op.TRUNCATE:
        raise PayloadError("TRUNCATE without 'all'")
    keys, old_keys = _keys(data.get("k")), _keys(data.get("o", []))
    if not keys and not old_keys:
        raise PayloadError("no keys")
    return RowChange(schema, table, op, xid, keys, old_keys)


def _keys(value: Any) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(value, list) or not all(isinstance(k, list) and k for k in value):
        raise PayloadError("keys are not a list of non-empty arrays")
    if not all(isinstance(part, _SCALARS) for k in value for part in k):
        raise PayloadError("key parts are not JSON scalars")
    return tuple(tuple(k) for k in value)


_SCALARS = (str, int, float, decimal.Decimal, bool, type(None))


def _is_name(text: str) -> bool:
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate, from a "\ud800" escape
        return False
    return 0 < size <= MAX_NAME_BYTES and "\x00" not in text


def sync_payload(token: str) -> str:
    return json.dumps({"v": PAYLOAD_VERSION, "sync": token}, separators=(",", ":"))

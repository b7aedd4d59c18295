"""The shared-memory store's byte layout (docs/shared-memory.md is its specification):
the canonical key encoding and the meta records. Pure functions, no I/O; the
client distribution carries its own copy (cache_sidecar_client/shared_memory.py),
and both are checked against the same vectors in the tests.

Key encoding (layout 1): the key's parts in key-column order, each a tag byte and
its payload --

    0x01 integer  8 bytes, big-endian two's complement (int2, int4, int8, oid)
    0x02 text     4-byte big-endian length, then UTF-8 (text, varchar, name, enums;
                  char(n) with trailing blanks removed, as PostgreSQL compares it)
    0x03 uuid     16 bytes (RFC 4122 byte order)
    0x04 boolean  1 byte, 0 or 1
    0x05 bytea    4-byte big-endian length, then the bytes

Other key column types (numeric, float, date, timestamp) have no encoding in this
layout: such tables are not written to the store (their reads stay on gRPC). A key
whose encoding is longer than ``MAX_KEY`` bytes (LMDB's limit) is not written either:
readers ask gRPC for such keys.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.core.keys import Key, KeyColumn

LAYOUT = 1
MAX_KEY = 511  # bytes: LMDB's largest key (its default build's); longer keys are not in the store
META_DB = b"meta"
STATE_KEY = b"state"
TABLE_PREFIX = b"table:"
ROWS_PREFIX = b"rows:"

# One character per key column in a table record: what a reader coerces a key part to.
KIND_BY_TYPE = {
    "int2": "h",  # the four integer kinds: one encoding, the reader checks the range
    "int4": "i",
    "int8": "l",
    "oid": "o",
    "text": "s",
    "varchar": "s",
    "name": "s",
    "bpchar": "p",  # text, trailing blanks removed
    "uuid": "u",
    "bool": "b",
    "bytea": "x",
}

STATE_HEADER = struct.Struct("<IIqQ")  # layout, flags, heartbeat (µs since 1970), revision number
TABLE_HEADER = struct.Struct("<IIQ")  # layout, flags, rows
SOURCE_UP = 1  # state flag: the change source is up and the store is not held back
SERVED = 1  # table flag: the table's rows in the store are complete and may be read

_INT = struct.Struct(">q")
_LENGTH = struct.Struct(">I")


def key_kinds(columns: Sequence[KeyColumn]) -> str | None:
    """The table record's kinds for these key columns; None if one has no encoding."""
    kinds = []
    for column in columns:
        kind = "s" if column.enum else KIND_BY_TYPE.get(column.type_name)
        if kind is None:
            return None
        kinds.append(kind)
    return "".join(kinds)


def encode_part(value: Any) -> bytes:
    """One coerced key part (as keys.py makes it: by its Python type, not its column's)."""
    if value is True or value is False:
        return b"\x04\x01" if value else b"\x04\x00"
    if isinstance(value, int):
        return b"\x01" + _INT.pack(value)
    if isinstance(value, str):
        data = value.encode()
        return b"\x02" + _LENGTH.pack(len(data)) + data
    if isinstance(value, uuid.UUID):
        return b"\x03" + value.bytes
    if isinstance(value, bytes):
        return b"\x05" + _LENGTH.pack(len(value)) + value
    raise TypeError(f"a key part of type {type(value).__name__} has no shared-memory encoding")


def encode_key(key: Key) -> bytes:
    if len(key) == 1:
        return encode_part(key[0])
    return b"".join(map(encode_part, key))


_TAGGED_INT = struct.Struct(">Bq").pack


def _one_integer(key: Key) -> bytes:
    return _TAGGED_INT(1, key[0])


def key_encoder(kinds: str | None) -> Callable[[Key], bytes]:
    """``encode_key``, or for a key of one integer column (most tables) the same bytes in one
    call: a 1 M-row table's rewrite encodes a million keys."""
    return _one_integer if kinds is not None and len(kinds) == 1 and kinds in "hilo" else encode_key


def state_record(source_up: bool, heartbeat_us: int, revision: int, epoch: str) -> bytes:
    return STATE_HEADER.pack(LAYOUT, SOURCE_UP if source_up else 0, heartbeat_us, revision) + epoch.encode()


def table_record(served: bool, rows: int, kinds: str) -> bytes:
    return TABLE_HEADER.pack(LAYOUT, SERVED if served else 0, rows) + kinds.encode()


def rows_db_name(table: str) -> bytes:
    return ROWS_PREFIX + table.encode()


def table_key(table: str) -> bytes:
    return TABLE_PREFIX + table.encode()

"""Primary keys: coercing request and payload values to each key column's type.

A cache key is a tuple of Python values, one per key column, in the types
asyncpg returns for those columns, so that a key from a client, from a trigger
payload and from a loaded row compare and hash equal. Each column gets a
``KeyColumn`` whose ``coerce`` accepts what a client may send (a KeyPart's
int, string, bool, double or bytes) and what a trigger sends (the column's
``to_json`` form) and raises ``InvalidKey`` naming the column otherwise.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import InvalidKey, SchemaError

Key = tuple[Any, ...]

_INT_RANGES = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
    "oid": (0, 2**32 - 1),
}


def _fail(column: str, type_name: str, value: Any, why: str = "") -> InvalidKey:
    """``column`` is the label shown to users: "name (sql type)"."""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidKey(f"key column {column}: {shown} {why or 'does not fit'}")


def _int(column: str, type_name: str) -> Callable[[Any], int]:
    low, high = _INT_RANGES[type_name]

    def coerce(value: Any) -> int:
        if isinstance(value, bool):
            raise _fail(column, type_name, value, "is not an integer")
        if isinstance(value, int):
            result = value
        elif isinstance(value, float | decimal.Decimal):
            # (checked before int(): int(Decimal("1e999999999")) would take the loop for minutes)
            if not math.isfinite(value) or (isinstance(value, decimal.Decimal) and value.adjusted() > 19):
                raise _fail(column, type_name, value, f"is out of range for {type_name}")
            if value != int(value):
                raise _fail(column, type_name, value, "is not an integer")
            result = int(value)
        elif isinstance(value, str):
            try:
                result = int(value.strip())
            except ValueError:
                raise _fail(column, type_name, value, "is not an integer") from None
        else:
            raise _fail(column, type_name, value, "is not an integer")
        if not low <= result <= high:
            raise _fail(column, type_name, value, f"is out of range for {type_name}")
        return result

    return coerce


# PostgreSQL's numeric holds up to 131072 digits before the point and 16383 after.
NUMERIC_MAX_INTEGER_DIGITS = 131072
NUMERIC_MAX_SCALE = 16383


def _encodable(text: str) -> bool:
    """Can be sent to PostgreSQL as UTF-8 (JSON's "\ud800" escapes make strings that cannot)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(column: str, type_name: str) -> Callable[[Any], str]:
    pad = type_name == "bpchar"  # char(n): PostgreSQL ignores trailing blanks

    def coerce(value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(column, type_name, value, "is not a string")
        if "\x00" in value:
            raise _fail(column, type_name, value, "contains a NUL character")
        if not _encodable(value):
            raise _fail(column, type_name, value, "is not valid Unicode (a lone surrogate)")
        return value.rstrip(" ") if pad else value

    return coerce


def _uuid(column: str, type_name: str) -> Callable[[Any], uuid.UUID]:
    def coerce(value: Any) -> uuid.UUID:
        try:
            if isinstance(value, uuid.UUID):
                return value
            if isinstance(value, bytes):
                return uuid.UUID(bytes=value)
            if isinstance(value, str):
                return uuid.UUID(value)
        except ValueError:
            pass
        raise _fail(column, type_name, value, "is not a UUID")

    return coerce


def _bool(column: str, type_name: str) -> Callable[[Any], bool]:
    words = {"true": True, "t": True, "false": False, "f": False}

    def coerce(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise _fail(column, type_name, value, "is not a boolean")

    return coerce


def _numeric(column: str, type_name: str) -> Callable[[Any], decimal.Decimal]:
    def coerce(value: Any) -> decimal.Decimal:
        if isinstance(value, bool):
            raise _fail(column, type_name, value, "is not a number")
        try:
            if isinstance(value, decimal.Decimal):
                result = value
            elif isinstance(value, int):
                result = decimal.Decimal(value)
            elif isinstance(value, float):
                result = decimal.Decimal(repr(value))
            elif isinstance(value, str):
                result = decimal.Decimal(value.strip())
            else:
                raise _fail(column, type_name, value, "is not a number")
        except decimal.InvalidOperation:
            raise _fail(column, type_name, value, "is not a number") from None
        if not result.is_finite():
            raise _fail(column, type_name, value, "is not a finite number")
        exponent = result.as_tuple().exponent
        scale = -exponent if isinstance(exponent, int) else 0
        if result and (result.adjusted() >= NUMERIC_MAX_INTEGER_DIGITS or scale > NUMERIC_MAX_SCALE):
            raise _fail(column, type_name, value, "is out of range for numeric")
        return result

    return coerce


def _float(column: str, type_name: str) -> Callable[[Any], float]:
    def coerce(value: Any) -> float:
        if isinstance(value, bool):
            raise _fail(column, type_name, value, "is not a number")
        try:
            if isinstance(value, int | float | decimal.Decimal):
                result = float(value)
            elif isinstance(value, str):
                result = float(value.strip())
            else:
                raise _fail(column, type_name, value, "is not a number")
        except (ValueError, OverflowError):
            raise _fail(column, type_name, value, "is not a number") from None
        if math.isnan(result):
            raise _fail(column, type_name, value, "is NaN, which never equals a key")
        return result

    return coerce


def _date(column: str, type_name: str) -> Callable[[Any], dt.date]:
    def coerce(value: Any) -> dt.date:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value.strip())
            except ValueError:
                pass
        raise _fail(column, type_name, value, "is not an ISO date (YYYY-MM-DD)")

    return coerce


def _timestamp(column: str, type_name: str) -> Callable[[Any], dt.datetime]:
    aware = type_name == "timestamptz"

    def coerce(value: Any) -> dt.datetime:
        result: dt.datetime | None = None
        if isinstance(value, dt.datetime):
            result = value
        elif isinstance(value, str):
            try:
                result = dt.datetime.fromisoformat(value.strip())
            except ValueError:
                result = None
        if result is None:
            raise _fail(column, type_name, value, "is not an ISO 8601 timestamp")
        if aware:
            # A timestamptz key without an offset is read as UTC.
            return result if result.tzinfo else result.replace(tzinfo=dt.UTC)
        if result.tzinfo is not None:
            raise _fail(column, type_name, value, "has a UTC offset but the column has no time zone")
        return result

    return coerce


def _bytea(column: str, type_name: str) -> Callable[[Any], bytes]:
    def coerce(value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value.startswith("\\x"):
            try:
                return bytes.fromhex(value[2:])
            except ValueError:
                pass
        raise _fail(column, type_name, value, "is not bytes (or a '\\x...' hex string)")

    return coerce


_COERCERS: dict[str, Callable[[str, str], Callable[[Any], Any]]] = {
    **{name: _int for name in _INT_RANGES},
    **{name: _text for name in ("text", "varchar", "bpchar", "name")},
    "uuid": _uuid,
    "bool": _bool,
    "numeric": _numeric,
    "float4": _float,
    "float8": _float,
    "date": _date,
    "timestamp": _timestamp,
    "timestamptz": _timestamp,
    "bytea": _bytea,
}
SUPPORTED_KEY_TYPES = (*sorted(_COERCERS), "enum types")


@dataclass(frozen=True)
class KeyColumn:
    """One primary-key column: its name, its SQL type and how to coerce values to it."""

    name: str
    type_name: str  # pg_type.typname of the base type (domains resolved), e.g. "int8"
    sql_type: str  # format_type() of the column, for casts, e.g. "bigint"
    coerce: Callable[[Any], Any]
    # Held as str (text types, enums): ordered by code point, as COLLATE "C" orders text.
    textual: bool = False
    cast_type: str = ""  # the type without modifiers, for parameters (format_type(oid, -1))
    enum: bool = False

    @classmethod
    def create(
        cls, name: str, type_name: str, sql_type: str, is_enum: bool = False, cast_type: str | None = None
    ) -> KeyColumn:
        factory = _text if is_enum else _COERCERS.get(type_name)
        if factory is None:
            raise SchemaError(
                f"column {name} has type {sql_type}, which cannot be a cache key or an indexed column "
                f"(supported: {', '.join(SUPPORTED_KEY_TYPES)})"
            )
        label = f"{name} ({sql_type})"
        coerce = factory(label, "text" if is_enum else type_name)
        return cls(name, type_name, sql_type, coerce, factory is _text, cast_type or sql_type, is_enum)

    # SQL: parameters are cast to the type without its modifiers, so that a value that
    # does not fit (a longer string, more decimals) matches nothing instead of being
    # truncated or rounded into a match; enums compare as text, so that a label that is
    # not one of the type's matches nothing instead of failing the query.

    def compared_sql(self, expression: str) -> str:
        """``expression`` (this column) as compared with parameters."""
        return f"{expression}::text" if self.enum else expression

    def parameter_sql(self, number: int, array: bool = False) -> str:
        cast = "text" if self.enum else self.cast_type
        return f"${number}::{cast}{'[]' if array else ''}"

    def held_sql(self, expression: str) -> str | None:
        """A condition for the values the sidecar can hold in an index, where some cannot be
        (infinite dates and timestamps, those beyond year 9999, non-finite numbers)."""
        if self.type_name == "date":
            return f"{expression} BETWEEN '0001-01-01'::date AND '9999-12-31'::date"
        if self.type_name in ("timestamp", "timestamptz"):
            return f"{expression} >= '0001-01-01'::{self.cast_type} AND {expression} < '10000-01-01'::{self.cast_type}"
        if self.type_name == "numeric":
            return f"{expression}::text NOT IN ('NaN', 'Infinity', '-Infinity')"
        if self.type_name in ("float4", "float8"):
            return f"{expression}::text <> 'NaN'"
        return None

    def order_sql(self, expression: str) -> str:
        """``expression`` (this column) as SQL that sorts the way the sidecar sorts its values."""
        return f'{expression}::text COLLATE "C"' if self.textual else expression


def coerce_key(columns: Sequence[KeyColumn], parts: Sequence[Any]) -> Key:
    """Coerce one key (a sequence of parts in key-column order)."""
    if len(parts) != len(columns):
        names = ", ".join(c.name for c in columns)
        raise InvalidKey(f"key has {len(parts)} part(s) but the primary key is ({names})")
    if len(columns) == 1:  # the common case, kept cheap
        return (columns[0].coerce(parts[0]),)
    return tuple(column.coerce(part) for column, part in zip(columns, parts, strict=True))


_ONLY_INT, _ONLY_STR = {int}, {str}  # (bool is not int here: type(), not isinstance())


def coerce_single(columns: Sequence[KeyColumn], values: Sequence[Any]) -> list[Key]:
    """Coerce many values of a one-column key (the compact BatchGet forms)."""
    if len(columns) != 1:
        names = ", ".join(c.name for c in columns)
        raise InvalidKey(f"key has 1 part(s) but the primary key is ({names})")
    column = columns[0]
    values = list(values)  # (each read of a protobuf container makes its values anew: read it once)
    if values:
        # The common cases, checked a whole list at a time (in C) instead of a call per value;
        # anything else, or anything these checks refuse, goes value by value (and its error).
        bounds = _INT_RANGES.get(column.type_name)
        if bounds is not None:
            if set(map(type, values)) == _ONLY_INT and bounds[0] <= min(values) and max(values) <= bounds[1]:
                return list(zip(values))
        elif column.textual and column.type_name != "bpchar" and set(map(type, values)) == _ONLY_STR:
            joined = "".join(values)
            if joined.isascii() and "\x00" not in joined:
                return list(zip(values))
    coerce = column.coerce
    return [(coerce(v),) for v in values]


def normalize_stored(columns: Sequence[KeyColumn], values: Sequence[Any]) -> Key:
    """A key as loaded from the database, normalized like a coerced one."""
    if any(c.type_name == "bpchar" for c in columns):
        return tuple(
            v.rstrip(" ") if c.type_name == "bpchar" and isinstance(v, str) else v
            for c, v in zip(columns, values, strict=True)
        )
    return tuple(values)


def part_kind(value: Any) -> tuple[str, Any]:
    """How a key value travels in a KeyPart: (field name, value)."""
    if isinstance(value, bool):
        return "bool_value", value
    if isinstance(value, int):
        return "int_value", value
    if isinstance(value, str):
        return "string_value", value
    if isinstance(value, float):
        return "double_value", value
    if isinstance(value, bytes):
        return "bytes_value", value
    if isinstance(value, dt.datetime | dt.date):
        return "string_value", value.isoformat()
    return "string_value", str(value)  # uuid, Decimal


def key_text(key: Key) -> str:
    """A key for logs and messages."""
    shown = ", ".join(repr(part_kind(v)[1]) for v in key)
    return f"({shown})"

"""Primary keys: coercing request, payload and loaded values to each key column's type.

A cache key is a tuple of Python values, one per key column, each in one
*canonical* form per PostgreSQL value, so that a key from a client, from a
trigger payload and from a loaded row compare and hash equal exactly when
PostgreSQL's ``=`` says so. Each column gets a ``KeyColumn`` whose ``coerce``
accepts what a client may send (a KeyPart's int, string, bool, double or
bytes), what a trigger sends (the column's ``to_json`` form) and what a load
reads (``stored_sql``), and raises ``InvalidKey`` naming the column otherwise.

Canonical forms: a ``real`` is the float4 value (widened), not the nearest
double of the text given; ``-0.0`` is ``0.0``; a numeric has no trailing
fraction zeros (``1.0`` and ``1.00`` are one value); a timestamptz is in UTC;
``char(n)`` has no trailing blanks. Values Python's types cannot hold or order
as PostgreSQL does are ``Special`` singletons: dates' and timestamps'
``infinity``/``-infinity`` (asyncpg would read them as ``date.max``/``date.min``,
colliding with real dates) and the ``NaN`` of floats and numerics (which
PostgreSQL holds equal to itself and sorts above every number).
"""

from __future__ import annotations

import datetime as dt
import decimal
import fractions
import math
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import InvalidKey, SchemaError

Key = tuple[Any, ...]


class Special:
    """A key value with no Python equivalent that orders as PostgreSQL orders it: below
    every other value (``-infinity``), or above (``infinity``; ``NaN`` above that)."""

    __slots__ = ("rank", "text")

    def __init__(self, rank: int, text: str) -> None:
        self.rank = rank
        self.text = text  # as PostgreSQL reads it back, and as a KeyPart string carries it

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Special) and other.rank == self.rank

    def __hash__(self) -> int:
        return hash((Special, self.rank))

    def _rank(self, other: object) -> int:
        return other.rank if isinstance(other, Special) else 0

    def __lt__(self, other: object) -> bool:
        return self.rank < self._rank(other)

    def __le__(self, other: object) -> bool:
        return self.rank <= self._rank(other)

    def __gt__(self, other: object) -> bool:
        return self.rank > self._rank(other)

    def __ge__(self, other: object) -> bool:
        return self.rank >= self._rank(other)


MINUS_INFINITY = Special(-1, "-infinity")  # dates and timestamps
INFINITY = Special(1, "infinity")
NAN = Special(2, "NaN")  # floats and numerics
_INFINITE = {"infinity": INFINITY, "+infinity": INFINITY, "-infinity": MINUS_INFINITY}

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
    def coerce(value: Any) -> Any:
        if value is NAN:
            return NAN
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
            if result.is_nan():  # (PostgreSQL: NaN = NaN, a key like any other)
                return NAN
            return decimal.Decimal("-Infinity" if result.is_signed() else "Infinity")
        exponent = result.as_tuple().exponent
        scale = -exponent if isinstance(exponent, int) else 0
        if result and (result.adjusted() >= NUMERIC_MAX_INTEGER_DIGITS or scale > NUMERIC_MAX_SCALE):
            raise _fail(column, type_name, value, "is out of range for numeric")
        return canonical_decimal(result)

    return coerce


def canonical_decimal(value: decimal.Decimal) -> decimal.Decimal:
    """A finite numeric without trailing fraction zeros and with no sign on zero, exactly
    (no context, no rounding): 1.0, 1.00 and 1 are one key, as in PostgreSQL."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if not any(digits):
        return decimal.Decimal(0)
    if exponent > 0:  # (1E+2 is 100)
        return decimal.Decimal((sign, digits + (0,) * exponent, 0))
    end = len(digits)
    while exponent < 0 and digits[end - 1] == 0:
        end -= 1
        exponent += 1
    if end == len(digits):
        return value
    return decimal.Decimal((sign, digits[:end], exponent))


_FLOAT4 = struct.Struct("<f")
_FLOAT4_BITS = struct.Struct("<I")


def _float4(value: float) -> float:
    """``value`` rounded to the nearest float4 (OverflowError beyond its range)."""
    return float(_FLOAT4.unpack(_FLOAT4.pack(value))[0])


def _float4_exact(text: decimal.Decimal) -> float:
    """The float4 nearest to a decimal, rounded once (as PostgreSQL's strtof does), not
    via the nearest double (which rounds twice and can land one float4 off)."""
    guess = _float4(float(text))
    if not math.isfinite(guess) or guess == 0.0:
        return guess
    bits = _FLOAT4_BITS.unpack(_FLOAT4.pack(guess))[0]
    exact = fractions.Fraction(text)
    candidates = [guess]
    for step in (-1, 1):
        neighbour = float(_FLOAT4.unpack(_FLOAT4_BITS.pack(bits + step))[0])
        if math.isfinite(neighbour):
            candidates.append(neighbour)
    # nearest; on a tie the even mantissa (the last bit clear), as IEEE rounding does
    return min(
        candidates,
        key=lambda c: (abs(fractions.Fraction(c) - exact), _FLOAT4_BITS.unpack(_FLOAT4.pack(c))[0] & 1),
    )


def _float(column: str, type_name: str) -> Callable[[Any], Any]:
    single = type_name == "float4"
    sql_name = "real" if single else "double precision"

    def coerce(value: Any) -> Any:
        if value is NAN:
            return NAN
        if isinstance(value, bool):
            raise _fail(column, type_name, value, "is not a number")
        exact: decimal.Decimal | None = None  # the value given, when it is not a double already
        try:
            if isinstance(value, float):
                result = value
            elif isinstance(value, int):
                exact = decimal.Decimal(value)
                result = float(value)
            elif isinstance(value, decimal.Decimal):
                exact, result = value, float(value)
            elif isinstance(value, str):
                text = value.strip()
                result = float(text)
                exact = decimal.Decimal(text)
            else:
                raise _fail(column, type_name, value, "is not a number")
        except OverflowError:
            raise _fail(column, type_name, value, f"is out of range for {sql_name}") from None
        except (ValueError, decimal.InvalidOperation):
            raise _fail(column, type_name, value, "is not a number") from None
        if math.isnan(result):
            return NAN  # (PostgreSQL: NaN = NaN, above every other value)
        if single:
            try:
                rounded = _float4_exact(exact) if exact is not None and exact.is_finite() else _float4(result)
            except OverflowError:
                rounded = math.inf
            if math.isinf(rounded) and not math.isinf(result):
                raise _fail(column, type_name, value, "is out of range for real")
            result = rounded
        if exact is not None and exact.is_finite() and exact and (result == 0.0 or math.isinf(result)):
            # (PostgreSQL refuses what rounds to 0 or overflows: "1e400" is no key of Infinity)
            raise _fail(column, type_name, value, f"is out of range for {sql_name}")
        return result + 0.0  # (-0.0 = 0.0: one key)

    return coerce


def _date(column: str, type_name: str) -> Callable[[Any], dt.date]:
    def coerce(value: Any) -> Any:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value
        if isinstance(value, Special) and value.rank in (-1, 1):
            return value
        if isinstance(value, str):
            text = value.strip()
            special = _INFINITE.get(text.lower())
            if special is not None:
                return special
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                if _beyond_years(text):
                    raise _fail(column, type_name, value, _BEYOND) from None
        raise _fail(column, type_name, value, "is not an ISO date (YYYY-MM-DD)")

    return coerce


# PostgreSQL's dates reach 4713 BC and 5874897 AD; Python's, 1 to 9999 AD.
_BEYOND = "is beyond the years 1-9999 the sidecar can hold"


def _beyond_years(text: str) -> bool:
    """A date or timestamp PostgreSQL spells (BC, or a year of five digits or more)."""
    year = text.split("-", 1)[0]
    return text.upper().endswith(" BC") or text.startswith("-") or (year.isdigit() and len(year) > 4)


def _timestamp(column: str, type_name: str) -> Callable[[Any], dt.datetime]:
    aware = type_name == "timestamptz"

    def coerce(value: Any) -> Any:
        result: dt.datetime | None = None
        if isinstance(value, dt.datetime):
            result = value
        elif isinstance(value, Special) and value.rank in (-1, 1):
            return value
        elif isinstance(value, str):
            text = value.strip()
            special = _INFINITE.get(text.lower())
            if special is not None:
                return special
            try:
                result = dt.datetime.fromisoformat(text)
            except ValueError:
                if _beyond_years(text):
                    raise _fail(column, type_name, value, _BEYOND) from None
                result = None
        if result is None:
            raise _fail(column, type_name, value, "is not an ISO 8601 timestamp")
        if aware:
            # A timestamptz key without an offset is read as UTC; one key per instant.
            if result.tzinfo is None:
                return result.replace(tzinfo=dt.UTC)
            try:
                return result.astimezone(dt.UTC)
            except OverflowError:
                raise _fail(column, type_name, value, _BEYOND) from None
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
# Types a load reads as PostgreSQL's text and parameters send as text: asyncpg's binary
# codecs read 'infinity' as date.max (and send date.max as 'infinity').
_AS_TEXT = frozenset({"date", "timestamp", "timestamptz"})
# Types whose loaded values need ``coerce`` to be canonical (the others come canonical).
_NORMALIZED = _AS_TEXT | {"bpchar", "float4", "float8", "numeric"}
_NAN_PARAMETER: dict[str, Any] = {"float4": math.nan, "float8": math.nan, "numeric": decimal.Decimal("NaN")}


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
        brackets = "[]" if array else ""
        if self.type_name in _AS_TEXT:
            return f"${number}::pg_catalog.text{brackets}::{cast}{brackets}"
        return f"${number}::{cast}{brackets}"

    def parameter(self, value: Any) -> Any:
        """A canonical value as a query parameter (see ``parameter_sql``)."""
        if self.type_name in _AS_TEXT:
            return value.text if isinstance(value, Special) else value.isoformat()
        if value is NAN:
            return _NAN_PARAMETER[self.type_name]
        return value

    def stored_sql(self, expression: str) -> str:
        """``expression`` (this column) as a load reads it, for ``stored``."""
        return f"{expression}::pg_catalog.text" if self.type_name in _AS_TEXT else expression

    @property
    def normalized(self) -> bool:
        """Whether a loaded value needs ``coerce`` to be canonical."""
        return self.type_name in _NORMALIZED

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
    """A key as loaded from the database (``stored_sql``), in the canonical form a coerced
    one has; ``InvalidKey`` for a value the sidecar cannot hold (a year beyond 9999)."""
    if any(c.normalized for c in columns):
        return tuple(c.coerce(v) if c.normalized and v is not None else v for c, v in zip(columns, values, strict=True))
    return tuple(values)


def orderable(value: Any) -> bool:
    """Whether an index holds ``value``: not NULL, nor a value PostgreSQL orders apart
    (infinite dates and numerics, NaN: see ``KeyColumn.held_sql``)."""
    if value is None or isinstance(value, Special):
        return False
    return not isinstance(value, decimal.Decimal) or value.is_finite()


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
    if isinstance(value, Special):
        return "string_value", value.text
    return "string_value", str(value)  # uuid, Decimal


def key_text(key: Key) -> str:
    """A key for logs and messages."""
    shown = ", ".join(repr(part_kind(v)[1]) for v in key)
    return f"({shown})"


def collision_text(count: int) -> str:
    """Why a load whose rows collide on keys cannot be served."""
    return (
        f"{count} row(s) have the key of another row (a key that is not unique, or values "
        "the sidecar cannot tell apart): the table would miss rows"
    )

"""The exact bytes of ``row_to_json(t)::text``, built from a row's columns in text format
(as pgoutput sends them) without asking PostgreSQL; no I/O.

``row_json(columns, values, types)`` follows PostgreSQL's own ``row_to_json``
(``composite_to_json`` / ``datum_to_json`` in ``src/backend/utils/adt/json.c``):

- ``boolean`` -> ``true``/``false``; ``smallint``/``integer``/``bigint``/``real``/``double
  precision``/``numeric`` -> the output text as a JSON number when it is one, else a JSON string
  (``"NaN"``, ``"Infinity"``, ``"-Infinity"``);
- ``json``/``jsonb`` -> their text, embedded as is;
- ``timestamp``/``timestamptz`` -> ISO 8601 strings (``T`` between date and time, the zone as
  ``+HH:MM``), ``"infinity"``/``"-infinity"``, `` BC`` kept;
- arrays -> JSON arrays (nested for several dimensions; lower bounds dropped; NULL -> null),
  elements converted by their own type; domains -> as their base type; composites -> JSON
  objects of their fields (PostgreSQL's record text is parsed, quoting and all);
- everything else (text, bytea, date, time, timetz, interval, uuid, inet, enums, money, ...)
  -> its output text as a JSON string, escaped as ``escape_json`` does (``\\b \\f \\n \\r \\t \\"
  \\\\``, other control characters as ``\\u00XX`` in lower case, everything else as is).

The text of a value depends on session settings, and pgoutput writes it with the walsender's:
the replication connection must pin what the daemon's own sessions pin
(``sidecar.pg.db.PINNED_SETTINGS``: ``DateStyle=ISO, MDY``, ``TimeZone=UTC``,
``IntervalStyle=postgres``, ``extra_float_digits=3``, ``bytea_output=hex``, ``lc_monetary=C``,
...) and ``client_encoding=UTF8``. The timestamp conversion checks the ISO form and refuses
any other, so a DateStyle that was not pinned is noticed rather than served.

Refused (``Unconvertible``: the caller refetches the row with ``row_to_json`` instead):

- a type ``types`` does not describe (only the plain built-in types of ``PLAIN_TYPES`` need
  no description; arrays, enums, domains, composites and extension types do, see
  ``CATALOG_QUERY``);
- a user-defined type with a cast to ``json`` (``row_to_json`` calls the cast: hstore and
  the like);
- a value pgoutput did not send as text: an unchanged TOASTed value (``UNCHANGED``: take it
  from the cached row) or a binary one;
- text that does not parse as its type's output (settings not pinned, or a forged message).

Generated columns are not sent by pgoutput (before PostgreSQL 18) but are part of
``row_to_json``: the caller compares the Relation's columns with the table's and refetches
when they differ.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from sidecar.pg import pgoutput

__all__ = [
    "CATALOG_QUERY",
    "PLAIN_TYPES",
    "Array",
    "Base",
    "Composite",
    "Domain",
    "Enum",
    "TypeInfo",
    "Unconvertible",
    "converter",
    "row_from_tuple",
    "row_json",
    "types_from_catalog",
    "value_json",
]


class Unconvertible(Exception):
    """This value's row_to_json bytes cannot be built exactly from its text."""


@dataclass(frozen=True, slots=True)
class Base:
    """A base type. ``json_cast``: user-defined and has a cast to json (row_to_json uses it)."""

    json_cast: bool = False


@dataclass(frozen=True, slots=True)
class Enum:
    json_cast: bool = False


@dataclass(frozen=True, slots=True)
class Array:
    """An array type: its element type and that type's delimiter in array text."""

    element: int
    delimiter: str = ","


@dataclass(frozen=True, slots=True)
class Domain:
    base: int


@dataclass(frozen=True, slots=True)
class Composite:
    """A composite type's fields (name, type), dropped ones left out, in order."""

    fields: tuple[tuple[str, int], ...]


TypeInfo: TypeAlias = Base | Enum | Array | Domain | Composite

BOOL, INT8, INT2, INT4, JSON, FLOAT4, FLOAT8, TIMESTAMP, TIMESTAMPTZ, NUMERIC, JSONB = (
    16,
    20,
    21,
    23,
    114,
    700,
    701,
    1114,
    1184,
    1700,
    3802,
)
_NUMBERS: Final = frozenset({INT2, INT4, INT8, FLOAT4, FLOAT8, NUMERIC})

PLAIN_TYPES: Final[frozenset[int]] = frozenset(
    {
        *(BOOL, INT8, INT2, INT4, JSON, FLOAT4, FLOAT8, TIMESTAMP, TIMESTAMPTZ, NUMERIC, JSONB),
        17,  # bytea
        18,  # "char"
        19,  # name
        25,  # text
        26,  # oid
        142,  # xml
        650,  # cidr
        790,  # money
        829,  # macaddr
        869,  # inet
        1042,  # character
        1043,  # character varying
        1082,  # date
        1083,  # time
        1186,  # interval
        1266,  # time with time zone
        1560,  # bit
        1562,  # bit varying
        2950,  # uuid
        3220,  # pg_lsn
        3614,  # tsvector
    }
)
"""Built-in base types converted without a description in ``types``."""

_VECTORS: Final = frozenset({22, 30})  # int2vector, oidvector
_MAX_DEPTH: Final = 32  # nested composites and arrays (arrays alone have at most 6 dimensions)

# What pg_catalog says about the types of a table's columns, and of their elements, bases and
# fields, recursively: one row per type for ``types_from_catalog``. $1: the columns' type OIDs.
CATALOG_QUERY: Final = """
WITH RECURSIVE wanted(oid) AS (
    SELECT unnest($1::pg_catalog.oid[])
  UNION
    SELECT d.oid
    FROM wanted w
    JOIN pg_catalog.pg_type t ON t.oid = w.oid
    CROSS JOIN LATERAL (
        SELECT t.typelem WHERE t.typlen = -1 AND t.typelem <> 0
            AND t.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc
        UNION ALL SELECT t.typbasetype WHERE t.typtype = 'd'
        UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
            WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
    ) AS d(oid)
)
SELECT t.oid::pg_catalog.int8 AS oid,
    t.typtype::pg_catalog.text AS typtype,
    CASE WHEN t.typlen = -1 AND t.typelem <> 0
        AND t.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc
        THEN t.typelem::pg_catalog.int8 END AS element,
    (SELECT e.typdelim::pg_catalog.text FROM pg_catalog.pg_type e WHERE e.oid = t.typelem) AS delimiter,
    t.typbasetype::pg_catalog.int8 AS base,
    ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum) AS field_names,
    ARRAY(SELECT a.atttypid::pg_catalog.int8 FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum) AS field_types,
    t.oid >= 16384 AND EXISTS (
        SELECT FROM pg_catalog.pg_cast c
        WHERE c.castsource = t.oid AND c.casttarget = 'pg_catalog.json'::pg_catalog.regtype
            AND c.castmethod = 'f') AS json_cast
FROM wanted w JOIN pg_catalog.pg_type t ON t.oid = w.oid
"""


def types_from_catalog(rows: Iterable[Mapping[str, Any]]) -> dict[int, TypeInfo]:
    """``CATALOG_QUERY``'s rows as the ``types`` the other functions take."""
    types: dict[int, TypeInfo] = {}
    for row in rows:
        oid = int(row["oid"])
        if row["element"] is not None:
            types[oid] = Array(int(row["element"]), str(row["delimiter"] or ","))
        elif row["typtype"] == "d":
            types[oid] = Domain(int(row["base"]))
        elif row["typtype"] == "c":
            types[oid] = Composite(tuple(zip(row["field_names"], map(int, row["field_types"]), strict=True)))
        elif row["typtype"] == "e":
            types[oid] = Enum(bool(row["json_cast"]))
        elif row["typtype"] == "b":
            types[oid] = Base(bool(row["json_cast"]))
        # pseudo-types, ranges, multiranges: left out, so refused (ranges' text is plain, but
        # nothing needs them yet)
    return types


# -- strings ----------------------------------------------------------------------------

_ESCAPES: Final = {
    b'"': b'\\"',
    b"\\": b"\\\\",
    b"\b": b"\\b",
    b"\f": b"\\f",
    b"\n": b"\\n",
    b"\r": b"\\r",
    b"\t": b"\\t",
}
_TO_ESCAPE: Final = re.compile(rb'[\x00-\x1f"\\]')


def _escape_match(match: re.Match[bytes]) -> bytes:
    char = match[0]
    return _ESCAPES.get(char) or b"\\u%04x" % char[0]


def _string(text: bytes) -> bytes:
    """PostgreSQL's escape_json on UTF-8 bytes."""
    return b'"' + _TO_ESCAPE.sub(_escape_match, text) + b'"'


_JSON_NUMBER: Final = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_TIMESTAMP: Final = re.compile(rb"([0-9]{4,}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)( BC)?")
_TIMESTAMPTZ: Final = re.compile(
    rb"([0-9]{4,}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?)"
    rb"([+-][0-9]{2})(:[0-9]{2})?(:[0-9]{2})?( BC)?"
)
_INFINITE: Final = frozenset({b"infinity", b"-infinity"})


# -- values -----------------------------------------------------------------------------


def value_json(text: bytes | None, type_oid: int, types: Mapping[int, TypeInfo], depth: int = 0) -> bytes:
    """One value's JSON as row_to_json writes it; ``text`` is its output text, None for NULL."""
    if text is None:
        return b"null"
    if depth > _MAX_DEPTH:
        raise Unconvertible(f"nested deeper than {_MAX_DEPTH} levels")
    info = types.get(type_oid)
    for _ in range(_MAX_DEPTH):
        if not isinstance(info, Domain):
            break
        type_oid = info.base  # row_to_json looks through domains to the base type
        info = types.get(type_oid)
    else:
        raise Unconvertible(f"domains nested deeper than {_MAX_DEPTH} levels")
    if isinstance(info, Array):
        if type_oid in _VECTORS:  # (arrays to row_to_json, but written "1 2 3")
            return (
                b"["
                + b",".join(value_json(part, info.element, types, depth + 1) for part in text.split(b" ") if part)
                + b"]"
            )
        return _array(text, info, types, depth)
    if isinstance(info, Composite):
        return _composite(text, info, types, depth)
    if isinstance(info, Base | Enum) and info.json_cast:
        raise Unconvertible(f"type {type_oid} has a cast to json, which row_to_json calls")
    if info is None and type_oid not in PLAIN_TYPES:
        raise Unconvertible(f"type {type_oid} is not described")
    if type_oid in _NUMBERS:
        return text if _JSON_NUMBER.fullmatch(text) else _string(text)
    if type_oid == BOOL:
        if text == b"t":
            return b"true"
        if text == b"f":
            return b"false"
        raise Unconvertible(f"boolean text {text[:20]!r}")
    if type_oid in (JSON, JSONB):
        return text
    if type_oid == TIMESTAMP:
        return _timestamp(text)
    if type_oid == TIMESTAMPTZ:
        return _timestamptz(text)
    return _string(text)


def converter(type_oid: int, types: Mapping[int, TypeInfo]) -> Callable[[bytes], bytes]:
    """``value_json(text, type_oid, types)`` for a value's text (not NULL), as one function
    chosen once per column: the common built-in types get theirs directly, every other type
    the general ``value_json``. Same bytes, same ``Unconvertible``."""
    info = types.get(type_oid)
    if type_oid in PLAIN_TYPES and (info is None or (isinstance(info, Base | Enum) and not info.json_cast)):
        if type_oid in _NUMBERS:
            return _number
        if type_oid == BOOL:
            return _bool
        if type_oid in (JSON, JSONB):
            return _same
        if type_oid == TIMESTAMP:
            return _timestamp
        if type_oid == TIMESTAMPTZ:
            return _timestamptz
        return _string
    return functools.partial(_general, type_oid=type_oid, types=types)


def _general(text: bytes, *, type_oid: int, types: Mapping[int, TypeInfo]) -> bytes:
    return value_json(text, type_oid, types)


def _number(text: bytes) -> bytes:
    if text.isdigit() and text[0] != 0x30:  # (ASCII digits, no leading zero: the common JSON number)
        return text
    return text if _JSON_NUMBER.fullmatch(text) else _string(text)


def _bool(text: bytes) -> bytes:
    if text == b"t":
        return b"true"
    if text == b"f":
        return b"false"
    raise Unconvertible(f"boolean text {text[:20]!r}")


def _same(text: bytes) -> bytes:
    return text


def _timestamp(text: bytes) -> bytes:
    if text in _INFINITE:
        return b'"' + text + b'"'
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise Unconvertible(f"timestamp text {text[:40]!r} is not ISO (DateStyle not pinned?)")
    date, time, bc = match.groups()
    return b'"' + date + b"T" + time + (bc or b"") + b'"'


def _timestamptz(text: bytes) -> bytes:
    if text in _INFINITE:
        return b'"' + text + b'"'
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:
        raise Unconvertible(f"timestamptz text {text[:40]!r} is not ISO (DateStyle not pinned?)")
    date, time, hours, minutes, seconds, bc = match.groups()
    # ISO writes the zone as +HH when it is whole hours; XSD (row_to_json) always as +HH:MM.
    zone = hours + (minutes or b":00") + (seconds or b"")
    return b'"' + date + b"T" + time + zone + (bc or b"") + b'"'


# -- arrays ------------------------------------------------------------------------------

_DIMENSIONS: Final = re.compile(rb"(?:\[-?[0-9]+:-?[0-9]+\]){1,6}=")
_ARRAY_SPECIAL: Final = frozenset(b'{}"\\ \t\n\r\v\f')


def _array(text: bytes, info: Array, types: Mapping[int, TypeInfo], depth: int) -> bytes:
    """array_out's text -> a JSON array (row_to_json ignores the lower bounds)."""
    if text[:1] == b"[":
        bounds = _DIMENSIONS.match(text)
        if bounds is None:
            raise Unconvertible(f"array text {text[:40]!r}: malformed dimensions")
        text = text[bounds.end() :]
    delimiter = info.delimiter.encode()
    if len(delimiter) != 1:
        raise Unconvertible(f"array delimiter {info.delimiter!r}")
    parser = _ArrayText(text, delimiter[0])
    out = parser.parse(lambda element: value_json(element, info.element, types, depth + 1))
    return out


class _ArrayText:
    """A strict reader of array_out's output: braces, delimiters, NULL, quoted elements."""

    __slots__ = ("delimiter", "pos", "text")

    def __init__(self, text: bytes, delimiter: int) -> None:
        self.text = text
        self.pos = 0
        self.delimiter = delimiter

    def fail(self, problem: str) -> Unconvertible:
        return Unconvertible(f"array text {self.text[:40]!r}: {problem} at offset {self.pos}")

    def parse(self, convert: Any) -> bytes:
        out = self._level(convert, 1)
        if self.pos != len(self.text):
            raise self.fail("text after the array")
        return out

    def _level(self, convert: Any, level: int) -> bytes:
        if level > 6:
            raise self.fail("more than 6 dimensions")
        if self.text[self.pos : self.pos + 1] != b"{":
            raise self.fail("expected '{'")
        self.pos += 1
        parts: list[bytes] = []
        if self.text[self.pos : self.pos + 1] == b"}":
            self.pos += 1
            return b"[]"
        while True:
            if self.text[self.pos : self.pos + 1] == b"{":
                parts.append(self._level(convert, level + 1))
            else:
                parts.append(convert(self._element()))
            if self.pos >= len(self.text):
                raise self.fail("unterminated array")
            char = self.text[self.pos]
            self.pos += 1
            if char == 0x7D:  # '}'
                return b"[" + b",".join(parts) + b"]"
            if char != self.delimiter:
                raise self.fail("expected a delimiter or '}'")

    def _element(self) -> bytes | None:
        text, start = self.text, self.pos
        if text[start : start + 1] == b'"':
            out = bytearray()
            pos = start + 1
            while True:
                end = _next_quote_or_backslash(text, pos)
                if end < 0:
                    self.pos = len(text)
                    raise self.fail("unterminated quoted element")
                out += text[pos:end]
                if text[end] == 0x22:  # '"'
                    self.pos = end + 1
                    return bytes(out)
                if end + 1 >= len(text):
                    self.pos = end
                    raise self.fail("backslash at the end")
                out.append(text[end + 1])
                pos = end + 2
        pos = start
        while pos < len(text) and text[pos] != self.delimiter and text[pos] != 0x7D:
            if text[pos] in _ARRAY_SPECIAL:
                self.pos = pos
                raise self.fail("unexpected character in an unquoted element")
            pos += 1
        if pos == start:
            raise self.fail("empty unquoted element")
        self.pos = pos
        token = text[start:pos]
        return None if token == b"NULL" else token


def _next_quote_or_backslash(text: bytes, pos: int) -> int:
    quote = text.find(b'"', pos)
    backslash = text.find(b"\\", pos)
    if backslash < 0 or (0 <= quote < backslash):
        return quote
    return backslash


# -- composites ----------------------------------------------------------------------------

_RECORD_SPECIAL: Final = frozenset(b'"\\(), \t\n\r\v\f')


def _composite(text: bytes, info: Composite, types: Mapping[int, TypeInfo], depth: int) -> bytes:
    """record_out's text -> a JSON object of the fields."""
    if text == b"()" and not info.fields:
        return b"{}"
    values = _record_fields(text)
    if len(values) != len(info.fields):
        raise Unconvertible(f"record text has {len(values)} fields, its type {len(info.fields)}")
    return _object(info.fields, values, types, depth + 1)


def _record_fields(text: bytes) -> list[bytes | None]:
    """The fields of record_out's text: ``(a,"b c",,"x""y")``; an empty unquoted field is NULL."""
    if text[:1] != b"(" or text[-1:] != b")":
        raise Unconvertible(f"record text {text[:40]!r}: expected '(...)'")
    fields: list[bytes | None] = []
    pos, end = 1, len(text) - 1
    while True:
        if pos < end and text[pos] == 0x22:  # '"': quoted, "" and \x stand for " and x
            out = bytearray()
            pos += 1
            while True:
                if pos >= end:
                    raise Unconvertible(f"record text {text[:40]!r}: unterminated quoted field")
                char = text[pos]
                if char == 0x22:
                    if pos + 1 < end and text[pos + 1] == 0x22:
                        out.append(0x22)
                        pos += 2
                        continue
                    pos += 1
                    break
                if char == 0x5C:  # backslash
                    if pos + 1 >= end:
                        raise Unconvertible(f"record text {text[:40]!r}: backslash at the end")
                    out.append(text[pos + 1])
                    pos += 2
                    continue
                out.append(char)
                pos += 1
            fields.append(bytes(out))
        else:
            start = pos
            while pos < end and text[pos] != 0x2C:
                if text[pos] in _RECORD_SPECIAL:
                    raise Unconvertible(f"record text {text[:40]!r}: unexpected character at offset {pos}")
                pos += 1
            fields.append(text[start:pos] if pos > start else None)
        if pos == end:
            return fields
        if text[pos] != 0x2C:  # ','
            raise Unconvertible(f"record text {text[:40]!r}: expected ',' at offset {pos}")
        pos += 1


def _object(
    fields: Sequence[tuple[str, int]], values: Sequence[bytes | None], types: Mapping[int, TypeInfo], depth: int
) -> bytes:
    parts = []
    for (name, type_oid), value in zip(fields, values, strict=True):
        try:
            parts.append(_string(name.encode()) + b":" + value_json(value, type_oid, types, depth))
        except Unconvertible as exc:
            raise Unconvertible(f"{name}: {exc}") from None
    return b"{" + b",".join(parts) + b"}"


# -- rows --------------------------------------------------------------------------------


def row_json(
    columns: Sequence[tuple[str, int]], values: Sequence[bytes | None], types: Mapping[int, TypeInfo]
) -> bytes:
    """``row_to_json(t)::text`` as UTF-8 for a row of these columns (name, type OID) and
    values (output text, None for NULL). Raises ``Unconvertible`` naming the column."""
    if len(columns) != len(values):
        raise Unconvertible(f"{len(values)} values for {len(columns)} columns")
    for value in values:
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Unconvertible(f"a value is not UTF-8 ({exc.reason})") from None
    return _object(columns, values, types, 0)


def row_from_tuple(
    relation: pgoutput.Relation, values: Sequence[pgoutput.Datum], types: Mapping[int, TypeInfo]
) -> bytes:
    """``row_json`` of a pgoutput Insert/Update tuple of this Relation (text format only)."""
    columns = [(c.name, c.type_oid) for c in relation.columns]
    texts: list[bytes | None] = []
    for column, value in zip(relation.columns, values, strict=False):
        if isinstance(value, pgoutput.Text):
            texts.append(value.data)
        elif value is None:
            texts.append(None)
        elif value is pgoutput.UNCHANGED:
            raise Unconvertible(f"{column.name}: unchanged TOASTed value (not sent)")
        else:
            raise Unconvertible(f"{column.name}: binary format")
    if len(values) != len(columns):
        raise Unconvertible(f"{len(values)} values for the {len(columns)} columns of {relation.name}")
    return row_json(columns, texts, types)


# -- what the cached row already says ----------------------------------------------------

_TOKENS: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],:]', re.DOTALL)


def object_values(raw: bytes) -> list[bytes]:
    """The values of a JSON object's top-level fields, in order, as raw JSON text (a row of
    ``row_to_json``: its fields are the columns, in order). Raises ``Unconvertible`` when
    ``raw`` is not one object."""
    if not raw.startswith(b"{"):
        raise Unconvertible("a cached row is not a JSON object")
    values: list[bytes] = []
    depth, start, expect_value = 0, -1, False
    for match in _TOKENS.finditer(raw, 1):
        token = match[0]
        if depth == 0:
            if token == b":":
                start, expect_value = match.end(), True
                continue
            if token in (b",", b"}"):
                if expect_value:
                    values.append(raw[start : match.start()])  # (a json value keeps its spaces)
                    expect_value = False
                if token == b"}":
                    if match.end() != len(raw.rstrip()):
                        raise Unconvertible("a cached row has bytes after its object")
                    return values
                continue
        if token in (b"{", b"["):
            depth += 1
        elif token in (b"}", b"]"):
            depth -= 1
            if depth < 0:
                raise Unconvertible("a cached row's brackets do not match")
    raise Unconvertible("a cached row is not a complete JSON object")


def describes(type_oid: int, types: Mapping[int, TypeInfo], depth: int = 0) -> str | None:
    """None when values of ``type_oid`` convert exactly (by ``value_json``), else why not."""
    if depth > _MAX_DEPTH:
        return f"type {type_oid} nests deeper than {_MAX_DEPTH} levels"
    info = types.get(type_oid)
    if info is None:
        return None if type_oid in PLAIN_TYPES else f"type {type_oid} is not one row_to_json's text is known for"
    if isinstance(info, Domain):
        return describes(info.base, types, depth + 1)
    if isinstance(info, Array):
        return describes(info.element, types, depth + 1)
    if isinstance(info, Composite):
        for _, field_type in info.fields:
            if (why := describes(field_type, types, depth + 1)) is not None:
                return why
        return None
    if info.json_cast:
        return f"type {type_oid} has a cast to json, which row_to_json calls"
    return None

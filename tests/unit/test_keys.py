"""Key coercion per column type: what fits, what is refused, with the column named."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import struct
import uuid

import pytest

from sidecar.core.keys import (
    INFINITY,
    MINUS_INFINITY,
    NAN,
    KeyColumn,
    coerce_key,
    coerce_single,
    normalize_stored,
    part_kind,
)
from sidecar.errors import InvalidKey, SchemaError

U = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
UTC = dt.UTC


def col(type_name: str, sql_type: str | None = None, **kw) -> KeyColumn:
    return KeyColumn.create("k", type_name, sql_type or type_name, **kw)


@pytest.mark.parametrize(
    ("type_name", "given", "expected"),
    [
        ("int2", 7, 7),
        ("int4", "42", 42),
        ("int8", 2**63 - 1, 2**63 - 1),
        ("int8", "9223372036854775807", 9223372036854775807),
        ("int8", 5.0, 5),
        ("int8", decimal.Decimal("12"), 12),
        ("text", "héllo", "héllo"),
        ("varchar", "", ""),
        ("bpchar", "ab   ", "ab"),
        ("uuid", U.upper(), uuid.UUID(U)),
        ("uuid", uuid.UUID(U).bytes, uuid.UUID(U)),
        ("bool", True, True),
        ("bool", "false", False),
        ("numeric", "1.50", decimal.Decimal("1.5")),
        ("numeric", decimal.Decimal("1.50"), decimal.Decimal("1.50")),
        ("numeric", 3, decimal.Decimal(3)),
        ("float8", 1.5, 1.5),
        ("float8", "2.25", 2.25),
        ("date", "2024-02-29", dt.date(2024, 2, 29)),
        ("timestamp", "2024-01-01T12:30:00", dt.datetime(2024, 1, 1, 12, 30)),
        ("timestamptz", "2024-01-01T12:30:00+02:00", dt.datetime(2024, 1, 1, 10, 30, tzinfo=UTC)),
        ("timestamptz", "2024-01-01T10:30:00", dt.datetime(2024, 1, 1, 10, 30, tzinfo=UTC)),
        ("bytea", b"\x00\xff", b"\x00\xff"),
        ("bytea", "\\x00ff", b"\x00\xff"),
    ],
)
def test_fits(type_name, given, expected):
    (value,) = coerce_key([col(type_name)], [given])
    assert value == expected
    assert hash(value) == hash(expected)  # a key must find the stored row


@pytest.mark.parametrize(
    ("type_name", "given", "fragment"),
    [
        ("int4", 2**31, "out of range for int4"),
        ("int2", "12x", "not an integer"),
        ("int8", True, "not an integer"),
        ("int8", 1.5, "not an integer"),
        ("text", 5, "not a string"),
        ("text", "a\x00b", "NUL"),
        ("uuid", "not-a-uuid", "not a UUID"),
        ("bool", "maybe", "not a boolean"),
        ("numeric", "abc", "not a number"),
        ("date", "29/02/2024", "ISO date"),
        ("timestamp", "2024-01-01T00:00:00+00:00", "UTC offset"),
        ("timestamptz", "yesterday", "ISO 8601"),
        ("bytea", "00ff", "hex"),
        # Values Python holds but PostgreSQL cannot take: a refetch of them would fail forever.
        ("text", "a\ud800b", "lone surrogate"),
        ("varchar", "\udfff", "lone surrogate"),
        ("numeric", "1e1000000", "out of range for numeric"),
        ("numeric", decimal.Decimal("1e-20000"), "out of range for numeric"),
        ("int8", decimal.Decimal("1e999999999"), "out of range for int8"),
        ("int4", decimal.Decimal("-1e30"), "out of range for int4"),
    ],
)
def test_refused_with_column_named(type_name, given, fragment):
    with pytest.raises(InvalidKey) as info:
        coerce_key([col(type_name)], [given])
    assert f"key column k ({type_name})" in str(info.value) and fragment in str(info.value)


def test_numeric_at_postgres_limits_fits():
    (big,) = coerce_key([col("numeric")], ["9" * 1000 + ".5"])
    (small,) = coerce_key([col("numeric")], ["1e-16383"])
    assert big == decimal.Decimal("9" * 1000 + ".5") and small == decimal.Decimal("1e-16383")
    assert coerce_key([col("numeric")], ["0e-99999"]) == (decimal.Decimal(0),)


def test_composite_keys_and_arity():
    columns = [KeyColumn.create("tenant", "int4", "integer"), KeyColumn.create("sku", "text", "text")]
    assert coerce_key(columns, ["3", "x-1"]) == (3, "x-1")
    with pytest.raises(InvalidKey, match=r"1 part\(s\) but the primary key is \(tenant, sku\)"):
        coerce_key(columns, [3])


def test_enum_keys_are_text_and_unknown_types_are_refused_at_start():
    assert coerce_key([col("mood", is_enum=True)], ["happy"]) == ("happy",)
    with pytest.raises(SchemaError, match="type point, which cannot be a cache key"):
        KeyColumn.create("k", "point", "point")


def test_stored_char_keys_compare_like_postgres():
    assert normalize_stored([col("bpchar")], ["ab   "]) == ("ab",)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (1, "int_value"),
        (True, "bool_value"),
        ("x", "string_value"),
        (1.5, "double_value"),
        (b"x", "bytes_value"),
        (uuid.UUID(U), "string_value"),
        (dt.date(2024, 1, 1), "string_value"),
    ],
)
def test_part_kind_round_trips(value, kind):
    assert part_kind(value)[0] == kind
    column = {
        bool: "bool",
        int: "int8",
        str: "text",
        float: "float8",
        bytes: "bytea",
        uuid.UUID: "uuid",
        dt.date: "date",
    }[type(value)]
    assert coerce_key([col(column)], [part_kind(value)[1]]) == (value,)


# ---------------------------------------------------------------- many values at once

SINGLE_CASES = [
    ("int8", [1, 2, 2**63 - 1, -(2**63)]),
    ("int8", [True, 1]),  # a bool is not an integer, even among ints
    ("int8", [1, 2**63]),
    ("int4", [2**31 - 1, -(2**31)]),
    ("int4", [1, 2**31]),
    ("int2", [1, -(2**15) - 1]),
    ("oid", [0, 2**32 - 1]),
    ("oid", [-1]),
    ("int8", [1, "2", 3.0]),  # mixed forms: value by value
    ("int8", []),
    ("text", ["a", "b", ""]),
    ("text", ["a", "b\x00"]),
    ("text", ["héllo", "b"]),
    ("text", ["a", "\ud800"]),
    ("text", ["a", 1]),
    ("bpchar", ["ab  ", "c"]),
    ("uuid", [U, U.upper()]),
]


def _one_by_one(column: KeyColumn, values: list[object]) -> list[tuple[object, ...]] | str:
    try:
        return [coerce_key([column], [v]) for v in values]
    except InvalidKey as exc:
        return str(exc)


@pytest.mark.parametrize(("type_name", "values"), SINGLE_CASES)
def test_many_values_coerce_as_one_by_one_would(type_name, values):
    """The whole-list checks of ``coerce_single`` answer (and refuse) exactly as
    coercing each value alone: same keys, same types, the same error."""
    column = col(type_name)
    expected = _one_by_one(column, values)
    try:
        got: list[tuple[object, ...]] | str = coerce_single([column], values)
    except InvalidKey as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):
        assert [type(k[0]) for k in got] == [type(k[0]) for k in expected]  # type: ignore[index]


def test_many_values_read_a_container_once():
    """A protobuf repeated field makes its values anew at each read: read once, it is
    checked and coerced from the same list (a generator is read once too)."""
    column = col("int8")
    assert coerce_single([column], (v for v in [3, 1, 2])) == [(3,), (1,), (2,)]


# -------------------------------------------------------------- one canonical value per key


def _canonical(type_name: str, value: object) -> object:
    return KeyColumn.create("k", type_name, type_name).coerce(value)


def test_real_is_the_float4_value_whatever_the_text():
    # Loaded real 0.1 is the float4 0.100000001490116...; a client's 0.1 and a trigger's
    # "0.1" must be that value too, or Get misses and a DELETE leaves the row.
    loaded = float(struct.unpack("<f", struct.pack("<f", 0.1))[0])
    for given in (0.1, "0.1", decimal.Decimal("0.1"), loaded, " 0.1 ", "1e-1"):
        assert _canonical("float4", given) == loaded
    assert _canonical("float8", "0.1") == 0.1


def test_real_rounds_once_from_decimal_text():
    # 1 + 2^-24 + 2^-53 (exactly): the nearest double is the float4 midpoint 1 + 2^-24,
    # which rounds to even (1.0); the float4 nearest to the decimal itself is 1 + 2^-23.
    text = str(decimal.Decimal(1) + decimal.Decimal(2) ** -24 + decimal.Decimal(2) ** -53)
    assert _canonical("float4", text) == 1 + 2**-23


def test_real_out_of_range_refused():
    with pytest.raises(InvalidKey, match="out of range for real"):
        _canonical("float4", "1e39")
    assert _canonical("float4", "Infinity") == math.inf


@pytest.mark.parametrize("type_name", ["float4", "float8"])
def test_float_nan_and_signed_zero(type_name):
    # PostgreSQL: NaN = NaN (a key like any other, sorted above Infinity); -0 = 0.
    for given in (math.nan, "NaN", "nan", decimal.Decimal("NaN")):
        assert _canonical(type_name, given) is NAN
    assert {(_canonical(type_name, "NaN"),): 1}[(_canonical(type_name, math.nan),)] == 1
    zero = _canonical(type_name, "-0")
    assert zero == 0.0 and math.copysign(1.0, zero) == 1.0
    assert sorted([NAN, math.inf, -math.inf, 1.0]) == [-math.inf, 1.0, math.inf, NAN]


def test_numeric_one_form_per_value():
    for given in ("1.0", "1.00", 1, decimal.Decimal("1E+0"), "1"):
        assert str(_canonical("numeric", given)) == "1"
    assert str(_canonical("numeric", "100")) == "100"
    assert str(_canonical("numeric", decimal.Decimal("1E+2"))) == "100"
    assert str(_canonical("numeric", "-0.000")) == "0"
    assert str(_canonical("numeric", "12.5000")) == "12.5"
    long = "1" + "0" * 40 + ".10"  # (no context rounding: more digits than its precision)
    assert str(_canonical("numeric", long)) == long[:-1]
    assert _canonical("numeric", "NaN") is NAN
    assert _canonical("numeric", "-Infinity") == decimal.Decimal("-Infinity")


@pytest.mark.parametrize("type_name", ["date", "timestamp", "timestamptz"])
def test_infinite_dates_are_not_the_last_day(type_name):
    # asyncpg reads 'infinity' as date.max: a key of 9999-12-31 must not find it.
    last = _canonical(type_name, "9999-12-31")
    assert _canonical(type_name, "infinity") is INFINITY
    assert _canonical(type_name, "-Infinity") is MINUS_INFINITY
    assert _canonical(type_name, "+infinity") is INFINITY
    assert last != INFINITY and _canonical(type_name, "0001-01-01") != MINUS_INFINITY
    assert sorted([INFINITY, last, MINUS_INFINITY]) == [MINUS_INFINITY, last, INFINITY]


@pytest.mark.parametrize("type_name", ["date", "timestamp", "timestamptz"])
@pytest.mark.parametrize("given", ["10000-01-01", "0044-03-15 BC", "0044-03-15 00:00:00 BC"])
def test_years_python_cannot_hold_refused(type_name, given):
    with pytest.raises(InvalidKey, match="beyond the years 1-9999"):
        _canonical(type_name, given)


def test_timestamptz_one_key_per_instant():
    utc = _canonical("timestamptz", "2024-01-01T00:00:00+00:00")
    for given in ("2024-01-01 01:00:00+01", "2024-01-01T00:00:00", "2023-12-31T19:00:00-05:00"):
        value = _canonical("timestamptz", given)
        assert value == utc and value.utcoffset() == dt.timedelta(0) and value.isoformat() == utc.isoformat()


def test_stored_values_normalized_like_coerced_ones():
    columns = (KeyColumn.create("d", "date", "date"), KeyColumn.create("r", "float4", "real"))
    # (a load reads dates as PostgreSQL's text, see stored_sql)
    assert normalize_stored(columns, ("infinity", 0.10000000149011612)) == (INFINITY, _canonical("float4", 0.1))
    with pytest.raises(InvalidKey):
        normalize_stored(columns, ("10000-01-01", 1.0))


def test_parameters_round_trip_as_postgresql_reads_them():
    date = KeyColumn.create("d", "date", "date")
    assert date.parameter_sql(1, True) == "$1::pg_catalog.text[]::date[]"
    assert date.parameter(INFINITY) == "infinity" and date.parameter(dt.date(9999, 12, 31)) == "9999-12-31"
    assert math.isnan(KeyColumn.create("f", "float8", "double precision").parameter(NAN))
    assert part_kind(MINUS_INFINITY) == ("string_value", "-infinity")


@pytest.mark.parametrize("type_name", ["float4", "float8"])
@pytest.mark.parametrize("given", ["1e400", "-1e400", "1e-400", decimal.Decimal("1e400"), 10**400])
def test_floats_out_of_range_refused_not_rounded_to_another_key(type_name, given):
    # PostgreSQL refuses these; read as Infinity or 0 they would find another row.
    with pytest.raises(InvalidKey, match="out of range"):
        _canonical(type_name, given)


def test_float4_out_of_its_range_only():
    with pytest.raises(InvalidKey, match="out of range for real"):
        _canonical("float4", "1e-50")
    assert _canonical("float8", "1e-50") == 1e-50
    assert _canonical("float4", "1e-40") == float(struct.unpack("<f", struct.pack("<f", 1e-40))[0])  # (subnormal)
    assert _canonical("float8", "-Infinity") == -math.inf

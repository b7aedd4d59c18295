"""sidecar.pg.rowjson without a database: the conversions, the record and array text readers,
and what is refused. (tests/integration/logical/test_rowjson_exact.py compares with
PostgreSQL's own row_to_json byte for byte.)"""

from __future__ import annotations

import functools
import json
import random

import pytest

from sidecar.pg import pgoutput, rowjson
from sidecar.pg.rowjson import Array, Base, Composite, Domain, Enum, Unconvertible, row_json, value_json

INT4, TEXT, NUMERIC, FLOAT8, BOOL, JSONB, TS, TSTZ, DATE, TIMETZ, BOX = (
    23,
    25,
    1700,
    701,
    16,
    3802,
    1114,
    1184,
    1082,
    1266,
    603,
)
INT4_ARRAY, TEXT_ARRAY, BOX_ARRAY = 1007, 1009, 1020
PAIR, PAIR_ARRAY, MOOD, POSINT = 90001, 90002, 90003, 90004
TYPES: dict[int, rowjson.TypeInfo] = {
    INT4_ARRAY: Array(INT4),
    TEXT_ARRAY: Array(TEXT),
    BOX_ARRAY: Array(BOX, ";"),
    PAIR: Composite((("a", INT4), ("b", TEXT))),
    PAIR_ARRAY: Array(PAIR),
    MOOD: Enum(),
    POSINT: Domain(INT4),
    BOX: Base(),
}


def j(text: bytes | None, oid: int) -> bytes:
    return value_json(text, oid, TYPES)


@pytest.mark.parametrize(
    ("text", "oid", "expected"),
    [
        (None, INT4, b"null"),
        (b"-12", INT4, b"-12"),
        (b"12345678901234567890.000000000000000001", NUMERIC, b"12345678901234567890.000000000000000001"),
        (b"NaN", NUMERIC, b'"NaN"'),
        (b"Infinity", FLOAT8, b'"Infinity"'),
        (b"-Infinity", FLOAT8, b'"-Infinity"'),
        (b"-0", FLOAT8, b"-0"),
        (b"1e+300", FLOAT8, b"1e+300"),
        (b"t", BOOL, b"true"),
        (b"f", BOOL, b"false"),
        (b'{"a": [1, 2.50]}', JSONB, b'{"a": [1, 2.50]}'),
        (b"2024-01-02 03:04:05.5", TS, b'"2024-01-02T03:04:05.5"'),
        (b"0044-03-15 12:00:00 BC", TS, b'"0044-03-15T12:00:00 BC"'),
        (b"2024-01-02 03:04:05+00", TSTZ, b'"2024-01-02T03:04:05+00:00"'),
        (b"2024-01-02 03:04:05.1-05:30", TSTZ, b'"2024-01-02T03:04:05.1-05:30"'),
        (b"1900-01-01 00:00:00+05:21:10", TSTZ, b'"1900-01-01T00:00:00+05:21:10"'),
        (b"4713-01-01 00:00:00+00 BC", TSTZ, b'"4713-01-01T00:00:00+00:00 BC"'),
        (b"infinity", TSTZ, b'"infinity"'),
        (b"-infinity", TS, b'"-infinity"'),
        (b"4713-11-24 BC", DATE, b'"4713-11-24 BC"'),
        (b"03:04:05+02", TIMETZ, b'"03:04:05+02"'),  # time and timetz are plain strings
        (b"happy", MOOD, b'"happy"'),
        (b"7", POSINT, b"7"),
        (b"(3,4),(1,2)", BOX, b'"(3,4),(1,2)"'),
    ],
)
def test_values(text: bytes | None, oid: int, expected: bytes) -> None:
    assert j(text, oid) == expected


def _converted(convert: object, text: bytes) -> object:
    try:
        return convert(text)  # type: ignore[operator]
    except Unconvertible as exc:
        return ("refused", str(exc))


def test_a_columns_converter_gives_value_json_s_bytes_and_errors() -> None:
    """``converter`` (chosen once per column, for rows built from the stream) is
    ``value_json``: the same bytes or the same refusal, whatever the catalog says of a
    built-in type (nothing, a plain base type, one with a json cast)."""
    texts = [
        b"-12",
        b"12",
        b"0",
        b"007",
        b"-0",
        b"1\xd9\xa3",
        b"1.50",
        b"NaN",
        b"-Infinity",
        b"1e+300",
        b"12a",
        b"",
        b"t",
        b"f",
        b"true",
        b'{"a": 1}',
        b"2024-01-02 03:04:05.5",
        b"2024-01-02 03:04:05+00",
        b"2024-01-02 03:04:05.1-05:30",
        b"infinity",
        b"01/02/2024",
        b"0044-03-15 12:00:00 BC",
        b'he said "hi"\n\x01',
        b"{1,2}",
        b"(1,x)",
        b"happy",
    ]
    oids = [16, 20, 21, 23, 25, 114, 700, 701, 1043, 1082, 1114, 1184, 1700, 3802, 2950]
    oids += [INT4_ARRAY, TEXT_ARRAY, PAIR, MOOD, POSINT, BOX, 603, 99999]
    catalogs: list[dict[int, rowjson.TypeInfo]] = [
        TYPES,
        {**TYPES, **{oid: Base() for oid in oids if oid not in TYPES}},
        {**TYPES, **{oid: Base(json_cast=True) for oid in oids if oid not in TYPES}},
        {**TYPES, **{oid: Enum() for oid in oids if oid not in TYPES}},
    ]
    for types in catalogs:
        for oid in oids:
            convert = rowjson.converter(oid, types)
            for text in texts:
                reference = functools.partial(value_json, type_oid=oid, types=types)
                assert _converted(convert, text) == _converted(reference, text), (oid, text)


def test_strings_are_escaped_as_escape_json_does() -> None:
    every_control = bytes(range(1, 32))
    expected = (
        b'"\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\\u000e\\u000f'
        b"\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\\u0019\\u001a\\u001b\\u001c"
        b'\\u001d\\u001e\\u001f"'
    )
    assert j(every_control, TEXT) == expected
    assert j('"\\/\x7f é \U0001f600 \u2028'.encode(), TEXT) == '"\\"\\\\/\x7f é \U0001f600 \u2028"'.encode()
    assert j(b"", TEXT) == b'""'


@pytest.mark.parametrize(
    ("text", "oid", "expected"),
    [
        (b"{}", INT4_ARRAY, b"[]"),
        (b"{1,NULL,3}", INT4_ARRAY, b"[1,null,3]"),
        (b"{{1,2},{3,4}}", INT4_ARRAY, b"[[1,2],[3,4]]"),
        (b"[0:1]={1,2}", INT4_ARRAY, b"[1,2]"),
        (b"[-2:-1][3:4]={{1,2},{3,4}}", INT4_ARRAY, b"[[1,2],[3,4]]"),
        (b'{NULL,"NULL",null,"","a b","\\"\\\\","x,y"}', TEXT_ARRAY, b'[null,"NULL","null","","a b","\\"\\\\","x,y"]'),
        (b"{(3,4),(1,2);(0,0),(-1,-1)}", BOX_ARRAY, b'["(3,4),(1,2)","(0,0),(-1,-1)"]'),
        (
            b'{"(1,\\"x,\\"\\"y\\"\\"\\")",NULL,"(,)"}',
            PAIR_ARRAY,
            b'[{"a":1,"b":"x,\\"y\\""},null,{"a":null,"b":null}]',
        ),
        (b'(1,"a ""b"" \\\\ c")', PAIR, b'{"a":1,"b":"a \\"b\\" \\\\ c"}'),
        (b'(,"")', PAIR, b'{"a":null,"b":""}'),
    ],
)
def test_arrays_and_composites(text: bytes, oid: int, expected: bytes) -> None:
    assert j(text, oid) == expected


def test_a_row() -> None:
    columns = [("id", INT4), ('we"ird\n', TEXT), ("p", PAIR), ("tags", TEXT_ARRAY)]
    assert (
        row_json(columns, [b"1", None, b"(2,x)", b"{a}"], TYPES)
        == b'{"id":1,"we\\"ird\\n":null,"p":{"a":2,"b":"x"},"tags":["a"]}'
    )


def test_row_from_tuple_takes_text_and_refuses_the_rest() -> None:
    relation = pgoutput.Relation(
        None, 1, "s", "t", "d", (pgoutput.Column(1, "id", INT4, -1), pgoutput.Column(0, "v", TEXT, -1))
    )
    assert rowjson.row_from_tuple(relation, (pgoutput.Text(b"1"), None), {}) == b'{"id":1,"v":null}'
    with pytest.raises(Unconvertible, match="v: unchanged TOASTed value"):
        rowjson.row_from_tuple(relation, (pgoutput.Text(b"1"), pgoutput.UNCHANGED), {})
    with pytest.raises(Unconvertible, match="id: binary format"):
        rowjson.row_from_tuple(relation, (pgoutput.Binary(b"\0\0\0\1"), None), {})
    with pytest.raises(Unconvertible, match="1 values for the 2 columns of t"):
        rowjson.row_from_tuple(relation, (pgoutput.Text(b"1"),), {})


@pytest.mark.parametrize(
    ("columns", "values", "types", "problem"),
    [
        ([("x", 90099)], [b"1"], {}, "x: type 90099 is not described"),
        ([("x", 90099)], [b"1"], {90099: Base(json_cast=True)}, "x: type 90099 has a cast to json"),
        ([("x", 90099)], [b"on"], {90099: Enum(json_cast=True)}, "has a cast to json"),
        ([("x", 90099)], [b"1"], {90099: Domain(90099)}, "domains nested deeper"),
        ([("x", BOOL)], [b"true"], {}, "x: boolean text"),
        ([("x", TS)], [b"01/02/2024 03:04:05"], {}, "x: timestamp text .* is not ISO"),
        ([("x", TSTZ)], [b"Tue Jan 02 03:04:05 2024 UTC"], {}, "x: timestamptz text .* is not ISO"),
        ([("x", TEXT)], [b"\xff"], {}, "not UTF-8"),
        ([("x", TEXT)], [], {}, "0 values for 1 columns"),
        ([("x", INT4_ARRAY)], [b"{1,2"], TYPES, "unterminated array"),
        ([("x", INT4_ARRAY)], [b"{1,2}}"], TYPES, "text after the array"),
        ([("x", INT4_ARRAY)], [b"{1,,2}"], TYPES, "empty unquoted element"),
        ([("x", INT4_ARRAY)], [b"{1 ,2}"], TYPES, "unexpected character"),
        ([("x", INT4_ARRAY)], [b'{"1}'], TYPES, "unterminated quoted element"),
        ([("x", INT4_ARRAY)], [b'{"\\'], TYPES, "backslash at the end"),
        ([("x", INT4_ARRAY)], [b"[1:2]{1,2}"], TYPES, "malformed dimensions"),
        ([("x", INT4_ARRAY)], [b"{{{{{{{1}}}}}}}"], TYPES, "more than 6 dimensions"),
        ([("x", INT4_ARRAY)], [b"1,2"], TYPES, "expected '{'"),
        ([("x", PAIR)], [b"(1,2,3)"], TYPES, "record text has 3 fields, its type 2"),
        ([("x", PAIR)], [b"1,2"], TYPES, "expected '\\(...\\)'"),
        ([("x", PAIR)], [b'(1,"x)'], TYPES, "unterminated quoted field"),
        ([("x", PAIR)], [b'(1,"x"y)'], TYPES, "expected ','"),
        ([("x", PAIR)], [b"(1,x y)"], TYPES, "unexpected character"),
    ],
)
def test_refused(
    columns: list[tuple[str, int]],
    values: list[bytes | None],
    types: dict[int, rowjson.TypeInfo],
    problem: str,
) -> None:
    with pytest.raises(Unconvertible, match=problem):
        row_json(columns, values, types)


def test_types_from_catalog() -> None:
    def row(oid: int, typtype: str, **fields: object) -> dict[str, object]:
        base = {"oid": oid, "typtype": typtype, "element": None, "delimiter": None, "base": 0}
        return base | {"field_names": [], "field_types": [], "json_cast": False} | fields

    rows = [
        row(1007, "b", element=23, delimiter=","),
        row(1020, "b", element=603, delimiter=";"),
        row(5, "d", base=23),
        row(6, "c", field_names=["a", "b"], field_types=[23, 25]),
        row(7, "e"),
        row(8, "b", json_cast=True),
        row(9, "p"),
    ]
    assert rowjson.types_from_catalog(rows) == {
        1007: Array(23),
        1020: Array(603, ";"),
        5: Domain(23),
        6: Composite((("a", 23), ("b", 25))),
        7: Enum(),
        8: Base(json_cast=True),
    }


def test_fuzzed_array_and_record_text_is_converted_or_refused_never_crashes() -> None:
    rng = random.Random(20261207)
    samples = [
        (b'{"(1,\\"x,\\"\\"y\\"\\"\\")",NULL,"(,)"}', PAIR_ARRAY),
        (b"[-2:-1][3:4]={{1,2},{3,4}}", INT4_ARRAY),
        (b'{NULL,"NULL","","a b","\\"\\\\","x,y"}', TEXT_ARRAY),
        (b'(1,"a ""b"" \\\\ c")', PAIR),
        (b"2024-01-02 03:04:05.1-05:30", TSTZ),
    ]
    alphabet = b'{}[]:=(),"\\ NUL1-;'
    outcomes = {"built": 0, "refused": 0}
    for _ in range(20_000):
        text, oid = rng.choice(samples)
        data = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(3)
            position = rng.randrange(len(data) + 1)
            if action == 0 and data:
                del data[min(position, len(data) - 1)]
            elif action == 1:
                data.insert(position, rng.choice(alphabet))
            else:
                del data[position:]
        try:
            out = value_json(bytes(data), oid, TYPES)
        except Unconvertible:
            outcomes["refused"] += 1
        else:
            outcomes["built"] += 1
            json.loads(out)  # whatever is built is valid JSON
    assert outcomes["refused"] > 1000 and outcomes["built"] > 100


def test_text_is_not_validated_against_its_type_but_stays_valid_json() -> None:
    # PostgreSQL wrote the text; a forged 'x' in an integer field becomes a JSON string,
    # never broken JSON.
    assert value_json(b"(x,y)", PAIR, TYPES) == b'{"a":"x","b":"y"}'
    assert value_json(b"{1;2}", INT4_ARRAY, TYPES) == b'["1;2"]'
    assert json.loads(value_json(b"(x,y)", PAIR, TYPES)) == {"a": "x", "b": "y"}


def test_object_values_splits_a_row_at_its_top_level_fields() -> None:
    raw = b'{"a":1,"b":"x,}\\"{[","c":{"d": [1, {"e": "]"}]},"e":null,"f":[[1,2],[3]],"g":-1.5e+10}'
    assert rowjson.object_values(raw) == [
        b"1",
        b'"x,}\\"{["',
        b'{"d": [1, {"e": "]"}]}',
        b"null",
        b"[[1,2],[3]]",
        b"-1.5e+10",
    ]
    assert rowjson.object_values(b"{}") == []
    for bad in (b"", b"[1]", b'{"a":1', b'{"a":[1}', b'{"a":1}x'):
        with pytest.raises(rowjson.Unconvertible):
            rowjson.object_values(bad)


def test_describes_says_why_a_type_cannot_be_converted() -> None:
    composite = 90001
    types = {
        composite: rowjson.Composite((("a", 23), ("r", 3904))),  # int4range: not described
        90002: rowjson.Domain(composite),
        90003: rowjson.Array(90002),
        90004: rowjson.Base(json_cast=True),
        90005: rowjson.Enum(),
    }
    assert rowjson.describes(23, types) is None and rowjson.describes(90005, types) is None
    assert "3904" in (rowjson.describes(90003, types) or "")
    assert "cast to json" in (rowjson.describes(90004, types) or "")
    assert rowjson.describes(12345678, {}) is not None


def test_object_values_are_the_fields_text_exactly() -> None:
    """A cached row's fields as row_to_json wrote them: a json value's own whitespace (kept
    by the json type, embedded as is) is part of it."""
    raw = b'{"a":1,"j":\n  {"k": [1, ","]}\n\t ,"s":"x\\",:{","e":{},"last":  [ ] }'
    assert rowjson.object_values(raw) == [b"1", b'\n  {"k": [1, ","]}\n\t ', b'"x\\",:{"', b"{}", b"  [ ] "]
    with pytest.raises(Unconvertible):
        rowjson.object_values(b'{"a":1')


def test_vectors_are_arrays_written_with_spaces() -> None:
    types = {22: Array(21), 30: Array(26)}
    assert value_json(b"1 -2 3", 22, types) == b"[1,-2,3]"
    assert value_json(b"", 22, types) == b"[]"
    assert value_json(b"4 4294967295", 30, types) == b'["4","4294967295"]'

"""Row JSON without json's limits: any integer length, any nesting depth, same values."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from sidecar.core import jsonread
from sidecar.core.jsonread import _iterative


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "[]",
        '{"a":1,"b":[1,2,{"c":null}],"d":"x\\u00e9\\ud83d\\ude00","e":1.5e3,"f":true,"g":{},"h":false}',
        " [ [ [ ] ] , { } ] ",
        '"s"',
        "-0",
        "12.50",
        '{"a":{"b":{"c":[1,[2,[3]]]}}}',
    ],
)
def test_the_loop_reads_what_json_reads(text):
    assert _iterative(text) == json.loads(text, parse_float=Decimal)


@pytest.mark.parametrize("text", ["[1,]", '{"a" 1}', "[1 2]", "{", "[1]x", '{"a":1,}', "tru", "", "[-]"])
def test_the_loop_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        _iterative(text)


def test_no_depth_limit():
    value = jsonread.loads(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b',"b":1}')
    assert value["b"] == 1
    depth, inner = 0, value["a"]
    while inner:
        inner, depth = inner[0], depth + 1
    assert depth == 99_999


def test_no_integer_length_limit():
    assert jsonread.loads('{"n":' + "9" * 5000 + "}")["n"] == Decimal("9" * 5000)
    assert jsonread.loads("[" * 2000 + "-" + "1" * 5000 + "]" * 2000) is not None

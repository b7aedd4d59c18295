"""``cache-sidecar get --pretty``: whitespace is all the reindenter may change."""

from __future__ import annotations

import json

import pytest

from sidecar.remote import reindent


@pytest.mark.parametrize(
    "document",
    [
        b'{"id":1,"amount":12345678901234567890.0123456789,"exact":1.000,"label":"cr\xc3\xa8me"}',
        b'{"s": "a \\" , : { } [ ] \\\\", "e": [], "o": {}, "n": [1, {"x": null}, [true, false]], "u": "\\u00e8"}',
        b'{ "spaced" :  [ 1 ,2 ] }',
        b"[]",
        b'"just a string"',
        b"-1.5e+300",
    ],
)
def test_only_whitespace_outside_strings_changes(document):
    out = reindent(document)
    assert json.loads(out) == json.loads(document)
    assert _tokens(out) == _tokens(document)  # each token byte for byte


def test_one_member_a_line_and_empty_containers_stay_on_theirs():
    assert reindent(b'{"a":[1,2],"b":{},"c":[]}') == b'{\n  "a": [\n    1,\n    2\n  ],\n  "b": {},\n  "c": []\n}'


def _tokens(document: bytes) -> list[bytes]:
    """The document's tokens, whitespace between them dropped."""
    tokens, i = [], 0
    while i < len(document):
        c = document[i : i + 1]
        if c in b" \t\r\n":
            i += 1
        elif c == b'"':
            end = i + 1
            while document[end : end + 1] != b'"':
                end += 2 if document[end : end + 1] == b"\\" else 1
            tokens.append(document[i : end + 1])
            i = end + 1
        elif c in b"{}[],:":
            tokens.append(c)
            i += 1
        else:
            end = i
            while end < len(document) and document[end : end + 1] not in b' \t\r\n{}[],:"':
                end += 1
            tokens.append(document[i:end])
            i = end
    return tokens

"""Row JSON read without the limits of Python's ``json``: integers of any length (``int()``
refuses over 4300 digits) and nesting of any depth (the C scanner recurses, and stops
near 1000 levels). PostgreSQL's ``row_to_json`` makes both (a 131072-digit numeric, a
deeply nested jsonb), and a row that cannot be read would be indexed under no value.

``loads`` tries ``json.loads`` (fast, in C) and, on a row it refuses for depth, reads it
again with a loop over an explicit stack. Numbers with a fraction or exponent are
``Decimal``; long integers are ``Decimal`` too (exact, and no quadratic ``int()``).
"""

from __future__ import annotations

import json
import json.decoder
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

# Digits json's own int() takes; longer integers are read as Decimal.
_INT_DIGITS = 4000
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\n\r]*")
_WORDS: tuple[tuple[str, bool | None], ...] = (("true", True), ("false", False), ("null", None))
# (the C string scanner json itself uses: non-recursive, validating, escapes decoded)
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


def loads(data: bytes | str) -> Any:
    """A JSON document; ``ValueError`` if it is not one."""
    text = data.decode() if isinstance(data, bytes) else data
    try:
        return json.loads(text, parse_float=Decimal, parse_int=_int)
    except RecursionError:
        return _iterative(text)


def _space(text: str, position: int) -> int:
    return _SPACE.match(text, position).end()  # type: ignore[union-attr]


def _scalar(text: str, position: int) -> tuple[Any, int]:
    char = text[position : position + 1]
    if char == '"':
        return _scanstring(text, position + 1)
    for word, value in _WORDS:
        if text.startswith(word, position):
            return value, position + len(word)
    number = _NUMBER.match(text, position)
    if number is None:
        raise ValueError(f"unexpected character at {position}")
    raw = number.group()
    return (Decimal(raw) if number.group(1) or number.group(2) else _int(raw)), number.end()


def _name(text: str, position: int) -> tuple[str, int]:
    """``"name":`` at ``position``: the name and where its value starts."""
    if text[position : position + 1] != '"':
        raise ValueError(f"expected a member name at {position}")
    name, position = _scanstring(text, position + 1)
    position = _space(text, position)
    if text[position : position + 1] != ":":
        raise ValueError(f"expected ':' at {position}")
    return name, _space(text, position + 1)


def _iterative(text: str) -> Any:
    """``json.loads`` with an explicit stack instead of recursion."""
    # Open containers, innermost last, each with the member name its next value takes.
    stack: list[tuple[Any, str | None]] = []
    position = _space(text, 0)
    while True:
        char = text[position : position + 1]
        value: Any
        if char in ("{", "["):
            position = _space(text, position + 1)
            if text[position : position + 1] == ("}" if char == "{" else "]"):
                value, position = ({} if char == "{" else []), position + 1
            elif char == "{":
                name, position = _name(text, position)
                stack.append(({}, name))
                continue
            else:
                stack.append(([], None))
                continue
        else:
            value, position = _scalar(text, position)
        while True:  # ``value`` is complete: into its container, then on to the next value
            if not stack:
                if _space(text, position) != len(text):
                    raise ValueError(f"extra data at {position}")
                return value
            parent, key = stack[-1]
            if key is None:
                parent.append(value)
            else:
                parent[key] = value
            position = _space(text, position)
            char = text[position : position + 1]
            if char == ",":
                position = _space(text, position + 1)
                if key is not None:
                    key, position = _name(text, position)
                    stack[-1] = (parent, key)
                break
            if char != ("]" if key is None else "}"):
                raise ValueError(f"expected ',' or the container's end at {position}")
            position += 1
            stack.pop()
            value = parent

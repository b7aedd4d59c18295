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
import re
from decimal import Decimal
from json.decoder import scanstring
from typing import Any

# Digits json's own int() takes; longer integers are read as Decimal.
_INT_DIGITS = 4000
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\n\r]*")
_WORDS = {"true": True, "false": False, "null": None}


def _int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


def loads(data: bytes | str) -> Any:
    """A JSON document; ``ValueError`` if it is not one."""
    text = data.decode() if isinstance(data, bytes) else data
    try:
        return json.loads(text, parse_float=Decimal, parse_int=_int)
    except RecursionError:
        return _iterative(text)


def _iterative(text: str) -> Any:
    """``json.loads`` with an explicit stack instead of recursion."""
    stack: list[tuple[list[Any] | dict[str, Any], str | None]] = []
    position = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
    result: Any = None
    while True:
        # a value at ``position``
        char = text[position : position + 1]
        container: list[Any] | dict[str, Any] | None = None
        if char == "{":
            container, position = {}, _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
            if text[position : position + 1] == "}":
                value, position, container = {}, position + 1, None
        elif char == "[":
            container, position = [], _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
            if text[position : position + 1] == "]":
                value, position, container = [], position + 1, None
        elif char == '"':
            value, position = scanstring(text, position + 1)
        elif char in ("t", "f", "n"):
            word = next((w for w in _WORDS if text.startswith(w, position)), None)
            if word is None:
                raise ValueError(f"unexpected character at {position}")
            value, position = _WORDS[word], position + len(word)
        else:
            number = _NUMBER.match(text, position)
            if number is None:
                raise ValueError(f"unexpected character at {position}")
            raw = number.group()
            value = Decimal(raw) if number.group(1) or number.group(2) else _int(raw)
            position = number.end()
        if container is not None:
            if isinstance(container, dict):
                position = _member_name(text, position, container, stack)
            else:
                stack.append((container, None))
            continue
        # ``value`` is complete: put it in its container, then find the next value
        while True:
            if not stack:
                position = _SPACE.match(text, position).end()  # type: ignore[union-attr]
                if position != len(text):
                    raise ValueError(f"extra data at {position}")
                return value
            parent, name = stack[-1]
            if isinstance(parent, dict):
                assert name is not None
                parent[name] = value
            else:
                parent.append(value)
            position = _SPACE.match(text, position).end()  # type: ignore[union-attr]
            char = text[position : position + 1]
            if char == ",":
                position = _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
                if isinstance(parent, dict):
                    stack.pop()
                    position = _member_name(text, position, parent, stack)
                break
            closing = "}" if isinstance(parent, dict) else "]"
            if char != closing:
                raise ValueError(f"expected ',' or {closing!r} at {position}")
            position += 1
            stack.pop()
            value = parent
        result = value
    return result  # (unreachable)


def _member_name(text: str, position: int, container: dict[str, Any], stack: list[Any]) -> int:
    """Read ``"name":`` and push the object awaiting that member's value."""
    if text[position : position + 1] != '"':
        raise ValueError(f"expected a member name at {position}")
    name, position = scanstring(text, position + 1)
    position = _SPACE.match(text, position).end()  # type: ignore[union-attr]
    if text[position : position + 1] != ":":
        raise ValueError(f"expected ':' at {position}")
    stack.append((container, name))
    return _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]

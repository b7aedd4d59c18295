"""Row JSON without the limits of Python's ``json``: integers of any length (``int()``
refuses strings over ``sys.get_int_max_str_digits()``, 4300 by default) and nesting of
any depth (the C scanner recurses and stops near 1000 levels). PostgreSQL makes both:
a numeric may have 131072 digits, a jsonb may nest thousands deep.

``loads`` reads what ``json.loads`` reads and returns the same values (integers as
``int``, exactly; other numbers as ``float``), with a loop over an explicit stack.
"""

from __future__ import annotations

import json.decoder
import re
import sys
from collections.abc import Callable
from typing import Any

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\n\r]*")
_WORDS: tuple[tuple[str, Any], ...] = (
    ("true", True),
    ("false", False),
    ("null", None),
    # (json.loads takes these too)
    ("NaN", float("nan")),
    ("Infinity", float("inf")),
    ("-Infinity", float("-inf")),
)
# (the C string scanner json itself uses: non-recursive, validating, escapes decoded)
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def exact_int(text: str) -> int:
    """``int(text)`` for a decimal string of any length (halves converted apart and
    joined: no single conversion exceeds the interpreter's limit)."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    digits = text.lstrip("-")
    if not limit or len(digits) <= limit:
        return int(text, 10)
    half = len(digits) // 2
    scale: int = 10**half
    value = exact_int(digits[:-half]) * scale + exact_int(digits[-half:])
    return -value if text.startswith("-") else value


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
    return (float(raw) if number.group(1) or number.group(2) else exact_int(raw)), number.end()


def _name(text: str, position: int) -> tuple[str, int]:
    """``"name":`` at ``position``: the name and where its value starts."""
    if text[position : position + 1] != '"':
        raise ValueError(f"expected a member name at {position}")
    name, position = _scanstring(text, position + 1)
    position = _space(text, position)
    if text[position : position + 1] != ":":
        raise ValueError(f"expected ':' at {position}")
    return name, _space(text, position + 1)


def loads(data: bytes | str) -> Any:
    """A JSON document; ``ValueError`` if it is not one."""
    text = data.decode() if isinstance(data, bytes | bytearray) else data
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

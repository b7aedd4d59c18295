"""Rows from ``COPY ... TO STDOUT`` in its text format, as cache entries.

A load of a table whose key is one integer column streams
``COPY (SELECT key, row_to_json(t.*)::text ...)``: PostgreSQL sends the rows
without a round trip per chunk, and splitting lines costs less than decoding
result records (a plain COPY into a dict loads 1 M rows in about 60 % of the
time a plain ``fetch`` takes). The text format is a line per row, columns
separated by a tab, NULL as ``\\N``, and a backslash before a backslash and
before the control characters it spells as letters (a ``json`` column may hold a
raw newline or tab between its tokens). Plain Python: ``db.py`` feeds it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from sidecar.core.source import Rows
from sidecar.core.wire import PREFIXES, entry

_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)
_LETTERS = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def unescape(field: bytes) -> bytes:
    """A text-format field's bytes (COPY TO writes no octal or hex escapes)."""
    return _ESCAPED.sub(lambda m: _LETTERS.get(m[1], m[1]), field)


class Abandoned(Exception):
    """The load stopped taking rows."""


class IntegerKeyRows:
    """Parses COPY text of ``(integer key, row JSON)`` lines into ``Rows`` chunks of about
    ``size`` rows, handed to ``emit`` (which may wait: the COPY waits with it)."""

    def __init__(self, emit: Callable[[Rows], Awaitable[None]], size: int) -> None:
        self._emit = emit
        self._size = size
        self._rows: Rows = {}
        self._rest = b""
        self._abandoned = False
        self._brought = 0  # lines in ``_rows`` (more than its keys if two lines share a key)
        self.count = 0
        self.collisions = 0  # lines whose key an earlier line of their chunk had

    def abandon(self) -> None:
        """The rows are no longer wanted: the next block raises ``Abandoned`` (which aborts
        the COPY that feeds it)."""
        self._abandoned = True

    async def feed(self, data: bytes) -> None:
        """One block of COPY data (any number of lines; the last may be cut)."""
        if self._abandoned:
            raise Abandoned("the load was abandoned")
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        rows, prefixes, limit = self._rows, PREFIXES, len(PREFIXES)
        brought = len(lines)
        for line in lines:
            key, _, row = line.partition(b"\t")
            if key == b"\\N":
                brought -= 1
                continue  # (a relation's NULL key: it cannot be asked for)
            if b"\\" in row:
                row = unescape(row)
            size = len(row)
            rows[(int(key),)] = prefixes[size] + row if size < limit else entry(row)
        self._brought += brought
        if len(rows) >= self._size:
            self._emitted(rows)
            await self._emit(rows)

    def _emitted(self, rows: Rows) -> None:
        # (two lines of one key, a relation's key that is not unique, are counted, not
        # raised: an error in the sink would abort the COPY and leave its connection busy)
        self.collisions += self._brought - len(rows)
        self.count += len(rows)
        self._rows = {}
        self._brought = 0

    def finish(self) -> Rows:
        """The rows not yet emitted, once the COPY has ended."""
        if self._rest:
            raise ValueError(f"COPY data ended inside a line: {self._rest[:60]!r}")
        rows = self._rows
        self._emitted(rows)
        return rows

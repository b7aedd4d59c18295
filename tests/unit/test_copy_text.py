"""COPY text -> cache entries: escapes, lines cut between blocks, NULL keys, chunks."""

from __future__ import annotations

import pytest

from sidecar.core import wire
from sidecar.core.source import Rows
from sidecar.pg.copy_text import Abandoned, IntegerKeyRows, unescape


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"plain", b"plain"),
        (b"a\\\\b", b"a\\b"),
        (b"\\\\\\\\", b"\\\\"),
        (b"x\\ty\\nz\\r\\b\\f\\v", b"x\ty\nz\r\b\f\v"),
        (b'{"q":"\\\\"\\\\\\\\"}', b'{"q":"\\"\\\\"}'),  # JSON's own escapes, doubled by COPY
        (b"\\\\n", b"\\n"),  # an escaped backslash, then a letter: not a newline
    ],
)
def test_unescape(field, value):
    assert unescape(field) == value


async def parse(blocks: list[bytes], size: int = 1000) -> tuple[list[Rows], Rows]:
    emitted: list[Rows] = []

    async def emit(rows: Rows) -> None:
        emitted.append(rows)

    parser = IntegerKeyRows(emit, size)
    for block in blocks:
        await parser.feed(block)
    return emitted, parser.finish()


async def test_lines_become_entries_keyed_by_one_integer_tuple():
    big = b"x" * 5000  # (past the prefixes made in advance)
    emitted, rest = await parse([b'1\t{"a":1}\n-20\t{"b":"\\\\n"}\n9223372036854775807\t' + big + b"\n"])
    assert emitted == []
    assert rest == {
        (1,): wire.entry(b'{"a":1}'),
        (-20,): wire.entry(b'{"b":"\\n"}'),
        (9223372036854775807,): wire.entry(big),
    }


async def test_a_line_cut_between_blocks_is_joined():
    data = b"".join(b'%d\t{"v":%d}\n' % (i, i) for i in range(50))
    whole = (await parse([data]))[1]
    for cut in (1, 2, 7, 8, len(data) // 2, len(data) - 1):
        assert (await parse([data[:cut], data[cut:]]))[1] == whole, cut
    assert (await parse([data[i : i + 3] for i in range(0, len(data), 3)]))[1] == whole


async def test_rows_with_a_null_key_are_left_out():
    assert (await parse([b"\\N\t{}\n5\t{}\n"]))[1] == {(5,): wire.entry(b"{}")}


async def test_chunks_of_about_the_size_asked():
    data = [b"".join(b"%d\t{}\n" % (block * 10 + i) for i in range(10)) for block in range(25)]
    emitted, rest = await parse(data, size=30)
    assert [len(chunk) for chunk in emitted] == [30] * 8 and len(rest) == 10
    keys = [key for chunk in [*emitted, rest] for key in chunk]
    assert keys == [(i,) for i in range(250)]


async def test_data_that_ends_inside_a_line_is_an_error():
    emitted: list[Rows] = []

    async def emit(rows: Rows) -> None:
        emitted.append(rows)

    parser = IntegerKeyRows(emit, 10)
    await parser.feed(b"1\t{}\n2\t{")
    with pytest.raises(ValueError, match="ended inside a line"):
        parser.finish()


async def test_an_abandoned_parser_raises_at_its_next_block():
    async def emit(rows: Rows) -> None:
        pass

    parser = IntegerKeyRows(emit, 10)
    await parser.feed(b"1\t{}\n")
    parser.abandon()
    with pytest.raises(Abandoned):  # (asyncpg aborts a COPY whose sink raises)
        await parser.feed(b"2\t{}\n")


async def test_lines_of_one_key_are_counted_not_merged_silently():
    emitted: list[Rows] = []

    async def emit(rows: Rows) -> None:
        emitted.append(rows)

    parser = IntegerKeyRows(emit, 2)
    await parser.feed(b"1\t{}\n1\t{}\n2\t{}\n")  # (a relation's key that is not unique)
    await parser.feed(b"3\t{}\n3\t{}\n\\N\t{}\n\\N\t{}\n")  # (NULL keys are left out, not collisions)
    parser.finish()
    assert parser.collisions == 2 and parser.count == 3

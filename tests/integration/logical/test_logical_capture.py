"""The daemon with ``database.capture = logical`` on a real server: rows from the stream
(no query per change), partitions and inheritance children, reloads that take rows from
the stream again, a schema change under writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from sidecar.core.wire import row_json
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio


async def test_rows_come_from_the_stream(logical_dsn: str, lschema: str, start_logical: Any) -> None:
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE TABLE {lschema}.t (id int PRIMARY KEY, name text, n numeric, at timestamptz)")
    await conn.execute(f"INSERT INTO {lschema}.t VALUES (1, 'a', 1.50, '2020-01-01 00:00+02')")
    daemon = await start_logical([f"{lschema}.t"])
    engine = daemon.engine
    table = daemon.core.tables[f"{lschema}.t"]
    assert table.streamed
    await conn.execute(f"INSERT INTO {lschema}.t VALUES (2, 'b', 2.250, 'infinity')")
    await conn.execute(f"UPDATE {lschema}.t SET name = 'A' WHERE id = 1")
    await conn.execute(f"DELETE FROM {lschema}.t WHERE id = 2")
    await engine.sync()
    want = await conn.fetch(f"SELECT id, row_to_json(t.*)::text AS j FROM {lschema}.t t ORDER BY id")
    got = {k[0]: v for k, v in table.rows.items()}
    assert sorted(got) == [r["id"] for r in want]
    for r in want:
        assert row_json(got[r["id"]]).decode() == r["j"]
    assert table.refetches == 0 and table.reloads == 1
    lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
    assert engine.revision.number > 0
    await conn.close()
    print(engine.revision, lsn)


async def test_partitions_and_inheritance_children_reach_the_cached_ancestor(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    conn = await asyncpg.connect(logical_dsn)
    s = lschema
    await conn.execute(
        f"CREATE TABLE {s}.p (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
        f"CREATE TABLE {s}.p1 PARTITION OF {s}.p FOR VALUES FROM (0) TO (100);"
        f"CREATE TABLE {s}.p2 PARTITION OF {s}.p FOR VALUES FROM (100) TO (200);"
        f"CREATE TABLE {s}.par (id int PRIMARY KEY, v text);"
        f"CREATE TABLE {s}.ch (extra int) INHERITS ({s}.par); ALTER TABLE {s}.ch ADD PRIMARY KEY (id);"
        f"INSERT INTO {s}.p VALUES (1, 'a'), (150, 'b'); INSERT INTO {s}.par VALUES (1, 'x')"
    )
    daemon = await start_logical([f"{s}.p", f"{s}.par"])
    engine = daemon.engine
    p, par = daemon.core.tables[f"{s}.p"], daemon.core.tables[f"{s}.par"]
    await conn.execute(f"INSERT INTO {s}.p1 VALUES (2, 'c')")
    await conn.execute(f"UPDATE {s}.p SET id = 120 WHERE id = 2")  # moves it to p2
    await conn.execute(f"INSERT INTO {s}.ch VALUES (7, 'child', 1)")
    await engine.sync()
    assert sorted(k[0] for k in p.rows) == [1, 120, 150]
    assert sorted(k[0] for k in par.rows) == [1, 7]
    assert p.streamed and p.refetches == 0
    await conn.execute(f"TRUNCATE {s}.p1")
    await engine.sync()
    await eventually(lambda: sorted(k[0] for k in p.rows) == [120, 150] and not p.reloading, 10, what="p1 emptied")
    await conn.close()


async def test_a_reload_under_writes_takes_rows_from_the_stream_again(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    """A reload reads at a snapshot newer than the stream: the changes its snapshot saw are
    skipped, the others applied, and the table takes rows from the stream again -- exact,
    with no refetch (this fails if the reload's snapshot is not honoured: rows go back)."""
    conn = await asyncpg.connect(logical_dsn)
    s = lschema
    await conn.execute(f"CREATE TABLE {s}.big (id int PRIMARY KEY, n int NOT NULL)")
    await conn.execute(f"INSERT INTO {s}.big SELECT g, 0 FROM generate_series(1, 100000) g")
    daemon = await start_logical([f"{s}.big"])
    engine, table = daemon.engine, daemon.core.tables[f"{s}.big"]
    stop = False

    async def write() -> int:
        writer = await asyncpg.connect(logical_dsn)
        count = 0
        try:
            while not stop:
                await writer.execute(
                    f"UPDATE {s}.big SET n = n + 1 WHERE id = ANY($1::int[])", [count % 50 + 1, 99_999]
                )
                count += 1
        finally:
            await writer.close()
        return count

    went_back: list[tuple[int, int, int]] = []

    async def watch_memory() -> None:
        """Memory's n of the written keys never goes down (a row older than the one held would)."""
        highest: dict[int, int] = {}
        while not stop:
            for key in range(1, 51):
                entry = table.rows.get((key,))
                if entry is None:
                    continue
                n = json.loads(row_json(entry))["n"]
                if n < highest.get(key, 0):
                    went_back.append((key, highest[key], n))
                highest[key] = max(n, highest.get(key, 0))
            await asyncio.sleep(0.001)

    writers = [asyncio.ensure_future(write()) for _ in range(3)]
    watcher = asyncio.ensure_future(watch_memory())
    try:
        for _ in range(3):
            before = table.reloads
            daemon.core.notices.reload_table(f"{s}.big", "a test asked")
            await eventually(lambda before=before: table.reloads > before and table.streamed, 30, what="reloaded")
    finally:
        stop = True
        written = await asyncio.gather(*writers)
        await watcher
    assert sum(written) > 0
    assert went_back == []
    await engine.sync()
    want = {r["id"]: r["n"] for r in await conn.fetch(f"SELECT id, n FROM {s}.big WHERE n > 0")}
    got = {k[0]: json.loads(row_json(v))["n"] for k, v in table.rows.items() if json.loads(row_json(v))["n"] > 0}
    assert got == want
    assert table.streamed and table.refetches == 0
    await conn.close()


async def test_a_column_added_under_writes_reloads_once_and_rows_come_from_the_stream_again(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    conn = await asyncpg.connect(logical_dsn)
    s = lschema
    await conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, v text); INSERT INTO {s}.t VALUES (1, 'a'), (2, 'b')")
    daemon = await start_logical([f"{s}.t"])
    engine, table = daemon.engine, daemon.core.tables[f"{s}.t"]
    await conn.execute(f"ALTER TABLE {s}.t ADD COLUMN w int DEFAULT 7")
    await conn.execute(f"UPDATE {s}.t SET v = 'A' WHERE id = 1")
    await engine.sync()
    await eventually(lambda: table.streamed and not table.reloading, 15, what="streamed again")
    await conn.execute(f"INSERT INTO {s}.t VALUES (3, 'c', 9)")
    await engine.sync()
    want = {r["id"]: r["j"] for r in await conn.fetch(f"SELECT id, row_to_json(t.*)::text AS j FROM {s}.t t")}
    assert {k[0]: row_json(v).decode() for k, v in table.rows.items()} == want
    assert table.streamed and table.refetches == 0
    await conn.close()


async def test_invalidate_of_a_table_from_the_stream_drops_nothing_and_covers_every_earlier_commit(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    """Nothing escapes the WAL: an Invalidate keeps the rows (a refetch would end taking rows
    from the stream), returns once everything committed before it is applied, and watchers
    still hear of it."""
    from sidecar.core.fanout import INVALIDATE

    conn = await asyncpg.connect(logical_dsn)
    s = lschema
    await conn.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, v text); INSERT INTO {s}.t VALUES (1, 'a'), (2, 'b')")
    daemon = await start_logical([f"{s}.t"])
    table = daemon.core.tables[f"{s}.t"]
    engine = daemon.engine
    recorded: list[Any] = []
    original = daemon.core.fanout.record
    daemon.core.fanout.record = lambda seq, xid, *changes: (recorded.extend(changes), original(seq, xid, *changes))[1]
    await conn.execute(f"UPDATE {s}.t SET v = 'A' WHERE id = 1")
    await engine.invalidate(f"{s}.t", [[1]], refresh=True)
    assert json.loads(row_json(table.rows[(1,)]))["v"] == "A"  # (applied before it returned)
    assert table.streamed and table.refetches == 0 and table.reloads == 1
    assert any(c.op == INVALIDATE and c.key == (1,) for c in recorded)
    await conn.close()

"""Real pgoutput messages from a server with ``wal_level = logical``, captured through
``pg_logical_slot_peek_binary_changes`` (no replication connection needed).

``python -m tests.support.logical > tests/unit/pgoutput_messages.json`` starts a throwaway
cluster with the pgserver binaries, runs every scenario and writes the messages the unit
tests read (the bulk of a streamed transaction's inserts trimmed).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from sidecar.pg.db import PINNED_SETTINGS
from tests.support.pg import LOGICAL_SETTINGS, LocalCluster, pgserver_bindir


def start_logical_cluster(bindir: str | None = None) -> LocalCluster:
    """A cluster with logical decoding on, of the embedded server's version unless ``bindir``
    names other binaries."""
    return LocalCluster(bindir or pgserver_bindir(), run_as="pgserver", settings=LOGICAL_SETTINGS)


async def connect(dsn: str) -> asyncpg.Connection:
    """A session pinned the way the daemon pins its own (the slot functions' text output
    follows the calling session's settings)."""
    return await asyncpg.connect(dsn, server_settings=dict(PINNED_SETTINGS))


@dataclass
class Slot:
    """A logical slot on one connection; ``peek`` returns the pgoutput messages so far."""

    conn: asyncpg.Connection
    publication: str
    name: str = ""

    async def create(self, two_phase: bool = False) -> Slot:
        self.name = f"s_{secrets.token_hex(4)}"
        await self.conn.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, $2)", self.name, two_phase
        )
        return self

    async def peek(self, *options: str) -> list[bytes]:
        args = _override(["proto_version", "1", "publication_names", self.publication, "messages", "true", *options])
        placeholders = ", ".join(f"${i + 2}" for i in range(len(args)))
        rows = await self.conn.fetch(
            f"SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, {placeholders})",
            self.name,
            *args,
        )
        return [bytes(row["data"]) for row in rows]

    async def drop(self) -> None:
        await self.conn.execute("SELECT pg_drop_replication_slot($1)", self.name)


def _override(args: list[str]) -> list[str]:
    """Later option pairs replace earlier ones of the same name (proto_version)."""
    merged: dict[str, str] = {}
    for name, value in zip(args[::2], args[1::2], strict=True):
        merged[name] = value
    return [item for pair in merged.items() for item in pair]


Scenario = Callable[[asyncpg.Connection, str], Awaitable[list[bytes]]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(function: Scenario) -> Scenario:
    SCENARIOS[function.__name__] = function
    return function


async def _slot(conn: asyncpg.Connection, schema: str, tables: Sequence[str], two_phase: bool = False) -> Slot:
    publication = f"{schema}_pub"
    names = ", ".join(f"{schema}.{t}" for t in tables)
    await conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE {names}")
    return await Slot(conn, publication).create(two_phase)


async def _captured(slot: Slot, *options: str) -> list[bytes]:
    try:
        return await slot.peek(*options)
    finally:
        await slot.drop()


@scenario
async def changes(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """Insert, update, key-changing update, delete of many types; REPLICA IDENTITY DEFAULT."""
    await conn.execute(f"""
        CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN {s}.posint AS integer CHECK (VALUE > 0);
        CREATE TYPE {s}.pair AS (a integer, b text);
        CREATE TABLE {s}.t (
            id integer PRIMARY KEY, n numeric, txt text, b bytea, j jsonb, arr integer[],
            m {s}.mood, d {s}.posint, p {s}.pair, ts timestamptz, nothing text
        )""")
    slot = await _slot(conn, s, ["t"])
    await conn.execute(f"""
        INSERT INTO {s}.t VALUES (1, 12345678901234567890.000000000000000001, 'h\u00e9llo \U0001f600 "q" \\ x',
            '\\x00ff10', '{{"a": [1, 2.50, null]}}', '{{1,NULL,3}}', 'happy', 7, ROW(1, 'x,"y"'),
            '2024-01-02 03:04:05.123+00', NULL);
        UPDATE {s}.t SET txt = 'changed' WHERE id = 1;
        UPDATE {s}.t SET id = 2 WHERE id = 1;
        DELETE FROM {s}.t WHERE id = 2;
        """)
    return await _captured(slot)


@scenario
async def binary_columns(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """The 'binary' option: columns in their send format ('b')."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, f float8, txt text)")
    slot = await _slot(conn, s, ["t"])
    await conn.execute(f"INSERT INTO {s}.t VALUES (1, 1.5, 'x'), (2, NULL, NULL)")
    return await _captured(slot, "binary", "true")


@scenario
async def replica_identity_full(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """REPLICA IDENTITY FULL: the whole old row ('O') with updates and deletes."""
    await conn.execute(f"""
        CREATE TABLE {s}.t (id integer PRIMARY KEY, v text);
        ALTER TABLE {s}.t REPLICA IDENTITY FULL""")
    slot = await _slot(conn, s, ["t"])
    await conn.execute(f"""
        INSERT INTO {s}.t VALUES (1, 'a');
        UPDATE {s}.t SET v = 'b' WHERE id = 1;
        DELETE FROM {s}.t WHERE id = 1""")
    return await _captured(slot)


@scenario
async def unchanged_toast(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """A big out-of-line value not touched by an UPDATE is sent as 'u'."""
    await conn.execute(f"""
        CREATE TABLE {s}.t (id integer PRIMARY KEY, big text, small text);
        ALTER TABLE {s}.t ALTER COLUMN big SET STORAGE EXTERNAL""")
    slot = await _slot(conn, s, ["t"])
    await conn.execute(f"""
        INSERT INTO {s}.t VALUES (1, repeat('0123456789', 300), 'a');
        UPDATE {s}.t SET small = 'b' WHERE id = 1""")
    return await _captured(slot)


@scenario
async def truncate(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """TRUNCATE plain, and of two tables with RESTART IDENTITY CASCADE."""
    await conn.execute(f"""
        CREATE TABLE {s}.a (id serial PRIMARY KEY);
        CREATE TABLE {s}.b (id serial PRIMARY KEY, a integer REFERENCES {s}.a)""")
    slot = await _slot(conn, s, ["a", "b"])
    await conn.execute(f"""
        INSERT INTO {s}.a DEFAULT VALUES;
        TRUNCATE {s}.b;
        TRUNCATE {s}.a RESTART IDENTITY CASCADE""")
    return await _captured(slot)


@scenario
async def savepoint(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """A rolled-back savepoint's insert is not sent; the others are."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY)")
    slot = await _slot(conn, s, ["t"])
    await conn.execute(f"""
        BEGIN;
        INSERT INTO {s}.t VALUES (1);
        SAVEPOINT x;
        INSERT INTO {s}.t VALUES (2);
        ROLLBACK TO SAVEPOINT x;
        INSERT INTO {s}.t VALUES (3);
        COMMIT""")
    return await _captured(slot)


@scenario
async def logical_messages(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """pg_logical_emit_message, transactional and not, with a NUL byte in the content."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY)")
    slot = await _slot(conn, s, ["t"])
    await conn.execute("""
        BEGIN;
        SELECT pg_logical_emit_message(true, 'sidecar', 'token-\u00e9');
        SELECT pg_logical_emit_message(false, 'other', '\\x00ff'::bytea);
        COMMIT""")
    return await _captured(slot)


@scenario
async def origin(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """A transaction replayed under a replication origin carries an Origin message."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY)")
    slot = await _slot(conn, s, ["t"])
    name = f"{s}_origin"
    await conn.execute("SELECT pg_replication_origin_create($1)", name)
    try:
        await conn.execute("SELECT pg_replication_origin_session_setup($1)", name)
        await conn.execute(f"""
            BEGIN;
            SELECT pg_replication_origin_xact_setup('0/12345678', '2024-01-02 03:04:05+00');
            INSERT INTO {s}.t VALUES (1);
            COMMIT""")
        await conn.execute("SELECT pg_replication_origin_session_reset()")
    finally:
        await conn.execute("SELECT pg_replication_origin_drop($1)", name)
    return await _captured(slot)


@scenario
async def two_phase(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """PREPARE TRANSACTION, then COMMIT PREPARED; another one ROLLBACK PREPARED (version 3)."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY)")
    slot = await _slot(conn, s, ["t"], two_phase=True)
    await conn.execute(f"BEGIN; INSERT INTO {s}.t VALUES (1); PREPARE TRANSACTION '{s}_one'")
    await conn.execute(f"COMMIT PREPARED '{s}_one'")
    await conn.execute(f"BEGIN; INSERT INTO {s}.t VALUES (2); PREPARE TRANSACTION '{s}_two'")
    await conn.execute(f"ROLLBACK PREPARED '{s}_two'")
    return await _captured(slot, "proto_version", "3", "two_phase", "on")


async def _big_transaction(conn: asyncpg.Connection, s: str, finish: str) -> None:
    await conn.execute(f"""
        BEGIN;
        INSERT INTO {s}.t SELECT g, repeat('x', 100) FROM generate_series(1, 3000) g;
        SAVEPOINT inner_one;
        INSERT INTO {s}.t SELECT g, 'sub' FROM generate_series(3001, 5000) g;
        ROLLBACK TO SAVEPOINT inner_one;
        {finish}""")


@scenario
async def streamed(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """A transaction larger than logical_decoding_work_mem streams (version 2): Stream
    Start/Stop blocks, an aborted subtransaction's Stream Abort, Stream Commit. (A transaction
    rolled back entirely may or may not be streamed: the server skips one it already knows
    aborted.)"""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text)")
    slot = await _slot(conn, s, ["t"])
    await _big_transaction(conn, s, "COMMIT")
    return await _captured(slot, "proto_version", "2", "streaming", "on")


@scenario
async def streamed_parallel(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """``streaming = parallel`` (version 4): Stream Abort (of the rolled-back subtransaction)
    carries the abort LSN and time."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text)")
    slot = await _slot(conn, s, ["t"])
    await _big_transaction(conn, s, "COMMIT")
    return await _captured(slot, "proto_version", "4", "streaming", "parallel")


@scenario
async def streamed_prepare(conn: asyncpg.Connection, s: str) -> list[bytes]:
    """A streamed transaction prepared for two-phase commit: Stream Prepare (version 3)."""
    await conn.execute(f"CREATE TABLE {s}.t (id integer PRIMARY KEY, v text)")
    slot = await _slot(conn, s, ["t"], two_phase=True)
    await _big_transaction(conn, s, f"PREPARE TRANSACTION '{s}_big'")
    await conn.execute(f"COMMIT PREPARED '{s}_big'")
    return await _captured(slot, "proto_version", "3", "streaming", "on", "two_phase", "on")


async def capture(dsn: str, names: Sequence[str] = ()) -> dict[str, list[bytes]]:
    """Each scenario's messages, each scenario in a schema of its own (dropped after)."""
    conn = await connect(dsn)
    try:
        # The calling session decodes: a small budget makes the big transactions stream.
        await conn.execute("SET logical_decoding_work_mem = '64kB'")
        captured: dict[str, list[bytes]] = {}
        for name in names or SCENARIOS:
            schema = f"cap_{secrets.token_hex(4)}"
            await conn.execute(f"CREATE SCHEMA {schema}")
            try:
                captured[name] = await SCENARIOS[name](conn, schema)
            finally:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                await conn.execute(f"DROP PUBLICATION IF EXISTS {schema}_pub")
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        return captured
    finally:
        await conn.close()


def trimmed(messages: list[bytes], keep_inserts: int = 3) -> list[bytes]:
    """The messages without a streamed transaction's bulk: at most ``keep_inserts`` Inserts
    per Stream Start/Stop block (and per plain transaction)."""
    kept: list[bytes] = []
    inserts = 0
    for message in messages:
        if message[:1] in (b"S", b"B", b"b"):
            inserts = 0
        if message[:1] == b"I":
            inserts += 1
            if inserts > keep_inserts:
                continue
        kept.append(message)
    return kept


async def _server_version(dsn: str) -> str:
    conn = await connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def main() -> None:
    cluster = start_logical_cluster()
    try:
        captured = asyncio.run(capture(cluster.dsn))
        version = asyncio.run(_server_version(cluster.dsn))
    finally:
        cluster.stop()
    fixtures = {
        "generated_by": "python -m tests.support.logical > tests/unit/pgoutput_messages.json",
        "server_version": version,
        "scenarios": {name: [m.hex() for m in trimmed(messages)] for name, messages in captured.items()},
    }
    json.dump(fixtures, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

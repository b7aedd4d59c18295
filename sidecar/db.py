"""The query side of PostgreSQL: catalog look-ups, loads and keyed refetches.

``Database`` is the small interface the caches use; ``PgDatabase`` adapts an
asyncpg pool to it (``sidecar.testing.MemoryDatabase`` is the in-memory one).
The LISTEN connection is not here: ``listener.py`` owns it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import asyncpg

from sidecar.config import Config, TableConfig, redact_dsn, scrub
from sidecar.errors import ConfigError, SchemaError, Unavailable
from sidecar.keys import Key, KeyColumn, normalize_stored
from sidecar.schema import TableSchema
from sidecar.wire import entry

log = logging.getLogger(__name__)

Rows = dict[Key, bytes]  # key -> cache entry (see wire.py)

# asyncpg/OS errors that mean "the database is unreachable or went away".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


class Database(Protocol):
    """What the caches need from PostgreSQL."""

    async def describe(self, table: TableConfig) -> TableSchema: ...

    def load(self, schema: TableSchema) -> AsyncIterator[Rows]:
        """Every row of the table, in chunks, from one snapshot."""
        ...

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        """The rows that exist among ``keys`` (missing keys are absent)."""
        ...


def connect_kwargs(config: Config, application_name: str) -> dict[str, Any]:
    """asyncpg connection arguments: DSN (or PG* variables) and session settings."""
    return {
        "dsn": config.dsn,
        "timeout": config.connect_timeout,
        "server_settings": {
            "application_name": application_name,
            # Row JSON must not depend on the sidecar's session: timestamps in
            # UTC, bytea as hex.
            "TimeZone": "UTC",
            "bytea_output": "hex",
        },
    }


CATALOG_TABLE_SQL = """
SELECT c.oid, c.relkind::text AS relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""

CATALOG_KEY_SQL = """
SELECT a.attname,
       format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END),
       bt.typname,
       bt.typtype = 'e'
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""


async def describe_table(conn: Any, table: TableConfig) -> TableSchema:
    """Find a table and its primary key in the catalog."""
    found = await conn.fetchrow(CATALOG_TABLE_SQL, table.schema, table.name)
    if found is None:
        raise SchemaError(f"table {table.qualified} does not exist")
    if found["relkind"] not in ("r", "p"):
        raise SchemaError(f"{table.qualified} is not a table (relkind {found['relkind']!r})")
    key_rows = await conn.fetch(CATALOG_KEY_SQL, found["oid"])
    if not key_rows:
        raise SchemaError(f"table {table.qualified} has no primary key; cache-sidecar needs one to identify rows")
    columns = tuple(
        KeyColumn.create(name, type_name, sql_type, is_enum) for name, sql_type, type_name, is_enum in key_rows
    )
    return TableSchema(config=table, key_columns=columns)


class PgDatabase:
    """``Database`` over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, dsn: str | None = None, timeout: float = 10.0) -> None:
        self.pool = pool
        self._dsn = dsn
        self.timeout = timeout  # per query and per wait for a connection: a stall must not hang readers

    @classmethod
    async def connect(cls, config: Config) -> PgDatabase:
        try:
            pool = await asyncpg.create_pool(
                min_size=config.pool_min_size,
                max_size=config.pool_max_size,
                command_timeout=config.query_timeout,
                **connect_kwargs(config, "cache-sidecar"),
            )
        except CONNECTION_ERRORS as exc:  # may fix itself: the caller may retry
            raise Unavailable(f"cannot connect to {redact_dsn(config.dsn)}: {scrub(str(exc), config.dsn)}") from None
        except (asyncpg.PostgresError, ValueError) as exc:  # bad credentials, database, DSN
            raise ConfigError(
                "database.dsn", f"cannot connect to {redact_dsn(config.dsn)}: {scrub(str(exc), config.dsn)}"
            ) from None
        return cls(pool, config.dsn, config.query_timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def describe(self, table: TableConfig) -> TableSchema:
        async with self.pool.acquire(timeout=self.timeout) as conn:
            return await describe_table(conn, table)

    async def load(self, schema: TableSchema) -> AsyncIterator[Rows]:
        width = len(schema.key_columns)
        columns = schema.key_columns
        async with (
            self.pool.acquire(timeout=self.timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await conn.cursor(schema.select_all_sql())
            while records := await cursor.fetch(10_000):
                yield _rows(records, columns, width)

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        columns = schema.key_columns
        args = [[key[i] for key in keys] for i in range(len(columns))]
        async with self.pool.acquire(timeout=self.timeout) as conn:
            records = await conn.fetch(schema.select_keys_sql(), *args)
        return _rows(records, columns, len(columns))


def _rows(records: Sequence[Any], columns: tuple[KeyColumn, ...], width: int) -> Rows:
    """Key -> the row's cache entry (its JSON, already in response encoding)."""
    if width == 1 and columns[0].type_name != "bpchar":
        return {(r[0],): entry(r[1].encode()) for r in records}
    return {normalize_stored(columns, tuple(r[:width])): entry(r[width].encode()) for r in records}

"""The query side of PostgreSQL: catalog look-ups, loads and keyed refetches.

``PgDatabase`` adapts an asyncpg pool to ``source.Database``, the small
interface the caches use (``sidecar.testing.MemoryDatabase`` is the in-memory
one). Driver errors are translated here, so the core never sees asyncpg's:
``Unavailable`` for what may pass (the database is away, a timeout),
``QueryFailed`` for what the same query would meet again (a value PostgreSQL
refuses, an undefined column). The LISTEN connection is not here:
``listener.py`` owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import asyncpg

from sidecar.config import Config, TableConfig, dsn
from sidecar.config.dsn import Target, scrub
from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key, KeyColumn, collision_text, normalize_stored
from sidecar.core.schema import SourceSchema, TableSchema
from sidecar.core.source import Database, Rows
from sidecar.core.wire import PREFIXES, entry
from sidecar.errors import ConfigError, InvalidKey, QueryFailed, SchemaError, SidecarError, Unavailable
from sidecar.identifiers import qualified_name
from sidecar.pg.copy_text import IntegerKeyRows

log = logging.getLogger(__name__)

# (Database and Rows live in source.py, the core's side of the seam; re-exported here.)
__all__ = ["CONNECTION_ERRORS", "Database", "PgDatabase", "Rows", "connect_kwargs", "translated"]

# asyncpg/OS errors that mean "the database is unreachable or went away".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)
_SNAPSHOT_NAME = re.compile(r"[0-9A-F]+-[0-9A-F]+-[0-9]+")
# Rows per chunk a load yields (a cursor's fetch; a COPY's parsed lines).
LOAD_CHUNK_ROWS = 10_000
# Keys a load streams by COPY: its text form of these is what int() reads.
COPY_KEY_TYPES = frozenset({"int2", "int4", "int8"})
# asyncpg bounds a COPY as a whole; a load bounds each chunk instead (see _copy_load).
COPY_TIMEOUT = 7 * 24 * 3600.0
# SQLSTATE classes that the same query, sent again, meets again: data exceptions (a
# value PostgreSQL cannot take), undefined or mistyped objects (the schema changed),
# unsupported features, errors raised by functions a relation's query calls.
REPEATING_SQLSTATE_CLASSES = frozenset({"0A", "22", "2F", "38", "39", "42", "P0"})


def _would_repeat(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # an argument asyncpg cannot encode
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in REPEATING_SQLSTATE_CLASSES
    return not isinstance(exc, CONNECTION_ERRORS)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Driver errors as the daemon's own: ``QueryFailed`` if the same query would fail
    again, ``Unavailable`` if it may pass; anything else (a bug) is left as it is."""
    try:
        yield
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        text = f"{what}: {type(exc).__name__}: {exc}"
        if _would_repeat(exc):
            raise QueryFailed(text) from exc
        raise Unavailable(text) from exc


# Row JSON must not depend on the session: whoever may ALTER ROLE/DATABASE ... SET
# must not change what is served. Settings sent at connection override those (and
# RESET ALL, as the pool does on release, returns to them). Each changes the text of
# some type, or how the SQL a relation or filter is written in reads its literals.
PINNED_SETTINGS = {
    "TimeZone": "UTC",  # timestamptz
    "bytea_output": "hex",  # bytea
    "extra_float_digits": "3",  # float4/float8: exact, not rounded
    "IntervalStyle": "postgres",  # interval
    "DateStyle": "ISO, MDY",  # date/time text, and how date literals read
    "lc_monetary": "C",  # money
    "lc_numeric": "C",  # to_char() in a relation's query
    "lc_time": "C",  # to_char() month and day names
    "standard_conforming_strings": "on",  # backslashes in string literals
    "xmloption": "content",  # text -> xml
    "xmlbinary": "base64",  # bytea inside xml
    "timezone_abbreviations": "Default",  # what 'EST' in a timestamp literal means
    "quote_all_identifiers": "off",  # regclass, regtype, format_type() text
    "array_nulls": "on",  # NULL in array literals
    "transform_null_equals": "off",  # x = NULL in a query or filter
}


def connect_target(config: Config, application_name: str) -> Target:
    """How to connect (the DSN or PG* variables, a service, the session settings); every
    connection the daemon and the CLI open is built here. ``application_name`` tells the
    connections apart in pg_stat_activity unless the DSN names one."""
    target = dsn.resolve(config.dsn)
    arguments = dict(target.arguments)
    arguments.setdefault("timeout", config.connect_timeout)
    arguments["server_settings"] = {
        "application_name": application_name,
        **arguments.get("server_settings", {}),
        **PINNED_SETTINGS,
    }
    return dataclasses.replace(target, arguments=arguments)


def connect_kwargs(config: Config, application_name: str) -> dict[str, Any]:
    """asyncpg ``connect()``/``create_pool()`` keyword arguments (see ``connect_target``)."""
    return connect_target(config, application_name).arguments


def connect_failure(config: Config, target: Target, exc: BaseException) -> SidecarError:
    """A failed connection attempt as the daemon's error, naming where it tried: ``Unavailable``
    when it may fix itself (the caller may retry), ``ConfigError`` when only a change can."""
    detail = scrub(str(exc).strip() or type(exc).__name__, config.dsn)
    message = f"cannot connect to {target.address} ({target.origin}): {detail}"
    # (asyncpg's configuration errors are InterfaceErrors too: retrying them cannot help)
    if isinstance(exc, CONNECTION_ERRORS) and not isinstance(exc, asyncpg.ClientConfigurationError):
        return Unavailable(message)
    return ConfigError("database.dsn", message)


async def connect(config: Config, application_name: str) -> asyncpg.Connection:
    """One connection, outside the pool (the listener's, the CLI's)."""
    target = connect_target(config, application_name)
    try:
        return await asyncpg.connect(**target.arguments)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError, ValueError) as exc:
        raise connect_failure(config, target, exc) from None


CATALOG_TABLE_SQL = """
SELECT c.oid, c.relkind::text AS relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""

CATALOG_KEY_SQL = """
SELECT a.attname,
       pg_catalog.format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END),
       bt.typname,
       bt.typtype = 'e',
       pg_catalog.format_type(bt.oid, -1),
       co.collname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_catalog.pg_collation co
  ON co.oid = (i.indcollation::pg_catalog.oid[])[k.ord - 1] AND NOT co.collisdeterministic
WHERE i.indrelid = $1 AND i.indisprimary
ORDER BY k.ord
"""


CATALOG_COLUMNS_SQL = """
SELECT a.attname,
       pg_catalog.format_type(bt.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END),
       bt.typname,
       bt.typtype = 'e',
       pg_catalog.format_type(bt.oid, -1)
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = $1 AND a.attname = ANY($2::text[]) AND a.attnum > 0 AND NOT a.attisdropped
"""

CATALOG_TYPES_SQL = """
SELECT t.oid, pg_catalog.format_type(bt.oid, -1), bt.typname, bt.typtype = 'e',
       pg_catalog.format_type(bt.oid, -1)
FROM pg_catalog.pg_type t
JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE t.oid = ANY($1::oid[])
"""


async def describe_table(conn: Any, table: TableConfig) -> TableSchema:
    """Find a table (or a relation's query) and its key in the catalog."""
    if table.is_relation:
        return await describe_relation(conn, table)
    found = await conn.fetchrow(CATALOG_TABLE_SQL, table.schema, table.name)
    if found is None:
        # A misspelt name is a configuration error like a misspelt key: exit 2, with a hint.
        raise ConfigError("tables", f"table {table.qualified} does not exist{await _near_names(conn, table)}")
    if found["relkind"] not in ("r", "p"):
        raise SchemaError(f"{table.qualified} is not a table (relkind {found['relkind']!r})")
    key_rows = await conn.fetch(CATALOG_KEY_SQL, found["oid"])
    if not key_rows:
        raise SchemaError(f"table {table.qualified} has no primary key; cache-sidecar needs one to identify rows")
    columns = tuple(_key_column(table, *row) for row in key_rows)
    wanted = sorted({c for index in table.indexes for c in index.columns} - {c.name for c in columns})
    others: dict[str, KeyColumn] = {}
    if wanted:
        for name, sql_type, type_name, is_enum, cast in await conn.fetch(CATALOG_COLUMNS_SQL, found["oid"], wanted):
            others[name] = KeyColumn.create(name, type_name, sql_type, is_enum, cast)
        missing = [c for c in wanted if c not in others]
        if missing:
            raise SchemaError(f"table {table.qualified} has no column {', '.join(missing)} (indexes)")
    return TableSchema(config=table, key_columns=columns, columns=others)


def _key_column(
    table: TableConfig, name: str, sql_type: str, type_name: str, is_enum: bool, cast: str, collation: str | None
) -> KeyColumn:
    """A primary-key column, or a ``ConfigError`` (exit 2, as for a missing table) naming the
    table and the column if the sidecar cannot hold its values as keys exactly."""
    if collation is not None:
        # ('a' = 'A' under a case-insensitive collation: one key to PostgreSQL, two here)
        raise ConfigError(
            "tables",
            f"table {table.qualified}: key column {name} uses the nondeterministic collation {collation}, "
            "whose equal values differ in their characters; the sidecar compares keys by character",
        )
    try:
        return KeyColumn.create(name, type_name, sql_type, is_enum, cast)
    except SchemaError as exc:
        raise ConfigError("tables", f"table {table.qualified}: key {exc}") from None


CATALOG_NEAR_SQL = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND (n.nspname = $1 OR lower(c.relname) = lower($2))
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
"""


async def _near_names(conn: Any, table: TableConfig) -> str:
    """ " (did you mean ...?)" from the tables of the same schema, and same-named ones elsewhere."""
    rows = [(schema, name) for schema, name in await conn.fetch(CATALOG_NEAR_SQL, table.schema, table.name)]
    same_schema = [name for schema, name in rows if schema == table.schema]
    close = [(table.schema, name) for name in difflib.get_close_matches(table.name, same_schema, n=3, cutoff=0.6)]
    elsewhere = sorted((s, n) for s, n in rows if s != table.schema and n.lower() == table.name.lower())
    names = [qualified_name(s, n) for s, n in close + elsewhere][:5]
    return f" (did you mean {' or '.join(names)}?)" if names else ""


async def describe_relation(conn: Any, relation: TableConfig) -> TableSchema:
    """A relation's columns from its query's result, and its sources from the catalog."""
    assert relation.query is not None
    try:
        statement = await conn.prepare(f"SELECT t.* FROM ({relation.query}) AS t")
    except asyncpg.PostgresError as exc:
        raise SchemaError(f"relation {relation.qualified}: its query fails: {exc}") from None
    attributes = statement.get_attributes()
    names = [a.name for a in attributes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SchemaError(f"relation {relation.qualified}: its query returns {', '.join(twice)} more than once")
    types = {
        oid: (sql_type, type_name, is_enum, cast)
        for oid, sql_type, type_name, is_enum, cast in await conn.fetch(
            CATALOG_TYPES_SQL, [a.type.oid for a in attributes]
        )
    }

    def column(name: str, role: str) -> KeyColumn:
        attribute = next((a for a in attributes if a.name == name), None)
        if attribute is None:
            raise SchemaError(f"relation {relation.qualified}: {role} {name!r} is not a column of its query")
        sql_type, type_name, is_enum, cast = types[attribute.type.oid]
        return KeyColumn.create(name, type_name, sql_type, is_enum, cast)

    key = tuple(column(name, "key column") for name in relation.key)
    sources = []
    wanted = {c for index in relation.indexes for c in index.columns}
    for source in relation.sources:
        source_schema = await describe_table(conn, TableConfig(schema=source.schema, name=source.name))
        source_key = [c.name for c in source_schema.key_columns]
        mapping = []
        for source_column, relation_column in source.mapping:
            if source_column not in source_key:
                raise SchemaError(
                    f"relation {relation.qualified}: source {source.qualified} maps {source_column!r}, which is not "
                    f"part of its primary key ({', '.join(source_key)}); changes are told by primary key"
                )
            column(relation_column, f"the column {source.qualified}.{source_column} maps to,")
            mapping.append((source_key.index(source_column), relation_column))
            wanted.add(relation_column)
        sources.append(SourceSchema(source_schema, tuple(mapping)))
    others = {name: column(name, "indexed column") for name in sorted(wanted - set(relation.key))}
    return TableSchema(config=relation, key_columns=key, columns=others, sources=tuple(sources))


class PgDatabase:
    """``Database`` over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, dsn: str | None = None, timeout: float = 10.0) -> None:
        self.pool = pool
        self._dsn = dsn
        self.timeout = timeout  # per query and per wait for a connection: a stall must not hang readers
        # An exported snapshot loads read under (logical decoding's start: the slot's), or None.
        self.snapshot: str | None = None

    @classmethod
    async def connect(cls, config: Config) -> PgDatabase:
        target = connect_target(config, "cache-sidecar")
        try:
            pool = await asyncpg.create_pool(
                min_size=config.pool_min_size,
                max_size=config.pool_max_size,
                command_timeout=config.query_timeout,
                **target.arguments,
            )
        except (*CONNECTION_ERRORS, asyncpg.PostgresError, ValueError) as exc:
            raise connect_failure(config, target, exc) from None
        return cls(pool, config.dsn, config.query_timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def describe(self, table: TableConfig) -> TableSchema:
        async with self.pool.acquire(timeout=self.timeout) as conn:
            return await describe_table(conn, table)

    async def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        """A key of one integer column streams by COPY (see copy_text.py); others by a cursor.
        ``seen`` is told the load's snapshot (``pg_current_snapshot()``'s text) before any row."""
        columns = schema.key_columns
        if len(columns) == 1 and columns[0].type_name in COPY_KEY_TYPES:
            # (closed with this one: left to the garbage collector, a COPY would go on meanwhile)
            async with contextlib.aclosing(self._copy_load(schema, seen)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        with translated(f"loading {schema.qualified}"):
            async with (
                self.pool.acquire(timeout=self.timeout) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                await self._use_snapshot(conn, seen)
                cursor = await conn.cursor(schema.select_all_sql())
                while records := await cursor.fetch(LOAD_CHUNK_ROWS):
                    yield _rows(records, columns, len(columns), schema.qualified)

    async def _copy_load(
        self, schema: TableSchema, seen: Callable[[str], None] | None = None
    ) -> AsyncGenerator[Rows, None]:
        # One statement: one snapshot. The COPY runs as a task that parses as data comes and
        # waits while two chunks are not taken yet; a stall is told per chunk, as a cursor's
        # fetches would tell it, not by a bound on the whole (a big table may take minutes).
        chunks: asyncio.Queue[Rows] = asyncio.Queue(maxsize=2)
        parser = IntegerKeyRows(chunks.put, LOAD_CHUNK_ROWS)
        with translated(f"loading {schema.qualified}"):
            async with self.pool.acquire(timeout=self.timeout) as conn, contextlib.AsyncExitStack() as stack:
                if self.snapshot is not None or seen is not None:
                    await stack.enter_async_context(conn.transaction(isolation="repeatable_read", readonly=True))
                    await self._use_snapshot(conn, seen)
                copying = asyncio.ensure_future(
                    conn.copy_from_query(schema.select_all_sql(as_text=True), output=parser.feed, timeout=COPY_TIMEOUT)
                )
                taking: asyncio.Future[Rows] | None = None
                try:
                    while True:
                        taking = asyncio.ensure_future(chunks.get())
                        done, _ = await asyncio.wait(
                            (taking, copying), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
                        )
                        if taking in done:
                            yield taking.result()
                            continue
                        taking.cancel()
                        if copying not in done:
                            raise TimeoutError(f"no rows for {self.timeout}s")
                        copying.result()  # (its error, if it failed)
                        while not chunks.empty():
                            yield chunks.get_nowait()
                        if rest := parser.finish():
                            yield rest
                        if parser.collisions:
                            raise QueryFailed(f"reading {schema.qualified}: {collision_text(parser.collisions)}")
                        return
                finally:  # (also when the load is abandoned, or stalled)
                    if taking is not None:
                        taking.cancel()
                    if not copying.done():
                        await _stop_copy(conn, copying, parser, chunks, self.timeout)

    async def _use_snapshot(self, conn: Any, seen: Callable[[str], None] | None = None) -> None:
        """Read under the exported snapshot, if one is set (the transaction's first statement);
        tell ``seen`` which snapshot the transaction reads."""
        snapshot = self.snapshot
        if snapshot is not None:
            if not _SNAPSHOT_NAME.fullmatch(snapshot):
                raise QueryFailed(f"not a snapshot name: {snapshot[:40]!r}")
            try:
                await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'", timeout=self.timeout)
            except asyncpg.PostgresError as exc:
                # (the replication connection that exported it ended: a rebuild follows; not a
                # failure of the table that would repeat)
                raise Unavailable(f"the exported snapshot is gone: {exc}") from None
        if seen is not None:
            seen(await conn.fetchval("SELECT pg_catalog.pg_current_snapshot()::text", timeout=self.timeout))

    async def estimate(self, schema: TableSchema) -> int | None:
        # The planner's estimate of the load's own query: it covers filters and relations too.
        with translated(f"estimating the rows of {schema.qualified}"):
            async with self.pool.acquire(timeout=self.timeout) as conn:
                plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + schema.select_all_sql())
        return _plan_rows(plan)

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        columns = schema.key_columns
        args = _arrays(columns, keys)
        with translated(f"reading {len(keys)} key(s) of {schema.qualified}"):
            async with self.pool.acquire(timeout=self.timeout) as conn:
                records = await conn.fetch(schema.select_keys_sql(), *args)
        return _rows(records, columns, len(columns), schema.qualified)

    async def fetch_matching(self, schema: TableSchema, columns: Sequence[str], values: Sequence[Key]) -> Rows:
        args = _arrays([schema.column(name) for name in columns], values)
        with translated(f"refreshing {schema.qualified}"):
            async with self.pool.acquire(timeout=self.timeout) as conn:
                records = await conn.fetch(schema.select_matching_sql(columns), *args)
        return _rows(records, schema.key_columns, len(schema.key_columns), schema.qualified)

    async def query(self, schema: TableSchema, query: IndexQuery) -> Rows:
        with translated(f"querying {schema.qualified}"):
            async with self.pool.acquire(timeout=self.timeout) as conn:
                records = await conn.fetch(*query_sql(schema, query))
        return _rows(records, schema.key_columns, len(schema.key_columns), schema.qualified)


# Whether a backend's role may change a table, so that a whole-table NOTIFY it sent may
# be real ($1 the backend's PID, $2 and $3 the table's schema and name; "known" is false
# when that backend is gone or there is no such table): it, or a role it may SET ROLE to,
# may INSERT, UPDATE, DELETE or TRUNCATE the table or a table whose writes reach it (a
# foreign key's cascade, a partition's or an inheritance parent, a view or rule over it),
# or it may call a SECURITY DEFINER function whose owner may (such a function may write
# the table for it; any such trigger function counts: firing one needs no EXECUTE right).
# Erring towards "may" only costs a reload; erring the other way would drop a real change.
MAY_WRITE_SQL = """
WITH RECURSIVE writers(oid) AS (
    SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $2 AND c.relname = $3
  UNION
    SELECT x.oid FROM writers w, LATERAL (
        SELECT f.confrelid FROM pg_catalog.pg_constraint f
        WHERE f.contype = 'f' AND f.conrelid = w.oid
          AND (f.confdeltype IN ('c', 'n', 'd') OR f.confupdtype IN ('c', 'n', 'd'))
      UNION ALL
        SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = w.oid
      UNION ALL
        SELECT r.ev_class FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
        WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
          AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = w.oid
    ) x(oid)
),
sender AS (SELECT a.usesysid AS role FROM pg_catalog.pg_stat_activity a WHERE a.pid = $1 AND a.usesysid IS NOT NULL)
SELECT EXISTS (SELECT FROM sender) AND EXISTS (SELECT FROM writers) AS known,
       EXISTS (
         SELECT FROM sender s, pg_catalog.pg_roles r, writers w
         WHERE pg_catalog.pg_has_role(s.role, r.oid, 'MEMBER')
           AND pg_catalog.has_table_privilege(r.oid, w.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
       ) OR EXISTS (
         SELECT FROM sender s, pg_catalog.pg_proc p, writers w
         WHERE p.prosecdef
           AND p.pronamespace NOT IN ('pg_catalog'::pg_catalog.regnamespace,
                                      'information_schema'::pg_catalog.regnamespace)
           AND (pg_catalog.has_function_privilege(s.role, p.oid, 'EXECUTE')
                OR p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype)  -- (firing needs no EXECUTE)
           AND pg_catalog.has_table_privilege(p.proowner, w.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')
       ) AS may
"""


def query_sql(schema: TableSchema, query: IndexQuery) -> tuple[Any, ...]:
    """An index query as SQL and its arguments (one row past the limit, to tell truncation)."""
    if query.values is not None:
        sql = schema.select_index_sql(query.columns, equality=True, descending=query.descending)
        return (sql, *_arrays(query.columns, query.values), query.limit + 1)
    column = query.columns[0]
    bounds = [column.parameter(bound) for bound in (query.low, query.high) if bound is not None]
    sql = schema.select_index_sql(
        query.columns,
        equality=False,
        low=query.low is not None,
        high=query.high is not None,
        low_open=query.low_open,
        high_open=query.high_open,
        descending=query.descending,
    )
    return (sql, *bounds, query.limit + 1)


async def _stop_copy(
    conn: Any, copying: asyncio.Future[Any], parser: IntegerKeyRows, chunks: asyncio.Queue[Rows], timeout: float
) -> None:
    """End a load's COPY midway. Cancelling asyncpg's COPY task can leave its connection
    stuck ("another operation is in progress"); a sink that raises is asyncpg's way to
    abort one. So the parser raises at its next block (the queue is emptied, in case it
    waits to put a chunk); a COPY that gets no block (a stalled server) is cut off with
    its connection, and the pool opens another."""
    parser.abandon()
    while not chunks.empty():
        chunks.get_nowait()
    await asyncio.wait((copying,), timeout=timeout)
    if not copying.done():
        copying.cancel()
        conn.terminate()
    await asyncio.gather(copying, return_exceptions=True)


def _plan_rows(plan: Any) -> int | None:
    """The row estimate of an ``EXPLAIN (FORMAT JSON)`` answer, if it has a sane one."""
    try:
        rows = json.loads(plan)[0]["Plan"]["Plan Rows"]
    except (TypeError, ValueError, LookupError):
        return None
    if isinstance(rows, int | float) and not isinstance(rows, bool) and 0 <= rows < 2**63:
        return int(rows)
    return None


def _arrays(columns: Sequence[KeyColumn], values: Sequence[Key]) -> list[list[Any]]:
    """One array parameter per column (see ``KeyColumn.parameter_sql``)."""
    return [[column.parameter(value[i]) for value in values] for i, column in enumerate(columns)]


def _rows(records: Sequence[Any], columns: tuple[KeyColumn, ...], width: int, table: str) -> Rows:
    """Key -> the row's cache entry (its JSON, already in response encoding). Rows with a
    NULL key part (possible in a relation's query) cannot be asked for: they are left out.
    Two rows with one key (a relation's key that is not unique) and a key the sidecar
    cannot hold are ``QueryFailed``: a table missing a row would answer "not found"."""
    # (the common sizes' entry prefixes inline: a 1 M-row load spends its own time here)
    prefixes, limit = PREFIXES, len(PREFIXES)
    rows: Rows = {}
    if width == 1 and not columns[0].normalized:
        for key, row in records:
            if key is not None:
                rows[(key,)] = prefixes[len(row)] + row if len(row) < limit else entry(row)
        brought = sum(1 for r in records if r[0] is not None) if len(rows) < len(records) else len(rows)
    elif width == 1:  # (one coerce per row to its canonical form: floats, numerics, dates, char(n))
        coerce, brought = columns[0].coerce, 0
        try:
            for key, row in records:
                if key is not None:
                    rows[(coerce(key),)] = prefixes[len(row)] + row if len(row) < limit else entry(row)
                    brought += 1
        except InvalidKey as exc:
            raise QueryFailed(f"reading {table}: a row's key cannot be held: {exc}") from None
    else:
        brought = 0
        for record in records:
            values = record[:width]
            if None in values:
                continue
            try:
                key = normalize_stored(columns, values)
            except InvalidKey as exc:
                raise QueryFailed(f"reading {table}: a row's key cannot be held: {exc}") from None
            rows[key] = entry(record[width])
            brought += 1
    if brought != len(rows):
        raise QueryFailed(f"reading {table}: {collision_text(brought - len(rows))}")
    return rows

"""Logical capture's object in the database: the publication the replication stream reads
(the counterpart of ``triggers.py``), and what it asks of the tables in it.

One publication per configuration, ``cache_sidecar_<digest>``, where the digest is of the
sorted set of PostgreSQL tables the cache needs (each cached table and every source of each
relation, as ``triggers.captured_tables`` finds them): sidecars caching the same tables share
it, sidecars caching others keep their own beside it. It publishes insert, update, delete and
truncate without ``publish_via_partition_root``: a write naming a partition (or an inheritance
child) arrives under that partition's name and the stream maps it to the cached ancestors
itself, because with ``publish_via_partition_root`` pgoutput leaves a TRUNCATE of one
partition out of the stream altogether (the cache would never hear of it). Never a row filter
or a column list: the cache builds whole rows from the stream, so a publication that filters
either counts as outdated.

A table in a publication that publishes UPDATE and DELETE needs a replica identity, or
PostgreSQL refuses every UPDATE and DELETE of it ("cannot update table ... because it does
not have a replica identity and publishes updates"): the application's writes would fail,
not just the cache. The identity is per table, so partitions and inheritance children (which
a publication naming their parent includes) each need one. ``identities`` reads them and
``install`` refuses to publish a table that lacks one.

Needs PostgreSQL 13 or newer (``publish_via_partition_root``, partitioned tables in a
publication). Names in the SQL are always quoted; comments never carry a raw name.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import asyncpg

from sidecar.config import Config
from sidecar.core.schema import TableSchema
from sidecar.errors import SchemaError
from sidecar.identifiers import qualified_name, quote_ident
from sidecar.pg import triggers
from sidecar.pg.triggers import _comment_text, _literal, _sql_name, captured_tables

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 130000
PUBLISH = "insert, update, delete, truncate"
OPTIONS = f"publish = '{PUBLISH}', publish_via_partition_root = false"
# Bumped whenever what the publication is changes; a sidecar never replaces a newer one's.
DEFINITION = 1
COMMENT_PREFIX = "cache-sidecar logical capture"
INSTALL_LOCK = 0x63617074  # advisory lock id: concurrent installs (many pods) take turns
_DEFINITION = re.compile(r"\(definition (\d+)\)")
# What logical capture needs of the server and of the sidecar's role (the script's comments).
REQUIREMENTS = (
    "wal_level = logical (a server setting; a restart applies it)",
    "max_replication_slots and max_wal_senders: one free slot and one free sender per sidecar",
    "the sidecar's role: the REPLICATION attribute (ALTER ROLE ... WITH REPLICATION; on Amazon RDS / "
    "Aurora: GRANT rds_replication TO ...), and SELECT on the cached tables",
    "each published table (and each of its partitions and children): a replica identity, its primary "
    "key by default (ALTER TABLE ... REPLICA IDENTITY USING INDEX ... or FULL otherwise)",
)


@dataclass(frozen=True)
class Publication:
    """The publication one configuration reads: ``tables`` are (schema, name), sorted."""

    tables: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, tables: Iterable[tuple[str, str]]) -> Publication:
        return cls(tuple(sorted(set(tables))))

    @property
    def name(self) -> str:
        identity = json.dumps(self.tables)  # (unambiguous whatever the names hold)
        return "cache_sidecar_" + hashlib.sha256(identity.encode()).hexdigest()[:10]

    @property
    def sql_name(self) -> str:
        return quote_ident(self.name)

    @property
    def table_list(self) -> str:
        return ", ".join(_sql_name(schema, name) for schema, name in self.tables)

    def comment(self) -> str:
        return f"{COMMENT_PREFIX} (definition {DEFINITION}): the tables one cache-sidecar configuration caches"

    def _header(self) -> str:
        names = ", ".join(qualified_name(schema, name) for schema, name in self.tables)
        return f"-- {COMMENT_PREFIX}: {_comment_text(names)}\n"

    def install_sql(self) -> str:
        return (
            self._header()
            + f"CREATE PUBLICATION {self.sql_name} FOR TABLE {self.table_list} WITH ({OPTIONS});\n"
            + f"COMMENT ON PUBLICATION {self.sql_name} IS {_literal(self.comment())};\n"
        )

    def update_sql(self) -> str:
        """Make an existing publication of this name what ``install_sql`` creates."""
        return (
            self._header()
            + f"ALTER PUBLICATION {self.sql_name} SET TABLE {self.table_list};\n"
            + f"ALTER PUBLICATION {self.sql_name} SET ({OPTIONS});\n"
            + f"COMMENT ON PUBLICATION {self.sql_name} IS {_literal(self.comment())};\n"
        )

    def replace_sql(self) -> str:
        """For one made ``FOR ALL TABLES`` (which ``SET TABLE`` cannot change)."""
        return f"DROP PUBLICATION IF EXISTS {self.sql_name};\n" + self.install_sql()

    def uninstall_sql(self) -> str:
        return f"DROP PUBLICATION IF EXISTS {self.sql_name};\n"


def for_schemas(schemas: Sequence[TableSchema]) -> Publication:
    """The publication the cached tables (and relations' sources) need."""
    return Publication.of((table.config.schema, table.config.name) for table in captured_tables(schemas))


@dataclass(frozen=True)
class Inspected:
    """What the catalog holds under a publication's name: ``status`` is 'ok' (as this sidecar
    defines it), 'missing', or 'outdated' (``problems`` says what differs)."""

    status: str
    problems: tuple[str, ...] = ()
    all_tables: bool = False  # made FOR ALL TABLES: SET TABLE cannot change it
    newer: int | None = None  # the definition found, when a newer cache-sidecar's

    @property
    def description(self) -> str:
        return "; ".join(self.problems) or self.status


PUBLICATION_SQL = """
SELECT p.oid, p.puballtables AS all_tables,
       p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate AS every_operation,
       coalesce((pg_catalog.to_jsonb(p) ->> 'pubviaroot')::boolean, false) AS via_root,
       pg_catalog.obj_description(p.oid, 'pg_publication') AS comment
  FROM pg_catalog.pg_publication p
 WHERE p.pubname = $1
"""
# (row filters and column lists exist from PostgreSQL 15: read through to_jsonb, which any
# version answers)
PUBLICATION_TABLES_SQL = """
SELECT n.nspname AS schema, c.relname AS name,
       (pg_catalog.to_jsonb(r) ->> 'prqual') IS NOT NULL AS row_filter,
       (pg_catalog.to_jsonb(r) ->> 'prattrs') IS NOT NULL AS column_list,
       EXISTS (SELECT FROM pg_catalog.pg_inherits i
                 JOIN pg_catalog.pg_publication_rel p ON p.prrelid = i.inhparent AND p.prpubid = r.prpubid
                WHERE i.inhrelid = c.oid) AS inherited
  FROM pg_catalog.pg_publication_rel r
  JOIN pg_catalog.pg_class c ON c.oid = r.prrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE r.prpubid = $1
 ORDER BY 1, 2
"""
# Inheritance children (not partitions: a partitioned table publishes every partition,
# present and future) of the published tables that the publication lacks: "FOR TABLE t"
# adds t's children as they are then, and a child made later is not published at all.
UNPUBLISHED_CHILDREN_SQL = """
WITH RECURSIVE tree(oid) AS (
    SELECT r.prrelid FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = $1
  UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT n.nspname AS schema, c.relname AS name
  FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT c.relispartition AND c.relkind = 'r'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = $1 AND r.prrelid = c.oid)
 ORDER BY 1, 2
"""
PUBLICATION_SCHEMAS_SQL = """
SELECT n.nspname AS schema
  FROM pg_catalog.pg_publication_namespace pn
  JOIN pg_catalog.pg_namespace n ON n.oid = pn.pnnspid
 WHERE pn.pnpubid = $1
 ORDER BY 1
"""


async def inspect(conn: Any, publication: Publication) -> Inspected:
    """Read the catalog: is the publication there, with exactly these tables, whole rows,
    every operation, and not ``publish_via_partition_root``?"""
    row = await conn.fetchrow(PUBLICATION_SQL, publication.name)
    if row is None:
        return Inspected("missing")
    found = _DEFINITION.search(row["comment"] or "")
    if found is not None and int(found.group(1)) > DEFINITION:
        newer = int(found.group(1))
        return Inspected(
            "outdated", (f"made by a newer cache-sidecar (definition {newer}; this one has {DEFINITION})",), newer=newer
        )
    problems: list[str] = []
    if row["all_tables"]:
        problems.append("it publishes every table of the database (FOR ALL TABLES)")
    if not row["every_operation"]:
        problems.append(f"it does not publish every operation ({PUBLISH})")
    if row["via_root"]:
        problems.append("publish_via_partition_root is on (a TRUNCATE of one partition would never be sent)")
    rows = await conn.fetch(PUBLICATION_TABLES_SQL, row["oid"])
    present = {(r["schema"], r["name"]) for r in rows}
    absent = [t for t in publication.tables if t not in present]
    # (a published table's inheritance children are in it too, by "FOR TABLE")
    extra = sorted(present - set(publication.tables) - {(r["schema"], r["name"]) for r in rows if r["inherited"]})
    if absent and not row["all_tables"]:
        problems.append(f"it lacks {_names(absent)}")
    if not row["all_tables"]:
        children = [(r["schema"], r["name"]) for r in await conn.fetch(UNPUBLISHED_CHILDREN_SQL, row["oid"])]
        if children:
            problems.append(f"it lacks the inheritance children {_names(children)} (made after it)")
    if extra:
        problems.append(f"it also publishes {_names(extra)}")
    for r in rows:
        if r["row_filter"]:
            problems.append(f"it publishes only some rows of {qualified_name(r['schema'], r['name'])} (a WHERE filter)")
        if r["column_list"]:
            problems.append(f"it publishes only some columns of {qualified_name(r['schema'], r['name'])}")
    if await conn.fetchval("SELECT pg_catalog.to_regclass('pg_catalog.pg_publication_namespace') IS NOT NULL"):
        schemas = [r["schema"] for r in await conn.fetch(PUBLICATION_SCHEMAS_SQL, row["oid"])]
        if schemas:
            problems.append(f"it also publishes every table of the schemas {', '.join(map(quote_ident, schemas))}")
    return Inspected("outdated" if problems else "ok", tuple(problems), all_tables=row["all_tables"])


async def check_server(conn: Any) -> None:
    version = int(await conn.fetchval("SHOW server_version_num"))
    if version < MIN_SERVER_VERSION:
        raise SchemaError(f"PostgreSQL {version // 10000} is too old: logical capture needs 13 or newer")


async def install(conn: Any, publication: Publication) -> bool:
    """Create the publication, or make the one of its name what it must be; True if anything
    changed. Idempotent, and safe when sidecars of one configuration install at once.
    Refuses (``SchemaError``) to publish a table without a replica identity: PostgreSQL would
    then refuse every UPDATE and DELETE of it."""
    await check_server(conn)
    problems = [
        p for schema, name in publication.tables for i in await identities(conn, schema, name) if (p := i.problem())
    ]
    if problems:
        raise SchemaError(f"{IDENTITY_NOTE}: {'; '.join(problems)}")
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        found = await inspect(conn, publication)
        if found.status == "missing":
            if await _create(conn, publication):
                return True
            # Another installer (one that takes no lock: a DBA's script) made it meanwhile.
            found = await inspect(conn, publication)
        if found.status == "ok":
            return False
        if found.newer is not None:
            raise SchemaError(
                f"the publication {publication.name} was made by a newer cache-sidecar (definition {found.newer}; "
                f"this one has {DEFINITION}); this one will not replace it: upgrade it, or uninstall it with that "
                "newer version first"
            )
        log.info("updating the publication %s: %s", publication.name, found.description)
        sql = publication.replace_sql() if found.all_tables else publication.update_sql()
        await _run(conn, sql, f"updating the publication {publication.name}", _needs(publication))
        return True


async def _create(conn: Any, publication: Publication) -> bool:
    """CREATE it; False if another session made one of the same name first."""
    try:
        async with conn.transaction():  # (a savepoint: the caller's transaction goes on after a race)
            await _run(
                conn,
                publication.install_sql(),
                f"creating the publication {publication.name}",
                _needs(publication),
                creating=True,
            )
    except _Raced:
        return False
    return True


async def uninstall(conn: Any, publication: Publication) -> bool:
    """Drop exactly this configuration's publication; True if there was one."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        if (await inspect(conn, publication)).status == "missing":
            return False
        await _run(
            conn,
            publication.uninstall_sql(),
            f"dropping the publication {publication.name}",
            f"needs to own the publication {publication.name}",
        )
        return True


async def check_or_install(conn: Any, config: Config, schemas: Sequence[TableSchema]) -> Publication:
    """At start in logical mode: install the publication when ``server.install_triggers`` is
    on, else require it to be there as this configuration needs it (``SchemaError`` saying what
    to run). Returns it (its ``name`` is what the replication stream asks for)."""
    publication = for_schemas(schemas)
    if config.install_triggers:
        if await install(conn, publication):
            log.info(
                "installed the publication %s (%s)",
                publication.name,
                ", ".join(qualified_name(*t) for t in publication.tables),
            )
        return publication
    found = await inspect(conn, publication)
    what = f"the publication {publication.name} (of {', '.join(qualified_name(*t) for t in publication.tables)})"
    todo = (
        "run 'cache-sidecar capture install --capture logical' with the same tables (or 'cache-sidecar capture "
        "sql --capture logical' for a DBA to review and run), or start with --install-capture"
    )
    if found.status == "missing":
        raise SchemaError(f"{what} that logical capture reads does not exist; {todo}")
    if found.status == "outdated":
        raise SchemaError(f"{what} is not as this sidecar needs it: {found.description}; it could miss changes; {todo}")
    return publication


async def replicated(conn: Any, publication: Publication, timeout: float) -> None:
    """Wait until a standby (``conn``) has replayed the publication as the primary has it
    now: a slot made there before would decode without it (``SchemaError`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while (found := await inspect(conn, publication)).status != "ok":
        if time.monotonic() > deadline:
            raise SchemaError(
                f"the standby (database.dsn) does not have the publication {publication.name} as the primary has it "
                f"after {timeout:g}s ({found.description}): is database.primary_dsn its primary, and is it replaying?"
            )
        await asyncio.sleep(0.05)


def script(publication: Publication, found: Inspected, uninstall: bool = False) -> str:
    """The install (or removal) script for a DBA: what the catalog needs changed now (create,
    update, or nothing), one locked transaction; the server's and role's needs as comments."""
    if uninstall:
        body = publication.uninstall_sql()
    elif found.status == "ok":
        # (not the CREATE commented out: a newline in a table's name would end the comment)
        body = f"-- {publication.name} exists as this configuration needs it: nothing to run\n"
    elif found.status == "outdated":
        body = f"-- it exists but {_comment_text(found.description)}\n" + (
            publication.replace_sql() if found.all_tables else publication.update_sql()
        )
    else:
        body = publication.install_sql()
    needs = (
        "" if uninstall else "-- Logical capture also needs:\n" + "".join(f"--   {r}\n" for r in REQUIREMENTS) + "\n"
    )
    return (
        f"{needs}SET client_encoding = 'UTF8';\nBEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK});\n\n"
        f"{body}\nCOMMIT;\n"
    )


# ------------------------------------------------------------------ replica identities

IDENTITY_NOTE = (
    "PostgreSQL refuses every UPDATE and DELETE of a published table without a replica identity, "
    "so publishing these would make the application's writes fail"
)

# The table, and its partitions and inheritance children at any depth (a publication naming
# a table includes them, each with a replica identity of its own); per table its identity,
# the columns of its primary key and of its identity index, and the unique indexes that
# could be its identity (valid, immediate, no expression or predicate, NOT NULL columns).
IDENTITY_SQL = """
WITH RECURSIVE tree(oid) AS (
  SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname = $1 AND c.relname = $2
  UNION
  SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind, c.relreplident::text AS identity,
       (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_catalog.pg_index x
          CROSS JOIN LATERAL pg_catalog.unnest(x.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = c.oid AND x.indisprimary) AS primary_key,
       (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_catalog.pg_index x
          CROSS JOIN LATERAL pg_catalog.unnest(x.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
         WHERE x.indrelid = c.oid AND x.indisreplident) AS index_columns,
       (SELECT pg_catalog.array_agg(ic.relname::text ORDER BY ic.relname)
          FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
         WHERE x.indrelid = c.oid AND x.indisunique AND x.indimmediate AND x.indisvalid
           AND x.indpred IS NULL AND x.indexprs IS NULL
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                            WHERE a.attrelid = c.oid AND a.attnum = ANY (x.indkey) AND NOT a.attnotnull)
       ) AS candidates
  FROM tree t
  JOIN pg_catalog.pg_class c ON c.oid = t.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class ReplicaIdentity:
    """One table's replica identity: what an UPDATE or DELETE of it tells of the old row."""

    schema: str
    name: str
    kind: str  # pg_class.relkind: 'r' a table, 'p' partitioned (its rows live in partitions), ...
    identity: str  # pg_class.relreplident: 'd' default (the primary key), 'i' index, 'f' full, 'n' nothing
    primary_key: tuple[str, ...] | None
    index_columns: tuple[str, ...] | None
    candidates: tuple[str, ...] = ()

    @property
    def qualified(self) -> str:
        return qualified_name(self.schema, self.name)

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The old row's columns an UPDATE or DELETE tells: ``None`` all of them (FULL), ``()`` none."""
        if self.identity == "f":
            return None
        if self.identity == "d":
            return self.primary_key or ()
        if self.identity == "i":
            return self.index_columns or ()
        return ()

    def problem(self) -> str | None:
        """Why PostgreSQL would refuse UPDATE and DELETE of it once published, and the fix."""
        if self.kind != "r" or self.columns != ():
            return None  # (a partitioned table holds no rows; a foreign table is never published)
        if self.identity == "n":
            why = "has REPLICA IDENTITY NOTHING"
        elif self.identity == "d":
            why = "has no primary key (its REPLICA IDENTITY DEFAULT means the primary key)"
        else:
            why = "has REPLICA IDENTITY USING INDEX of an index that no longer exists"
        table = _sql_name(self.schema, self.name)
        index = quote_ident(self.candidates[0]) if self.candidates else "<a unique index of NOT NULL columns>"
        return (
            f"table {self.qualified} {why}: run ALTER TABLE {table} REPLICA IDENTITY USING INDEX "
            f"{index} (or REPLICA IDENTITY FULL, which writes whole old rows to the WAL)"
        )

    def key_note(self, key: Sequence[str]) -> str | None:
        """When the cache's key is not all in the identity: the old key of an UPDATE that
        changes it, or of a DELETE, is then not in the stream."""
        columns = self.columns
        if self.kind != "r" or columns is None or not columns or set(key) <= set(columns):
            return None
        return (
            f"the cache's key of {self.qualified} ({', '.join(key)}) is not all in its replica identity "
            f"({', '.join(columns)}): UPDATEs that change the key and DELETEs cannot name the old key, so the "
            "sidecar reloads the table for them; ALTER TABLE ... REPLICA IDENTITY DEFAULT (the primary key) "
            "or FULL avoids that"
        )


async def identities(conn: Any, schema: str, name: str) -> list[ReplicaIdentity]:
    """The replica identity of a table and of each of its partitions and inheritance children."""
    rows = await conn.fetch(IDENTITY_SQL, schema, name)
    return [
        ReplicaIdentity(
            r["schema"],
            r["name"],
            r["kind"],
            r["identity"],
            tuple(r["primary_key"]) if r["primary_key"] is not None else None,
            tuple(r["index_columns"]) if r["index_columns"] is not None else None,
            tuple(r["candidates"] or ()),
        )
        for r in rows
    ]


# ------------------------------------------------------------------ running the SQL


class _Raced(Exception):
    """Another session created an object of the same name meanwhile."""


def _needs(publication: Publication) -> str:
    return (
        "needs CREATE on the database and ownership of every table it publishes (PostgreSQL lets only a "
        f"table's owner publish it): {', '.join(qualified_name(*t) for t in publication.tables)}"
    )


async def _run(conn: Any, sql: str, doing: str, needs: str, creating: bool = False) -> None:
    try:
        await conn.execute(sql)
    except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError) as exc:
        # duplicate_object when the other's commit came first, unique_violation when it
        # committed while this CREATE waited for it
        if creating:
            raise _Raced() from None
        raise SchemaError(f"{doing} failed: {exc}") from None
    except asyncpg.InsufficientPrivilegeError as exc:
        raise SchemaError(
            f"{doing} failed: {exc}. The database role {needs}. Or leave it to someone who has those rights: "
            "'cache-sidecar capture sql --capture logical' (same tables) prints the script to run."
        ) from None
    except asyncpg.PostgresError as exc:
        raise SchemaError(f"{doing} failed: {exc}") from None


def _names(tables: Iterable[tuple[str, str]]) -> str:
    return ", ".join(qualified_name(schema, name) for schema, name in tables)


class PublicationCapture:
    """``catalog.Capture`` by the publication: every table the cache reads must be in it,
    and the publication as this sidecar defines it (else changes go untold)."""

    objects = "the publication for"

    def __init__(
        self, publication: Publication, install_on: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    ) -> None:
        self.publication = publication
        # A hub on a standby reads the publication there and installs it on the primary
        # (a connection ``install_on()`` opens); None: where it is read.
        self._install_on = install_on

    async def inspect(self, conn: Any, trigger_set: triggers.TriggerSet) -> triggers.Installed:
        """Whether every change of ``trigger_set``'s table is sent: the publication's problems
        that concern it (another table missing from it does not)."""
        found = await inspect(conn, self.publication)
        if found.status == "missing":
            return triggers.Installed("missing")
        config = trigger_set.schema.config
        name = qualified_name(config.schema, config.name)
        problems = [
            p
            for p in found.problems
            if p.startswith(_EVERY_TABLE_PROBLEMS) or (name in p and not p.startswith("it also publishes"))
        ]
        children = await conn.fetch(_TABLE_UNPUBLISHED_CHILDREN_SQL, await _oid(conn, self.publication))
        root = (config.schema, config.name)
        mine = {(r["schema"], r["name"]) for r in children if (r["root_schema"], r["root"]) == root}
        if mine:
            problems.append(f"it lacks the inheritance children {_names(sorted(mine))} of {name} (made after it)")
        return triggers.Installed("outdated" if problems else "current", tuple(problems))

    async def install(self, conn: Any, trigger_set: triggers.TriggerSet) -> None:
        if self._install_on is None:
            await install(conn, self.publication)
            return
        async with self._install_on() as primary:
            await install(primary, self.publication)

    def problem(self, table: str, what: str, trigger_set: triggers.TriggerSet) -> str:
        return (
            f"the publication {self.publication.name} would not send every change of {table} ({what}); run "
            "'cache-sidecar capture install --capture logical' (or 'capture sql' for a DBA), or start with "
            "--install-capture"
        )


# Problems of the publication as a whole (every table's changes may go unsent).
_EVERY_TABLE_PROBLEMS = (
    "made by a newer",
    "it publishes every table",
    "it does not publish every operation",
    "publish_via_partition_root",
)

# UNPUBLISHED_CHILDREN_SQL, with the published table each child descends from.
_TABLE_UNPUBLISHED_CHILDREN_SQL = """
WITH RECURSIVE tree(oid, root) AS (
    SELECT r.prrelid, r.prrelid FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = $1
  UNION
    SELECT i.inhrelid, tree.root FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT n.nspname AS schema, c.relname AS name, rn.nspname AS root_schema, rc.relname AS root
  FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_class rc ON rc.oid = tree.root
  JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
 WHERE NOT c.relispartition AND c.relkind = 'r'
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_publication_rel r WHERE r.prpubid = $1 AND r.prrelid = c.oid)
"""


async def _oid(conn: Any, publication: Publication) -> int | None:
    oid = await conn.fetchval("SELECT oid FROM pg_catalog.pg_publication WHERE pubname = $1", publication.name)
    return None if oid is None else int(oid)

"""Noticing schema changes of cached tables: the catalog, checked periodically,
after every reconnect and (its cheap part) in every read barrier round.

DDL fires no trigger, and event triggers need a superuser, so a cheap query
of the catalog stands in: per table the sidecar reads (a table, or a source of
a relation) its oid (DROP + CREATE gives a new one), its columns and their
types, its primary key, and whether its change triggers are this sidecar's
(channel and fingerprint) and would fire: enabled, calling this sidecar's
function with this version's body, and present on every partition, inheritance
child and parent (``triggers.inspect``). Any role can read that.

When something changed, each cached table that reads the changed table is
described again. Same key and indexed columns: it is reloaded (a column added,
dropped or retyped changes every row's JSON). Otherwise, or when its triggers
are missing or notify another channel (and ``install_triggers`` is off), or
when it cannot be described at all (dropped), it is not served from memory,
with the reason in its log line, in ``ListTables`` and in the metrics; the
other tables are served as before. A table not served is tried again at every
check, so it comes back once it is fixed. Triggers that would not report every
change are reinstalled when ``install_triggers`` is on (then the table is
reloaded); otherwise the table is in ``capture_problems``, and health says
NOT_SERVING while any is.

Some DDL keeps every column's name and type and still changes the rows served:
a rewrite (``ALTER COLUMN v TYPE text USING upper(v)``; a new ``relfilenode``),
a renamed enum label (``ALTER TYPE mood RENAME VALUE``, also under a domain or an
array), a composite type's attributes, a partition attached or detached. So the
state also holds the table's *contents*: facts read from the catalog rows those
depend on (``dependencies`` finds the rows, ``contents`` reads them), and any
change reloads the readers. The read barrier asks for them too (``verify``, one
query for every table per barrier round): a STRONG read or ``Sync`` never
answers from the shape before a DDL that committed before it began, while
EVENTUAL reads may lag a DDL by up to the check interval.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import operator
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.core.aio import wait_set
from sidecar.core.schema import TableSchema
from sidecar.errors import SidecarError
from sidecar.pg import triggers

log = logging.getLogger(__name__)

STATE_SQL = """
SELECT c.oid,
       array(SELECT a.attname || ' ' || a.atttypid::text || ' ' || a.atttypmod::text
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum) AS columns,
       array(SELECT a.attname
               FROM pg_catalog.pg_index i
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = c.oid AND i.indisprimary
              ORDER BY k.ord) AS key
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""

# What the rows served of a table depend on besides its own columns: the table and
# its inheritance descendants (partitions: their storage and children), and the
# enum and composite types its columns use, through domains, arrays and ranges
# (not multiranges: their link to a range needs PostgreSQL 14).
DEPENDENCIES_SQL = """
WITH RECURSIVE
  tree(oid) AS (
      SELECT $1::pg_catalog.oid
    UNION
      SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid),
  used(oid) AS (
      SELECT a.atttypid FROM pg_catalog.pg_attribute a
       WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
    UNION
      SELECT n.oid
        FROM used JOIN pg_catalog.pg_type t ON t.oid = used.oid
       CROSS JOIN LATERAL (
             SELECT t.typbasetype WHERE t.typtype = 'd'
             UNION ALL SELECT t.typelem WHERE t.typelem <> 0
             UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = t.oid
             UNION ALL SELECT a.atttypid FROM pg_catalog.pg_attribute a
              WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
       ) AS n(oid))
SELECT array(SELECT tree.oid FROM tree ORDER BY 1) AS storage,
       array(SELECT $1::pg_catalog.oid UNION
             SELECT t.typrelid FROM used JOIN pg_catalog.pg_type t ON t.oid = used.oid
              WHERE t.typtype = 'c' ORDER BY 1) AS attributes,
       array(SELECT t.oid FROM used JOIN pg_catalog.pg_type t ON t.oid = used.oid
              WHERE t.typtype = 'e' ORDER BY 1) AS enums
"""

# The catalog rows of those dependencies, as facts to compare: index look-ups only,
# so that every barrier round can afford it for every table at once. Each column is
# one kind of fact (a column added here is compared everywhere). The arrays are read
# through sub-selects so that the plan does not depend on their values: PostgreSQL
# then keeps one generic plan instead of planning each call (measured: a third less).
# The cache-sidecar triggers on the table and its descendants are facts too (enabled
# state, type, function, the function's body and settings): a trigger disabled,
# re-pointed or replaced is then found by the next barrier round, not the next periodic
# check, and since it may have missed changes meanwhile, the reload is what is needed.
# (A kind of fact whose change must not reload the tables needs handling of its own in
# ``CatalogWatch._check``: every difference counts as ``changed`` there.)
CONTENTS_SQL = """
WITH ids AS (SELECT $1::pg_catalog.oid[] AS storage, $2::pg_catalog.oid[] AS attributes,
                    $3::pg_catalog.oid[] AS enums)
SELECT array(SELECT c.oid::text || ' ' || c.relnamespace::text || ' ' || c.relfilenode::text || ' '
                    || c.relname::text
               FROM pg_catalog.pg_class c
              WHERE c.oid = ANY((SELECT storage FROM ids)::pg_catalog.oid[])) AS storage,
       array(SELECT i.inhparent::text || ' ' || i.inhrelid::text
               FROM pg_catalog.pg_inherits i
              WHERE i.inhparent = ANY((SELECT storage FROM ids)::pg_catalog.oid[])) AS children,
       array(SELECT a.attrelid::text || ' ' || a.attnum::text || ' ' || a.atttypid::text || ' '
                    || a.atttypmod::text || ' ' || a.attname::text
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = ANY((SELECT attributes FROM ids)::pg_catalog.oid[])
                AND a.attnum > 0 AND NOT a.attisdropped) AS attributes,
       array(SELECT i.indrelid::text || ' ' || i.indkey::text
               FROM pg_catalog.pg_index i
              WHERE i.indrelid = ANY((SELECT attributes FROM ids)::pg_catalog.oid[]) AND i.indisprimary) AS keys,
       array(SELECT e.enumtypid::text || ' ' || e.enumsortorder::text || ' ' || e.enumlabel::text
               FROM pg_catalog.pg_enum e
              WHERE e.enumtypid = ANY((SELECT enums FROM ids)::pg_catalog.oid[])) AS labels,
       array(SELECT t.tgrelid::text || ' ' || t.tgname::text || ' ' || t.tgenabled::text || ' '
                    || t.tgtype::text || ' ' || t.tgfoid::text || ' ' || pg_catalog.md5(p.prosrc) || ' '
                    || coalesce(p.proconfig::text, '')
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE t.tgrelid = ANY((SELECT storage FROM ids)::pg_catalog.oid[])
                AND t.tgname LIKE 'cache\\_sidecar\\_%') AS triggers
"""


@dataclass(frozen=True)
class Dependencies:
    """The catalog rows a table's served rows depend on (``DEPENDENCIES_SQL``), by oid."""

    storage: tuple[int, ...] = ()  # the table and its inheritance descendants
    attributes: tuple[int, ...] = ()  # the table and the composite types its columns use
    enums: tuple[int, ...] = ()  # the enum types its columns use

    def __or__(self, other: Dependencies) -> Dependencies:
        return Dependencies(
            tuple(sorted({*self.storage, *other.storage})),
            tuple(sorted({*self.attributes, *other.attributes})),
            tuple(sorted({*self.enums, *other.enums})),
        )


Facts = frozenset[tuple[str, str]]  # (kind: a column of CONTENTS_SQL, the fact)


async def dependencies(conn: Any, oid: int) -> Dependencies:
    row = await conn.fetchrow(DEPENDENCIES_SQL, oid)
    return Dependencies(tuple(row["storage"]), tuple(row["attributes"]), tuple(row["enums"]))


async def contents(conn: Any, depends: Dependencies) -> Facts:
    """What the catalog says now of the rows ``depends`` names."""
    row = await conn.fetchrow(CONTENTS_SQL, list(depends.storage), list(depends.attributes), list(depends.enums))
    return frozenset((kind, fact) for kind, facts in row.items() for fact in facts)


@dataclass(frozen=True)
class TableState:
    """What the catalog says of one table (``oid`` None: there is no such table)."""

    oid: int | None
    columns: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    triggers: str = "missing"  # triggers.installed_state: current, outdated, missing
    depends: Dependencies = Dependencies()
    contents: Facts = frozenset()  # what the catalog said of ``depends``: a change reloads the readers
    trigger_problems: tuple[str, ...] = ()  # triggers.inspect: what is not as installed, or not firing


def definition(states: Sequence[tuple[str, TableState | None]]) -> str:
    """A digest of what rows read from these tables depend on (``ListTables``' definition):
    their oid, columns and types, key and the facts of their contents but their triggers
    (NOTIFY's means, not the rows'). Every sidecar reading the same database (a primary
    and its standbys share oids) that has seen the same DDL gives the same one; a follower
    resuming on another hub compares it with the one its rows were read with."""
    digest = hashlib.sha256(b"cache-sidecar definition 1")
    for name, state in states:
        digest.update(b"\0table\0" + name.encode())
        if state is None or state.oid is None:
            digest.update(b"\0none")
            continue
        facts = sorted(f"{kind} {fact}" for kind, fact in state.contents if kind != "triggers")
        for part in (str(state.oid), *state.columns, "key", *state.key, "contents", *facts):
            digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]


def shape(schema: TableSchema) -> tuple[Any, ...]:
    """What a cache of ``schema`` depends on besides row contents: key and indexed columns, typed."""
    columns = sorted(schema.columns.items())
    return tuple((c.name, c.sql_type, c.type_name) for c in (*schema.key_columns, *(c for _, c in columns)))


class Capture(Protocol):
    """What tells the cache of a table's changes, as the catalog holds it: the triggers
    (``TriggerCapture``) or the publication (``publication.PublicationCapture``)."""

    objects: str  # what is installed, in a log line: "the triggers on" (a table)

    async def inspect(self, conn: Any, trigger_set: triggers.TriggerSet) -> triggers.Installed:
        """'current' when every change of the table will be told."""
        ...

    async def install(self, conn: Any, trigger_set: triggers.TriggerSet) -> None: ...

    def problem(self, table: str, what: str, trigger_set: triggers.TriggerSet) -> str:
        """Why a reader of ``table`` is not served, and what to run."""
        ...


class TriggerCapture:
    """Capture by the triggers: NOTIFY mode's."""

    objects = "the triggers on"

    async def inspect(self, conn: Any, trigger_set: triggers.TriggerSet) -> triggers.Installed:
        return await triggers.inspect(conn, trigger_set)

    async def install(self, conn: Any, trigger_set: triggers.TriggerSet) -> None:
        await triggers.install(conn, [trigger_set])

    def problem(self, table: str, what: str, trigger_set: triggers.TriggerSet) -> str:
        return (
            f"the cache-sidecar triggers on {table} would not report every change ({what}): they must "
            f"be installed and enabled on it and on its partitions, children and parents, notifying channel "
            f"{trigger_set.channel} with this version's definition; run 'cache-sidecar triggers install' "
            "as the table's owner (or start with --install-triggers)"
        )


async def table_state(conn: Any, trigger_set: triggers.TriggerSet, capture: Capture | None = None) -> TableState:
    config = trigger_set.schema.config
    row = await conn.fetchrow(STATE_SQL, config.schema, config.name)
    if row is None:
        return TableState(None)
    installed = await (capture or TriggerCapture()).inspect(conn, trigger_set)
    depends = await dependencies(conn, row["oid"])
    facts = await contents(conn, depends)
    return TableState(
        row["oid"], tuple(row["columns"]), tuple(row["key"]), installed.status, depends, facts, installed.problems
    )


class CatalogWatch:
    """Compares the catalog with what the cached tables were loaded with, and acts."""

    def __init__(
        self,
        *,
        acquire: Callable[[], Any],
        describe: Callable[[Any], Awaitable[TableSchema]],
        schemas: Sequence[TableSchema],
        trigger_sets: Sequence[triggers.TriggerSet],
        install: bool,
        reload: Callable[[str, str], None],
        fail: Callable[[str, str], None],
        problem: Callable[[str], str | None],
        interval: float = 10.0,
        capture_changed: Callable[[], None] | None = None,
        capture: Capture | None = None,
        definitions: dict[str, str] | None = None,
    ) -> None:
        self._capture_by = capture or TriggerCapture()
        # cached table -> ``definition`` of what it was last (re)loaded with (ListTables)
        self.definitions = {} if definitions is None else definitions
        self._acquire = acquire  # an async context manager giving a connection
        self._describe = describe
        self._schemas = {s.qualified: s for s in schemas}
        self._sets = {s.schema.qualified: s for s in trigger_sets}
        self._install = install
        self._reload = reload  # (cached table, why): reload it in memory
        self._fail = fail  # (cached table, problem): stop serving it from memory
        self._problem = problem  # a cached table's current problem, if any
        self.interval = interval
        self._known: dict[str, TableState] = {}
        self._poke = asyncio.Event()
        self._lock = asyncio.Lock()  # one check at a time: a barrier's waits for the periodic one
        self.checks = 0
        # Cached tables not served because their triggers would not tell of a change
        # (health says NOT_SERVING while any is here), and whom to tell when this changes.
        self.capture_problems: dict[str, str] = {}
        self._capture_changed = capture_changed
        self.verified = 0  # barrier rounds' catalog queries
        self._watched: tuple[Dependencies, Facts] | None = None  # of every table in _known, together

    def poke(self) -> None:
        """Check soon (the listener reconnected)."""
        self._poke.set()

    def _readers(self, table: str) -> list[str]:
        """The cached tables that read ``table``: itself, and the relations it is a source of."""
        return [
            name
            for name, schema in self._schemas.items()
            if (schema.config.is_relation and any(s.table.qualified == table for s in schema.sources))
            or (not schema.config.is_relation and name == table)
        ]

    async def baseline(self) -> None:
        """Take the catalog as it is now as what the tables were loaded with."""
        async with self._acquire() as conn:
            for name, trigger_set in self._sets.items():
                self._known[name] = await table_state(conn, trigger_set, self._capture_by)
        self._watched = None
        self._define()

    def _define(self) -> None:
        """Each cached table's definition from what the catalog said of the tables it reads
        when it was last (re)loaded (``definition``)."""
        for reader, schema in self._schemas.items():
            sources = [s.table.qualified for s in schema.sources] if schema.config.is_relation else [reader]
            self.definitions[reader] = definition([(name, self._known.get(name)) for name in sorted(set(sources))])

    async def run(self) -> None:
        while True:
            await wait_set(self._poke, self.interval)
            self._poke.clear()
            try:
                await self.check()
            except SidecarError as exc:
                log.warning("catalog check failed: %s", exc)
            except (OSError, TimeoutError) as exc:  # the database is away: the listener says so too
                log.debug("catalog check failed: %s", exc)
            except Exception as exc:
                if type(exc).__module__.startswith("asyncpg"):
                    log.debug("catalog check failed: %s: %s", type(exc).__name__, exc)
                else:
                    raise

    async def verify(self) -> None:
        """The read barrier's check: one query of what every cached table's rows depend on
        (``contents``), compared with what they were loaded with; when anything differs, a
        full check acts on it (reloads, or stops serving, the tables concerned) before this
        returns. Run after the barrier round's callers began, it sees every DDL committed
        before they did."""
        self.verified += 1
        depends, _ = self._watching()
        async with self._acquire() as conn:
            facts = await contents(conn, depends)
        async with self._lock:  # (a check under way may be acting on this very change: wait for it)
            if facts == self._watching()[1]:
                return
            try:
                await self._check()
            finally:
                self._watched = None

    def _watching(self) -> tuple[Dependencies, Facts]:
        """What every table depends on, and the facts they were loaded with."""
        if self._watched is None:
            states = self._known.values()
            depends = functools.reduce(operator.or_, (s.depends for s in states), Dependencies())
            self._watched = depends, frozenset().union(*(s.contents for s in states))
        return self._watched

    async def check(self) -> None:
        """One pass over every table the cache reads."""
        async with self._lock:
            try:
                await self._check()
            finally:
                self._watched = None

    async def _check(self) -> None:
        self.checks += 1
        settle: list[tuple[str, TableState, list[str], bool]] = []  # (settled with the connection back:
        async with self._acquire() as conn:  # describing takes one, and the pool may have one only)
            for name, trigger_set in self._sets.items():
                state = await table_state(conn, trigger_set, self._capture_by)
                known = self._known.get(name)
                changed = known is not None and (state.oid, state.columns, state.key, state.contents) != (
                    known.oid,
                    known.columns,
                    known.key,
                    known.contents,
                )
                readers = self._readers(name)
                retry = [r for r in readers if self._problem(r) is not None or r in self.capture_problems]
                if not changed and self._reporting(state) and not retry:
                    self._known[name] = state
                    continue
                if changed:
                    log.log(
                        logging.INFO if _storage_only(known, state) else logging.WARNING,  # (TRUNCATE does that)
                        "%s changed in the catalog (%s)",
                        name,
                        _difference(known, state),
                        extra={"event": "schema_changed", "table": name},
                    )
                if state.oid is not None and not self._reporting(state) and self._install:
                    await self._reinstall(conn, name, state, trigger_set)
                    state = await table_state(conn, trigger_set, self._capture_by)
                settle.append((name, state, readers, changed))
        for name, state, readers, changed in settle:
            await self._settle(name, state, readers, changed)
            self._known[name] = state  # (after: a check stopped before acting finds the change again)
        if settle:
            self._define()

    def _reporting(self, state: TableState) -> bool:
        """Whether the table's changes are reported (its triggers are current, or none are needed)."""
        return state.triggers == "current"

    async def _reinstall(self, conn: Any, name: str, state: TableState, trigger_set: triggers.TriggerSet) -> None:
        what = "; ".join(state.trigger_problems) or state.triggers
        try:
            await self._capture_by.install(conn, trigger_set)
        except SidecarError as exc:
            log.warning("cannot reinstall %s %s (%s): %s", self._capture_by.objects, name, what, exc)
        else:
            log.warning(
                f"reinstalled {self._capture_by.objects} %s: %s",
                name,
                what,
                extra={"event": "triggers_reinstalled", "table": name},
            )

    def _capture(self, reader: str, problem: str | None) -> None:
        """Record whether ``reader`` is not served because its changes may go unreported."""
        if problem is None:
            if self.capture_problems.pop(reader, None) is None:
                return
        elif self.capture_problems.get(reader) == problem:
            return
        else:
            self.capture_problems[reader] = problem
        if self._capture_changed is not None:
            self._capture_changed()

    async def _settle(self, name: str, state: TableState, readers: list[str], changed: bool) -> None:
        trigger_set = self._sets[name]
        for reader in readers:
            if state.oid is None:
                self._fail(reader, f"{name} does not exist (dropped?)")
                self._capture(reader, None)
                continue
            if not self._reporting(state):
                what = "; ".join(state.trigger_problems) or f"{state.triggers}"
                problem = self._capture_by.problem(name, what, trigger_set)
                self._capture(reader, problem)
                self._fail(reader, problem)
                continue
            old = self._schemas[reader]
            try:
                new = await self._describe(old.config)
            except SidecarError as exc:
                self._fail(reader, str(exc))
                self._capture(reader, None)
                continue
            if shape(new) != shape(old):
                self._fail(
                    reader,
                    f"its key or indexed columns changed ({_columns(old)} -> {_columns(new)}); "
                    "restart the sidecar to cache the new shape",
                )
                self._capture(reader, None)
                continue
            self._reload(reader, f"{name} changed in the catalog" if changed else "it can be served again")
            self._capture(reader, None)  # (after the reload began: health waits for it, not SERVING before)


def _columns(schema: TableSchema) -> str:
    return ", ".join(f"{name} {sql_type}" for name, sql_type, _ in shape(schema))


def _difference(old: TableState | None, new: TableState) -> str:
    if old is None:
        return "first seen"
    if new.oid is None:
        return "dropped"
    if new.oid != old.oid:
        return "dropped and created again"
    parts = []
    if new.key != old.key:
        parts.append(f"primary key {old.key!r} -> {new.key!r}")
    if new.columns != old.columns:
        gone = [repr(c.rsplit(" ", 2)[0]) for c in old.columns if c not in new.columns]
        added = [repr(c.rsplit(" ", 2)[0]) for c in new.columns if c not in old.columns]
        parts.append(f"columns changed (before: {', '.join(gone) or '-'}; now: {', '.join(added) or '-'})")
    if not parts and new.contents != old.contents:
        kinds = sorted({kind for kind, _ in new.contents ^ old.contents})
        parts.append(f"{', '.join(_CONTENT_CHANGES.get(k, k) for k in kinds)} changed")
    return "; ".join(parts) or "unchanged"


def _storage_only(old: TableState | None, new: TableState) -> bool:
    """Only the storage changed: a rewrite that changes no type (maybe a TRUNCATE or VACUUM FULL)."""
    return (
        old is not None
        and (old.oid, old.columns, old.key) == (new.oid, new.columns, new.key)
        and {kind for kind, _ in old.contents ^ new.contents} == {"storage"}
    )


_CONTENT_CHANGES = {
    "storage": "its storage (rewritten: ALTER COLUMN ... TYPE ... USING, VACUUM FULL, CLUSTER, TRUNCATE)",
    "children": "its partitions or inheritance children",
    "attributes": "the attributes of a composite type it uses",
    "keys": "a primary key",
    "labels": "the labels of an enum type it uses",
    "triggers": "its cache-sidecar triggers (disabled, re-pointed, replaced or dropped?)",
}

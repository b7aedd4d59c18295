"""Noticing schema changes of cached tables: the catalog, checked periodically
and after every reconnect.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar import triggers
from sidecar.errors import SidecarError
from sidecar.schema import TableSchema

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


@dataclass(frozen=True)
class TableState:
    """What the catalog says of one table (``oid`` None: there is no such table)."""

    oid: int | None
    columns: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    triggers: str = "missing"  # triggers.installed_state: current, outdated, missing
    trigger_problems: tuple[str, ...] = ()  # triggers.inspect: what is not as installed, or not firing


def shape(schema: TableSchema) -> tuple[Any, ...]:
    """What a cache of ``schema`` depends on besides row contents: key and indexed columns, typed."""
    columns = sorted(schema.columns.items())
    return tuple((c.name, c.sql_type, c.type_name) for c in (*schema.key_columns, *(c for _, c in columns)))


async def table_state(conn: Any, trigger_set: triggers.TriggerSet) -> TableState:
    config = trigger_set.schema.config
    row = await conn.fetchrow(STATE_SQL, config.schema, config.name)
    if row is None:
        return TableState(None)
    installed = await triggers.inspect(conn, trigger_set)
    return TableState(row["oid"], tuple(row["columns"]), tuple(row["key"]), installed.status, installed.problems)


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
    ) -> None:
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
        self.checks = 0
        # Cached tables not served because their triggers would not tell of a change
        # (health says NOT_SERVING while any is here), and whom to tell when this changes.
        self.capture_problems: dict[str, str] = {}
        self._capture_changed = capture_changed

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
                self._known[name] = await table_state(conn, trigger_set)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.interval)
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

    async def check(self) -> None:
        """One pass over every table the cache reads."""
        self.checks += 1
        async with self._acquire() as conn:
            for name, trigger_set in self._sets.items():
                state = await table_state(conn, trigger_set)
                known = self._known.get(name)
                changed = known is not None and (state.oid, state.columns, state.key) != (
                    known.oid,
                    known.columns,
                    known.key,
                )
                readers = self._readers(name)
                retry = [r for r in readers if self._problem(r) is not None or r in self.capture_problems]
                if not changed and state.triggers == "current" and not retry:
                    self._known[name] = state
                    continue
                if changed:
                    log.warning(
                        "%s changed in the catalog (%s)",
                        name,
                        _difference(known, state),
                        extra={"event": "schema_changed", "table": name},
                    )
                if state.oid is not None and state.triggers != "current" and self._install:
                    await self._reinstall(conn, name, state, trigger_set)
                    state = await table_state(conn, trigger_set)
                self._known[name] = state
                await self._settle(name, state, readers, changed)

    async def _reinstall(self, conn: Any, name: str, state: TableState, trigger_set: triggers.TriggerSet) -> None:
        what = "; ".join(state.trigger_problems) or state.triggers
        try:
            await triggers.install(conn, [trigger_set])
        except SidecarError as exc:
            log.warning("cannot reinstall the triggers on %s (%s): %s", name, what, exc)
        else:
            log.warning(
                "reinstalled the triggers on %s: %s",
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
            if state.triggers != "current":
                what = "; ".join(state.trigger_problems) or f"{state.triggers}"
                problem = (
                    f"the cache-sidecar triggers on {name} would not report every change ({what}): they must "
                    f"be installed and enabled on it and on its partitions, children and parents, notifying channel "
                    f"{trigger_set.channel} with this version's definition; run 'cache-sidecar triggers install' "
                    "as the table's owner (or start with --install-triggers)"
                )
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
    return "; ".join(parts) or "unchanged"

"""Routing change events: each parsed notification to the caches that hear
about its table -- the table's own, and the relations it is a source of --
with its keys coerced to each one's columns, and recorded in the Watch fan-out
as the changes of its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.core.cache import RefetchingTable
from sidecar.core.events import Op, RowChange, TableChange
from sidecar.core.fanout import DELETE, INSERT, INVALIDATE, TABLE_CHANGED, TRUNCATE, UPDATE, Change, FanOut
from sidecar.core.keys import Key, KeyColumn, coerce_key, key_text
from sidecar.core.revisions import Revisions
from sidecar.core.schema import SourceSchema
from sidecar.errors import InvalidKey

log = logging.getLogger(__name__)

_OPS = {Op.INSERT: INSERT, Op.UPDATE: UPDATE, Op.DELETE: DELETE}


@dataclass
class RouterStats:
    events: int = 0
    ignored: int = 0  # events for tables this sidecar does not cache
    bad_keys: int = 0  # keys that did not fit their columns (degraded to whole-table)


class ChangeRouter:
    """Events to tables and relations, numbered into batches, recorded for Watch."""

    def __init__(self, revisions: Revisions, fanout: FanOut) -> None:
        self._revisions = revisions
        self._fanout = fanout
        self.stats = RouterStats()
        self._tables: dict[str, RefetchingTable] = {}
        # Who hears about changes of a PostgreSQL table: the table's own cache
        # (source None) and the relations it is a source of.
        self._consumers: dict[tuple[str, str], list[tuple[RefetchingTable, SourceSchema | None]]] = {}

    def register(self, table: RefetchingTable) -> None:
        """Route the changes of ``table``'s PostgreSQL table, or of a relation's sources, to it."""
        schema = table.schema
        self._tables[schema.qualified] = table
        if schema.config.is_relation:
            for source in schema.sources:
                config = source.table.config
                self._consumers.setdefault((config.schema, config.name), []).append((table, source))
        else:
            self._consumers.setdefault((schema.config.schema, schema.config.name), []).append((table, None))

    def hears(self, schema: str, table: str) -> bool:
        """Whether changes of PostgreSQL table ``schema.table`` matter to a cached table."""
        return (schema, table) in self._consumers

    def route(self, event: RowChange | TableChange) -> None:
        """Apply one change event (called synchronously, as notifications arrive): numbered
        into its batch, its keys coerced once per consumer, its changes recorded at once,
        then each consumer told what to refetch."""
        consumers = self._consumers.get((event.schema, event.table))
        if consumers is None:
            self.stats.ignored += 1
            return
        self.stats.events += 1
        seq = self._revisions.batch_for(event.xid)
        if len(consumers) == 1:  # (the common case, without the lists: it runs for every change)
            table, source = consumers[0]
            route = self._own(table, event) if source is None else self._to_relation(table, source, event)
            self._fanout.record(seq, event.xid, *route.changes)
            route.apply(seq, event.xid)
            return
        routes = [
            self._own(table, event) if source is None else self._to_relation(table, source, event)
            for table, source in consumers
        ]
        self._fanout.record(seq, event.xid, *(change for route in routes for change in route.changes))
        for route in routes:
            route.apply(seq, event.xid)

    # ------------------------------------------------------------ the sidecar's own batches

    def invalidate(self, table: RefetchingTable, keys: list[Key] | None, drop: bool = True) -> None:
        """Drop cached rows (all when ``keys`` is None), as a batch of the sidecar's own
        (``drop`` False: only told to watchers)."""
        seq = self._revisions.own_batch()
        name = table.schema.qualified
        if keys is None:
            log.info("%s: invalidated (whole table)", name)
            self._fanout.record(seq, 0, Change(name, TABLE_CHANGED))
            if drop:
                table.changed_all(seq)
        else:
            log.debug("%s: invalidated %s", name, ", ".join(map(key_text, keys[:10])))
            for key in keys:
                self._fanout.record(seq, 0, Change(name, INVALIDATE, key))
            if drop:
                table.changed(keys, seq)

    def reload(self, name: str, why: str) -> None:
        """Reload a cached table from scratch (its definition changed, or it can be served again)."""
        table = self._tables[name]
        log.info("%s: reloading (%s)", name, why, extra={"event": "table_reload", "table": name})
        seq = self._revisions.own_batch()
        self._fanout.record(seq, 0, Change(name, TABLE_CHANGED))
        table.rebuild(seq)

    def fail(self, name: str, problem: str) -> None:
        """Stop serving a cached table from memory (reads go to the database) because of ``problem``."""
        table = self._tables[name]
        if table.problem == problem:
            return
        seq = self._revisions.own_batch()
        self._fanout.record(seq, 0, Change(name, TABLE_CHANGED))  # watchers drop what they hold of it
        table.fail(problem)

    def matched(self, name: str, seq: int, keys: set[Key]) -> None:
        """A relation refresh ran: the rows a source change of batch ``seq`` touched join that batch."""
        for key in keys:
            self._fanout.add(seq, Change(name, UPDATE, key, by_outcome=True))

    # ------------------------------------------------------------ routing one event

    def _own(self, table: RefetchingTable, event: RowChange | TableChange) -> Routed:
        """A change of ``table``'s own PostgreSQL table."""
        name = table.schema.qualified
        if isinstance(event, TableChange):
            log.debug("%s: whole table changed (%s)", name, event.reason)
            op = TRUNCATE if event.op is Op.TRUNCATE else TABLE_CHANGED
            return Routed(table, [Change(name, op)], emptied=event.emptied)
        keys = self._coerce(table.schema.key_columns, event, name)
        if keys is None:
            return Routed(table, [Change(name, TABLE_CHANGED)])
        rows = None
        if event.rows is not None:  # (the change brought the rows: keys an UPDATE moved away from are gone)
            rows = dict.fromkeys(keys[len(event.keys) :])
            rows.update(zip(keys, event.rows, strict=False))
        return Routed(table, _row_changes(event, name, keys), keys, rows=rows)

    def _to_relation(self, relation: RefetchingTable, source: SourceSchema, event: RowChange | TableChange) -> Routed:
        """A source of ``relation`` changed: refresh exactly the relation rows it affects."""
        name = relation.schema.qualified
        source_keys = None if isinstance(event, TableChange) else self._coerce(source.table.key_columns, event, name)
        if source_keys is None:
            return Routed(relation, [Change(name, TABLE_CHANGED)])
        columns = source.relation_columns
        mapped = [tuple(key[position] for position, _ in source.mapping) for key in source_keys]
        key_names = [c.name for c in relation.schema.key_columns]
        by_key = set(key_names) <= set(columns)  # the source's key gives the relation's key
        try:
            if by_key:
                keys = list(
                    dict.fromkeys(
                        coerce_key(relation.schema.key_columns, [value[columns.index(n)] for n in key_names])
                        for value in mapped
                    )
                )
            else:
                value_columns = [relation.schema.column(c) for c in columns]
                values = list(dict.fromkeys(coerce_key(value_columns, value) for value in mapped))
        except InvalidKey as exc:
            log.warning("%s: source values that do not fit (%s); reloading it", name, exc)
            return Routed(relation, [Change(name, TABLE_CHANGED)])
        if by_key:  # (a source insert may change a relation row, a delete add none...)
            return Routed(relation, [Change(name, UPDATE, key, by_outcome=True) for key in keys], keys)
        if relation.holds_all_rows:  # its changes are known once the refresh has run
            return Routed(relation, [], matching=(columns, values))
        # a lazy relation holds no index to find the rows: drop them all
        return Routed(relation, [Change(name, TABLE_CHANGED)])

    def _coerce(self, columns: Sequence[KeyColumn], event: RowChange, name: str) -> list[Key] | None:
        """The event's keys (new, then old) coerced to ``columns``; None when one does not fit."""
        try:
            keys = [coerce_key(columns, parts) for parts in event.keys]
            keys += [coerce_key(columns, parts) for parts in event.old_keys]
        except InvalidKey as exc:
            # Never guess: a key we cannot read could be any row.
            self.stats.bad_keys += 1
            log.warning("%s: unreadable key in notification (%s); reloading it", name, exc)
            return None
        return keys


@dataclass
class Routed:
    """What one event means for one consumer: the changes Watch records, and what the
    table refetches -- ``keys``, the rows ``matching`` source values, or (neither) all --
    or the ``rows`` the change brought with it."""

    table: RefetchingTable
    changes: list[Change]
    keys: list[Key] | None = None
    matching: tuple[tuple[str, ...], list[Key]] | None = None
    rows: dict[Key, bytes | None] | None = None  # the rows the change brought, by key
    emptied: bool = False  # the change brought the outcome: the table is empty

    def apply(self, seq: int, xid: int = 0) -> None:
        if self.emptied:
            self.table.emptied(seq, xid)
        elif self.rows is not None:
            self.table.carried(self.rows, seq, xid)
        elif self.matching is not None:
            self.table.changed_matching(*self.matching, seq)
        elif self.keys is not None:
            self.table.changed(self.keys, seq)
        else:
            self.table.changed_all(seq)


def _row_changes(event: RowChange, name: str, keys: list[Key]) -> list[Change]:
    op = _OPS[event.op]
    new_count = len(event.keys)
    moved = keys[new_count:]
    if len(moved) == 1 and new_count == 1:  # one row changed its key: pair them
        return [Change(name, op, keys[0], moved[0])]
    return [Change(name, op, key) for key in keys]  # (keys an UPDATE moved away from carry no row: gone)

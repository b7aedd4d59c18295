"""Routing change events: each parsed notification to the caches that hear
about its table -- the table's own, and the relations it is a source of --
with its keys coerced to each one's columns, and recorded in the Watch fan-out
as the changes of its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.cache import TableCache
from sidecar.errors import InvalidKey
from sidecar.events import Op, RowChange, TableChange
from sidecar.fanout import DELETE, INSERT, INVALIDATE, TABLE_CHANGED, TRUNCATE, UPDATE, Change, FanOut
from sidecar.keys import Key, KeyColumn, coerce_key, key_text
from sidecar.revisions import Revisions
from sidecar.schema import SourceSchema

log = logging.getLogger(__name__)

_OPS = {Op.INSERT: INSERT, Op.UPDATE: UPDATE, Op.DELETE: DELETE}


@dataclass
class RouterStats:
    events: int = 0
    ignored: int = 0  # events for tables this sidecar does not cache
    bad_keys: int = 0  # keys that did not fit their columns (degraded to whole-table)


class ChangeRouter:
    """Events to tables and relations, numbered into batches, recorded for Watch."""

    def __init__(self, tables: Mapping[str, TableCache], revisions: Revisions, fanout: FanOut) -> None:
        self._revisions = revisions
        self.fanout = fanout
        self.stats = RouterStats()
        self._tables = tables
        # Who hears about changes of a PostgreSQL table: the table's own cache
        # (source None) and the relations it is a source of.
        self._consumers: dict[tuple[str, str], list[tuple[TableCache, SourceSchema | None]]] = {}
        for table in tables.values():
            schema = table.schema
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
        """Apply one change event (called synchronously, as notifications arrive)."""
        consumers = self._consumers.get((event.schema, event.table))
        if consumers is None:
            self.stats.ignored += 1
            return
        self.stats.events += 1
        seq = self._revisions.batch_for(event.xid)
        for table, source in consumers:
            if source is None:
                self._apply(table, event, seq)
            else:
                self._apply_to_relation(table, source, event, seq)

    # ------------------------------------------------------------ the sidecar's own batches

    def invalidate(self, table: TableCache, keys: list[Key] | None) -> None:
        """Drop cached rows (all when ``keys`` is None), as a batch of the sidecar's own."""
        seq = self._revisions.own_batch()
        name = table.schema.qualified
        if keys is None:
            log.info("%s: invalidated (whole table)", name)
            self.fanout.record(seq, 0, Change(name, TABLE_CHANGED))
            table.changed_all(seq)
        else:
            log.debug("%s: invalidated %s", name, ", ".join(map(key_text, keys[:10])))
            for key in keys:
                self.fanout.record(seq, 0, Change(name, INVALIDATE, key))
            table.changed(keys, seq)

    def reload(self, name: str, why: str) -> None:
        """Reload a cached table from scratch (its definition changed, or it can be served again)."""
        table = self._tables[name]
        log.info("%s: reloading (%s)", name, why, extra={"event": "table_reload", "table": name})
        seq = self._revisions.own_batch()
        self.fanout.record(seq, 0, Change(name, TABLE_CHANGED))
        table.rebuild(seq)

    def fail(self, name: str, problem: str) -> None:
        """Stop serving a cached table from memory (reads go to the database) because of ``problem``."""
        table = self._tables[name]
        if table.problem == problem:
            return
        seq = self._revisions.own_batch()
        self.fanout.record(seq, 0, Change(name, TABLE_CHANGED))  # watchers drop what they hold of it
        table.fail(problem)

    def matched(self, name: str, seq: int, keys: set[Key]) -> None:
        """A relation refresh ran: the rows a source change of batch ``seq`` touched join that batch."""
        for key in keys:
            self.fanout.add(seq, Change(name, UPDATE, key, by_outcome=True))

    # ------------------------------------------------------------ applying

    def _apply(self, table: TableCache, event: RowChange | TableChange, seq: int) -> None:
        name = table.schema.qualified
        if isinstance(event, TableChange):
            log.debug("%s: whole table changed (%s)", name, event.reason)
            op = TRUNCATE if event.op is Op.TRUNCATE else TABLE_CHANGED
            self.fanout.record(seq, event.xid, Change(name, op))
            table.changed_all(seq)
            return
        keys = self._coerce(table.schema.key_columns, event, name)
        if keys is None:
            self.fanout.record(seq, event.xid, Change(name, TABLE_CHANGED))
            table.changed_all(seq)
            return
        self._record_rows(seq, event, name, keys)
        table.changed(keys, seq)

    def _apply_to_relation(
        self, relation: TableCache, source: SourceSchema, event: RowChange | TableChange, seq: int
    ) -> None:
        """A source of ``relation`` changed: refresh exactly the relation rows it affects."""
        name = relation.schema.qualified
        source_keys = None if isinstance(event, TableChange) else self._coerce(source.table.key_columns, event, name)
        if source_keys is None:
            self.fanout.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)
            return
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
            self.fanout.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)
            return
        if by_key:
            for key in keys:  # (a source insert may change a relation row, a delete add none...)
                self.fanout.record(seq, event.xid, Change(name, UPDATE, key, by_outcome=True))
            relation.changed(keys, seq)
        elif relation.holds_all_rows:
            self.fanout.ensure(seq, event.xid)  # its changes are known once the refresh has run
            relation.changed_matching(columns, values, seq)
        else:  # a lazy relation holds no index to find the rows: drop them all
            self.fanout.record(seq, event.xid, Change(name, TABLE_CHANGED))
            relation.changed_all(seq)

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

    def _record_rows(self, seq: int, event: RowChange, name: str, keys: list[Key]) -> None:
        op = _OPS[event.op]
        new_count = len(event.keys)
        moved = keys[new_count:]
        if len(moved) == 1 and new_count == 1:  # one row changed its key: pair them
            self.fanout.record(seq, event.xid, Change(name, op, keys[0], moved[0]))
            return
        for key in keys:  # (keys an UPDATE moved away from carry no row: gone)
            self.fanout.record(seq, event.xid, Change(name, op, key))

"""A cached table's shape (name, key columns, filter, indexed columns) and the
SQL that reads it. A *relation* is a cached query: the same shape, read from
``(query) AS t`` instead of a table, plus its sources (the tables whose
changes refresh it).

Rows are produced by PostgreSQL itself as ``row_to_json(t.*)`` (sent as UTF-8 bytea): the JSON
that responses carry is made once, by the database, when a row is loaded, and
follows PostgreSQL's documented JSON mapping.

Column names are the table owner's (or the query's) choice, so the SQL here reads
the row only as ``t.*`` (always the whole row; a bare ``t`` would mean a column
named ``t`` if there is one) and columns only as ``t."name"`` (a qualified name
prefers the alias), and calls functions schema-qualified (a function of the same
name elsewhere in the search_path, e.g. one taking the table's row type, would
otherwise win and run with the sidecar's rights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.config import TableConfig
from sidecar.core.keys import KeyColumn
from sidecar.identifiers import quote_ident


@dataclass(frozen=True)
class SourceSchema:
    """How changes of one source table reach a relation."""

    table: TableSchema  # the source table (its key columns)
    # For each mapped source key column: its position in the source key and the
    # relation column it maps to.
    mapping: tuple[tuple[int, str], ...]

    @property
    def relation_columns(self) -> tuple[str, ...]:
        return tuple(column for _, column in self.mapping)


@dataclass(frozen=True)
class TableSchema:
    """A configured table (or relation) as found in the catalog."""

    config: TableConfig
    key_columns: tuple[KeyColumn, ...]
    # Typed columns besides the key that the sidecar reads values of: indexed
    # columns, and the columns relation sources map to.
    columns: dict[str, KeyColumn] = field(default_factory=dict)
    sources: tuple[SourceSchema, ...] = ()

    @property
    def qualified(self) -> str:
        return self.config.qualified

    @property
    def sql_name(self) -> str:
        """The table's quoted name (tables only)."""
        return f"{quote_ident(self.config.schema)}.{quote_ident(self.config.name)}"

    @property
    def source_sql(self) -> str:
        if self.config.query is not None:
            return f"({self.config.query}) AS t"
        return f"{self.sql_name} AS t"

    def column(self, name: str) -> KeyColumn:
        for key_column in self.key_columns:
            if key_column.name == name:
                return key_column
        return self.columns[name]

    def _select(self, as_text: bool = False) -> str:
        keys = ", ".join(c.stored_sql(f"t.{quote_ident(c.name)}") for c in self.key_columns)
        row = "pg_catalog.row_to_json(t.*)::text"
        if not as_text:
            # The JSON as bytea: asyncpg hands it over as bytes, as the client receives it
            # (UTF-8), with no str made and encoded again per row.
            row = f"pg_catalog.convert_to({row}, 'UTF8')"
        return f"SELECT {keys}, {row} FROM {self.source_sql}"

    def _filter(self) -> str:
        return f"({self.config.where})" if self.config.where else ""

    def _condition(self, columns: Sequence[KeyColumn]) -> str:
        """Rows whose ``columns`` take one of the given values (one array parameter per column)."""
        if len(columns) == 1:
            column = columns[0]
            return f"{column.compared_sql('t.' + quote_ident(column.name))} = ANY({column.parameter_sql(1, True)})"
        names = ", ".join(c.compared_sql(f"t.{quote_ident(c.name)}") for c in columns)
        # (multi-argument unnest() is this ROWS FROM only when unqualified)
        arrays = ", ".join(f"pg_catalog.unnest({c.parameter_sql(i, True)})" for i, c in enumerate(columns, 1))
        return f"({names}) IN (SELECT * FROM ROWS FROM ({arrays}))"

    def _where(self, condition: str) -> str:
        extra = self._filter()
        return f"{self._select()} WHERE {condition}" + (f" AND {extra}" if extra else "")

    def select_all_sql(self, as_text: bool = False) -> str:
        """Every cached row: key columns, then the row's JSON (as bytea, or as text for COPY,
        whose text form would spell bytea in hex)."""
        where = self._filter()
        return self._select(as_text) + (f" WHERE {where}" if where else "")

    def select_keys_sql(self) -> str:
        """The rows of a set of keys; one array parameter per key column."""
        return self._where(self._condition(self.key_columns))

    def select_matching_sql(self, columns: Sequence[str]) -> str:
        """The rows whose ``columns`` take given values; one array parameter per column."""
        return self._where(self._condition([self.column(name) for name in columns]))

    def select_index_sql(
        self,
        columns: Sequence[KeyColumn],
        *,
        equality: bool,
        low: bool = False,
        high: bool = False,
        low_open: bool = False,
        high_open: bool = False,
        descending: bool = False,
    ) -> str:
        """An index query in SQL, answering rows in the order memory answers them (see
        ``KeyColumn.order_sql``). Parameters: for equality one array per column, for a
        range the bounds given (lower, upper); then the row limit."""
        direction = " DESC" if descending else ""
        order = [c.order_sql(f"t.{quote_ident(c.name)}") + direction for c in self.key_columns]
        if equality:
            condition, count = self._condition(columns), len(columns)
        else:
            column = columns[0]
            name = f"t.{quote_ident(column.name)}"
            value = column.order_sql(name)
            conditions, count = [f"{name} IS NOT NULL"], 0
            held = column.held_sql(name)
            if held is not None:
                conditions.append(held)
            for given, operator in ((low, ">" if low_open else ">="), (high, "<" if high_open else "<=")):
                if given:
                    count += 1
                    parameter = f"${count}::text" if column.textual else column.parameter_sql(count)
                    conditions.append(f"{value} {operator} {parameter}")
            condition = " AND ".join(conditions)
            order.insert(0, value + direction)
        return f"{self._where(condition)} ORDER BY {', '.join(order)} LIMIT ${count + 1}"

"""A cached table's shape (name, key columns, filter) and the SQL that reads it.

Rows are produced by PostgreSQL itself as ``row_to_json(t)::text``: the JSON
that responses carry is made once, by the database, when a row is loaded, and
follows PostgreSQL's documented JSON mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import TableConfig, quote_ident
from sidecar.keys import KeyColumn


@dataclass(frozen=True)
class TableSchema:
    """A configured table as found in the catalog."""

    config: TableConfig
    key_columns: tuple[KeyColumn, ...]

    @property
    def qualified(self) -> str:
        return self.config.qualified

    @property
    def sql_name(self) -> str:
        return f"{quote_ident(self.config.schema)}.{quote_ident(self.config.name)}"

    def _select(self) -> str:
        keys = ", ".join(f"t.{quote_ident(c.name)}" for c in self.key_columns)
        return f"SELECT {keys}, row_to_json(t)::text FROM {self.sql_name} AS t"

    def _filter(self) -> str:
        return f"({self.config.where})" if self.config.where else ""

    def select_all_sql(self) -> str:
        """Every cached row: key columns, then the row's JSON."""
        where = self._filter()
        return self._select() + (f" WHERE {where}" if where else "")

    def select_keys_sql(self) -> str:
        """The rows of a set of keys; one array parameter per key column."""
        columns = self.key_columns
        if len(columns) == 1:
            column = columns[0]
            condition = f"t.{quote_ident(column.name)} = ANY($1::{column.sql_type}[])"
        else:
            names = ", ".join(f"t.{quote_ident(c.name)}" for c in columns)
            arrays = ", ".join(f"${i}::{c.sql_type}[]" for i, c in enumerate(columns, 1))
            condition = f"({names}) IN (SELECT * FROM unnest({arrays}))"
        where = self._filter()
        return f"{self._select()} WHERE {condition}" + (f" AND {where}" if where else "")

"""What is cached: a table's, relation's and index's specification (``TableConfig``,
``RelationSource``, ``IndexConfig``), read from a config file's ``[[tables]]`` or from a
``--table`` spec, every field checked (untrusted input: the error names the entry)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.errors import ConfigError
from sidecar.identifiers import parse_table_name, qualified_name

TableMode = Literal["full", "lazy"]


TABLE_MODES: tuple[TableMode, ...] = ("full", "lazy")


@dataclass(frozen=True)
class IndexConfig:
    """A secondary index: equality on ``columns`` (``range``: ordered, one column)."""

    name: str
    columns: tuple[str, ...]
    unique: bool = False
    range: bool = False


@dataclass(frozen=True)
class RelationSource:
    """A table a relation reads, and which of its key columns map to relation columns."""

    schema: str
    name: str
    mapping: tuple[tuple[str, str], ...]  # (source column, relation column)

    @property
    def qualified(self) -> str:
        return qualified_name(self.schema, self.name)


@dataclass(frozen=True)
class TableConfig:
    """One cached table, or a relation (a cached query) when ``query`` is set."""

    schema: str
    name: str
    mode: TableMode = "full"
    max_rows: int = 100_000
    ttl_seconds: float | None = None
    where: str | None = None
    query: str | None = None
    key: tuple[str, ...] = ()  # a relation's key columns (tables: from the catalog)
    sources: tuple[RelationSource, ...] = ()
    indexes: tuple[IndexConfig, ...] = ()

    @functools.cached_property
    def qualified(self) -> str:
        """The table's name as the API spells it: ``schema.table`` (made once: reads use it)."""
        return qualified_name(self.schema, self.name)

    @property
    def is_relation(self) -> bool:
        return self.query is not None


TABLE_KEYS = {"name", "mode", "max_rows", "ttl_seconds", "where", "query", "key", "sources", "indexes"}


INDEX_KEYS = {"name", "columns", "unique", "range"}


def read_tables(content: Any) -> list[TableConfig]:
    if not isinstance(content, list):
        raise ConfigError("tables", "must be an array of tables ([[tables]])")
    tables = []
    for index, entry in enumerate(content):
        where = f"tables[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table with at least 'name'")
        for name in entry:
            if name not in TABLE_KEYS:
                raise ConfigError(f"{where}.{name}", f"unknown key (known: {', '.join(sorted(TABLE_KEYS))})")
        if "name" not in entry:
            raise ConfigError(f"{where}.name", "is required")
        tables.append(_table_from_dict(entry, where))
    return tables


def _table_from_dict(entry: Mapping[str, Any], where: str) -> TableConfig:
    name = entry["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name", "must be a string like 'public.patron'")
    schema, table = parse_table_name(name, f"{where}.name")
    mode = entry.get("mode", "full")
    if mode not in TABLE_MODES:
        raise ConfigError(f"{where}.mode", f"must be one of {', '.join(TABLE_MODES)}, not {mode!r}")
    max_rows = entry.get("max_rows", 100_000)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ConfigError(f"{where}.max_rows", f"must be a positive integer, not {max_rows!r}")
    ttl = entry.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
        raise ConfigError(f"{where}.ttl_seconds", f"must be a positive number, not {ttl!r}")
    where_sql = entry.get("where")
    if where_sql is not None and (not isinstance(where_sql, str) or not where_sql.strip()):
        raise ConfigError(f"{where}.where", "must be a non-empty SQL condition")
    if mode == "full" and ("max_rows" in entry or ttl is not None):
        raise ConfigError(where, "max_rows and ttl_seconds apply to mode = 'lazy' only")
    query, key, sources = _relation(entry, where)
    indexes = _indexes(entry.get("indexes", []), f"{where}.indexes")
    if indexes and mode != "full":
        raise ConfigError(f"{where}.indexes", "indexes are served from memory: they need mode = 'full'")
    if query is not None and where_sql is not None:
        raise ConfigError(f"{where}.where", "a relation filters in its query; 'where' is for tables")
    return TableConfig(
        schema=schema,
        name=table,
        mode=mode,
        max_rows=max_rows,
        ttl_seconds=float(ttl) if ttl is not None else None,
        where=where_sql,
        query=query,
        key=key,
        sources=sources,
        indexes=indexes,
    )


def _relation(entry: Mapping[str, Any], where: str) -> tuple[str | None, tuple[str, ...], tuple[RelationSource, ...]]:
    query = entry.get("query")
    if query is None:
        for name in ("key", "sources"):
            if name in entry:
                raise ConfigError(f"{where}.{name}", "applies to relations (tables defined by a query)")
        return None, (), ()
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"{where}.query", "must be a non-empty SELECT")
    key = entry.get("key")
    if not isinstance(key, list) or not key or not all(isinstance(k, str) and k for k in key):
        raise ConfigError(f"{where}.key", 'a relation needs its key columns, e.g. key = ["user_id"]')
    raw_sources = entry.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise ConfigError(
            f"{where}.sources",
            "a relation needs its source tables and how their key columns map to its columns, e.g. "
            'sources = { "public.users" = { user_id = "user_id" } }',
        )
    sources = []
    for source_name, mapping in raw_sources.items():
        spot = f"{where}.sources.{source_name}"
        source_schema, source_table = parse_table_name(source_name, spot)
        if (
            not isinstance(mapping, dict)
            or not mapping
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        ):
            raise ConfigError(spot, 'must map source columns to relation columns, e.g. { user_id = "user_id" }')
        sources.append(RelationSource(source_schema, source_table, tuple(mapping.items())))
    return query.strip().rstrip(";"), tuple(key), tuple(sources)


def _indexes(raw: Any, where: str) -> tuple[IndexConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(where, "must be an array of tables ([[tables.indexes]])")
    indexes = []
    for position, entry in enumerate(raw):
        spot = f"{where}[{position}]"
        if not isinstance(entry, dict):
            raise ConfigError(spot, "must be a table with name and columns")
        for name in entry:
            if name not in INDEX_KEYS:
                raise ConfigError(f"{spot}.{name}", f"unknown key (known: {', '.join(sorted(INDEX_KEYS))})")
        name, columns = entry.get("name"), entry.get("columns")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{spot}.name", "must be a plain identifier")
        if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns):
            raise ConfigError(f"{spot}.columns", "must list one or more column names")
        unique, ordered = entry.get("unique", False), entry.get("range", False)
        if not isinstance(unique, bool) or not isinstance(ordered, bool):
            raise ConfigError(spot, "unique and range must be true or false")
        if ordered and len(columns) != 1:
            raise ConfigError(f"{spot}.columns", "a range index orders by one column")
        indexes.append(IndexConfig(name, tuple(columns), unique, ordered))
    names = [i.name for i in indexes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(where, f"index {duplicate!r} is declared twice")
    return tuple(indexes)


def parse_table_spec(spec: str, where: str) -> TableConfig:
    """``schema.table[:full|lazy]``, as given to ``--table`` or CACHE_SIDECAR_TABLES."""
    name, _, mode = spec.strip().rpartition(":") if _has_mode(spec) else (spec.strip(), "", "")
    entry: dict[str, Any] = {"name": name}
    if mode:
        entry["mode"] = mode
    return _table_from_dict(entry, f"{where} {spec!r}")


def _has_mode(spec: str) -> bool:
    return bool(re.search(r":[A-Za-z]+\s*$", spec)) and not spec.rstrip().endswith('"')

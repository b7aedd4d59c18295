"""SQL identifiers: table names read the way PostgreSQL reads them, quoted for SQL,
and spelled for display and API lookups (``schema.table``)."""

from __future__ import annotations

import re

from sidecar.errors import ConfigError

_IDENT = r'(?:"(?:[^"]|"")+"|[^."\s]+)'


def parse_table_name(text: str, where: str = "table") -> tuple[str, str]:
    """Split ``schema.table`` the way PostgreSQL reads it: unquoted parts fold
    to lower case, quoted parts are exact; the schema defaults to ``public``."""
    match = re.fullmatch(rf"\s*(?:({_IDENT})\.)?({_IDENT})\s*", text)
    if match is None:
        raise ConfigError(where, f"{text!r} is not a table name like 'public.patron'")
    schema_part, table_part = match.groups()
    return (_unquote(schema_part) if schema_part else "public"), _unquote(table_part)


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


def quote_ident(name: str) -> str:
    """Quote an identifier for SQL, always (safe for any name)."""
    return '"' + name.replace('"', '""') + '"'


def qualified_name(schema: str, table: str) -> str:
    """``schema.table`` for display and API lookups, quoting only where needed."""
    return f"{_display(schema)}.{_display(table)}"


def _display(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else quote_ident(name)

"""Checks made at start, before the daemon changes anything (triggers, socket files): that
every address it will listen on can be listened on, and that its database role may read
every configured table. A problem found here stops the start with a message naming the
setting or the table and what is missing (exit 2), instead of a half-done start.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Sequence
from typing import Any

import asyncpg

from sidecar.config import Config
from sidecar.config.addresses import ListenAddress, parse_listen_address
from sidecar.core.schema import TableSchema
from sidecar.errors import ConfigError, MissingPrivilege


def check_listen(config: Config) -> None:
    """Every listen address (``server.listen``, ``server.health_listen``, ``metrics.listen``)
    can be bound now: its port is free, its socket's directory exists and is writable."""
    addresses = [("server.listen", text) for text in config.listen]
    addresses += [("server.health_listen", text) for text in config.health_listen]
    if config.metrics_listen:
        addresses.append(("metrics.listen", config.metrics_listen))
    for key, text in addresses:
        address = parse_listen_address(text)
        if address.unix_path is not None:
            if key == "metrics.listen":
                raise ConfigError(key, f"{text}: must be host:port")
            _check_unix(key, address.unix_path)
        else:
            _check_port(key, address)


def _check_unix(key: str, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(key, f"cannot listen on unix://{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot listen on unix://{path}: directory {directory} is not writable by this user")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(key, f"cannot listen on unix://{path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a stale socket file (the server removes it)
    raise ConfigError(key, f"cannot listen on unix://{path}: another process listens there")


def _check_port(key: str, address: ListenAddress) -> None:
    assert address.port is not None
    if address.port == 0:
        return  # any free port
    host = (address.host or "").strip("[]") or None
    try:
        found = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(key, f"cannot listen on {address.text}: host {host!r} not found ({exc.strerror})") from None
    family, kind, proto, _, where = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as servers do: TIME_WAIT is no conflict)
        try:
            probe.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    key, f"cannot listen on {address.text}: port {address.port} is in use (another process listens)"
                ) from None
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    key, f"cannot listen on {address.text}: port {address.port} needs privileges this user lacks"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    key, f"cannot listen on {address.text}: {host} is not an address of this machine"
                ) from None
            raise ConfigError(key, f"cannot listen on {address.text}: {exc.strerror}") from None


PRIVILEGES_SQL = """
SELECT pg_catalog.has_schema_privilege($1, 'USAGE') AS usage,
       pg_catalog.has_table_privilege(
           pg_catalog.quote_ident($1) || '.' || pg_catalog.quote_ident($2), 'SELECT') AS select
"""


async def check_privileges(conn: Any, schemas: Sequence[TableSchema]) -> None:
    """The role may read every configured table, every relation's source tables, and
    whatever a relation's query or a table's `where` reads (its plan is checked)."""
    missing: list[str] = []
    seen: set[str] = set()
    for schema in schemas:
        tables = [source.table for source in schema.sources] if schema.config.is_relation else [schema]
        for table in tables:
            if table.qualified in seen:
                continue
            seen.add(table.qualified)
            row = await conn.fetchrow(PRIVILEGES_SQL, table.config.schema, table.config.name)
            if not row["usage"]:
                missing.append(f"USAGE on schema {table.config.schema} (to reach {table.qualified})")
            elif not row["select"]:
                missing.append(f"SELECT on table {table.qualified}")
        if (schema.config.is_relation or schema.config.where is not None) and not missing:
            try:  # (planning checks every privilege the query needs, without reading a row)
                await conn.execute("EXPLAIN " + schema.select_all_sql())
            except asyncpg.InsufficientPrivilegeError as exc:
                what = "relation" if schema.config.is_relation else "table"
                missing.append(f"what {what} {schema.qualified}'s query reads ({exc})")
    if missing:
        raise MissingPrivilege(
            "the database role cannot read what it must cache; it lacks "
            + "; ".join(missing)
            + ". Grant it (GRANT USAGE ON SCHEMA ..., GRANT SELECT ON ...) and start again"
        )


async def check_logical(conn: Any, schemas: Sequence[TableSchema]) -> None:  # TEMP stand-in
    return None

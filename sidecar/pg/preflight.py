"""Checks made at start, before the daemon changes anything (triggers, publication, socket
files): that every address it will listen on can be listened on, that its database role may
read every configured table, and, for logical capture, that the server, the role and the
tables allow it. A problem found here stops the start with a message naming the
setting or the table and what is missing (exit 2), instead of a half-done start.
"""

from __future__ import annotations

import errno
import logging
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
from sidecar.identifiers import quote_ident
from sidecar.pg import publication
from sidecar.pg.triggers import captured_tables

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ logical capture

WAL_LEVEL_FIX = (
    "set it and restart PostgreSQL: ALTER SYSTEM SET wal_level = logical (a server you run); Amazon RDS / "
    "Aurora: rds.logical_replication = 1 in the DB (cluster) parameter group, then reboot; Google Cloud SQL: "
    "the database flag cloudsql.logical_decoding = on; Azure Database for PostgreSQL: the server parameter "
    "wal_level = logical, then restart; Supabase: it is on already; Neon: enable logical replication in the "
    "project's settings"
)

LOGICAL_SERVER_SQL = """
SELECT pg_catalog.current_setting('server_version_num')::int AS version,
       pg_catalog.current_setting('wal_level') AS wal_level,
       pg_catalog.current_setting('max_replication_slots')::int AS max_slots,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_replication_slots)::int AS slots,
       pg_catalog.current_setting('max_wal_senders')::int AS max_senders,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_replication)::int AS senders,
       r.rolname AS role, r.rolsuper AS superuser, r.rolreplication AS replication,
       pg_catalog.to_regrole('rds_replication') IS NOT NULL AS rds
  FROM pg_catalog.pg_roles r
 WHERE r.rolname = session_user
"""


async def check_logical(conn: Any, schemas: Sequence[TableSchema]) -> None:
    """What logical capture (``database.capture = logical``) needs of the server, of the
    sidecar's role and of the cached tables, all checked before anything is changed; every
    problem found is named in one error (``ConfigError`` on ``database.capture``) with its fix,
    so that one restart of the server can fix them all. Key columns outside a table's replica
    identity are logged as a warning: capture works, with reloads where the old key is unknown."""
    server = await conn.fetchrow(LOGICAL_SERVER_SQL)
    problems: list[str] = []
    if server["version"] < publication.MIN_SERVER_VERSION:
        problems.append(f"PostgreSQL {server['version'] // 10000} is too old: logical capture needs 13 or newer")
    if server["wal_level"] != "logical":
        problems.append(
            f"the server's wal_level is {server['wal_level']}, logical decoding needs logical: {WAL_LEVEL_FIX}"
        )
    if not (server["superuser"] or server["replication"]):
        rds = server["rds"] and await conn.fetchval(
            "SELECT pg_catalog.pg_has_role(session_user, 'rds_replication', 'MEMBER')"
        )
        if not rds:
            role = quote_ident(server["role"])
            problems.append(
                f"the role {server['role']} lacks the REPLICATION attribute a replication connection needs: "
                f"ALTER ROLE {role} WITH REPLICATION (run by a superuser, or on Cloud SQL, Azure and Neon by the "
                f"admin role); on Amazon RDS / Aurora: GRANT rds_replication TO {role}"
            )
    if server["slots"] >= server["max_slots"]:
        problems.append(
            f"max_replication_slots is {server['max_slots']} and {server['slots']} slots exist: the sidecar needs "
            "one more; raise max_replication_slots (a restart applies it) or drop slots no longer used "
            "(SELECT slot_name, active FROM pg_replication_slots; SELECT pg_drop_replication_slot(...))"
        )
    if server["senders"] >= server["max_senders"]:
        problems.append(
            f"max_wal_senders is {server['max_senders']} and {server['senders']} are in use: the sidecar needs "
            "one more; raise max_wal_senders (a restart applies it)"
        )
    tables = captured_tables(schemas)
    for table in tables:
        for identity in await publication.identities(conn, table.config.schema, table.config.name):
            problem = identity.problem()
            if problem is not None:
                problems.append(f"{problem} ({publication.IDENTITY_NOTE})")
            note = identity.key_note([column.name for column in table.key_columns])
            if note is not None:
                log.warning("%s", note, extra={"event": "replica_identity_note", "table": identity.qualified})
    if problems:
        raise ConfigError(
            "database.capture",
            "'logical' cannot work with this database as it is (or use capture 'notify', which needs none of "
            "this): " + "; ".join(f"({n}) {p}" for n, p in enumerate(problems, 1)),
        )


# ------------------------------------------------------------------ a hub on a hot standby

STANDBY_SQL = """
SELECT pg_catalog.pg_is_in_recovery() AS standby,
       pg_catalog.current_setting('server_version_num')::int AS version,
       pg_catalog.current_setting('hot_standby_feedback')::bool AS feedback
"""
PRIMARY_SQL = """
SELECT pg_catalog.pg_is_in_recovery() AS standby,
       pg_catalog.current_setting('wal_level') AS wal_level
"""
SYSTEM_SQL = "SELECT system_identifier::pg_catalog.text FROM pg_catalog.pg_control_system()"
MIN_STANDBY_VERSION = 160000  # logical decoding on a standby


async def check_standby(conn: Any, config: Config) -> bool:
    """Whether ``database.dsn`` is a hot standby the hub may decode on; refuses what cannot
    run there (``ConfigError``, exit 2, naming the setting to change). A ``primary_dsn``
    given while ``database.dsn`` is no standby (promoted since) is not used: the barriers go
    to ``database.dsn`` itself, which is then the primary."""
    row = await conn.fetchrow(STANDBY_SQL)
    if not row["standby"]:
        if config.primary_dsn is not None:
            log.warning(
                "database.dsn is not a standby (promoted?): it is used as the primary, database.primary_dsn is not",
                extra={"event": "primary_dsn_unused"},
            )
        return False
    if config.capture != "logical":
        raise ConfigError(
            "database.capture",
            "database.dsn is a hot standby (read-only): capture notify needs the primary (its triggers NOTIFY, "
            "its LISTEN connection hears them). Set database.capture = logical with database.primary_dsn, or "
            "point database.dsn at the primary",
        )
    if config.primary_dsn is None:
        raise ConfigError(
            "database.primary_dsn",
            "database.dsn is a hot standby: logical capture there needs the primary too (read barriers emit "
            "their token there; the publication is installed there). Set database.primary_dsn (--primary-dsn), "
            "or point database.dsn at the primary",
        )
    if row["version"] < MIN_STANDBY_VERSION:
        raise ConfigError(
            "database.dsn",
            f"database.dsn is a hot standby of PostgreSQL {row['version'] // 10000}: logical decoding on a "
            "standby needs PostgreSQL 16 or newer; point database.dsn at the primary",
        )
    return True


async def check_primary(primary: Any, standby: Any) -> None:
    """``database.primary_dsn`` is the primary of the standby ``database.dsn`` is, and both
    allow decoding there (every problem named in one ``ConfigError``)."""
    row = await primary.fetchrow(PRIMARY_SQL)
    problems: list[str] = []
    if row["standby"]:
        problems.append("database.primary_dsn is a standby too: give the primary's DSN")
    if row["wal_level"] != "logical":
        problems.append(
            f"the primary's wal_level is {row['wal_level']}; decoding on its standby needs logical there: "
            + WAL_LEVEL_FIX
        )
    if not await standby.fetchval("SELECT pg_catalog.current_setting('hot_standby_feedback')::bool"):
        problems.append(
            "the standby's hot_standby_feedback is off: the primary would vacuum away catalog rows the slot "
            "still needs and PostgreSQL would invalidate it (a rebuild each time); ALTER SYSTEM SET "
            "hot_standby_feedback = on on the standby, then reload it"
        )
    systems = []
    for conn in (primary, standby):
        try:
            systems.append(await conn.fetchval(SYSTEM_SQL))
        except asyncpg.InsufficientPrivilegeError:
            break  # (pg_control_system() is for superusers unless granted: not checked then)
    if len(systems) == 2 and systems[0] != systems[1]:
        problems.append(
            f"database.primary_dsn is another cluster (system identifier {systems[0]}) than database.dsn's "
            f"({systems[1]}): its barrier tokens would never reach the standby's stream"
        )
    if problems:
        raise ConfigError(
            "database.primary_dsn",
            "a hub on a standby cannot work with these servers as they are: "
            + "; ".join(f"({n}) {p}" for n, p in enumerate(problems, 1)),
        )

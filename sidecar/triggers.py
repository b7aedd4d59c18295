"""Change capture: the trigger SQL, and installing or removing it.

Per cached table, install creates one function (in the table's schema) and
four statement-level triggers on the table:

* INSERT / UPDATE / DELETE triggers read the statement's transition tables
  and send the changed primary keys with ``pg_notify``, in chunks that stay
  under PostgreSQL's 8000-byte payload limit. One statement sends one
  notification per chunk, never one per row; above ``bulk_threshold`` rows it
  sends a single whole-table event instead.
* The TRUNCATE trigger sends a whole-table event.
* A key whose JSON exceeds ``MAX_KEY_BYTES`` also degrades to a whole-table event.

Payloads never carry row data (see ``events.py`` for the format). The function's
comment carries a fingerprint of its definition, so installing again is a no-op
when nothing changed, and uninstall removes exactly these five objects.

Catalog names are chosen by table owners and the function runs with the rights
of whoever writes the table, so the SQL here trusts neither:

* every identifier is quoted, SQL comments never carry a raw name, string
  literals are safe whatever ``standard_conforming_strings`` says, and the
  function body's dollar quote uses a tag absent from the body;
* the function pins ``search_path`` (and the one setting that changes a key's
  JSON) and schema-qualifies every function it calls, so a writer's own
  ``pg_notify`` earlier in its search_path cannot swallow the notification;
* aliases inside the body are qualified wherever a column name could meet them.

Requires PostgreSQL 11 or newer (transition tables, ``EXECUTE FUNCTION``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import SchemaError
from sidecar.identifiers import quote_ident
from sidecar.schema import TableSchema

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 110000
MAX_KEY_BYTES = 1000  # one key's JSON; larger keys degrade to a whole-table event
CHUNK_BYTES = 6000  # keys per notification; + one key + header stays < 8000
TRIGGERS = {
    "INSERT": "cache_sidecar_insert",
    "UPDATE": "cache_sidecar_update",
    "DELETE": "cache_sidecar_delete",
    "TRUNCATE": "cache_sidecar_truncate",
}
COMMENT_PREFIX = "cache-sidecar change capture"
# On the function, whoever fires it: a writer's search_path must not pick the functions
# and operators it calls, and its extra_float_digits must not change a float key's JSON.
FUNCTION_SETTINGS = "SET search_path = pg_catalog, pg_temp SET extra_float_digits = 3"
INSTALL_LOCK = 0x63616368  # advisory lock id: concurrent installs (many pods) take turns


@dataclass(frozen=True)
class TriggerSet:
    """The SQL objects for one table."""

    schema: TableSchema
    channel: str
    bulk_threshold: int

    @property
    def function_name(self) -> str:
        base = f"cache_sidecar_notify_{self.schema.config.name}"
        if len(base.encode()) <= 63:
            return base
        digest = hashlib.sha1(self.schema.config.name.encode()).hexdigest()[:8]
        return f"cache_sidecar_notify_{self.schema.config.name.encode()[:30].decode(errors='ignore')}_{digest}"

    @property
    def function_sql_name(self) -> str:
        return f"{quote_ident(self.schema.config.schema)}.{quote_ident(self.function_name)}"

    def _key_json(self, alias: str) -> str:
        parts = []
        for column in self.schema.key_columns:
            ref = f"{alias}.{quote_ident(column.name)}"
            # bytea as hex whatever the writer's bytea_output says; E'' whatever its
            # standard_conforming_strings says
            parts.append(f"E'\\\\x' || pg_catalog.encode({ref}, 'hex')" if column.type_name == "bytea" else ref)
        return f"pg_catalog.json_build_array({', '.join(parts)})::text"

    def _chunks(self, source: str) -> str:
        """A query yielding one payload per chunk, from a keys CTE source."""
        return f"""
    FOR payload IN
      WITH cs_keys AS ({source}),
      cs_sized AS (
        SELECT s.kind, s.key, pg_catalog.sum(pg_catalog.octet_length(s.key) + 1) OVER (ORDER BY s.kind, s.key) AS run
        FROM cs_keys s)
      SELECT head || ',"k":[' || coalesce(pg_catalog.string_agg(z.key, ',') FILTER (WHERE z.kind = 'k'), '')
                  || '],"o":[' || coalesce(pg_catalog.string_agg(z.key, ',') FILTER (WHERE z.kind = 'o'), '') || ']}}'
      FROM cs_sized z GROUP BY z.run / {CHUNK_BYTES}
    LOOP
      PERFORM pg_catalog.pg_notify({_literal(self.channel)}, payload);
    END LOOP;"""

    def function_body(self) -> str:
        # User columns are only ever read as alias."column" (a qualified name prefers the
        # alias, and no plpgsql variable is a row): the outer queries see only kind/key.
        new_keys = f"SELECT 'k'::text AS kind, {self._key_json('n')} AS key FROM cs_new n"
        old_keys = f"SELECT 'k'::text AS kind, {self._key_json('o')} AS key FROM cs_old o"
        moved = (
            f"{new_keys} UNION ALL SELECT 'o', m.key FROM ("
            f"SELECT {self._key_json('o')} AS key FROM cs_old o "
            f"EXCEPT SELECT {self._key_json('n')} FROM cs_new n) m"
        )
        channel = _literal(self.channel)
        whole = f"PERFORM pg_catalog.pg_notify({channel}, head || ',\"all\":\"' || reason || '\"}}');"
        summary = (
            "SELECT pg_catalog.max(pg_catalog.octet_length(k.key)), "
            "pg_catalog.sum(pg_catalog.octet_length(k.key) + 1), "
            "pg_catalog.string_agg(k.key, ',') FILTER (WHERE k.kind = 'k'), "
            "pg_catalog.string_agg(k.key, ',') FILTER (WHERE k.kind = 'o') "
            "INTO widest, total, new_list, old_list FROM ({keys}) k;"
        )
        return f"""
DECLARE
  head text;
  payload text;
  reason text;
  n bigint;
  widest int;
  total bigint;
  new_list text;
  old_list text;
BEGIN
  head := '{{"v":1,"s":' || pg_catalog.to_json(TG_TABLE_SCHEMA::text)::text
       || ',"t":' || pg_catalog.to_json(TG_TABLE_NAME::text)::text
       || ',"x":' || pg_catalog.txid_current()::text
       || ',"op":"' || pg_catalog.left(TG_OP, 1) || '"';
  IF TG_OP = 'TRUNCATE' THEN
    reason := 'truncate';
    {whole}
    RETURN NULL;
  END IF;
  -- Count first: a bulk statement degrades before any key is built.
  IF TG_OP = 'DELETE' THEN
    SELECT pg_catalog.count(*) INTO n FROM cs_old;
  ELSE
    SELECT pg_catalog.count(*) INTO n FROM cs_new;
  END IF;
  IF n = 0 THEN
    RETURN NULL;
  END IF;
  IF n > {self.bulk_threshold} THEN
    reason := 'bulk';
    {whole}
    RETURN NULL;
  END IF;
  IF TG_OP = 'DELETE' THEN
    {summary.format(keys=old_keys)}
  ELSIF TG_OP = 'UPDATE' THEN
    {summary.format(keys=moved)}
  ELSE
    {summary.format(keys=new_keys)}
  END IF;
  IF widest > {MAX_KEY_BYTES} THEN
    reason := 'oversized key';
    {whole}
    RETURN NULL;
  END IF;
  IF total <= {CHUNK_BYTES} THEN  -- the common case: one notification
    PERFORM pg_catalog.pg_notify({channel}, head || ',"k":[' || coalesce(new_list, '') || '],"o":['
                                            || coalesce(old_list, '') || ']}}');
    RETURN NULL;
  END IF;
  IF TG_OP = 'DELETE' THEN{self._chunks(old_keys)}
  ELSIF TG_OP = 'UPDATE' THEN{self._chunks(moved)}
  ELSE{self._chunks(new_keys)}
  END IF;
  RETURN NULL;
END"""

    def fingerprint(self) -> str:
        text = "\n".join((FUNCTION_SETTINGS, self.function_body(), *self._trigger_lines()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def comment(self) -> str:
        return (
            f"{COMMENT_PREFIX} for {self.schema.qualified} "
            f"(channel {self.channel}, bulk_threshold {self.bulk_threshold}, "
            f"fingerprint {self.fingerprint()})"
        )

    def _trigger_lines(self) -> list[str]:
        table = self.schema.sql_name
        function = self.function_sql_name
        return [
            f"CREATE TRIGGER {TRIGGERS['INSERT']} AFTER INSERT ON {table} "
            f"REFERENCING NEW TABLE AS cs_new FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {TRIGGERS['UPDATE']} AFTER UPDATE ON {table} "
            f"REFERENCING OLD TABLE AS cs_old NEW TABLE AS cs_new "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {TRIGGERS['DELETE']} AFTER DELETE ON {table} "
            f"REFERENCING OLD TABLE AS cs_old FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {TRIGGERS['TRUNCATE']} AFTER TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
        ]

    def install_sql(self) -> str:
        table = self.schema.sql_name
        drops = "\n".join(f"DROP TRIGGER IF EXISTS {name} ON {table};" for name in TRIGGERS.values())
        body = self.function_body()
        tag = _dollar_tag(body)
        return (
            f"-- {_comment_text(self.schema.qualified)}: key "
            f"({_comment_text(', '.join(quote_ident(c.name) for c in self.schema.key_columns))})\n"
            f"CREATE OR REPLACE FUNCTION {self.function_sql_name}() RETURNS trigger\n"
            f"LANGUAGE plpgsql {FUNCTION_SETTINGS}\nAS {tag}{body}\n{tag};\n"
            f"COMMENT ON FUNCTION {self.function_sql_name}() IS {_literal(self.comment())};\n"
            f"{drops}\n" + "\n".join(self._trigger_lines()) + "\n"
        )

    def uninstall_sql(self) -> str:
        table = self.schema.sql_name
        drops = "\n".join(f"DROP TRIGGER IF EXISTS {name} ON {table};" for name in TRIGGERS.values())
        return (
            f"-- {_comment_text(self.schema.qualified)}\n{drops}\nDROP FUNCTION IF EXISTS {self.function_sql_name}();\n"
        )


def trigger_sets(schemas: Sequence[TableSchema], channel: str, bulk_threshold: int) -> list[TriggerSet]:
    """The triggers the cached tables need: on each table, and on every source of each relation."""
    tables: dict[str, TableSchema] = {}
    for schema in schemas:
        for table in [source.table for source in schema.sources] if schema.config.is_relation else [schema]:
            tables.setdefault(table.qualified, table)
    return [TriggerSet(table, channel, bulk_threshold) for table in tables.values()]


def _literal(text: str) -> str:
    """A string literal that reads back as ``text`` whatever ``standard_conforming_strings``
    says (the script may run in a DBA's psql with any settings)."""
    quoted = "'" + text.replace("'", "''") + "'"
    if "\\" in text:  # only an E'' literal means the same in both modes
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def _dollar_tag(body: str) -> str:
    """A dollar-quote tag that does not occur in ``body`` (a column may be named
    ``x$cache_sidecar$y``); the first free one, so the script stays stable."""
    tag, n = "$cache_sidecar$", 0
    while tag in body:
        n += 1
        tag = f"$cache_sidecar_{n}$"
    return tag


def _comment_text(text: str) -> str:
    """``text`` fit for a ``--`` comment: a line comment ends at a newline or carriage
    return, so anything but printable ASCII (and the backslash psql might act on) is
    written as <U+XXXX>."""
    return "".join(c if " " <= c <= "~" and c != "\\" else f"<U+{ord(c):04X}>" for c in text)


def script(sets: Sequence[TriggerSet], uninstall: bool = False) -> str:
    """The whole install (or uninstall) script, one transaction, for a DBA to review."""
    body = "".join((s.uninstall_sql() if uninstall else s.install_sql()) + "\n" for s in sets)
    # The script is UTF-8: a psql in another client encoding would read names differently.
    return (
        f"SET client_encoding = 'UTF8';\nBEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK});\n\n"
        f"{body}COMMIT;\n"
    )


STATE_SQL = """
SELECT (SELECT pg_catalog.obj_description(p.oid, 'pg_proc')
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0) AS comment,
       EXISTS (SELECT 1
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0) AS has_function,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger tg
         JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $3 AND tg.tgname = ANY($4::text[])
           AND NOT tg.tgisinternal) AS triggers
"""


async def installed_state(conn: Any, trigger_set: TriggerSet) -> str:
    """'current', 'outdated' (partly there, or another definition) or 'missing'."""
    row = await conn.fetchrow(
        STATE_SQL,
        trigger_set.schema.config.schema,
        trigger_set.function_name,
        trigger_set.schema.config.name,
        list(TRIGGERS.values()),
    )
    if not row["has_function"] and row["triggers"] == 0:
        return "missing"
    if row["triggers"] == len(TRIGGERS) and row["comment"] == trigger_set.comment():
        return "current"
    return "outdated"


async def check_server(conn: Any) -> None:
    version = int(await conn.fetchval("SHOW server_version_num"))
    if version < MIN_SERVER_VERSION:
        raise SchemaError(f"PostgreSQL {version // 10000} is too old: cache-sidecar's triggers need 11 or newer")


async def install(conn: Any, sets: Sequence[TriggerSet]) -> list[str]:
    """Install (idempotently) in one transaction; return the tables changed."""
    await check_server(conn)
    changed = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        for trigger_set in sets:
            if await installed_state(conn, trigger_set) == "current":
                continue
            table = trigger_set.schema.qualified
            await _run(
                conn,
                trigger_set.install_sql(),
                f"installing triggers on {table}",
                f"needs CREATE on schema {trigger_set.schema.config.schema} (for the function "
                f"{trigger_set.function_name}) and ownership of table {table} (for its triggers, "
                "which install drops and creates again)",
                "cache-sidecar triggers sql",
            )
            changed.append(trigger_set.schema.qualified)
    return changed


async def uninstall(conn: Any, sets: Sequence[TriggerSet]) -> list[str]:
    """Remove exactly what ``install`` created; return the tables changed."""
    changed = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        for trigger_set in sets:
            if await installed_state(conn, trigger_set) == "missing":
                continue
            table = trigger_set.schema.qualified
            await _run(
                conn,
                trigger_set.uninstall_sql(),
                f"removing triggers from {table}",
                f"needs ownership of table {table} and of the function {trigger_set.function_name}",
                "cache-sidecar triggers sql --uninstall-sql",
            )
            changed.append(trigger_set.schema.qualified)
    return changed


async def _run(conn: Any, sql: str, doing: str, needs: str, script_command: str) -> None:
    import asyncpg

    try:
        await conn.execute(sql)
    except asyncpg.InsufficientPrivilegeError as exc:
        # PostgreSQL names only the first object it refused; the role usually lacks more.
        raise SchemaError(
            f"{doing} failed: {exc}. The database role {needs}. Or leave it to someone who has "
            f"those rights: '{script_command}' (same configuration) prints the script to run."
        ) from None
    except asyncpg.PostgresError as exc:
        raise SchemaError(f"{doing} failed: {exc}") from None

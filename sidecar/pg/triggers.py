"""Change capture: the trigger SQL, and installing or removing it.

Per cached table and configuration (channel, bulk threshold), install creates one
function (in the table's schema) and four statement-level triggers, on the table
and on each of its partitions and inheritance children (a statement that names a
partition fires only the partition's statement triggers):

* INSERT / UPDATE / DELETE triggers read the statement's transition tables
  and send the changed primary keys with ``pg_notify``, in chunks that stay
  under PostgreSQL's 8000-byte payload limit. One statement sends one
  notification per chunk, never one per row; above ``bulk_threshold`` rows it
  sends a single whole-table event instead. Events always name the cached table.
* The TRUNCATE trigger sends a whole-table event.
* A key whose JSON exceeds ``MAX_KEY_BYTES`` also degrades to a whole-table event.

Payloads never carry row data (see ``events.py`` for the format). The objects'
names carry a digest of table and configuration, so two sidecars configured
differently each keep their own instead of replacing each other's. The function's
comment carries a fingerprint of its definition, so installing again is a no-op
when nothing changed, and uninstall removes exactly these objects. ``inspect``
reads the catalog for more than presence: triggers disabled, firing only in
replica sessions, pointing at another function, a replaced function body, and
partitions or children without triggers all count as not current.

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

import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.core.schema import TableSchema
from sidecar.errors import SchemaError
from sidecar.identifiers import quote_ident

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 110000
MAX_KEY_BYTES = 1000  # one key's JSON; larger keys degrade to a whole-table event
CHUNK_BYTES = 6000  # keys per notification; + one key + header stays < 8000
# What each trigger is, as pg_trigger records it: tgtype (AFTER, FOR EACH STATEMENT, the
# event's bit) and its transition tables' names.
TRIGGER_KINDS = {
    "INSERT": (4, None, "cs_new"),
    "UPDATE": (16, "cs_old", "cs_new"),
    "DELETE": (8, "cs_old", None),
    "TRUNCATE": (32, None, None),
}
# Before definition 2 the objects were named per table only, so two configurations
# (another channel or bulk threshold) replaced each other's.
LEGACY_TRIGGERS = ("cache_sidecar_insert", "cache_sidecar_update", "cache_sidecar_delete", "cache_sidecar_truncate")
# Bumped whenever what the objects do changes; a sidecar never replaces a newer definition.
DEFINITION = 2
COMMENT_PREFIX = "cache-sidecar change capture"
# On the function, whoever fires it: a writer's search_path must not pick the functions
# and operators it calls, and its extra_float_digits must not change a float key's JSON.
FUNCTION_SETTINGS = "SET search_path = pg_catalog, pg_temp SET extra_float_digits = 3"
FUNCTION_CONFIG = ["search_path=pg_catalog, pg_temp", "extra_float_digits=3"]  # (as pg_proc.proconfig says it)
INSTALL_LOCK = 0x63616368  # advisory lock id: concurrent installs (many pods) take turns
TWO_PHASE_NOTE = (
    "a transaction that writes a table with these triggers sends a NOTIFY, and PostgreSQL cannot "
    "PREPARE such a transaction: PREPARE TRANSACTION (two-phase commit) fails on these tables "
    "while the triggers are installed"
)


@dataclass(frozen=True)
class TriggerSet:
    """The SQL objects for one table and one configuration (channel, bulk threshold).

    The objects' names carry a digest of table and configuration, so sidecars with another
    channel or bulk threshold install their own beside these instead of replacing them.
    ``relatives`` (partitions and inheritance children, and the parents the table is one
    of, at any depth: a statement naming one fires only that one's statement triggers) and
    ``strays`` (tables that still carry these triggers but are no longer relatives, such as
    a detached partition) come from the catalog: see ``resolve``.
    """

    schema: TableSchema
    channel: str
    bulk_threshold: int
    relatives: tuple[tuple[str, str], ...] = ()
    strays: tuple[tuple[str, str], ...] = ()

    @property
    def ident(self) -> str:
        identity = "\0".join(
            (self.schema.config.schema, self.schema.config.name, self.channel, str(self.bulk_threshold))
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:10]

    @property
    def function_name(self) -> str:
        prefix = f"cache_sidecar_{self.ident}_"
        return prefix + _cut(self.schema.config.name, 63 - len(prefix))

    @property
    def function_sql_name(self) -> str:
        return f"{quote_ident(self.schema.config.schema)}.{quote_ident(self.function_name)}"

    @property
    def trigger_names(self) -> dict[str, str]:
        """The trigger's name per event (the same on the table and on each relative)."""
        return {op: f"cache_sidecar_{self.ident}_{op.lower()}" for op in TRIGGER_KINDS}

    @property
    def legacy_function_name(self) -> str:
        """The function's name before definition 2 (see ``LEGACY_TRIGGERS``)."""
        base = f"cache_sidecar_notify_{self.schema.config.name}"
        if len(base.encode()) <= 63:
            return base
        digest = hashlib.sha1(self.schema.config.name.encode()).hexdigest()[:8]
        return f"cache_sidecar_notify_{self.schema.config.name.encode()[:30].decode(errors='ignore')}_{digest}"

    @property
    def configuration(self) -> str:
        return f"channel {self.channel}, bulk_threshold {self.bulk_threshold}"

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
  -- The cached table's name, also when a statement names one of its partitions or children
  head := '{{"v":1,"s":' || pg_catalog.to_json({_literal(self.schema.config.schema)}::text)::text
       || ',"t":' || pg_catalog.to_json({_literal(self.schema.config.name)}::text)::text
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

    def stored_body(self) -> str:
        """The body as ``pg_proc.prosrc`` holds it once installed."""
        return self.function_body() + "\n"

    def fingerprint(self) -> str:
        text = "\n".join((FUNCTION_SETTINGS, self.function_body(), *self._trigger_lines(self.schema.sql_name)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def comment(self) -> str:
        return (
            f"{COMMENT_PREFIX} for {self.schema.qualified} "
            f"({self.configuration}, definition {DEFINITION}, fingerprint {self.fingerprint()})"
        )

    def _trigger_lines(self, relation: str) -> list[str]:
        function = self.function_sql_name
        names = self.trigger_names
        return [
            f"CREATE TRIGGER {names['INSERT']} AFTER INSERT ON {relation} "
            f"REFERENCING NEW TABLE AS cs_new FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {names['UPDATE']} AFTER UPDATE ON {relation} "
            f"REFERENCING OLD TABLE AS cs_old NEW TABLE AS cs_new "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {names['DELETE']} AFTER DELETE ON {relation} "
            f"REFERENCING OLD TABLE AS cs_old FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
            f"CREATE TRIGGER {names['TRUNCATE']} AFTER TRUNCATE ON {relation} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
        ]

    def _drops(self, relation: str) -> str:
        return "\n".join(f"DROP TRIGGER IF EXISTS {name} ON {relation};" for name in self.trigger_names.values())

    def _relations(self) -> list[str]:
        """The table, then its relatives: each needs the triggers."""
        return [self.schema.sql_name, *(_sql_name(*r) for r in self.relatives)]

    def install_sql(self) -> str:
        body = self.function_body()
        tag = _dollar_tag(body)
        parts = [
            f"-- {_comment_text(self.schema.qualified)}: key "
            f"({_comment_text(', '.join(quote_ident(c.name) for c in self.schema.key_columns))})\n"
            f"CREATE OR REPLACE FUNCTION {self.function_sql_name}() RETURNS trigger\n"
            f"LANGUAGE plpgsql {FUNCTION_SETTINGS}\nAS {tag}{self.stored_body()}{tag};\n"
            f"COMMENT ON FUNCTION {self.function_sql_name}() IS {_literal(self.comment())};\n"
        ]
        for number, relation in enumerate(self._relations()):
            if number == 1:
                parts.append(
                    "-- its partitions, inheritance children and parents (a statement fires only its table's)\n"
                )
            parts.append(f"{self._drops(relation)}\n" + "\n".join(self._trigger_lines(relation)) + "\n")
        if self.strays:
            parts.append("-- no longer its partitions or children\n")
            parts.extend(f"{self._drops(_sql_name(*stray))}\n" for stray in self.strays)
        return "".join(parts)

    def uninstall_sql(self) -> str:
        relations = [*self._relations(), *(_sql_name(*stray) for stray in self.strays)]
        drops = "\n".join(self._drops(relation) for relation in relations)
        return (
            f"-- {_comment_text(self.schema.qualified)}\n{drops}\nDROP FUNCTION IF EXISTS {self.function_sql_name}();\n"
        )


def captured_tables(schemas: Sequence[TableSchema]) -> list[TableSchema]:
    """The PostgreSQL tables whose changes the cache must learn of: each cached table, and
    every source of each relation (once each, in the order configured)."""
    tables: dict[str, TableSchema] = {}
    for schema in schemas:
        for table in [source.table for source in schema.sources] if schema.config.is_relation else [schema]:
            tables.setdefault(table.qualified, table)
    return list(tables.values())


def trigger_sets(schemas: Sequence[TableSchema], channel: str, bulk_threshold: int) -> list[TriggerSet]:
    """The triggers the cached tables need: on each table, and on every source of each relation."""
    return [TriggerSet(table, channel, bulk_threshold) for table in captured_tables(schemas)]


def _sql_name(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    return text.encode()[:limit].decode(errors="ignore")


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
        + ("" if uninstall else f"-- Note: {TWO_PHASE_NOTE}.\n\n")
        + f"{body}COMMIT;\n"
    )


FUNCTION_SQL = """
SELECT p.oid, pg_catalog.obj_description(p.oid, 'pg_proc') AS comment, p.prosrc = $3::text AS same_body,
       p.proconfig AS settings, l.lanname AS language
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0
"""

# The table, its partitions and inheritance children and its ancestors (at any depth), and
# any other table carrying triggers of these names (a detached partition); with those
# triggers, if any. ``place``: 'table', 'below' (a descendant), 'above' (an ancestor), 'stray'.
RELATIONS_SQL = """
WITH RECURSIVE root AS (
  SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname = $1 AND c.relname = $2
), below(oid) AS (
  SELECT oid FROM root
  UNION
  SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN below b ON i.inhparent = b.oid
), above(oid) AS (
  SELECT oid FROM root
  UNION
  SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN above a ON i.inhrelid = a.oid
), rels AS (
  SELECT oid, 'table' AS place, 0 AS rank FROM root
  UNION ALL
  SELECT oid, 'below', 1 FROM below WHERE oid NOT IN (SELECT oid FROM root)
  UNION ALL
  SELECT oid, 'above', 2 FROM above WHERE oid NOT IN (SELECT oid FROM root)
  UNION ALL
  SELECT DISTINCT tg.tgrelid, 'stray', 3 FROM pg_catalog.pg_trigger tg
   WHERE tg.tgname = ANY($3::text[])
     AND tg.tgrelid NOT IN (SELECT oid FROM below UNION SELECT oid FROM above)
)
SELECT r.place, n.nspname AS schema, c.relname AS name,
       tg.tgname AS trigger, tg.tgfoid AS function, tg.tgenabled::text AS enabled, tg.tgtype AS type,
       tg.tgoldtable AS old, tg.tgnewtable AS new,
       (tg.tgqual IS NULL AND tg.tgnargs = 0 AND pg_catalog.cardinality(tg.tgattr::int2[]) = 0) AS plain
  FROM rels r
  JOIN pg_catalog.pg_class c ON c.oid = r.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = c.oid AND tg.tgname = ANY($3::text[])
 ORDER BY r.rank, 2, 3, 4
"""
PLACES = {
    "below": "a partition or child of {table}: statements naming it fire only its triggers",
    "above": "a parent of {table}: statements naming it fire only its triggers",
}

_DEFINITION = re.compile(r", definition (\d+), fingerprint [0-9a-f]+\)\Z")


@dataclass(frozen=True)
class Installed:
    """What the catalog holds of one ``TriggerSet``, and what is wrong with it.

    ``status`` is 'current' (every object there, as this sidecar defines it, firing),
    'missing' (none of it there) or 'outdated' (anything else: ``problems`` says what).
    """

    status: str
    problems: tuple[str, ...] = ()
    relatives: tuple[tuple[str, str], ...] = ()
    strays: tuple[tuple[str, str], ...] = ()
    newer: int | None = None  # the definition installed, when newer than this sidecar's

    def describe(self) -> str:
        return "; ".join(self.problems) or self.status


async def inspect(conn: Any, trigger_set: TriggerSet) -> Installed:
    """Read the catalog: are this set's objects there, this sidecar's, and firing?

    Present is not enough: a trigger can be disabled (``ALTER TABLE ... DISABLE TRIGGER``),
    made to fire only in replica sessions (``ENABLE REPLICA TRIGGER``), redefined to call
    another function, or the function's body replaced; and a partition or inheritance child
    attached after the install (or a parent the table was attached to) has no triggers, so
    statements naming it send nothing.
    ``ENABLE ALWAYS`` is accepted: such a trigger fires in every session.
    """
    config = trigger_set.schema.config
    names = trigger_set.trigger_names
    # (the body compared by the server: a digest of it would depend on the database's encoding)
    function = await conn.fetchrow(FUNCTION_SQL, config.schema, trigger_set.function_name, trigger_set.stored_body())
    rows = await conn.fetch(RELATIONS_SQL, config.schema, config.name, list(names.values()))
    relatives = tuple(dict.fromkeys((r["schema"], r["name"]) for r in rows if r["place"] in PLACES))
    strays = tuple(dict.fromkeys((r["schema"], r["name"]) for r in rows if r["place"] == "stray"))
    if function is None and all(r["trigger"] is None for r in rows):
        return Installed("missing", relatives=relatives, strays=strays)
    problems: list[str] = []
    newer = None
    if not any(r["place"] == "table" for r in rows):
        problems.append(f"the table {trigger_set.schema.qualified} does not exist")
    if function is None:
        problems.append(f"the function {trigger_set.function_name} is missing")
    else:
        found = _DEFINITION.search(function["comment"] or "")
        if found is not None and int(found.group(1)) > DEFINITION:
            newer = int(found.group(1))
            problems.append(f"installed by a newer cache-sidecar (definition {newer}; this one has {DEFINITION})")
        elif function["comment"] != trigger_set.comment():
            problems.append("its definition is another version's (or the table's key changed)")
        elif not function["same_body"]:
            problems.append(f"the body of {trigger_set.function_name} was replaced")
        elif list(function["settings"] or []) != FUNCTION_CONFIG or function["language"] != "plpgsql":
            problems.append(f"the settings or language of {trigger_set.function_name} were changed")
    expected = {names[op]: kind for op, kind in TRIGGER_KINDS.items()}
    by_relation: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if row["place"] != "stray":
            found_triggers = by_relation.setdefault((row["place"], row["schema"], row["name"]), {})
            if row["trigger"] is not None:
                found_triggers[row["trigger"]] = row
    for (place, schema, name), found_triggers in by_relation.items():
        where = _sql_name(schema, name)
        if place in PLACES:
            where = f"{where} ({PLACES[place].format(table=trigger_set.schema.qualified)})"
        absent = [trigger for trigger in expected if trigger not in found_triggers]
        if absent:
            problems.append(f"{where} lacks the triggers {', '.join(absent)}")
        for trigger, row in found_triggers.items():
            problem = _trigger_problem(row, expected[trigger], function["oid"] if function is not None else None)
            if problem:
                problems.append(f"the trigger {trigger} on {where} {problem}")
    return Installed("outdated" if problems else "current", tuple(problems), relatives, strays, newer)


def _trigger_problem(row: Any, kind: tuple[int, str | None, str | None], function: int | None) -> str | None:
    if row["function"] != function:
        return "calls another function"
    if (row["type"], row["old"], row["new"], row["plain"]) != (*kind, True):
        return "was redefined (other events, timing, level, condition or transition tables)"
    if row["enabled"] == "D":
        return "is disabled (ALTER TABLE ... DISABLE TRIGGER)"
    if row["enabled"] == "R":
        return "fires only in replica sessions (ENABLE REPLICA TRIGGER)"
    return None


async def installed_state(conn: Any, trigger_set: TriggerSet) -> str:
    """'current', 'outdated' (partly there, another definition, not firing) or 'missing'."""
    return (await inspect(conn, trigger_set)).status


async def resolve(conn: Any, sets: Sequence[TriggerSet]) -> list[TriggerSet]:
    """``sets`` with their relatives and strays as the catalog says now (for ``script``)."""
    resolved = []
    for trigger_set in sets:
        found = await inspect(conn, trigger_set)
        resolved.append(dataclasses.replace(trigger_set, relatives=found.relatives, strays=found.strays))
    return resolved


async def check_server(conn: Any) -> None:
    version = int(await conn.fetchval("SHOW server_version_num"))
    if version < MIN_SERVER_VERSION:
        raise SchemaError(f"PostgreSQL {version // 10000} is too old: cache-sidecar's triggers need 11 or newer")


async def install(conn: Any, sets: Sequence[TriggerSet]) -> list[str]:
    """Install (idempotently) in one transaction; return the tables changed.

    Objects of another configuration (channel, bulk threshold) are left alone: they have
    names of their own. A newer cache-sidecar's are never replaced (an error says so)."""
    await check_server(conn)
    changed = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        for trigger_set in sets:
            table = trigger_set.schema.qualified
            legacy = await _drop_legacy(conn, trigger_set)
            found = await inspect(conn, trigger_set)
            if found.status == "current" and not found.strays:
                if legacy:
                    changed.append(table)
                continue
            if found.newer is not None:
                raise SchemaError(
                    f"the cache-sidecar triggers on {table} ({trigger_set.configuration}) were installed by a "
                    f"newer cache-sidecar (definition {found.newer}; this one has {DEFINITION}); this one will "
                    "not replace them: upgrade it, or uninstall them with that newer version first"
                )
            if found.status == "outdated":
                log.info("replacing the triggers on %s: %s", table, found.describe())
            resolved = dataclasses.replace(trigger_set, relatives=found.relatives, strays=found.strays)
            await _run(
                conn,
                resolved.install_sql(),
                f"installing triggers on {table}",
                f"needs CREATE on schema {trigger_set.schema.config.schema} (for the function "
                f"{trigger_set.function_name}) and ownership of table {table} and of its partitions and "
                "inheritance children (for their triggers, which install drops and creates again)",
                "cache-sidecar triggers sql",
            )
            changed.append(table)
    return changed


async def uninstall(conn: Any, sets: Sequence[TriggerSet]) -> list[str]:
    """Remove exactly what ``install`` created (for this configuration); return the tables changed."""
    changed = []
    async with conn.transaction():
        await conn.execute(f"SELECT pg_catalog.pg_advisory_xact_lock({INSTALL_LOCK})")
        for trigger_set in sets:
            legacy = await _drop_legacy(conn, trigger_set)
            found = await inspect(conn, trigger_set)
            if found.status == "missing" and not found.strays:
                if legacy:
                    changed.append(trigger_set.schema.qualified)
                continue
            table = trigger_set.schema.qualified
            resolved = dataclasses.replace(trigger_set, relatives=found.relatives, strays=found.strays)
            await _run(
                conn,
                resolved.uninstall_sql(),
                f"removing triggers from {table}",
                f"needs ownership of table {table} (and of its partitions and children) and of the "
                f"function {trigger_set.function_name}",
                "cache-sidecar triggers sql --uninstall-sql",
            )
            changed.append(table)
    return changed


async def _drop_legacy(conn: Any, trigger_set: TriggerSet) -> bool:
    """Remove what a sidecar from before definition 2 installed for this same table and
    configuration (its objects had names of their own); True if there was something."""
    config = trigger_set.schema.config
    function = await conn.fetchrow(FUNCTION_SQL, config.schema, trigger_set.legacy_function_name, None)
    ours = f"{COMMENT_PREFIX} for {trigger_set.schema.qualified} ({trigger_set.configuration}, fingerprint "
    if function is None or not (function["comment"] or "").startswith(ours):
        return False
    table = trigger_set.schema.sql_name
    drops = "\n".join(f"DROP TRIGGER IF EXISTS {name} ON {table};" for name in LEGACY_TRIGGERS)
    legacy_function = f"{quote_ident(config.schema)}.{quote_ident(trigger_set.legacy_function_name)}"
    await _run(
        conn,
        f"{drops}\nDROP FUNCTION IF EXISTS {legacy_function}();",
        f"removing the triggers an older cache-sidecar installed on {trigger_set.schema.qualified}",
        f"needs ownership of table {trigger_set.schema.qualified} and of the function {legacy_function}",
        "cache-sidecar triggers sql",
    )
    log.info("removed the triggers an older cache-sidecar installed on %s", trigger_set.schema.qualified)
    return True


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

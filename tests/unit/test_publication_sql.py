"""Logical capture's publication as text: naming, quoting, the script; and the replica
identity rules (behaviour against PostgreSQL: tests/integration/logical/test_publication.py)."""

from __future__ import annotations

import re

from sidecar.config import RelationSource, TableConfig
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import SourceSchema, TableSchema
from sidecar.pg import publication
from sidecar.pg.publication import Inspected, Publication, ReplicaIdentity

ID = KeyColumn.create("id", "int4", "integer")


def table(name: str, namespace: str = "public") -> TableSchema:
    return TableSchema(TableConfig(schema=namespace, name=name), (ID,))


def relation(name: str, *sources: TableSchema) -> TableSchema:
    config = TableConfig(
        schema="public",
        name=name,
        query="SELECT 1 AS id",
        key=("id",),
        sources=tuple(RelationSource(s.config.schema, s.config.name, (("id", "id"),)) for s in sources),
    )
    return TableSchema(config, (ID,), sources=tuple(SourceSchema(s, ((0, "id"),)) for s in sources))


def test_a_hostile_table_name_is_quoted_and_never_leaves_a_comment():
    hostile = 'we"ird\nDROP TABLE x; --\r\\'
    sql = publication.for_schemas([table(hostile, "My Schema")]).install_sql()
    assert 'FOR TABLE "My Schema"."we""ird\nDROP TABLE x; --\r\\" WITH (' in sql
    first, second = sql.split("\n")[:2]
    assert first.startswith("-- ") and all(" " <= c <= "~" and c != "\\" for c in first)
    assert second.startswith("CREATE PUBLICATION ")


def test_the_publication_publishes_whole_rows_of_every_operation_not_via_the_partition_root():
    sql = publication.for_schemas([table("a"), table("b", "s")]).install_sql()
    create = next(line for line in sql.splitlines() if line.startswith("CREATE"))
    assert re.fullmatch(
        r'CREATE PUBLICATION "cache_sidecar_[0-9a-f]{10}" FOR TABLE "public"\."a", "s"\."b" '
        r"WITH \(publish = 'insert, update, delete, truncate', publish_via_partition_root = false\);",
        create,
    )
    assert " WHERE " not in sql and "(id)" not in sql  # no row filter, no column list


def test_the_name_is_a_digest_of_the_set_of_tables_whatever_their_order():
    a, b, c = table("a"), table("b"), table("c", "other")
    first = publication.for_schemas([a, b, c])
    assert first.name == publication.for_schemas([c, b, a]).name == publication.for_schemas([b, a, b, c]).name
    assert re.fullmatch(r"cache_sidecar_[0-9a-f]{10}", first.name)
    assert first.tables == (("other", "c"), ("public", "a"), ("public", "b"))


def test_other_tables_are_another_publication():
    names = {
        publication.for_schemas(schemas).name
        for schemas in ([table("a")], [table("a"), table("b")], [table("a", "s")], [table("b")])
    }
    assert len(names) == 4
    # (names that would join alike: table "s.a" in schema public is not table a in schema "public.s")
    assert Publication.of([("public", "s.a")]).name != Publication.of([("public.s", "a")]).name
    assert Publication.of([("a", "b,c")]).name != Publication.of([("a", "b"), ("a", "c")]).name


def test_a_relation_publishes_its_sources_and_not_itself():
    patron, city = table("patron"), table("city")
    wanted = publication.for_schemas([relation("patron_city", patron, city), patron])
    assert wanted.tables == (("public", "city"), ("public", "patron"))


def test_the_script_is_one_locked_transaction_and_says_what_the_server_needs():
    wanted = publication.for_schemas([table("a")])
    script = publication.script(wanted, Inspected("missing"))
    needs, sql = script.split("SET client_encoding = 'UTF8';\n")
    assert "wal_level = logical" in needs and "REPLICATION" in needs and "max_replication_slots" in needs
    assert all(line.startswith("--") or not line for line in needs.splitlines())
    assert sql.startswith("BEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock(") and sql.endswith("COMMIT;\n")
    assert "CREATE PUBLICATION" in sql
    outdated = publication.script(wanted, Inspected("outdated", ("it lacks public.a",))).split("BEGIN;")[1]
    assert "-- it exists but it lacks public.a\n" in outdated and "ALTER PUBLICATION" in outdated
    assert "CREATE" not in outdated
    replaced = publication.script(wanted, Inspected("outdated", ("FOR ALL TABLES",), all_tables=True))
    assert replaced.index("DROP PUBLICATION") < replaced.index("CREATE PUBLICATION")
    done = publication.script(wanted, Inspected("ok")).split("BEGIN;")[1]
    assert "nothing to run" in done and "CREATE" not in done and "ALTER" not in done
    removal = publication.script(wanted, Inspected("ok"), uninstall=True)
    assert f'DROP PUBLICATION IF EXISTS "{wanted.name}";' in removal and "wal_level" not in removal


def identity(
    kind: str = "r", ident: str = "d", pk: tuple[str, ...] | None = ("id",), **more: object
) -> ReplicaIdentity:
    return ReplicaIdentity("public", "t", kind, ident, pk, more.get("index"), more.get("candidates", ()))  # type: ignore[arg-type]


def test_which_replica_identities_make_updates_and_deletes_fail():
    assert identity().problem() is None  # the primary key
    assert identity(ident="f", pk=None).problem() is None
    assert identity(ident="i", index=("a", "b")).problem() is None
    nothing = identity(ident="n", candidates=("t_code_key",)).problem()
    assert nothing is not None and "REPLICA IDENTITY NOTHING" in nothing
    assert 'ALTER TABLE "public"."t" REPLICA IDENTITY USING INDEX "t_code_key"' in nothing and "FULL" in nothing
    no_key = identity(pk=None).problem()
    assert no_key is not None and "no primary key" in no_key and "<a unique index of NOT NULL columns>" in no_key
    gone = identity(ident="i", index=None).problem()
    assert gone is not None and "no longer exists" in gone
    assert identity(kind="p", ident="n").problem() is None  # a partitioned table holds no rows


def test_a_key_outside_the_identity_is_a_note():
    assert identity().key_note(["id"]) is None
    assert identity(ident="f").key_note(["id"]) is None
    note = identity(ident="i", index=("code",)).key_note(["id"])
    assert note is not None and "public.t (id)" in note and "(code)" in note and "reloads the table" in note

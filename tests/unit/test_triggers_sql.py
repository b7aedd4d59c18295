"""The trigger SQL as text: quoting, naming, fingerprints (behaviour is tested
against PostgreSQL in tests/integration/test_triggers.py)."""

from __future__ import annotations

import re

from sidecar.config import TableConfig
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import TableSchema
from sidecar.pg import triggers


def schema(name: str = "patron", namespace: str = "public", *columns: KeyColumn) -> TableSchema:
    columns = columns or (KeyColumn.create("id", "int4", "integer"),)
    return TableSchema(TableConfig(schema=namespace, name=name), columns)


def test_identifiers_are_always_quoted():
    odd = schema('we"ird; DROP TABLE x', "My Schema", KeyColumn.create('k"ey', "text", "text"))
    sql = triggers.TriggerSet(odd, "cache_sidecar", 1000).install_sql()
    assert '"My Schema"."we""ird; DROP TABLE x"' in sql
    assert 'n."k""ey"' in sql


def test_long_table_names_get_a_stable_short_function_name():
    long = schema("t" * 63)
    name = triggers.TriggerSet(long, "c", 10).function_name
    assert len(name.encode()) <= 63
    assert name == triggers.TriggerSet(long, "c", 10).function_name


def test_fingerprint_follows_what_changes_behaviour():
    base = triggers.TriggerSet(schema(), "cache_sidecar", 1000)
    assert base.fingerprint() == triggers.TriggerSet(schema(), "cache_sidecar", 1000).fingerprint()
    assert base.fingerprint() != triggers.TriggerSet(schema(), "other", 1000).fingerprint()
    assert base.fingerprint() != triggers.TriggerSet(schema(), "cache_sidecar", 10).fingerprint()


def test_script_is_one_locked_transaction():
    sets = [triggers.TriggerSet(schema("a"), "c", 5), triggers.TriggerSet(schema("b"), "c", 5)]
    script = triggers.script(sets)
    assert script.startswith("SET client_encoding = 'UTF8';\nBEGIN;\nSELECT pg_catalog.pg_advisory_xact_lock(")
    assert script.endswith("COMMIT;\n")
    assert script.count("CREATE OR REPLACE FUNCTION") == 2
    assert script.count("CREATE TRIGGER") == 8
    removal = triggers.script(sets, uninstall=True)
    assert removal.count("DROP FUNCTION IF EXISTS") == 2 and "CREATE" not in removal


def test_bytea_keys_are_sent_as_hex_whatever_the_session_says():
    bytes_key = schema("blobs", "public", KeyColumn.create("k", "bytea", "bytea"))
    assert "encode(n.\"k\", 'hex')" in triggers.TriggerSet(bytes_key, "c", 5).function_body()


def test_names_never_leave_a_comment():
    # A newline in a name would end the "--" comment, and what follows would run as SQL.
    hostile = "x\nALTER ROLE me SUPERUSER; --\r\\ é"
    odd = schema(hostile, hostile, KeyColumn.create(hostile, "int4", "integer"))
    for sql in (triggers.TriggerSet(odd, "c", 5).install_sql(), triggers.TriggerSet(odd, "c", 5).uninstall_sql()):
        first, second = sql.split("\n")[:2]
        assert first.startswith("-- ") and all(" " <= c <= "~" and c != "\\" for c in first)
        assert second.startswith(("CREATE OR REPLACE FUNCTION", "DROP TRIGGER"))
    escaped = "<U+000A>ALTER ROLE me SUPERUSER; --<U+000D><U+005C> <U+00E9>"
    assert escaped in triggers.TriggerSet(odd, "c", 5).install_sql()


def test_dollar_tag_is_absent_from_the_body():
    plain = triggers.TriggerSet(schema(), "c", 5)
    assert "AS $cache_sidecar$\n" in plain.install_sql()
    for name in ("x$cache_sidecar$y", "$cache_sidecar$$cache_sidecar_1$"):
        trigger_set = triggers.TriggerSet(schema("t", "public", KeyColumn.create(name, "int4", "integer")), "c", 5)
        body = trigger_set.function_body()
        tag = triggers._dollar_tag(body)
        assert tag not in body and f"AS {tag}{body}\n{tag};" in trigger_set.install_sql()


def test_literals_read_the_same_whatever_standard_conforming_strings_says():
    assert triggers._literal("it's") == "'it''s'"
    assert triggers._literal("a\\b'c") == "E'a\\\\b''c'"  # E'' doubles backslashes; '' doubles quotes


def test_the_function_pins_search_path_and_qualifies_its_calls():
    trigger_set = triggers.TriggerSet(schema("t", "public", KeyColumn.create("k", "bytea", "bytea")), "c", 5)
    assert "SET search_path = pg_catalog, pg_temp" in trigger_set.install_sql()
    body = trigger_set.function_body()
    calls = set(re.findall(r"([A-Za-z_.]+)\(", body))
    assert {c for c in calls if not c.startswith("pg_catalog.")} <= {"coalesce", "IN", "AS", "OVER", "FILTER"}
    # a backslash only inside an E'' literal: the writer's standard_conforming_strings cannot change it
    assert "'\\x'" not in body.replace("E'\\\\x'", "")


def test_fingerprint_covers_the_function_settings(monkeypatch):
    # Installs from before search_path was pinned must read as outdated, and be replaced.
    pinned = triggers.TriggerSet(schema(), "c", 5).fingerprint()
    monkeypatch.setattr(triggers, "FUNCTION_SETTINGS", "")
    assert triggers.TriggerSet(schema(), "c", 5).fingerprint() != pinned


def test_names_are_per_table_and_configuration():
    # Two sidecars with another channel or bulk threshold must not replace each other's objects.
    base = triggers.TriggerSet(schema(), "c", 5)
    others = [
        triggers.TriggerSet(schema(), "d", 5),
        triggers.TriggerSet(schema(), "c", 6),
        triggers.TriggerSet(schema("x"), "c", 5),
    ]
    names = {base.function_name, *base.trigger_names.values()}
    for other in others:
        assert not names & {other.function_name, *other.trigger_names.values()}
    assert all(name.startswith("cache_sidecar_") and len(name.encode()) <= 63 for name in names)


def test_the_function_sends_the_cached_tables_name_whichever_partition_fired_it():
    body = triggers.TriggerSet(schema("patron", "app"), "c", 5).function_body()
    assert "TG_TABLE_NAME" not in body and "TG_TABLE_SCHEMA" not in body
    assert "pg_catalog.to_json('app'::text)" in body and "pg_catalog.to_json('patron'::text)" in body


def test_relatives_get_the_same_triggers_and_strays_lose_them():
    trigger_set = triggers.TriggerSet(schema("p"), "c", 5, relatives=(("public", "p_eu"),), strays=(("public", "old"),))
    sql = trigger_set.install_sql()
    assert sql.count("CREATE TRIGGER") == 8 and sql.count('ON "public"."p_eu"') == 8  # 4 drops, 4 creates
    assert sql.count('ON "public"."old"') == 4 and "CREATE TRIGGER cache_sidecar" in sql
    removal = trigger_set.uninstall_sql()
    assert removal.count("DROP TRIGGER") == 12 and "CREATE" not in removal


def test_the_script_says_two_phase_commit_fails():
    assert "PREPARE TRANSACTION" in triggers.script([triggers.TriggerSet(schema(), "c", 5)])

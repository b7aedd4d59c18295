"""The trigger SQL as text: quoting, naming, fingerprints (behaviour is tested
against PostgreSQL in tests/integration/test_triggers.py)."""

from __future__ import annotations

from sidecar import triggers
from sidecar.config import TableConfig
from sidecar.keys import KeyColumn
from sidecar.schema import TableSchema


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
    assert script.startswith("BEGIN;\nSELECT pg_advisory_xact_lock(") and script.endswith("COMMIT;\n")
    assert script.count("CREATE OR REPLACE FUNCTION") == 2
    assert script.count("CREATE TRIGGER") == 8
    removal = triggers.script(sets, uninstall=True)
    assert removal.count("DROP FUNCTION IF EXISTS") == 2 and "CREATE" not in removal


def test_bytea_keys_are_sent_as_hex_whatever_the_session_says():
    bytes_key = schema("blobs", "public", KeyColumn.create("k", "bytea", "bytea"))
    assert "encode(n.\"k\", 'hex')" in triggers.TriggerSet(bytes_key, "c", 5).function_body()

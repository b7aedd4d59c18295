"""A table's definition (ListTables): a digest of the catalog facts its rows depend on, the
same on every hub that has seen the same DDL, which a follower resuming on another hub
compares with the one its rows were read with."""

from __future__ import annotations

from sidecar.pg.catalog import TableState, definition

T = "public.items"


def state(columns: tuple[str, ...] = ("id 20 -1", "v 25 -1"), **contents: str) -> TableState:
    facts = {"storage": "16384 2200 16390 items", "triggers": "16384 cache_sidecar_x O 29 1 abc "}
    facts.update(contents)
    return TableState(16384, columns, ("id",), contents=frozenset(facts.items()))


def test_the_same_catalog_gives_the_same_definition():
    assert definition([(T, state())]) == definition([(T, state())])
    assert len(definition([(T, state())])) == 32


def test_a_column_added_retyped_or_a_rewrite_changes_it():
    before = definition([(T, state())])
    assert definition([(T, state(("id 20 -1", "v 25 -1", "extra 23 -1")))]) != before
    assert definition([(T, state(("id 20 -1", "v 23 -1")))]) != before
    assert definition([(T, state(storage="16384 2200 16400 items"))]) != before  # (ALTER ... USING, VACUUM FULL)
    assert definition([(T, state(labels="16500 1 happy"))]) != before


def test_triggers_do_not_change_it():
    """NOTIFY's means, not what the rows are: a hub that reinstalled them serves the same rows."""
    assert definition([(T, state(triggers="16384 cache_sidecar_x D 29 1 abc "))]) == definition([(T, state())])


def test_a_table_that_is_not_there_has_a_definition_of_its_own():
    gone = definition([(T, TableState(None))])
    assert gone == definition([(T, None)]) != definition([(T, state())])
    assert definition([(T, state()), ("public.other", None)]) != definition([(T, state())])  # (a relation's sources)

"""RowStore: reloads in place (no second copy of the table) and shared snapshots
that stay exact while the rows change and reload under them."""

from __future__ import annotations

import gc
import json
import random

from sidecar.config import IndexConfig, TableConfig
from sidecar.core.indexes import plan
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import TableSchema
from sidecar.core.store import RowStore
from sidecar.core.wire import entry

INDEXED = TableSchema(
    config=TableConfig(
        schema="public",
        name="items",
        indexes=(IndexConfig("by_group", ("grp",)), IndexConfig("by_rank", ("rank",), range=True)),
    ),
    key_columns=(KeyColumn.create("id", "int8", "bigint"),),
    columns={name: KeyColumn.create(name, "int8", "bigint") for name in ("grp", "rank")},
)


def row(key: int, grp: int = 0, rank: int = 0, v: str = "") -> bytes:
    return entry(json.dumps({"id": key, "grp": grp, "rank": rank, "v": v}).encode())


def filled(keys: range, **values) -> RowStore:
    store = RowStore(INDEXED)
    store.replace({(k,): row(k, **values) for k in keys})
    return store


def reload(store: RowStore, rows: dict, chunk: int = 3) -> int:
    store.begin_reload()
    items = list(rows.items())
    for start in range(0, len(items), chunk):
        store.reload_chunk(dict(items[start : start + chunk]))
    return store.finish_reload()


def by_rank(store: RowStore, low: int, high: int) -> list[bytes]:
    return store.query(plan(INDEXED, "by_rank", None, low, high, limit=1000))[0]


def by_group(store: RowStore, grp: int) -> list[bytes]:
    return store.query(plan(INDEXED, "by_group", [[grp]], None, None, limit=1000))[0]


def test_reload_in_place_overwrites_adds_and_drops_the_rows_it_did_not_bring():
    store = filled(range(1, 11))
    rows_dict = store.rows
    fresh = {(k,): row(k, grp=1, rank=k) for k in range(5, 16)}  # 1-4 gone, 5-10 changed, 11-15 new
    assert reload(store, fresh) == 4
    assert store.rows is rows_dict  # the same dict: no second copy was made
    assert store.rows == fresh and len(store) == 11
    assert by_group(store, 1) == [fresh[k] for k in sorted(fresh)]
    assert by_group(store, 0) == []
    assert by_rank(store, 6, 8) == [fresh[(6,)], fresh[(7,)], fresh[(8,)]]


def test_a_reload_that_brings_every_row_unchanged_drops_nothing():
    store = filled(range(1, 100))
    before = dict(store.rows)
    assert reload(store, dict(before), chunk=10) == 0
    assert store.rows == before


def test_len_and_snapshots_never_show_the_reload_mark():
    store = filled(range(1, 6))
    store.begin_reload()
    store.reload_chunk({(1,): row(1, v="new")})
    assert len(store) == 5
    assert sorted(store.snapshot().keys) == [(k,) for k in range(1, 6)]
    store.abort_reload()  # (a failed load: the rows stay as they are, mixed)
    assert len(store.rows) == 5 and store.rows[(1,)] == row(1, v="new")


def test_a_range_index_follows_a_reload_that_moves_rows():
    store = filled(range(1, 6))
    for k in range(1, 6):
        store.store([(k,)], {(k,): row(k, rank=k)})
    fresh = {(1,): row(1, rank=50), (2,): row(2, rank=2), (9,): row(9, rank=3)}
    reload(store, fresh, chunk=1)
    assert by_rank(store, 0, 100) == [fresh[(2,)], fresh[(9,)], fresh[(1,)]]


def test_snapshots_are_shared_while_the_store_does_not_change():
    store = filled(range(1, 6))
    first = store.snapshot()
    assert store.snapshot() is first
    store.store([(1,)], {(1,): row(1)})  # the same entry: nothing changed
    assert store.snapshot() is first
    store.store([(1,)], {(1,): row(1, v="x")})
    second = store.snapshot()
    assert second is not first and store.snapshots == 2


def test_a_snapshot_costs_nothing_once_nobody_holds_it():
    store = filled(range(1, 6))
    view = store.snapshot()
    assert store.snapshots == 1
    del view
    gc.collect()
    assert store.snapshots == 0
    store.store([(1,)], {(1,): row(1, v="x")})  # (nothing to feed)


def test_a_snapshot_keeps_its_rows_through_changes_a_reload_and_a_clear():
    store = filled(range(1, 11))
    then = dict(store.rows)
    view = store.snapshot()
    store.store([(1,), (2,), (20,)], {(1,): row(1, v="changed"), (20,): row(20)})  # 2 deleted, 20 added
    reload(store, {(k,): row(k, v="reloaded") for k in range(5, 30)})
    assert dict(view.items()) == then
    assert view.get((20,)) is None and view.get((2,)) == then[(2,)]
    store.clear()
    store.store([(1,), (3,)], {(1,): row(1, v="after"), (3,): row(3, v="after")})
    assert dict(view.items()) == then
    assert [len(c) for c in view.chunks(4)] == [4, 4, 2]


def test_a_snapshot_taken_during_a_reload_is_exact_as_of_then():
    store = filled(range(1, 11))
    store.begin_reload()
    store.reload_chunk({(1,): row(1, v="new"), (50,): row(50)})
    then = {k: v for k, v in store.rows.items() if k in store.snapshot().keys}
    view = store.snapshot()
    store.reload_chunk({(2,): row(2, v="new")})
    store.finish_reload()  # drops 3..10
    assert dict(view.items()) == then and len(then) == 11


def test_snapshots_stay_exact_under_random_changes_and_reloads():
    rng = random.Random(11)
    store = filled(range(1, 60))
    views = []
    for step in range(300):
        action = rng.random()
        if action < 0.1:
            view = store.snapshot()
            views.append((view, dict(view.items())))
            # (what a snapshot answers is what the store held when it was taken)
            assert dict(view.items()) == {k: v for k, v in store.rows.items()}
        elif action < 0.2:
            rows = {(k,): row(k, grp=rng.randrange(3), rank=rng.randrange(9), v=str(step)) for k in range(1, 80)}
            reload(store, dict(rng.sample(sorted(rows.items()), rng.randrange(80))), chunk=rng.randrange(1, 9))
        elif action < 0.25:
            store.begin_reload()
            store.reload_chunk({(k,): row(k, v=f"partial{step}") for k in rng.sample(range(1, 80), 5)})
            store.abort_reload()
        elif action < 0.27 and views:
            views.pop(rng.randrange(len(views)))
        elif action < 0.28:
            store.replace({(k,): row(k, v=f"replaced{step}") for k in rng.sample(range(1, 80), 30)})
        else:
            keys = [(k,) for k in rng.sample(range(1, 80), 4)]
            store.store(keys, {k: row(k[0], rank=rng.randrange(9), v=str(step)) for k in keys if rng.random() < 0.7})
        for view, then in views:
            assert dict(view.items()) == then
        assert store.byte_count() == sum(map(len, store.rows.values()))  # (kept as rows change, not summed)
    # the indexes end exactly where a rebuild would put them
    rebuilt = RowStore(INDEXED)
    rebuilt.replace(dict(store.rows))
    assert by_rank(store, 0, 9) == by_rank(rebuilt, 0, 9)
    for grp in range(3):
        assert by_group(store, grp) == by_group(rebuilt, grp)

"""heap: big containers go to the collector's permanent generation, at most once an
interval, and what is frozen still dies by reference counting."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from sidecar.core import heap
from sidecar.core.heap import Heap
from sidecar.core.store import RowStore
from tests.support.waiting import eventually
from tests.unit.test_store import INDEXED, row


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # (the rest of the session collects as usual)


class Node:
    """A tracked object in a reference cycle."""

    def __init__(self) -> None:
        self.me = self


class Leaf:
    """A tracked object in no cycle."""


def test_a_big_container_freezes_what_is_alive() -> None:
    heap_ = Heap(big=100, interval=60)
    assert not heap_.built(99)
    assert gc.get_freeze_count() == 0
    assert heap_.built(100)
    assert gc.get_freeze_count() > 0
    assert heap_.freezes == 1


def test_at_most_one_freeze_per_interval() -> None:
    heap_ = Heap(big=1, interval=60)
    assert heap_.built(5)
    assert not heap_.built(5)  # (within the interval: left collectable)
    assert Heap(big=1, interval=0).built(5)


def test_frozen_objects_are_skipped_by_collections_but_freed_by_refcount() -> None:
    cycle, leaf = Node(), Leaf()
    in_cycle, acyclic = weakref.ref(cycle), weakref.ref(leaf)
    assert Heap(big=1, interval=0).built(1)
    del cycle, leaf
    assert acyclic() is None  # freed by reference counting, frozen or not
    gc.collect()
    assert in_cycle() is not None  # a frozen cycle is not collected (the documented price)
    gc.unfreeze()
    gc.collect()
    assert in_cycle() is None


def test_the_store_freezes_after_big_loads_and_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[int] = []
    monkeypatch.setattr(heap, "built", told.append)
    store = RowStore(INDEXED)
    store.replace({(k,): row(k) for k in range(1, 8)})
    store.begin_reload()
    store.reload_chunk({(k,): row(k, v="new") for k in range(1, 10)})
    store.finish_reload()
    store.snapshot()
    assert told == [7, 9, 9]


async def test_a_big_container_built_within_the_interval_is_frozen_when_it_ends() -> None:
    heap_ = Heap(big=1, interval=0.05)
    assert heap_.built(5)
    gc.unfreeze()
    assert not heap_.built(5) and not heap_.built(5)  # (one freeze is due, not two)
    assert gc.get_freeze_count() == 0
    await eventually(lambda: heap_.freezes == 2, what="the freeze when the interval ended")
    assert gc.get_freeze_count() > 0

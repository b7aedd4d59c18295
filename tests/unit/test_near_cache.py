"""The client's near-cache rules, without a server: ordering by revision,
fills overtaken by changes, flushes, bounds."""

from __future__ import annotations

from cache_sidecar_client import ChangeBatch, Revision
from cache_sidecar_client.near import NearCache
from cache_sidecar_client.watch import Change

T = "public.items"


def near(limit: int = 100) -> NearCache:
    cache = NearCache({T: limit})
    cache.connect()
    cache.mark(Revision("e", 10))
    return cache


def batch(number: int, *changes: Change, epoch: str = "e") -> ChangeBatch:
    return ChangeBatch(Revision(epoch, number), number, list(changes))


def update(key: int, version: int | None) -> Change:
    row = {"id": key, "version": version} if version is not None else None
    return Change(T, "update", key, None, row, row is not None)


def fill(cache: NearCache, key: int, version: int, revision: int) -> None:
    ticket = cache.begin_fill(T, key)
    cache.end_fill(T, key, ticket, {"id": key, "version": version}, Revision("e", revision))


def test_fill_then_hit_then_changes_apply_in_revision_order():
    cache = near()
    assert cache.lookup(T, 1) == (False, None)
    fill(cache, 1, version=5, revision=12)
    assert cache.lookup(T, 1) == (True, {"id": 1, "version": 5})
    cache.apply(batch(11, update(1, 4)))  # older than the fill: ignored
    assert cache.lookup(T, 1)[1]["version"] == 5
    cache.apply(batch(13, update(1, 6)))
    assert cache.lookup(T, 1)[1]["version"] == 6
    cache.apply(batch(14, update(1, None)))  # no row now: dropped
    assert cache.lookup(T, 1) == (False, None)
    assert cache.position == Revision("e", 14)
    assert (cache.stats.hits, cache.stats.misses) == (3, 2)


def test_a_row_marked_ahead_drops_the_key():
    """A relation's row the sidecar read ahead of its stream may show a source row newer than
    the rows held for its other keys do: not served from here, read from the sidecar."""
    cache = near()
    fill(cache, 1, version=5, revision=12)
    row = {"id": 1, "version": 6}
    cache.apply(batch(13, Change(T, "update", 1, None, row, True, ahead=True)))
    assert cache.lookup(T, 1) == (False, None)


def test_changes_do_not_insert_keys_nobody_read():
    cache = near()
    cache.apply(batch(11, update(7, 1)))
    assert cache.lookup(T, 7) == (False, None) and len(cache) == 0


def test_a_fill_overtaken_by_a_change_of_its_key_is_not_stored():
    cache = near()
    ticket = cache.begin_fill(T, 1)
    cache.apply(batch(11, update(1, 9)))  # arrives while the read is in flight
    cache.end_fill(T, 1, ticket, {"id": 1, "version": 8}, Revision("e", 10))
    assert cache.lookup(T, 1) == (False, None)
    assert cache.stats.stale_fills_dropped == 1


def test_a_fill_overtaken_by_a_flush_or_a_disconnect_is_not_stored():
    cache = near()
    ticket = cache.begin_fill(T, 1)
    cache.apply(batch(11, Change(T, "truncate", None, None, None, False)))
    cache.end_fill(T, 1, ticket, {"id": 1}, Revision("e", 11))
    assert len(cache) == 0
    ticket = cache.begin_fill(T, 2)
    cache.disconnect()
    cache.end_fill(T, 2, ticket, {"id": 2}, Revision("e", 11))
    assert len(cache) == 0 and not cache.serves(T)


def test_reset_and_disconnect_flush_everything():
    cache = near()
    fill(cache, 1, 1, 11)
    cache.reset(Revision("e2", 1))
    assert len(cache) == 0 and cache.position == Revision("e2", 1)
    fill(cache, 2, 1, 2)  # (a fill from the old epoch would be dropped)
    cache.disconnect()
    assert len(cache) == 0


def test_fills_from_another_epoch_are_not_stored():
    cache = near()
    ticket = cache.begin_fill(T, 1)
    cache.end_fill(T, 1, ticket, {"id": 1}, Revision("other", 99))
    assert len(cache) == 0


def test_lru_bound_and_key_moves():
    cache = near(limit=2)
    fill(cache, 1, 1, 11)
    fill(cache, 2, 1, 11)
    cache.lookup(T, 1)
    fill(cache, 3, 1, 11)  # evicts 2, the least recently used
    assert cache.lookup(T, 2) == (False, None) and cache.lookup(T, 1)[0] and cache.stats.evictions == 1
    fill(cache, 4, 1, 11)
    cache.apply(batch(12, Change(T, "update", 40, 4, {"id": 40}, True)))  # key 4 moved to 40
    assert cache.lookup(T, 4) == (False, None)


def test_the_client_reads_the_mark_from_the_stream():
    import json

    from cache_sidecar_client import watch
    from cache_sidecar_client.api.v1 import cache_pb2 as pb

    def event(ahead: bool) -> pb.ChangeEvent:
        key = pb.Key(parts=[pb.KeyPart(int_value=1)])
        return pb.ChangeEvent(table=T, operation=pb.UPDATE, key=key, row=b'{"id":1}', has_row=True, ahead=ahead)

    message = pb.WatchResponse(
        changes=pb.ChangeBatch(revision=pb.Revision(epoch="e", number=3), events=[event(True), event(False)])
    )
    [got] = watch.events(message, json.loads)
    assert isinstance(got, ChangeBatch) and [c.ahead for c in got.changes] == [True, False]

"""Listener pieces that need no database: backoff, payload handling."""

from __future__ import annotations

from sidecar.core import events
from sidecar.core.aio import backoff_delay
from sidecar.pg.listener import Listener


def test_backoff_doubles_is_capped_and_jittered():
    assert backoff_delay(0, 0.1, 10, rand=lambda: 0.0) == 0.05
    assert backoff_delay(0, 0.1, 10, rand=lambda: 1.0) == 0.1
    assert backoff_delay(3, 0.1, 10, rand=lambda: 1.0) == 0.8
    assert backoff_delay(50, 0.1, 10, rand=lambda: 1.0) == 10
    assert 5 <= backoff_delay(50, 0.1, 10) <= 10


def make_listener(received: list) -> Listener:
    async def never():  # pragma: no cover - not called here
        raise AssertionError

    return Listener(
        connect=never,
        channel="c",
        on_event=lambda event, pid: received.append(event),
        on_up=lambda: None,
        on_down=lambda reason: None,
    )


def test_good_payloads_become_events_and_bad_ones_are_counted_and_skipped():
    received: list = []
    listener = make_listener(received)
    listener._notified(None, 1, "c", '{"v":1,"s":"a","t":"b","x":1,"op":"D","k":[[1]]}')
    listener._notified(None, 1, "c", "garbage")
    listener._notified(None, 1, "c", '{"v":1,"s":"a","t":"b","x":2,"op":"T","all":"truncate"}')
    assert [type(e) for e in received] == [events.RowChange, events.TableChange]
    assert listener.stats.notifications == 3 and listener.stats.rejected == 1


def test_barrier_tokens_count_only_from_our_own_backend(caplog):
    received: list = []
    listener = make_listener(received)
    listener.backend_pid = 4242
    listener._notified(None, 4242, "c", events.sync_payload("ours"))
    for _ in range(50):  # a flood from another role's session: counted, logged once
        listener._notified(None, 999, "c", events.sync_payload("forged"))
    assert received == [events.SyncToken("ours")]
    assert listener.stats.forged == 50
    assert sum("backend 999" in r.getMessage() for r in caplog.records) == 1


def test_barrier_tokens_are_unguessable():
    from sidecar.core.barrier import new_token

    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000 and all(len(t) >= 22 for t in tokens)  # 128 random bits each

"""Listener pieces that need no database: backoff, payload handling."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from sidecar.core import events
from sidecar.core.aio import backoff_delay
from sidecar.pg.listener import Listener
from tests.support.waiting import eventually


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


class ClosingSlowly:
    """A connection that dies at once and takes its time to close, like a real one whose
    server went away."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()
        self.queries: list[str] = []
        self._closed = False

    def add_termination_listener(self, callback: Any) -> None:
        asyncio.get_running_loop().call_soon(callback, self)

    async def add_listener(self, channel: str, callback: Any) -> None:
        return None

    def get_server_pid(self) -> int:
        return 7

    def is_closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self.closing.set()
        await self.release.wait()
        self._closed = True

    def terminate(self) -> None:
        self._closed = True

    async def fetchrow(self, query: str, *args: Any, timeout: float) -> Any:
        self.queries.append(query)  # (the driver fails this during a close: another operation in progress)
        return None


async def test_no_look_up_runs_on_a_connection_being_closed() -> None:
    conn = ClosingSlowly()
    connects = 0

    async def connect() -> Any:
        nonlocal connects
        connects += 1
        if connects > 1:
            await asyncio.Event().wait()  # (no second connection in this test)
        return conn

    listener = Listener(
        connect=connect, channel="c", on_event=lambda e, p: None, on_up=lambda: None, on_down=lambda r: None
    )
    running = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(conn.closing.wait(), 5)
        with pytest.raises(ConnectionError):
            await listener.fetchrow("SELECT 1", timeout=1)
        assert conn.queries == []
    finally:
        conn.release.set()
        # (cancelled once the close is over: 3.11's wait_for may swallow a cancel that
        # comes as the awaited close completes)
        await eventually(lambda: connects > 1, 5, what="closed and reconnecting")
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

"""The LISTEN connection against a real PostgreSQL, with real faults: a killed
backend, a stalled network (no FIN: only the idle ping can tell)."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from sidecar.core import events
from sidecar.pg.listener import Listener
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

CHANNEL = "listener_test"


class Recorder:
    def __init__(self) -> None:
        self.events: list[events.Event] = []
        self.ups = 0
        self.downs: list[str] = []

    def up(self) -> None:
        self.ups += 1

    def down(self, reason: str) -> None:
        self.downs.append(reason)


@pytest.fixture
async def proxy(postgres):
    if postgres.socket_path is None:
        pytest.skip("the proxy fronts a server this session started")
    proxy = Proxy(unix_path=postgres.socket_path)
    await proxy.start()
    yield proxy
    await proxy.close()


async def start(connect, recorder: Recorder, **timing) -> tuple[Listener, asyncio.Task[None]]:
    listener = Listener(
        connect=connect,
        channel=CHANNEL,
        on_event=lambda event, pid: recorder.events.append(event),
        on_up=recorder.up,
        on_down=recorder.down,
        reconnect_min_delay=0.05,
        reconnect_max_delay=0.2,
        **timing,
    )
    task = asyncio.create_task(listener.run())
    await eventually(lambda: recorder.ups == 1, what="listening")
    return listener, task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_events_arrive_typed_and_bad_payloads_are_skipped(postgres, db):
    recorder = Recorder()
    listener, task = await start(lambda: asyncpg.connect(postgres.dsn), recorder)
    await db.execute(f"NOTIFY {CHANNEL}, 'not json'")
    await db.execute(f"""NOTIFY {CHANNEL}, '{{"v":1,"s":"a","t":"b","x":5,"op":"I","k":[[1]]}}'""")
    await eventually(lambda: len(recorder.events) == 1, what="event")
    assert isinstance(recorder.events[0], events.RowChange)
    assert listener.stats.rejected == 1 and listener.stats.notifications == 2
    await stop(task)


async def test_killed_backend_is_noticed_at_once_and_replaced(postgres, db):
    recorder = Recorder()
    listener, task = await start(lambda: asyncpg.connect(postgres.dsn), recorder, ping_interval=60)
    old_pid = listener.backend_pid
    assert await db.fetchval("SELECT pg_terminate_backend($1)", old_pid)
    # The ping would take a minute: the termination callback is what notices.
    await eventually(lambda: recorder.ups == 2, timeout=5, what="reconnected")
    assert recorder.downs == ["connection closed"]
    assert listener.backend_pid != old_pid
    await db.execute(f"""NOTIFY {CHANNEL}, '{{"v":1,"s":"a","t":"b","x":6,"op":"D","k":[[2]]}}'""")
    await eventually(lambda: len(recorder.events) == 1, what="event on the new connection")
    await stop(task)


async def test_stalled_network_is_found_by_the_idle_ping(postgres, proxy):
    recorder = Recorder()

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres", timeout=2)

    listener, task = await start(connect, recorder, ping_interval=0.3, ping_timeout=0.3)
    proxy.stall()
    await eventually(lambda: recorder.downs, timeout=5, what="stall detected")
    assert recorder.downs[0].startswith("ping unanswered")
    assert not listener.connected
    proxy.resume()
    await eventually(lambda: recorder.ups >= 2 and listener.connected, timeout=10, what="reconnected")
    await stop(task)


async def test_unreachable_database_is_retried_with_backoff(postgres):
    recorder = Recorder()
    attempts = []

    async def connect() -> asyncpg.Connection:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) <= 3:
            raise ConnectionRefusedError("refused")
        return await asyncpg.connect(postgres.dsn)

    _listener, task = await start(connect, recorder)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # doubling from 0.05 s (half jittered), capped at 0.2 s (slack for a loaded machine)
    assert len(attempts) == 4 and gaps[1] >= gaps[0] * 0.9 and all(g <= 1.0 for g in gaps)
    await stop(task)


async def test_killed_backend_is_noticed_at_once_while_barrier_notifies_are_in_flight(postgres, db):
    """A kill that races with an operation on the connection can leave asyncpg unsure of its
    state (InternalClientError) and skip the termination callback: the failed operation
    itself must count as the loss, not the next idle ping a minute later."""
    recorder = Recorder()
    listener, task = await start(lambda: asyncpg.connect(postgres.dsn), recorder, ping_interval=60)

    async def barrier_rounds() -> None:
        while True:
            try:
                await listener.notify(events.sync_payload("t"), 5)
            except Exception:
                await asyncio.sleep(0.001)

    senders = [asyncio.create_task(barrier_rounds()) for _ in range(3)]
    slowest = 0.0
    for kill in range(20):
        await eventually(lambda: listener.connected, timeout=10, what="connected")
        await eventually(lambda k=kill: listener.stats.notifications > 10 * (k + 1), timeout=10, what="rounds flowing")
        downs = len(recorder.downs)
        started = asyncio.get_running_loop().time()
        assert await db.fetchval("SELECT pg_terminate_backend($1)", listener.backend_pid)
        await eventually(lambda d=downs: len(recorder.downs) > d, timeout=10, interval=0.001, what="loss noticed")
        slowest = max(slowest, asyncio.get_running_loop().time() - started)
    for sender in senders:
        sender.cancel()
    await asyncio.gather(*senders, return_exceptions=True)
    assert slowest < 1.0, f"a kill took {slowest:.3f}s to notice"
    await stop(task)

"""The sender check of whole-table changes (``senders.SenderGate``): strangers' are
dropped, writers' and unknown senders' applied, order kept while a look-up runs,
one look-up per (backend, table) while its verdict lasts."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.core.events import Event, Op, RowChange, SyncToken, TableChange
from sidecar.errors import Unavailable
from sidecar.pg.senders import KEEP, SenderGate, Verdict
from tests.support.waiting import eventually

WRITER, STRANGER, GONE, BROKEN = 10, 20, 30, 40


def whole(table: str = "t", xid: int = 1) -> TableChange:
    return TableChange("s", table, Op.TRUNCATE, xid, "truncate")


def row(xid: int = 1) -> RowChange:
    return RowChange("s", "t", Op.UPDATE, xid, ((1,),))


class Harness:
    def __init__(self) -> None:
        self.delivered: list[Event] = []
        self.looked_up: list[tuple[int, str, str]] = []
        self.errors: list[BaseException] = []
        self.gates: dict[int, asyncio.Event] = {}  # pid -> released when its look-up may answer
        self.now = 0.0
        self.gate = SenderGate(
            deliver=self.delivered.append,
            check=self.check,
            hears=lambda schema, table: table != "other",
            on_error=self.errors.append,
            clock=lambda: self.now,
        )

    async def check(self, pid: int, schema: str, table: str) -> bool | None:
        self.looked_up.append((pid, schema, table))
        if pid in self.gates:
            await self.gates[pid].wait()
        if pid == BROKEN:
            raise Unavailable("the pool is away")
        return {WRITER: True, STRANGER: False}.get(pid)


async def test_a_strangers_whole_table_change_is_dropped_and_one_look_up_serves_many():
    h = Harness()
    for xid in range(1, 6):
        h.gate.receive(whole(xid=xid), STRANGER)
    h.gate.receive(SyncToken("after"), 1)
    await eventually(lambda: h.delivered == [SyncToken("after")], what="the token, alone")
    assert h.gate.stats.dropped == 5 and h.looked_up == [(STRANGER, "s", "t")]


async def test_a_failed_look_up_is_not_kept():
    h = Harness()
    h.gate.receive(whole(xid=1), BROKEN)
    await eventually(lambda: len(h.delivered) == 1, what="applied")
    h.gate.receive(whole(xid=2), BROKEN)  # asked again: the database may answer now
    await eventually(lambda: len(h.delivered) == 2, what="applied again")
    assert len(h.looked_up) == 2 and h.gate.stats.unknown == 2


async def test_writers_and_unknown_senders_are_applied():
    h = Harness()
    h.gate.receive(whole(xid=1), WRITER)
    h.gate.receive(whole(xid=2), GONE)  # (its backend exited before the look-up)
    h.gate.receive(whole(xid=3), BROKEN)  # (the look-up failed)
    await eventually(lambda: len(h.delivered) == 3, what="all three applied")
    assert [e.xid for e in h.delivered] == [1, 2, 3]  # type: ignore[union-attr]
    assert h.gate.stats.unknown == 2 and h.gate.stats.dropped == 0 and h.errors == []


async def test_events_behind_a_look_up_wait_and_keep_their_order():
    h = Harness()
    h.gates[WRITER] = asyncio.Event()
    h.gate.receive(row(1), 1)  # nothing to check: on at once
    h.gate.receive(whole(xid=2), WRITER)
    h.gate.receive(row(3), 1)
    h.gate.receive(SyncToken("x"), 1)
    h.gate.receive(whole("other", 4), STRANGER)  # a table nobody here hears of: never checked
    assert h.delivered == [row(1)] and h.gate.held == 4
    h.gates[WRITER].set()
    await eventually(lambda: len(h.delivered) == 5, what="the held events")
    assert h.delivered == [row(1), whole(xid=2), row(3), SyncToken("x"), whole("other", 4)]
    assert h.looked_up == [(WRITER, "s", "t")]


async def test_row_changes_are_not_checked():
    h = Harness()
    h.gate.receive(row(1), STRANGER)
    assert h.delivered == [row(1)] and h.looked_up == []


async def test_a_verdict_expires():
    h = Harness()
    h.gate.receive(whole(), STRANGER)
    await eventually(lambda: h.gate.stats.dropped == 1, what="dropped")
    h.now += KEEP[Verdict.STRANGER] + 0.1  # (a PID may be reused: ask again)
    h.gate.receive(whole(), STRANGER)
    await eventually(lambda: h.gate.stats.dropped == 2, what="dropped again")
    assert len(h.looked_up) == 2


async def test_a_lost_connection_throws_away_what_is_held():
    h = Harness()
    h.gates[WRITER] = asyncio.Event()
    h.gate.receive(whole(xid=1), WRITER)
    h.gate.receive(row(2), 1)
    h.gate.clear()  # (a rebuild follows: these are gone with the connection)
    h.gate.receive(row(3), 1)  # the new connection's events do not wait for the old look-up
    assert h.delivered == [row(3)]
    h.gates[WRITER].set()
    await eventually(lambda: h.gate._checking is False and not h.gate._tasks, what="the look-up ended")
    assert h.delivered == [row(3)]
    await h.gate.close()


async def test_a_failure_to_apply_after_a_look_up_is_reported():
    h = Harness()

    def deliver(event: Event) -> None:
        raise RuntimeError("a bug")

    h.gate._deliver = deliver
    h.gate.receive(whole(), WRITER)
    await eventually(lambda: h.errors, what="the failure reported")
    assert isinstance(h.errors[0], RuntimeError)
    with pytest.raises(RuntimeError):
        h.gate.receive(row(), 1)  # (but not held: raised to the listener, as before)


async def test_the_verdicts_kept_are_bounded(monkeypatch):
    monkeypatch.setattr("sidecar.pg.senders.MAX_VERDICTS", 2)
    h = Harness()
    for table in ("a", "b", "c", "a"):  # "a" was forgotten when "c" came
        h.gate.receive(whole(table), STRANGER)
        await eventually(lambda: not h.gate.held, what="looked up")
    assert [t for _, _, t in h.looked_up] == ["a", "b", "c", "a"] and len(h.gate._verdicts) == 2

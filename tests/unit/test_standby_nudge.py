"""A slot made on a standby becomes consistent only at a running-transactions record from
the primary, which an idle primary never writes: while the slot's creation waits, the
primary is nudged (``primary.Primary.nudge``), each NUDGE_INTERVAL."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from sidecar.pg import logical
from sidecar.pg.logical import LogicalSource

pytestmark = pytest.mark.asyncio


class FakePrimary:
    def __init__(self) -> None:
        self.nudges = 0
        self.logged = threading.Event()  # the primary wrote the record the slot waits for

    async def nudge(self) -> None:
        self.nudges += 1
        self.logged.set()


def _source(primary: Any) -> LogicalSource:
    return LogicalSource(
        database=None,  # type: ignore[arg-type]  (not reached: only the slot's creation runs)
        conninfo="",
        publication="p",
        tables={},
        query_timeout=5.0,
        primary=primary,
    )


async def test_a_slot_on_a_standby_is_made_once_the_primary_is_nudged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logical, "NUDGE_INTERVAL", 0.01)
    primary = FakePrimary()
    source = _source(primary)

    def create_slot(slot: str) -> tuple[int, str]:
        if not primary.logged.wait(timeout=10):  # (an idle primary: it would wait forever)
            raise TimeoutError("no running-transactions record came")
        return 42, "00000003-00000002-1"

    source._create_slot = create_slot  # type: ignore[method-assign]
    assert await source._created("s") == (42, "00000003-00000002-1")
    assert primary.nudges >= 1


async def test_on_the_primary_the_slot_is_made_without_nudges() -> None:
    source = _source(None)
    source._create_slot = lambda slot: (7, "snap")  # type: ignore[method-assign]
    assert await source._created("s") == (7, "snap")


class FakeDatabase:
    pool = object()


async def test_reads_that_come_together_share_one_freshness_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads the standby answers while the stream is down wait for it to replay the primary's
    position as of the read: one statement on the primary for reads that come together, a
    new one for a read that comes after a round has sent its own."""
    asked: list[str] = []
    waited: list[str] = []

    class Positions:
        async def current_position(self) -> str:
            asked.append(f"0/{len(asked) + 1}")
            return asked[-1]

    async def replayed(pool: Any, position: str, timeout: float) -> None:
        waited.append(position)

    monkeypatch.setattr(logical, "replayed", replayed)
    source = _source(Positions())
    source._database = FakeDatabase()  # type: ignore[assignment]
    await asyncio.gather(*(source.database_fresh() for _ in range(5)))
    assert asked == ["0/1"] and waited == ["0/1"]
    await source.database_fresh()
    assert asked == ["0/1", "0/2"]
    await _source(None).database_fresh()  # (a primary: nothing to ask, nothing to wait for)
    assert asked == ["0/1", "0/2"]

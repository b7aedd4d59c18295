"""A slot made on a standby becomes consistent only at a running-transactions record from
the primary, which an idle primary never writes: while the slot's creation waits, the
primary is nudged (``primary.Primary.nudge``), each NUDGE_INTERVAL."""

from __future__ import annotations

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

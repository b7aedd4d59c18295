"""Load progress: rows so far, rate and time left, on a fake clock; logged at intervals."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sidecar.core import progress
from sidecar.core.progress import LoadProgress
from sidecar.errors import Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ChunkedDatabase:
    """A Database's ``load``/``estimate`` that advance the clock as rows arrive."""

    def __init__(self, clock: Clock, chunks: list[int], estimate: Any = 1000, fail_after: int | None = None) -> None:
        self.clock = clock
        self.chunks = chunks
        self._estimate = estimate
        self.fail_after = fail_after

    async def estimate(self, schema: Any) -> int | None:
        if isinstance(self._estimate, BaseException):
            raise self._estimate
        return self._estimate  # type: ignore[no-any-return]

    async def load(self, schema: Any, seen: Callable[[str], None] | None = None) -> AsyncIterator[dict[Any, bytes]]:
        start = 0
        for index, size in enumerate(self.chunks):
            if self.fail_after is not None and index == self.fail_after:
                raise Unavailable("the database went away")
            self.clock.now += 1.0  # one second per chunk
            yield {(start + i,): b"x" for i in range(size)}
            start += size


class Schema:
    qualified = "public.big"


async def drain(tracker: LoadProgress, db: ChunkedDatabase, seen: list[Any] | None = None) -> int:
    rows = 0
    async for chunk in tracker.track(db, Schema()):  # type: ignore[arg-type]
        rows += len(chunk)
        if seen is not None:
            seen.append(tracker.state())
    return rows


def test_nothing_before_the_first_load():
    state = LoadProgress("public.big", clock=Clock()).state()
    assert (state.running, state.rows, state.expected, state.seconds, state.rate, state.eta, state.completed) == (
        False,
        0,
        None,
        0.0,
        0.0,
        None,
        0,
    )


async def test_rate_and_time_left_while_loading_then_the_totals():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    seen: list[Any] = []
    assert await drain(tracker, ChunkedDatabase(clock, [100, 100, 300, 500]), seen) == 1000
    first, second, third = seen[0], seen[1], seen[2]
    assert first.running and first.rows == 100 and first.expected == 1000
    assert first.seconds == 1.0 and first.rate == 100.0 and first.eta == pytest.approx(9.0)
    assert second.rows == 200 and second.rate == 100.0 and second.eta == pytest.approx(8.0)
    assert third.rows == 500 and third.rate == pytest.approx(500 / 3) and third.eta == pytest.approx(3.0)
    assert seen[3].eta is None  # every expected row is in: nothing left to tell
    clock.now += 50.0  # time after the load does not count
    done = tracker.state()
    assert not done.running and done.completed == 1 and done.rows == 1000
    assert done.seconds == 4.0 and done.rate == 250.0 and done.eta is None


async def test_the_clock_runs_while_waiting_for_a_chunk():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    tracker.start(1000)
    tracker.advance(100)
    clock.now += 4.0
    state = tracker.state()
    assert state.seconds == 4.0 and state.rate == 25.0 and state.eta == pytest.approx(36.0)


async def test_an_estimate_below_the_rows_so_far_gives_no_time_left():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    seen: list[Any] = []
    await drain(tracker, ChunkedDatabase(clock, [300, 300], estimate=400), seen)
    assert seen[1].running and seen[1].rows == 600 and seen[1].eta is None


async def test_no_estimate_when_the_database_cannot_tell():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    seen: list[Any] = []
    await drain(tracker, ChunkedDatabase(clock, [10], estimate=Unavailable("timeout")), seen)
    assert seen[0].expected is None and seen[0].eta is None and seen[0].rate == 10.0
    assert tracker.state().completed == 1


async def test_a_failed_load_stops_without_completing():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    with pytest.raises(Unavailable):
        await drain(tracker, ChunkedDatabase(clock, [100, 100, 100], fail_after=2))
    state = tracker.state()
    assert not state.running and state.completed == 0 and state.rows == 200


async def test_an_abandoned_load_stops_without_completing():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    chunks = tracker.track(ChunkedDatabase(clock, [100, 100, 100]), Schema())  # type: ignore[arg-type]
    await anext(chunks)
    assert tracker.state().running
    await chunks.aclose()  # (the reload was cancelled)
    assert not tracker.state().running and tracker.state().completed == 0


async def test_a_reload_starts_counting_again():
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock)
    await drain(tracker, ChunkedDatabase(clock, [100, 100]))
    seen: list[Any] = []
    await drain(tracker, ChunkedDatabase(clock, [50]), seen)
    assert seen[0].rows == 50 and seen[0].seconds == 1.0
    assert tracker.state().completed == 2


async def test_long_loads_log_at_intervals(caplog, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress, "LOG_INTERVAL", 2.5)
    tracker = LoadProgress("public.big", clock=clock)
    with caplog.at_level(logging.INFO, logger="sidecar.core.progress"):
        await drain(tracker, ChunkedDatabase(clock, [100] * 10))
    lines = [r for r in caplog.records if getattr(r, "event", None) == "table_load_progress"]
    # After 3 s (the first chunk at or past 2.5 s), then 6 s and 9 s.
    assert [r.rows for r in lines] == [300, 600, 900]  # type: ignore[attr-defined]
    assert lines[0].getMessage() == ("loading public.big: 300 rows of ~1,000 (30%) in 3.0s, 100 rows/s, about 7s left")
    assert lines[0].eta_seconds == 7.0  # type: ignore[attr-defined]


async def test_short_loads_do_not_log(caplog):
    clock = Clock()
    tracker = LoadProgress("public.big", clock=clock, interval=10.0)
    with caplog.at_level(logging.INFO, logger="sidecar.core.progress"):
        await drain(tracker, ChunkedDatabase(clock, [100] * 9))
    assert not [r for r in caplog.records if getattr(r, "event", None) == "table_load_progress"]

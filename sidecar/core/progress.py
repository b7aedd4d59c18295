"""How far a table's (re)load has got: rows so far, rate, and time left.

A load of a big table takes seconds. ``LoadProgress`` counts its chunks as they
land, logs a line at intervals while a load runs long, and holds what
ListTables and the metrics show. The expected row count is the database's
estimate (``Database.estimate``: the planner's, so it may be off); the time
left is only given while the rows so far are below it. Plain Python: the clock
is given, so unit tests drive it with a fake one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sidecar.core.schema import TableSchema
from sidecar.core.source import Database, Rows
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

LOG_INTERVAL = 5.0  # seconds between progress lines of one long load (a plain variable: tests change it)


@dataclass(frozen=True)
class LoadState:
    """One moment of a table's loads (what ListTables and the metrics show)."""

    running: bool  # a (re)load is due or in progress (memory answers no read of the table)
    rows: int  # rows read so far by the running load, or by the last one
    expected: int | None  # the estimate of the table's rows when the running or last load began
    seconds: float  # time the running load has taken so far, or the last one took
    rate: float  # rows per second of the running or last load (0 before any row)
    eta: float | None  # seconds left, if it can be told (running, an estimate, rows below it)
    completed: int  # loads that finished (the first one and every reload)


class LoadProgress:
    """The loads of one table, one at a time (the table runs at most one)."""

    def __init__(
        self,
        table: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
        due: Callable[[], bool] = lambda: False,
    ) -> None:
        self.table = table
        self._clock = clock
        self._interval = interval
        # A load the table needs and has not begun (it waits for refetches in flight to
        # land, or to retry): reads already go to the database, so it shows as running.
        self._due = due
        self._running = False
        self._rows = 0
        self._expected: int | None = None
        self._started = 0.0
        self._ended = 0.0
        self._next_log = 0.0
        self._begun = False
        self.completed = 0

    async def track(
        self, db: Database, schema: TableSchema, seen: Callable[[str], None] | None = None
    ) -> AsyncIterator[Rows]:
        """``db.load(schema)``, chunk by chunk, counted as they land (``seen``: see
        ``Database.load``)."""
        self.start(await _estimate(db, schema))
        finished = False
        chunks = db.load(schema) if seen is None else db.load(schema, seen)
        try:
            async for chunk in chunks:
                self.advance(len(chunk))
                yield chunk
            finished = True
        finally:
            self.stop(finished)
            # (closed now if this is: left to the garbage collector, the load would go on)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def start(self, expected: int | None) -> None:
        """A load begins; ``expected`` is the estimate of its rows, if there is one."""
        self._running = self._begun = True
        self._rows = 0
        self._expected = expected
        self._started = self._ended = self._clock()
        self._next_log = self._started + self._log_interval

    def advance(self, rows: int) -> None:
        """``rows`` more rows have been read."""
        self._rows += rows
        now = self._ended = self._clock()
        if now >= self._next_log:
            self._next_log = now + self._log_interval
            self._log()

    def stop(self, finished: bool) -> None:
        """The load ended: ``finished`` (every row read) or not (it failed or was abandoned)."""
        if not self._running:
            return
        self._running = False
        self._ended = self._clock()
        if finished:
            self.completed += 1

    @property
    def _log_interval(self) -> float:
        return LOG_INTERVAL if self._interval is None else self._interval

    def state(self) -> LoadState:
        running = self._running or self._due()
        if not self._begun:
            return LoadState(running, 0, None, 0.0, 0.0, None, 0)
        seconds = max(0.0, (self._clock() if self._running else self._ended) - self._started)
        rate = self._rows / seconds if seconds > 0 else 0.0
        eta = None
        if self._running and self._expected is not None and rate > 0 and self._rows < self._expected:
            eta = (self._expected - self._rows) / rate
        return LoadState(running, self._rows, self._expected, seconds, rate, eta, self.completed)

    def _log(self) -> None:
        state = self.state()
        if state.expected:
            share = f" of ~{state.expected:,} ({min(100.0, 100.0 * state.rows / state.expected):.0f}%)"
        else:
            share = ""
        left = f", about {state.eta:.0f}s left" if state.eta is not None else ""
        log.info(
            "loading %s: %s rows%s in %.1fs, %s rows/s%s",
            self.table,
            f"{state.rows:,}",
            share,
            state.seconds,
            f"{state.rate:,.0f}",
            left,
            extra={
                "event": "table_load_progress",
                "table": self.table,
                "rows": state.rows,
                "expected_rows": state.expected,
                "seconds": round(state.seconds, 3),
                "rows_per_second": round(state.rate),
                "eta_seconds": None if state.eta is None else round(state.eta, 1),
            },
        )


async def _estimate(db: Database, schema: TableSchema) -> int | None:
    """The database's estimate of the rows a load will read; None if it cannot tell (the
    load itself then says whether the database is there)."""
    try:
        return await db.estimate(schema)
    except SidecarError as exc:
        log.debug("no row estimate for %s: %s", schema.qualified, exc)
        return None

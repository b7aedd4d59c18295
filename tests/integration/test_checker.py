"""The consistency checker's short run (the long one: python -m tests.checker --duration 300)."""

from __future__ import annotations

import asyncio

from tests import checker


async def test_checker_finds_no_broken_promise_under_faults(postgres):
    restart = postgres.restart if postgres.can_restart else None
    report = await asyncio.to_thread(checker.run, postgres.dsn, restart, 25.0)
    print(report.table())
    assert report.reads > 1000 and report.strong_reads > 100 and report.writes_acked > 1000
    assert report.listener_kills >= 3
    assert report.barrier_kills >= 1 and max(report.kill_to_epoch) < 1.0  # a kill mid-barrier is noticed at once
    assert report.restarts == (1 if restart else 0)
    assert report.stale_strong_reads == 0, report.examples
    assert report.backwards_reads == 0, report.examples
    assert report.mismatched_rows == 0 and report.compared_rows == 3 * checker.ROWS, report.examples

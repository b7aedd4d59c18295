"""The NOTIFY queue watch: a warning when it passes the documented threshold, once per
further 10 points, and a note when it is back."""

from __future__ import annotations

import logging

from sidecar.pg.notify_queue import WARN_AT, NotifyQueue


class FakePool:
    def __init__(self, *usages: float) -> None:
        self.usages = list(usages)

    def acquire(self, timeout: float) -> FakePool:
        return self

    async def __aenter__(self) -> FakePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchval(self, sql: str) -> float:
        assert "pg_catalog.pg_notification_queue_usage()" in sql
        return self.usages.pop(0)


async def test_warns_above_half_full_and_says_when_it_is_back(caplog):
    caplog.set_level(logging.INFO, logger="sidecar.pg.notify_queue")
    queue = NotifyQueue()
    pool = FakePool(0.1, 0.55, 0.58, 0.7, 0.3)
    for _ in range(5):
        await queue.sample(pool)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "55% full" in warnings[0] and "70% full" in warnings[1]
    assert "every write to a cached table fails" in warnings[0]
    assert any("back to 30%" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert queue.usage == 0.3 and WARN_AT == 0.5


async def test_a_database_away_leaves_the_usage_unknown():
    class Away(FakePool):
        async def fetchval(self, sql: str) -> float:
            raise ConnectionRefusedError("away")

    queue = NotifyQueue()
    queue.observe(0.2)
    await queue.sample(Away())
    assert queue.usage is None

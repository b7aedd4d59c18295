"""PostgreSQL's NOTIFY queue, watched.

Every notification waits in one queue (8 GB by default) until every listener
has read it. A session that LISTENs and then sits in an open transaction --
any role can -- holds the queue's tail, and once the queue is full every
transaction that sends a NOTIFY fails at commit with "too many notifications
in the NOTIFY queue": writes to every cached table *fail*. This samples
``pg_notification_queue_usage()`` and warns well before that.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 15.0  # seconds between samples
WARN_AT = 0.5  # the documented alert threshold
WARN_STEP = 0.1  # warn again each time usage has risen this much more
CLEAR_AT = 0.4  # back below this: say so once


class NotifyQueue:
    """The latest ``pg_notification_queue_usage()`` (None: not known) and its warnings."""

    def __init__(self) -> None:
        self.usage: float | None = None
        self._warned_at: float | None = None  # usage at the last warning, while above WARN_AT

    async def run(self, pool: Any) -> None:
        while True:
            await self.sample(pool)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def sample(self, pool: Any) -> None:
        try:
            async with pool.acquire(timeout=5) as conn:
                usage = float(await conn.fetchval("SELECT pg_catalog.pg_notification_queue_usage()"))
        except Exception as exc:  # the database may be away: the listener reports that
            log.debug("cannot sample pg_notification_queue_usage(): %s", exc)
            self.usage = None
            return
        self.observe(usage)

    def observe(self, usage: float) -> None:
        self.usage = usage
        if usage >= WARN_AT and (self._warned_at is None or usage >= self._warned_at + WARN_STEP):
            self._warned_at = usage
            log.warning(
                "PostgreSQL's NOTIFY queue is %.0f%% full: at 100%% every write to a cached table fails "
                "('too many notifications in the NOTIFY queue'); a session that LISTENs inside a long "
                "open transaction holds it (find it in pg_stat_activity: state 'idle in transaction')",
                usage * 100,
                extra={"event": "notify_queue_filling", "usage": usage},
            )
        elif usage < CLEAR_AT and self._warned_at is not None:
            self._warned_at = None
            log.info("PostgreSQL's NOTIFY queue is back to %.0f%% full", usage * 100)

"""How far the standby a hub decodes on is behind its primary, as the hub sees it.

Sampled on the standby (the query pool), every ``SAMPLE_INTERVAL`` seconds, never on the
primary: the primary's end of WAL is known from two places at no cost to it, the standby's
WAL receiver (``pg_stat_wal_receiver.latest_end_lsn``: the end the primary last told it of)
and the hub's own last read barrier (the position its token was written at, which
``pg_logical_emit_message`` returns). The lag is the WAL from the later of the two to what
the standby has replayed -- its walsender decodes nothing beyond that -- and, while there
is any, the seconds since the standby replayed its last commit. A stalled link shows once
a barrier has been asked for past it: the receiver hears nothing new, the barrier's
position does. Reads are never stale for it (a barrier waits for its token in the
standby's stream); they are slow, and this says why.

``pg_stat_wal_receiver`` shows its positions only to superusers and members of
``pg_read_all_stats`` (``pg_monitor``): without that, the barrier's position alone is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.core.source import StandbyLag

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 5.0  # seconds between samples (read at each sleep: tests may change it)

STANDBY_LAG_SQL = """
SELECT pg_catalog.pg_is_in_recovery() AS standby,
       pg_catalog.pg_wal_lsn_diff(
           GREATEST(r.latest_end_lsn, r.flushed_lsn, $1::pg_catalog.text::pg_catalog.pg_lsn),
           pg_catalog.pg_last_wal_replay_lsn())::pg_catalog.int8 AS behind_bytes,
       pg_catalog.date_part('epoch', pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp())
           AS since_replayed,
       coalesce(r.status = 'streaming', false) AS receiving
  FROM (SELECT) AS one LEFT JOIN pg_catalog.pg_stat_wal_receiver r ON true
"""


@dataclass(frozen=True)
class StandbySample:
    behind_bytes: int  # WAL the primary has (as last heard of) that the standby has not replayed
    behind_seconds: float  # 0 when caught up; else seconds since the standby replayed a commit
    receiving: bool  # its WAL receiver is streaming from the primary
    standby: bool  # still a standby (False: promoted)


class StandbyWatch:
    """The latest ``StandbySample`` of the standby ``database.dsn`` is."""

    def lag(self) -> StandbyLag | None:
        """The latest sample, as ListTables shows it (None: none, or no longer a standby)."""
        sample = self.sample
        if sample is None or not sample.standby:
            return None
        return StandbyLag(sample.behind_bytes, sample.behind_seconds, sample.receiving)

    def __init__(
        self,
        barrier_position: Callable[[], str | None],
        query_timeout: float,
        on_promoted: Callable[[], None] = lambda: None,
    ) -> None:
        self._barrier_position = barrier_position  # the last barrier token's position on the primary
        self._on_promoted = on_promoted  # told when a sample finds it no longer a standby
        self.query_timeout = query_timeout
        self.sample: StandbySample | None = None
        self.failures = 0

    async def run(self, pool: Any) -> None:
        while True:
            await self.sample_once(pool)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def sample_once(self, pool: Any) -> None:
        try:
            async with pool.acquire(timeout=self.query_timeout) as conn:
                row = await conn.fetchrow(STANDBY_LAG_SQL, self._barrier_position(), timeout=self.query_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (the database may be away: the stream reports that)
            self.failures += 1
            log.debug("cannot read the standby's replay state: %s", exc)
            self.sample = None
            return
        behind = max(0, int(row["behind_bytes"] or 0))
        since = row["since_replayed"]
        self.sample = StandbySample(
            behind_bytes=behind,
            behind_seconds=max(0.0, float(since)) if behind > 0 and since is not None else 0.0,
            receiving=bool(row["receiving"]),
            standby=bool(row["standby"]),
        )
        if not self.sample.standby:
            self._on_promoted()

"""The replication slot of logical capture, watched: how much WAL it holds back.

A logical slot makes the server keep every WAL segment from the slot's ``restart_lsn``
on, until its consumer confirms it has what comes before. The sidecar confirms every
second, so the slot normally holds little; a sidecar that falls behind (its event loop
saturated, a network stall short of a lost connection) makes the server keep WAL --
without ``max_slot_wal_keep_size`` until its disk fills, with it until the slot is
invalidated (the stream then breaks and the sidecar rebuilds from a new slot).

This samples ``pg_replication_slots`` for the sidecar's own slot on the query pool,
bounded by ``query_timeout``, in its own task: it never waits on, nor fails, the stream.
A failed sample leaves nothing known (the stream's own state says why the database is
away). ``wal_status`` and ``safe_wal_size`` (PostgreSQL 13+) are read when the server has
them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 15.0  # seconds between samples (read at each sleep: tests may change it)
# wal_status values (pg_replication_slots): reserved and extended are safe; unreserved: the
# slot will be invalidated at the next checkpoint unless it catches up; lost: it was.
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
_TROUBLE = ("unreserved", "lost")

# (to_jsonb(s): wal_status and safe_wal_size are read on servers that have them, null before 13;
# on a standby, the WAL position is the replayed one)
SLOT_SQL = """
SELECT pg_catalog.pg_wal_lsn_diff(
           CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                ELSE pg_catalog.pg_current_wal_lsn() END,
           s.restart_lsn)::pg_catalog.int8 AS retained,
       pg_catalog.to_jsonb(s) OPERATOR(pg_catalog.->>) 'wal_status' AS wal_status,
       (pg_catalog.to_jsonb(s) OPERATOR(pg_catalog.->>) 'safe_wal_size')::pg_catalog.int8 AS safe_wal_size
FROM pg_catalog.pg_replication_slots s
WHERE s.slot_name = $1
"""


@dataclass(frozen=True)
class SlotSample:
    """One reading of the slot, as ``pg_replication_slots`` says."""

    slot: str  # the slot it is of (a reconnect makes a new slot: an older sample is not shown)
    retained: int | None  # bytes of WAL from restart_lsn to the server's current position (None: no restart_lsn)
    wal_status: str | None  # reserved, extended, unreserved, lost (None: before PostgreSQL 13)
    safe_wal_size: int | None  # bytes that may still be written before the slot is in danger (None: no limit)


class SlotWatch:
    """The latest ``SlotSample`` of the slot ``slot_name()`` names ("": none now), and a
    warning when the server is about to drop, or has dropped, the WAL it needs."""

    def __init__(self, slot_name: Callable[[], str], query_timeout: float) -> None:
        self._slot_name = slot_name
        self.query_timeout = query_timeout
        self._sample: SlotSample | None = None
        self.failures = 0  # samples that could not be taken (the database away, a timeout)

    @property
    def sample(self) -> SlotSample | None:
        """The latest sample of the current slot (None: none yet, or the slot is gone)."""
        sample = self._sample
        if sample is None or sample.slot != self._slot_name():
            return None
        return sample

    async def run(self, pool: Any) -> None:
        while True:
            await self.sample_once(pool)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def sample_once(self, pool: Any) -> None:
        name = self._slot_name()
        if not name:
            self._sample = None
            return
        try:
            async with pool.acquire(timeout=self.query_timeout) as conn:
                row = await conn.fetchrow(SLOT_SQL, name, timeout=self.query_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # (the database may be away: the stream reports that)
            self.failures += 1
            log.debug("cannot read replication slot %s: %s", name, exc)
            self._sample = None
            return
        if row is None:  # (gone with its connection: the stream is reconnecting)
            self._sample = None
            return
        self.observe(
            SlotSample(
                slot=name,
                retained=_int(row["retained"]),
                wal_status=str(row["wal_status"]) if row["wal_status"] is not None else None,
                safe_wal_size=_int(row["safe_wal_size"]),
            )
        )

    def observe(self, sample: SlotSample) -> None:
        before = self._sample.wal_status if self._sample is not None and self._sample.slot == sample.slot else None
        self._sample = sample
        status = sample.wal_status
        if status in _TROUBLE and status != before:
            log.warning(
                "replication slot %s: wal_status %s (%s bytes of WAL retained): %s",
                sample.slot,
                status,
                sample.retained,
                "the server will remove WAL it still needs at the next checkpoint unless the sidecar "
                "catches up (max_slot_wal_keep_size); the stream then breaks and every table is rebuilt"
                if status == "unreserved"
                else "the server removed WAL it still needed (max_slot_wal_keep_size); the stream breaks "
                "and every table is rebuilt from a new slot",
                extra={"event": "slot_wal_" + status, "slot": sample.slot, "retained": sample.retained},
            )


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None

"""Logical capture's metrics on a real server: the WAL the slot retains rises with writes
and falls once the stream has confirmed past them; the stream's state and its losses."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.pg import slot_watch
from tests.support.waiting import eventually

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


def scrape(address: str) -> dict[str, float]:
    """The unlabelled series (and wal_status's by status), by name."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            suffix = f"{{{sample.labels['status']}}}" if "status" in sample.labels else ""
            if not sample.labels or suffix:
                found[sample.name + suffix] = sample.value
    return found


class Scraper:
    def __init__(self, address: str) -> None:
        self.address = address
        self.last: dict[str, float] = {}

    async def __call__(self) -> dict[str, float]:
        self.last = await asyncio.to_thread(scrape, self.address)
        return self.last

    async def until(self, condition: Any, what: str, timeout: float = 30.0) -> dict[str, float]:
        async def met() -> bool:
            return bool(condition(await self()))

        await eventually(met, timeout, interval=0.2, what=what)
        return self.last


@pytest.fixture(autouse=True)
def sample_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slot_watch, "SAMPLE_INTERVAL", 0.2)


async def retained(scraper: Scraper) -> float:
    return (await scraper()).get("cache_sidecar_slot_retained_bytes", -1.0)


async def test_retained_wal_rises_with_writes_and_falls_once_confirmed(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    conn = await asyncpg.connect(logical_dsn)
    try:
        await conn.execute(f"CREATE TABLE {lschema}.t (id int PRIMARY KEY, v text)")
        await conn.execute(f"INSERT INTO {lschema}.t VALUES (1, 'a')")
        sidecar = await start_logical([f"{lschema}.t"], metrics_listen="127.0.0.1:0")
        scraper = Scraper(sidecar.daemon.metrics_address)
        first = await scraper.until(lambda s: "cache_sidecar_slot_retained_bytes" in s, "a slot sample")
        assert first["cache_sidecar_replication_connected"] == 1
        assert first["cache_sidecar_slot_wal_status{reserved}"] == 1  # (PostgreSQL 13+)
        assert first["cache_sidecar_slot_retained_bytes"] < MiB

        # ~6 MB of WAL the slot must keep until the stream has confirmed it
        await conn.execute(f"INSERT INTO {lschema}.t SELECT g, repeat('x', 200) FROM generate_series(2, 20001) g")
        high = await scraper.until(lambda s: s.get("cache_sidecar_slot_retained_bytes", 0) > 4 * MiB, "WAL retained")
        assert high["cache_sidecar_slot_retained_bytes"] > 4 * MiB

        # The server moves a logical slot's restart_lsn past a running-transactions record
        # it has decoded once the consumer confirms a position beyond it: a checkpoint
        # writes one, and the stream confirms what it applied within a second.
        await conn.execute("CHECKPOINT")
        await conn.execute(f"UPDATE {lschema}.t SET v = 'b' WHERE id = 1")
        await sidecar.engine.sync()
        low = await scraper.until(lambda s: 0 <= s.get("cache_sidecar_slot_retained_bytes", -1) < MiB, "WAL freed")
        assert low["cache_sidecar_replication_lag_bytes"] < MiB
        assert 0 <= low["cache_sidecar_replication_last_message_seconds"] < 30
        assert low["cache_sidecar_replication_transactions_total"] >= 2
    finally:
        await conn.close()


async def test_writes_to_other_tables_do_not_make_the_slot_hold_wal(
    logical_dsn: str, lschema: str, start_logical: Any
) -> None:
    """Only the cached tables are published: the server sends nothing of other tables'
    transactions (PostgreSQL 15+ not even their Begin and Commit), so the stream must
    confirm the positions its keepalives report (psycopg2 does, between transactions), or
    the slot holds every byte written to the rest of the database for as long as the
    cached tables see no write; the lag the sidecar reports counts them as confirmed too."""
    conn = await asyncpg.connect(logical_dsn)
    try:
        await conn.execute(f"CREATE TABLE {lschema}.t (id int PRIMARY KEY, v text)")
        await conn.execute(f"CREATE TABLE {lschema}.other (id int PRIMARY KEY, v text)")
        sidecar = await start_logical([f"{lschema}.t"], metrics_listen="127.0.0.1:0")
        scraper = Scraper(sidecar.daemon.metrics_address)
        await scraper.until(lambda s: "cache_sidecar_slot_retained_bytes" in s, "a slot sample")

        await conn.execute(f"INSERT INTO {lschema}.other SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
        await scraper.until(lambda s: s.get("cache_sidecar_slot_retained_bytes", 0) > 4 * MiB, "WAL retained")
        await conn.execute("CHECKPOINT")
        await conn.execute(f"INSERT INTO {lschema}.other VALUES (0, 'after the checkpoint')")
        low = await scraper.until(lambda s: 0 <= s.get("cache_sidecar_slot_retained_bytes", -1) < MiB, "WAL freed")
        assert low["cache_sidecar_replication_lag_bytes"] < MiB
    finally:
        await conn.close()


async def test_a_lost_stream_is_counted(logical_dsn: str, lschema: str, start_logical: Any) -> None:
    conn = await asyncpg.connect(logical_dsn)
    try:
        await conn.execute(f"CREATE TABLE {lschema}.t (id int PRIMARY KEY)")
        sidecar = await start_logical([f"{lschema}.t"], metrics_listen="127.0.0.1:0")
        scraper = Scraper(sidecar.daemon.metrics_address)
        before = await scraper()
        assert before["cache_sidecar_replication_connected"] == 1
        assert before["cache_sidecar_replication_losses_total"] == 0
        assert before["cache_sidecar_replication_reconnects_total"] == 0
        history = sidecar.history
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = $1",
            "cache-sidecar replication",
        )
        assert killed == 1
        await eventually(lambda: sidecar.engine.ready and sidecar.history != history, 30)
        after = await scraper.until(lambda s: s["cache_sidecar_replication_connected"] == 1, "reconnected")
        assert after["cache_sidecar_replication_losses_total"] == 1
        assert after["cache_sidecar_replication_reconnects_total"] == 1
    finally:
        await conn.close()

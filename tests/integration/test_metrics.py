"""The Prometheus endpoint, scraped: every promised series is there and moves."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from cache_sidecar_client import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels) -> float:  # type: ignore[no-untyped-def]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def tables(db, schema):
    await db.execute(
        f"CREATE TABLE {schema}.full_items (id int PRIMARY KEY, v int); "
        f"INSERT INTO {schema}.full_items SELECT g, 0 FROM generate_series(1, 10) g; "
        f"CREATE TABLE {schema}.lazy_items (id int PRIMARY KEY, v int); "
        f"INSERT INTO {schema}.lazy_items SELECT g, 0 FROM generate_series(1, 10) g"
    )
    return f"{schema}.full_items", f"{schema}.lazy_items"


async def test_metrics_endpoint(start_daemon, db, tables):
    full, lazy = tables
    sidecar = await start_daemon([full, f"{lazy}:lazy"], metrics_listen="127.0.0.1:0")
    address = sidecar.daemon.metrics_address
    async with AsyncClient(sidecar.target) as cache:
        await cache.get(full, 1)
        await cache.get(full, 99)
        await cache.batch_get(lazy, [1, 2])
        await cache.get(lazy, 1)
        await db.execute(f"UPDATE {full} SET v = 1 WHERE id = 1")
        await cache.sync()
        stream = cache.watch([full])
        reading = asyncio.create_task(anext(stream))
        await eventually(lambda: sidecar.core.fanout.subscribers == 1)
        samples = await asyncio.to_thread(scrape, address)
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await stream.aclose()

    assert value(samples, "cache_sidecar_reads_total", table=full, result="hit") == 1
    assert value(samples, "cache_sidecar_reads_total", table=full, result="not_found") == 1
    assert value(samples, "cache_sidecar_reads_total", table=lazy, result="miss") == 2
    assert value(samples, "cache_sidecar_reads_total", table=lazy, result="hit") == 1
    refetches = value(samples, "cache_sidecar_queries_total", table=full, kind="refetch")
    if sidecar.capture == "notify":
        assert refetches >= 1
    else:  # (rows built from the stream: no query per change)
        assert refetches == 0
    assert value(samples, "cache_sidecar_queries_total", table=lazy, kind="fill") == 1
    assert value(samples, "cache_sidecar_rows", table=full) == 10
    assert value(samples, "cache_sidecar_bytes", table=full) > 0
    assert value(samples, "cache_sidecar_table_loaded", table=lazy) == 1
    if sidecar.capture == "notify":  # (the LISTEN connection's; logical mode has none of these yet)
        assert value(samples, "cache_sidecar_notifications_total") >= 1
        assert value(samples, "cache_sidecar_notifications_rejected_total") == 0
        assert value(samples, "cache_sidecar_listener_connected") == 1
        assert value(samples, "cache_sidecar_listener_reconnects_total") == 0
    assert value(samples, "cache_sidecar_ready") == 1
    assert value(samples, "cache_sidecar_revision") == sidecar.core.revisions.applied
    assert value(samples, "cache_sidecar_watch_subscribers") == 1
    assert value(samples, "cache_sidecar_watch_dropped_total") == 0
    assert value(samples, "cache_sidecar_watch_refused_total") == 0
    assert value(samples, "cache_sidecar_request_seconds_count", method="Get") == 3
    assert value(samples, "cache_sidecar_request_seconds_count", method="BatchGet") == 1
    assert value(samples, "cache_sidecar_barrier_seconds_count") >= 1
    if sidecar.capture == "notify":
        assert 0 <= value(samples, "cache_sidecar_pg_notification_queue_usage") < 1
        assert ("cache_sidecar_pg_notification_queue_usage", ()) in samples


@pytest.mark.captures("notify")  # (logical mode exports no stream reconnect counter yet)
async def test_reconnects_are_counted(start_daemon, db, tables):
    full, _ = tables
    sidecar = await start_daemon([full], metrics_listen="127.0.0.1:0")
    history = sidecar.history
    await db.fetchval("SELECT pg_terminate_backend($1)", await sidecar.capture_pid(db))
    await eventually(lambda: sidecar.engine.ready and sidecar.history != history)
    samples = await asyncio.to_thread(scrape, sidecar.daemon.metrics_address)
    assert value(samples, "cache_sidecar_listener_reconnects_total") == 1

"""Logical capture's metrics, rendered as Prometheus scrapes them, from a fake replication
stream and slot samples; the slot watch's sampling; the not-ready words in logical mode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config as cfg
from sidecar.app import Daemon
from sidecar.core.assembly import Direct, Options, direct
from sidecar.errors import Unavailable
from sidecar.metrics import Metrics
from sidecar.pg import slot_watch
from sidecar.pg.logical import SlotState
from sidecar.pg.slot_watch import SlotSample, SlotWatch
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

TABLE = "public.items"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class FakeStream:
    """What the metrics read of ``LogicalSource``."""

    up: bool = True
    connects: int = 1
    losses: int = 0
    transactions: int = 0
    slot: SlotState = field(default_factory=SlotState)


@pytest.fixture
async def core() -> AsyncIterator[Direct]:
    db = MemoryDatabase(int_key_schema(TABLE))
    source = MemoryChangeSource(db)
    core = direct(source.database, list(db.schemas.values()))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    yield core
    following.cancel()
    await core.close()


async def scrape(metrics: Metrics) -> Samples:
    # (the collector hands its reading to the event loop and waits: scrape from a thread)
    text = (await asyncio.to_thread(generate_latest, metrics.registry)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def watching(core: Direct, stream: FakeStream | None) -> Metrics:
    metrics = Metrics()
    metrics.watch(core, None, asyncio.get_running_loop(), logical=stream)
    return metrics


async def test_a_streaming_slot_is_reported(core: Direct) -> None:
    slot = SlotState(name="cache_sidecar_1_ab", streaming=True, confirmed=1_000, server_end=5_096, received=900)
    slot.heard = time.monotonic() - 7
    stream = FakeStream(connects=3, losses=2, transactions=41, slot=slot)
    metrics = watching(core, stream)
    metrics.slot = watch = SlotWatch(lambda: stream.slot.name, query_timeout=1)
    watch.observe(SlotSample(slot.name, retained=123_456, wal_status="extended", safe_wal_size=9_999))

    samples = await scrape(metrics)

    assert samples[("cache_sidecar_replication_connected", ())] == 1
    assert samples[("cache_sidecar_replication_reconnects_total", ())] == 2
    assert samples[("cache_sidecar_replication_losses_total", ())] == 2
    assert samples[("cache_sidecar_replication_transactions_total", ())] == 41
    assert samples[("cache_sidecar_replication_lag_bytes", ())] == 4_096
    assert 7 <= samples[("cache_sidecar_replication_last_message_seconds", ())] < 60
    assert samples[("cache_sidecar_slot_retained_bytes", ())] == 123_456
    assert samples[("cache_sidecar_slot_safe_wal_bytes", ())] == 9_999
    statuses = {dict(labels)["status"]: v for (name, labels), v in samples.items() if name.endswith("wal_status")}
    assert statuses == {"reserved": 0, "extended": 1, "unreserved": 0, "lost": 0}
    # (the slot's name changes with every connection: it is no label anywhere)
    assert not any("cache_sidecar_1_ab" in value for _, labels in samples for _, value in labels)
    assert "cache_sidecar_listener_connected" not in names(samples)


async def test_a_stream_down_says_so_and_shows_no_position(core: Direct) -> None:
    stream = FakeStream(up=False, connects=1, losses=1, slot=SlotState(name="cache_sidecar_1_ab", server_end=10))
    metrics = watching(core, stream)
    metrics.slot = watch = SlotWatch(lambda: stream.slot.name, query_timeout=1)
    watch.observe(SlotSample("cache_sidecar_1_ab", retained=10, wal_status=None, safe_wal_size=None))

    samples = await scrape(metrics)

    assert samples[("cache_sidecar_replication_connected", ())] == 0
    assert samples[("cache_sidecar_replication_losses_total", ())] == 1
    assert samples[("cache_sidecar_replication_reconnects_total", ())] == 0
    shown = names(samples)
    assert "cache_sidecar_replication_lag_bytes" not in shown
    assert "cache_sidecar_replication_last_message_seconds" not in shown
    # (before PostgreSQL 13, or without max_slot_wal_keep_size: not known, not shown)
    assert samples[("cache_sidecar_slot_retained_bytes", ())] == 10
    assert "cache_sidecar_slot_safe_wal_bytes" not in shown and "cache_sidecar_slot_wal_status" not in shown


async def test_a_sample_of_an_earlier_slot_is_not_shown(core: Direct) -> None:
    stream = FakeStream(slot=SlotState(name="cache_sidecar_1_new", streaming=True))
    metrics = watching(core, stream)
    metrics.slot = watch = SlotWatch(lambda: stream.slot.name, query_timeout=1)
    watch.observe(SlotSample("cache_sidecar_1_old", retained=10**9, wal_status="lost", safe_wal_size=None))
    assert "cache_sidecar_slot_retained_bytes" not in names(await scrape(metrics))


async def test_notify_mode_has_no_replication_series(core: Direct) -> None:
    assert not {n for n in names(await scrape(watching(core, None))) if "replication" in n or "slot" in n}


# -- the slot watch ------------------------------------------------------------------------


class FakePool:
    """Answers the slot query with ``rows`` in turn (an exception is raised)."""

    def __init__(self, *rows: Any) -> None:
        self.rows = list(rows)
        self.asked: list[tuple[str, float]] = []

    def acquire(self, timeout: float) -> FakePool:
        return self

    async def __aenter__(self) -> FakePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def fetchrow(self, sql: str, name: str, timeout: float) -> Any:
        assert "pg_replication_slots" in sql and "restart_lsn" in sql
        self.asked.append((name, timeout))
        row = self.rows.pop(0)
        if isinstance(row, Exception):
            raise row
        return row


async def test_the_slot_watch_samples_its_own_slot_bounded_by_the_query_timeout() -> None:
    name = "cache_sidecar_7_cd"
    watch = SlotWatch(lambda: name, query_timeout=2.5)
    pool = FakePool({"retained": 4096, "wal_status": "reserved", "safe_wal_size": None})
    await watch.sample_once(pool)
    assert pool.asked == [(name, 2.5)]
    assert watch.sample == SlotSample(name, 4096, "reserved", None)


async def test_a_failed_sample_leaves_nothing_known() -> None:
    watch = SlotWatch(lambda: "s", query_timeout=1)
    watch.observe(SlotSample("s", 1, "reserved", None))
    await watch.sample_once(FakePool(TimeoutError("slow")))
    assert watch.sample is None and watch.failures == 1
    await watch.sample_once(FakePool(None))  # (the slot went with its connection)
    assert watch.sample is None and watch.failures == 1


async def test_no_slot_no_query() -> None:
    pool = FakePool()
    watch = SlotWatch(lambda: "", query_timeout=1)
    await watch.sample_once(pool)
    assert pool.asked == [] and watch.sample is None


async def test_the_slot_watch_keeps_sampling_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slot_watch, "SAMPLE_INTERVAL", 0.01)
    watch = SlotWatch(lambda: "s", query_timeout=1)
    pool = FakePool(ConnectionRefusedError("away"), *[{"retained": 7, "wal_status": None, "safe_wal_size": None}] * 50)
    running = asyncio.create_task(watch.run(pool))
    try:
        await eventually(lambda: watch.sample is not None)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert watch.failures == 1 and watch.sample == SlotSample("s", 7, None, None)


def test_losing_wal_is_warned_of_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.pg.slot_watch")
    watch = SlotWatch(lambda: "s", query_timeout=1)
    for status in ("reserved", "unreserved", "unreserved", "lost", "lost"):
        watch.observe(SlotSample("s", 10, status, 0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "wal_status unreserved" in warnings[0] and "max_slot_wal_keep_size" in warnings[0]
    assert "wal_status lost" in warnings[1] and "rebuilt" in warnings[1]


# -- words: the replication stream, not "the listener" ---------------------------------------


def test_logical_capture_names_its_stream() -> None:
    assert Options.from_config(cfg.Config(capture="logical")).source_name == "replication stream"
    assert Options.from_config(cfg.Config()).source_name == "listener"


class TokensLost(MemoryChangeSource):
    """Once ``silent``, barrier tokens never come back: a barrier waits until the stream is lost."""

    silent = False

    async def send_token(self, token: str) -> None:
        if not self.silent:
            await super().send_token(token)
        else:
            self.tokens += 1


async def test_a_lost_replication_stream_is_named_in_errors_and_the_not_ready_reason() -> None:
    db = MemoryDatabase(int_key_schema(TABLE))
    source = TokensLost(db)
    core = direct(source.database, list(db.schemas.values()), Options(source_name="replication stream"))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    try:
        await eventually(lambda: core.engine.ready)
        source.silent, sent = True, source.tokens
        waiting = asyncio.create_task(core.engine.sync())
        await eventually(lambda: source.tokens == sent + 1)
        source.lose("walsender terminated")
        with pytest.raises(Unavailable, match=r"replication stream down \(walsender terminated\)"):
            await waiting
        with pytest.raises(Unavailable, match="the replication stream is down"):
            await core.engine.sync()
        daemon = Daemon(cfg.Config(capture="logical"), handle_signals=False)
        daemon.core = core
        assert daemon._why_not_ready() == "replication stream down; reads go to the database"
        daemon.config = cfg.Config()
        assert daemon._why_not_ready() == "listener down; reads go to the database"
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await core.close()

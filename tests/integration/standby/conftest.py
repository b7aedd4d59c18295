"""A primary and its streaming hot standby (tests/support/standby.py), started once for the
tests of this package, and hubs that decode on the standby (``database.dsn`` the standby,
``database.primary_dsn`` the primary)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support.standby import StandbyPair, start_standby_pair


@pytest.fixture(scope="session")
def standby_pair() -> Iterator[StandbyPair]:
    pair = start_standby_pair()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
async def sschema(standby_pair: StandbyPair) -> AsyncIterator[str]:
    """A fresh schema, made on the primary (the standby replays it)."""
    name = f"s_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(standby_pair.primary.dsn)
    await conn.execute(f"CREATE SCHEMA {name}")
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


@pytest.fixture
async def start_on_standby(standby_pair: StandbyPair) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    """Start an in-process hub in logical mode on the standby: ``await start_on_standby([tables])``."""
    running: list[RunningDaemon] = []

    async def start(tables: list[str], wait: bool = True, **settings: Any) -> RunningDaemon:
        values: dict[str, Any] = {
            "dsn": standby_pair.standby.dsn,
            "primary_dsn": standby_pair.primary.dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "capture": "logical",
            "ping_interval": 1.0,
            "ping_timeout": 1.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "grace_period": 2.0,
            "tables": tuple(cfg.parse_table_spec(t, "test") for t in tables),
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, wait, "hub on a standby")

    yield start
    await stop_all(running)

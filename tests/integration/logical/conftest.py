"""Clusters of their own with ``wal_level = logical`` for the logical decoding tests (the
session's shared server keeps its settings; a wal_level change needs a restart)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from tests.conftest import RunningDaemon, start_in_process, stop_all
from tests.support.logical import start_logical_cluster
from tests.support.pg import system_bindir


@pytest.fixture(scope="session")
def logical_dsn() -> Iterator[str]:
    """The embedded server's version (the one the stored capture was made with)."""
    cluster = start_logical_cluster()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def system_logical_dsn() -> Iterator[str]:
    """The machine's own PostgreSQL, if installed (skipped otherwise)."""
    bindir = system_bindir()
    if bindir is None:
        pytest.skip("no system PostgreSQL installed (set SIDECAR_TEST_PG_BINDIR to use one)")
    cluster = start_logical_cluster(bindir)
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture(params=["embedded", "system"])
def any_logical_dsn(request: pytest.FixtureRequest) -> str:
    """Each available PostgreSQL version in turn."""
    name = "logical_dsn" if request.param == "embedded" else "system_logical_dsn"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
async def lschema(logical_dsn: str) -> AsyncIterator[str]:
    """A fresh schema on the logical cluster (its publication, if any, dropped with it)."""
    name = f"l_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(logical_dsn)
    await conn.execute(f"CREATE SCHEMA {name}")
    yield name
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


@pytest.fixture
async def start_logical(logical_dsn: str) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    """Start an in-process daemon on the logical cluster: ``await start_logical([tables])``,
    in logical capture unless ``capture="notify"`` is passed (its own channel then)."""
    running: list[RunningDaemon] = []

    async def start(tables: list[str] | list[cfg.TableConfig], wait: bool = True, **settings: Any) -> RunningDaemon:
        values: dict[str, Any] = {
            "dsn": logical_dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "capture": "logical",
            "channel": f"cs_{secrets.token_hex(4)}",
            "ping_interval": 1.0,
            "ping_timeout": 1.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "grace_period": 2.0,
            "tables": tuple(t if isinstance(t, cfg.TableConfig) else cfg.parse_table_spec(t, "test") for t in tables),
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, wait, f"{values['capture']} daemon")

    yield start
    await stop_all(running)

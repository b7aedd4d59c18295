"""Shared fixtures: PostgreSQL for the integration and e2e tiers, daemons, schemas.

The session starts its own PostgreSQL (the pgserver wheel) unless
SIDECAR_TEST_DSN points at one; a system installation's binaries, when
present, are used by the tests that run on every available version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from sidecar import config as cfg
from sidecar.app import Daemon
from tests.support.pg import EmbeddedServer, LocalCluster, Postgres, system_bindir
from tests.support.waiting import eventually


def _version(dsn: str) -> str:
    async def ask() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(ask())


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    external = os.environ.get("SIDECAR_TEST_DSN")
    if external:
        yield Postgres(external, _version(external), kind="external")
        return
    server = EmbeddedServer()
    pg = Postgres(server.dsn, _version(server.dsn), handle=server, kind="embedded")
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def system_postgres(postgres: Postgres) -> Iterator[Postgres]:
    """The machine's own PostgreSQL binaries, if installed (skipped otherwise)."""
    bindir = system_bindir()
    if bindir is None:
        pytest.skip("no system PostgreSQL installed (set SIDECAR_TEST_PG_BINDIR to use one)")
    cluster = LocalCluster(bindir, run_as="pgserver")
    pg = Postgres(cluster.dsn, _version(cluster.dsn), handle=cluster, kind="system")
    yield pg
    pg.stop()


@pytest.fixture(params=["embedded", "system"])
def any_postgres(request: pytest.FixtureRequest) -> Postgres:
    """Each available PostgreSQL version in turn."""
    name = "postgres" if request.param == "embedded" else "system_postgres"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
async def db(postgres: Postgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres.dsn)
    yield conn
    if not conn.is_closed():
        conn.terminate()


@pytest.fixture
async def schema(postgres: Postgres) -> AsyncIterator[str]:
    """A fresh schema per test (tables of one test never meet another's)."""
    name = f"t_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(postgres.dsn)
    await conn.execute(f"CREATE SCHEMA {name}")
    await conn.close()
    yield name
    conn = await asyncpg.connect(postgres.dsn)  # a new one: the test may have restarted the server
    await conn.execute(f"DROP SCHEMA {name} CASCADE")
    await conn.close()


@dataclasses.dataclass
class RunningDaemon:
    daemon: Daemon
    task: asyncio.Task[int]

    @property
    def engine(self) -> Any:
        return self.daemon.engine

    @property
    def core(self) -> Any:
        """The daemon's wired parts (``assembly.Direct`` or ``Following``)."""
        return self.daemon.core

    @property
    def target(self) -> str:
        assert self.daemon.server is not None
        return self.daemon.server.addresses[0]

    async def ready(self, timeout: float = 15.0) -> None:
        await eventually(lambda: self.engine is not None and self.engine.ready, timeout, what="daemon ready")

    async def stop(self) -> int:
        self.daemon.stop_event.set()
        return await asyncio.wait_for(self.task, 30)


StartDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_daemon(postgres: Postgres) -> AsyncIterator[StartDaemon]:
    """Start an in-process daemon: ``await start_daemon(tables=[...], **settings)``."""
    running: list[RunningDaemon] = []

    async def start(tables: list[str] | list[cfg.TableConfig], wait: bool = True, **settings: Any) -> RunningDaemon:
        table_configs = tuple(t if isinstance(t, cfg.TableConfig) else cfg.parse_table_spec(t, "test") for t in tables)
        values: dict[str, Any] = {
            "dsn": postgres.dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "channel": f"cs_{secrets.token_hex(4)}",
            "ping_interval": 1.0,
            "ping_timeout": 1.0,
            "reconnect_min_delay": 0.05,
            "reconnect_max_delay": 0.5,
            "grace_period": 2.0,
            "tables": table_configs,
        }
        values.update(settings)
        return await start_in_process(cfg.Config(**values), running, wait, "daemon")

    yield start
    await stop_all(running)


async def start_in_process(config: cfg.Config, running: list[RunningDaemon], wait: bool, what: str) -> RunningDaemon:
    """A daemon of ``config`` in this process, added to ``running``; ready unless not ``wait``."""
    started = asyncio.Event()
    daemon = Daemon(config, on_ready=lambda _d: started.set(), handle_signals=False)
    task = asyncio.create_task(daemon.run(), name=f"{what} under test")
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        raise AssertionError(f"{what} exited during start with code {task.result()}")
    handle = RunningDaemon(daemon, task)
    running.append(handle)
    if wait:
        await handle.ready()
    return handle


async def stop_all(running: list[RunningDaemon]) -> None:
    for handle in running:
        if not handle.task.done():
            await handle.stop()

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
from tests.support.pg import SESSION_SETTINGS, EmbeddedServer, LocalCluster, Postgres, system_bindir
from tests.support.waiting import eventually


def _server(dsn: str, handle: Any = None, kind: str = "embedded") -> Postgres:
    async def ask() -> tuple[str, str]:
        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SHOW server_version")), str(await conn.fetchval("SHOW wal_level"))
        finally:
            await conn.close()

    version, wal_level = asyncio.run(ask())
    return Postgres(dsn, version, handle=handle, kind=kind, wal_level=wal_level)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    external = os.environ.get("SIDECAR_TEST_DSN")
    if external:
        yield _server(external, kind="external")
        return
    server = EmbeddedServer(SESSION_SETTINGS)
    pg = _server(server.dsn, server)
    yield pg
    pg.stop()


CAPTURES = ("notify", "logical")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "captures(*modes): the capture modes (database.capture) the daemons of a test or "
        "module run in, each a test of its own ([notify], [logical]); unmarked: notify only",
    )
    config.addinivalue_line(
        "markers",
        "logical_bug(reason, strict=True): the test's [logical] run is expected to fail for a known bug of "
        "logical capture, named in reason (strict: it fails the run once the bug is fixed; remove the mark then)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests whose daemons take the ``capture`` fixture run once per mode their closest
    ``captures`` marker names (a test's marker overrides its module's)."""
    if "capture" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("captures")
    modes = marker.args if marker is not None else ("notify",)
    unknown = set(modes) - set(CAPTURES)
    if unknown or not modes:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: captures{modes}: modes are {CAPTURES}")
    if modes != ("notify",):  # (the default adds nothing to the test's id)
        bug = metafunc.definition.get_closest_marker("logical_bug")
        params = [
            pytest.param(mode, marks=pytest.mark.xfail(reason=bug.args[0], strict=bug.kwargs.get("strict", True)))
            if mode == "logical" and bug is not None
            else mode
            for mode in modes
        ]
        metafunc.parametrize("capture", params, indirect=True)


@pytest.fixture
def capture(request: pytest.FixtureRequest, postgres: Postgres) -> str:
    """The capture mode the test's daemons run in (see ``captures``)."""
    mode: str = getattr(request, "param", "notify")
    if mode == "logical" and not postgres.logical:
        pytest.skip(f"the {postgres.kind} server has wal_level {postgres.wal_level!r}, not 'logical'")
    return mode


@pytest.fixture(scope="session")
def system_postgres(postgres: Postgres) -> Iterator[Postgres]:
    """The machine's own PostgreSQL binaries, if installed (skipped otherwise)."""
    bindir = system_bindir()
    if bindir is None:
        pytest.skip("no system PostgreSQL installed (set SIDECAR_TEST_PG_BINDIR to use one)")
    cluster = LocalCluster(bindir, run_as="pgserver")
    pg = _server(cluster.dsn, cluster, "system")
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

    @property
    def capture(self) -> str:
        return self.daemon.config.capture

    @property
    def history(self) -> tuple[str, int]:
        """Where the history it serves began, ``(epoch, revision)``: every rebuild changes it
        (NOTIFY capture: a new epoch; logical capture, whose epoch is the database's history
        and outlives a reconnect: a new first revision)."""
        revisions = self.core.revisions
        return (revisions.epoch, revisions.epoch_start)

    async def capture_pid(self, db: asyncpg.Connection) -> int:
        """The backend the daemon's changes come through: the LISTEN connection's, or in
        logical mode the walsender streaming its slot (terminating it is a lost source)."""
        if self.capture == "notify":
            return int(self.daemon.listener.backend_pid)
        slot = self.daemon.source.slot.name
        pid = await db.fetchval("SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", slot)
        assert pid is not None, f"slot {slot!r} is not streaming"
        return int(pid)

    @property
    def capture_losses(self) -> int:
        """How often the daemon's change source was lost (LISTEN connection or stream)."""
        if self.capture == "notify":
            return int(self.daemon.listener.stats.disconnects)
        return int(self.daemon.source.losses)

    async def ready(self, timeout: float = 15.0) -> None:
        await eventually(lambda: self.engine is not None and self.engine.ready, timeout, what="daemon ready")

    async def stop(self) -> int:
        self.daemon.stop_event.set()
        return await asyncio.wait_for(self.task, 30)


StartDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_daemon(postgres: Postgres, capture: str) -> AsyncIterator[StartDaemon]:
    """Start an in-process daemon: ``await start_daemon(tables=[...], **settings)``, in the
    test's capture mode unless ``capture=`` says otherwise."""
    running: list[RunningDaemon] = []

    async def start(tables: list[str] | list[cfg.TableConfig], wait: bool = True, **settings: Any) -> RunningDaemon:
        table_configs = tuple(t if isinstance(t, cfg.TableConfig) else cfg.parse_table_spec(t, "test") for t in tables)
        values: dict[str, Any] = {
            "dsn": postgres.dsn,
            "listen": ("127.0.0.1:0",),
            "install_triggers": True,
            "capture": capture,
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

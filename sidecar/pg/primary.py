"""The primary, for a hub whose ``database.dsn`` is a hot standby (``database.primary_dsn``).

On a standby (PostgreSQL 16 or newer) the hub creates its slot, loads, refetches and checks
the catalog; the primary sees only what the read barrier needs: one statement per barrier
round, ``pg_logical_emit_message(true, ...)`` committed with ``synchronous_commit = on``.
The standby replays the primary's WAL in order, and its walsender decodes only what it has
replayed: the token comes back in the standby's stream after every transaction the primary
committed before the barrier began -- a standby that lags makes the barrier wait, never
answer early.

One connection, not a pool: a pool's release runs a reset statement of its own, and the
primary is to run one statement per barrier round. Barriers take turns on it (each is one
short statement); a lost connection is made again at the next barrier.

A logical slot on a standby becomes consistent at a running-transactions record from the
primary, which the primary writes every 15 s only while it writes anything else: ``nudge``
asks for one now (``pg_log_standby_snapshot()``, PostgreSQL 16; superusers and roles
granted EXECUTE on it), and where that is not allowed, writes a non-transactional logical
message, after which the primary's background writer logs one within 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from sidecar.config import Config
from sidecar.errors import ConfigError, Unavailable
from sidecar.pg.db import CONNECTION_ERRORS, connect

log = logging.getLogger(__name__)

APPLICATION_NAME = "cache-sidecar barrier"
NUDGE_PREFIX = "cache_sidecar_nudge"
FRESH_PREFIX = "cache_sidecar_fresh"  # a position for reads the standby answers (not a barrier token)
REPLAY_POLL = 0.005  # seconds between reads of the standby's replay position

EMIT_SQL = """
SELECT pg_catalog.pg_logical_emit_message(true, $1::pg_catalog.text, $2::pg_catalog.text)::pg_catalog.text,
    pg_catalog.set_config('synchronous_commit', 'on', true)
"""
_STANDBY_SNAPSHOT_SQL = "SELECT pg_catalog.pg_log_standby_snapshot()"
_NUDGE_SQL = "SELECT pg_catalog.pg_logical_emit_message(false, $1::pg_catalog.text, ''::pg_catalog.text)"


def primary_config(config: Config) -> Config:
    """``config`` with ``database.dsn`` the primary's (how every connection to it is made)."""
    assert config.primary_dsn is not None
    return dataclasses.replace(config, dsn=config.primary_dsn, primary_dsn=None)


async def replayed(pool: Any, position: str, timeout: float) -> None:
    """Wait until the standby (``pool``'s) has replayed the primary's WAL up to ``position``
    (``Unavailable`` after ``timeout``: it lags, or cannot reach the primary)."""
    deadline = time.monotonic() + timeout
    try:
        async with pool.acquire(timeout=timeout) as conn:
            while not await conn.fetchval(_REPLAYED_SQL, position, timeout=timeout):
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the standby (database.dsn) has not replayed the primary's WAL up to {position} "
                        f"in {timeout:g}s: it lags behind its primary"
                    )
                await asyncio.sleep(REPLAY_POLL)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise Unavailable(f"reading the standby's replay position: {type(exc).__name__}: {exc}") from None


_REPLAYED_SQL = """
SELECT coalesce(pg_catalog.pg_last_wal_replay_lsn() >= $1::pg_catalog.text::pg_catalog.pg_lsn
                OR NOT pg_catalog.pg_is_in_recovery(), false)
"""


@contextlib.asynccontextmanager
async def connection(config: Config) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the primary for a task (checks at start, installing the
    publication); a failure names ``database.primary_dsn``."""
    try:
        conn = await connect(primary_config(config), "cache-sidecar")
    except ConfigError as exc:
        raise ConfigError("database.primary_dsn", exc.problem) from None
    try:
        yield conn
    finally:
        await conn.close(timeout=config.query_timeout)


class Primary:
    """The barrier's connection to the primary."""

    def __init__(self, config: Config) -> None:
        self._config = primary_config(config)
        self.timeout = config.query_timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._may_log_snapshot = True
        self.statements = 0  # statements sent (barrier tokens and nudges)
        self.position: str | None = None  # the last barrier token's position in the primary's WAL

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(timeout=self.timeout)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncio.wait_for(connect(self._config, APPLICATION_NAME), self.timeout)
            except TimeoutError:
                raise Unavailable(
                    f"connecting to the primary (database.primary_dsn): no answer in {self.timeout:g}s"
                ) from None
            except ConfigError as exc:  # (refused now -- a password changed --: a barrier fails, retried later)
                raise Unavailable(f"connecting to the primary (database.primary_dsn): {exc.problem}") from None
        return self._conn

    async def _execute(self, sql: str, *args: str) -> Any:
        """The statement's first value."""
        async with self._lock:
            conn = await self._connection()
            self.statements += 1
            try:
                return await conn.fetchval(sql, *args, timeout=self.timeout)
            except asyncpg.PostgresError as exc:
                if isinstance(exc, asyncpg.PostgresConnectionError):
                    self._drop(conn)
                raise
            except BaseException:
                # (lost, timed out, cancelled, or in a state the driver cannot go on from --
                # asyncpg's InternalClientError after a server shutdown: the next one is new)
                self._drop(conn)
                raise

    def _drop(self, conn: asyncpg.Connection) -> None:
        if self._conn is conn:
            self._conn = None
        conn.terminate()

    async def emit(self, prefix: str, token: str) -> None:
        """The barrier's token into the primary's WAL (one statement, its commit flushed)."""
        try:
            self.position = str(await self._execute(EMIT_SQL, prefix, token))
        except Exception as exc:  # (any failure fails this barrier round, and the next one retries)
            raise Unavailable(f"sending a barrier token to the primary: {type(exc).__name__}: {exc}") from None

    async def current_position(self) -> str:
        """A position in the primary's WAL past every commit completed before this call (a
        flushed message's: the standby receives it, however idle the primary is)."""
        try:
            return str(await self._execute(EMIT_SQL, FRESH_PREFIX, ""))
        except Exception as exc:
            raise Unavailable(f"reading the primary's WAL position: {type(exc).__name__}: {exc}") from None

    async def nudge(self) -> None:
        """Make the primary log a running-transactions record soon (see the module's text)."""
        try:
            if self._may_log_snapshot:
                try:
                    await self._execute(_STANDBY_SNAPSHOT_SQL)
                    return
                except asyncpg.InsufficientPrivilegeError:
                    self._may_log_snapshot = False
                    log.info(
                        "the role may not run pg_log_standby_snapshot() on the primary: a slot on the standby "
                        "waits for the primary's next running-transactions record (within 15 s of a write)"
                    )
            await self._execute(_NUDGE_SQL, NUDGE_PREFIX)
        except Exception as exc:
            log.debug("nudging the primary: %s", exc)

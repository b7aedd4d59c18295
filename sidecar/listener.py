"""The one LISTEN connection: connect, LISTEN, parse notifications, notice
death, reconnect.

It owns that connection and nothing else. Notifications are parsed into typed
events here, at the edge, and handed synchronously to ``on_event``; a bad
payload is logged, counted and skipped. The connection is known dead when
asyncpg's termination callback fires or when an idle ping fails to answer in
time (a stalled network sends no FIN). Reconnects back off exponentially with
jitter, capped. ``on_up`` runs once LISTEN is active, ``on_down`` as soon as
the connection is lost: notifications sent in between are gone for good, so
the owner must rebuild on the next ``on_up``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from sidecar import events
from sidecar.errors import PayloadError

log = logging.getLogger(__name__)


@dataclass
class ListenerStats:
    notifications: int = 0
    rejected: int = 0
    connects: int = 0
    disconnects: int = 0


def backoff_delay(attempt: int, low: float, high: float, rand: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): doubling, capped, half jittered."""
    ceiling = min(high, low * float(1 << min(attempt, 30)))
    return ceiling / 2 + rand() * ceiling / 2


class Listener:
    """Holds the LISTEN connection for ``channel`` and keeps it alive."""

    def __init__(
        self,
        *,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        on_event: Callable[[events.Event], None],
        on_up: Callable[[], None],
        on_down: Callable[[str], None],
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        reconnect_min_delay: float = 0.1,
        reconnect_max_delay: float = 10.0,
        redact: Callable[[str], str] = lambda text: text,
    ) -> None:
        self._connect = connect
        self.channel = channel
        self._on_event = on_event
        self._on_up = on_up
        self._on_down = on_down
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_min_delay = reconnect_min_delay
        self.reconnect_max_delay = reconnect_max_delay
        self._redact = redact  # keeps a DSN's password out of logged driver errors
        self.stats = ListenerStats()
        self.connected = False
        self.backend_pid: int | None = None
        self._conn: Any = None
        self._last_heard = time.monotonic()
        self._dead = asyncio.Event()
        self._crash: BaseException | None = None

    async def run(self) -> None:
        """Listen until cancelled, reconnecting as needed."""
        attempt = 0
        while True:
            try:
                conn = await self._connect()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                delay = backoff_delay(attempt, self.reconnect_min_delay, self.reconnect_max_delay)
                log.warning("listener: cannot connect (%s); retrying in %.2fs", self._redact(_brief(exc)), delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            try:
                reason = await self._hold(conn)
            finally:
                await _close(conn)
            self._conn = None
            if self.connected:
                self.connected = False
                self.backend_pid = None
                self.stats.disconnects += 1
                log.warning(
                    "listener: connection lost (%s); reconnecting",
                    self._redact(reason),
                    extra={"event": "listener_lost", "reason": self._redact(reason)},
                )
                self._on_down(reason)
            await asyncio.sleep(backoff_delay(0, self.reconnect_min_delay, self.reconnect_max_delay))

    async def _hold(self, conn: Any) -> str:
        """LISTEN on ``conn`` and watch it until it dies; return why it died."""
        dead = self._dead = asyncio.Event()
        conn.add_termination_listener(lambda _conn: dead.set())
        try:
            await conn.add_listener(self.channel, self._notified)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return f"LISTEN failed: {_brief(exc)}"
        self.connected = True
        self._conn = conn
        self.backend_pid = conn.get_server_pid()
        self.stats.connects += 1
        self._last_heard = time.monotonic()
        log.info(
            "listener: listening on channel %s (backend pid %s)",
            self.channel,
            self.backend_pid,
            extra={"event": "listener_connected", "channel": self.channel, "connects": self.stats.connects},
        )
        self._on_up()
        while True:
            idle = time.monotonic() - self._last_heard
            try:
                await asyncio.wait_for(dead.wait(), max(self.ping_interval - idle, 0.001))
                if self._crash is not None:
                    raise self._crash
                return "connection closed"
            except TimeoutError:
                pass
            if time.monotonic() - self._last_heard < self.ping_interval:
                continue
            try:
                await conn.execute("SELECT 1", timeout=self.ping_timeout)
            except TimeoutError:
                return f"ping unanswered after {self.ping_timeout:g}s"
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                return f"ping failed: {_brief(exc)}"
            self._last_heard = time.monotonic()

    async def notify(self, payload: str, timeout: float) -> None:
        """Send a NOTIFY on our channel from the LISTEN session itself.

        It is queued behind every transaction committed before it and comes
        back to this very connection, so it makes the read barrier's token
        without borrowing a pool connection; if this connection is dead, the
        barrier fails at once, as it must.
        """
        conn = self._conn
        if conn is None:
            raise ConnectionError("the listener is not connected")
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, payload, timeout=timeout)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._last_heard = time.monotonic()
        self.stats.notifications += 1
        try:
            event = events.parse(payload)
        except PayloadError as exc:
            self.stats.rejected += 1
            log.warning("listener: skipping bad payload (%s): %.200s", exc, payload)
            return
        try:
            self._on_event(event)
        except Exception as exc:
            # A bug in event handling: fail loudly (the supervisor exits the
            # daemon) rather than carry on with a cache that missed an event.
            log.exception("listener: handling %r failed", event)
            self._crash = exc
            self._dead.set()


async def _close(conn: Any) -> None:
    if conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:
        conn.terminate()


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""The one LISTEN connection: connect, LISTEN, parse notifications, notice
death, reconnect.

It owns that connection and nothing else. Notifications are parsed into typed
events here, at the edge, and handed synchronously to ``on_event``; a bad
payload is logged, counted and skipped, and so is a read-barrier token that
another backend sent (anyone can NOTIFY our channel; only our own session's
tokens prove anything). Events go on with the sender's backend PID (whether
it may send a whole-table change is ``senders.py``'s to say, by a look-up on
this connection, ``fetchrow``). The connection is known dead when asyncpg's
termination callback fires, when an idle ping fails to answer in time (a
stalled network sends no FIN), or when any operation on it fails for a reason
other than the server refusing it: the driver's state is not trusted after
that, and the termination callback may never come. Operations on it take
turns (a ping and a barrier NOTIFY at once confuse the driver). Reconnects back off exponentially with
jitter, capped. ``on_up`` runs once LISTEN is active, ``on_down`` as soon as
the connection is lost: notifications sent in between are gone for good, so
the owner must rebuild on the next ``on_up``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from sidecar.core import events
from sidecar.core.aio import backoff_delay, wait_set
from sidecar.errors import PayloadError

log = logging.getLogger(__name__)


@dataclass
class ListenerStats:
    notifications: int = 0
    rejected: int = 0  # payloads that could not be parsed
    forged: int = 0  # read-barrier tokens sent by another backend
    connects: int = 0
    disconnects: int = 0


WARN_EVERY = 10.0  # seconds between warnings of one kind (a flood of bad payloads is one line)


class Listener:
    """Holds the LISTEN connection for ``channel`` and keeps it alive."""

    def __init__(
        self,
        *,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        on_event: Callable[[events.Event, int], None],
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
        self._lost: str | None = None  # why an operation declared the connection dead
        self._io = asyncio.Lock()  # one operation on the connection at a time
        self._warned: dict[str, tuple[float, int]] = {}  # kind -> (last warned, suppressed since)

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
                # (first: a look-up or NOTIFY that took it now would run beside the close,
                # and the driver fails that with an internal error rather than a lost connection)
                self._conn = None
                await _close(conn)
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
        self._lost = None
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
            if await wait_set(dead, max(self.ping_interval - idle, 0.001)):
                if self._crash is not None:
                    raise self._crash
                return self._lost or "connection closed"
            if conn.is_closed():
                return "connection closed (found by the driver)"
            if time.monotonic() - self._last_heard < self.ping_interval:
                continue
            try:
                async with self._io:
                    await conn.execute("SELECT 1", timeout=self.ping_timeout)
            except TimeoutError:
                return f"ping unanswered after {self.ping_timeout:g}s"
            except Exception as exc:  # whatever the driver says: it cannot be trusted now
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
        try:
            async with self._io:
                await conn.execute("SELECT pg_catalog.pg_notify($1, $2)", self.channel, payload, timeout=timeout)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                self._declare_lost(conn, f"NOTIFY failed: {_brief(exc)}")
            raise  # (otherwise the server refused it, e.g. a full queue: the connection is fine)
        except Exception as exc:
            self._declare_lost(conn, f"NOTIFY failed: {_brief(exc)}")
            raise

    async def fetchrow(self, query: str, *args: Any, timeout: float) -> Any:
        """One small query on the LISTEN session, which is never busy for long (the pool may
        be, under load): for look-ups that events wait behind. Fails as ``notify`` does."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("the listener is not connected")
        try:
            async with self._io:
                return await conn.fetchrow(query, *args, timeout=timeout)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                self._declare_lost(conn, f"a look-up failed: {_brief(exc)}")
            raise
        except Exception as exc:
            self._declare_lost(conn, f"a look-up failed: {_brief(exc)}")
            raise

    def _declare_lost(self, conn: Any, reason: str) -> None:
        if conn is self._conn and not self._dead.is_set():
            self._lost = reason
            self._dead.set()

    def _notified(self, _conn: Any, pid: int, _channel: str, payload: str) -> None:
        self._last_heard = time.monotonic()
        self.stats.notifications += 1
        try:
            event = events.parse(payload)
        except PayloadError as exc:
            self.stats.rejected += 1
            self._warn("payload", "listener: skipping a bad payload from backend %s (%s): %.200r", pid, exc, payload)
            return
        if isinstance(event, events.SyncToken) and pid != self.backend_pid:
            self.stats.forged += 1
            self._warn(
                "forged", "listener: ignoring a read-barrier token sent by backend %s, not by this sidecar's", pid
            )
            return
        try:
            self._on_event(event, pid)
        except Exception as exc:
            log.exception("listener: handling %r failed", event)
            self.crash(exc)

    def crash(self, exc: BaseException) -> None:
        """Handling an event failed (a bug): fail loudly (the supervisor exits the
        daemon) rather than carry on with a cache that missed an event."""
        self._crash = exc
        self._dead.set()

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log a warning of ``kind`` at most once per ``WARN_EVERY`` seconds (anyone can
        flood our channel; the log must stay readable)."""
        now = time.monotonic()
        last, suppressed = self._warned.get(kind, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[kind] = (last, suppressed + 1)
            return
        self._warned[kind] = (now, 0)
        if suppressed:
            message += f" (and {suppressed} more like it since the last warning)"
        log.warning(message, *args)


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

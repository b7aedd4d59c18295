"""PostgreSQL as a change source: the one LISTEN connection (``listener.py``)
for the changes and barrier tokens, and the query pool (``db.py``) for rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sidecar import events
from sidecar.db import PgDatabase
from sidecar.listener import Listener
from sidecar.source import ChangeSink


class PgChangeSource:
    """``source.ChangeSource`` over LISTEN/NOTIFY and an asyncpg pool."""

    def __init__(
        self,
        database: PgDatabase,
        *,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        query_timeout: float,
        **timing: Any,
    ) -> None:
        self._database = database
        self.query_timeout = query_timeout
        self._sink: ChangeSink | None = None
        self.listener = Listener(
            connect=connect,
            channel=channel,
            on_event=self._event,
            on_up=self._up,
            on_down=self._down,
            **timing,
        )

    @property
    def database(self) -> PgDatabase:
        return self._database

    async def follow(self, sink: ChangeSink) -> None:
        self._sink = sink
        await self.listener.run()

    async def send_token(self, token: str) -> None:
        # From the LISTEN session itself: ordered behind every earlier commit, and it
        # fails at once when that connection is dead, as a barrier must.
        await self.listener.notify(events.sync_payload(token), self.query_timeout)

    def _event(self, event: events.Event) -> None:
        assert self._sink is not None
        self._sink.handle(event)

    def _up(self) -> None:
        assert self._sink is not None
        self._sink.listener_connected()

    def _down(self, reason: str) -> None:
        assert self._sink is not None
        self._sink.listener_lost(reason)

"""PostgreSQL as a change source: the one LISTEN connection (``listener.py``)
for the changes and barrier tokens, the query pool (``db.py``) for rows, and
between the listener and the engine the check of who sent a whole-table change
(``senders.py``; its look-ups on the LISTEN session)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from sidecar.core import events
from sidecar.core.source import ChangeSink
from sidecar.errors import Unavailable
from sidecar.pg.db import MAY_WRITE_SQL, PgDatabase
from sidecar.pg.listener import Listener
from sidecar.pg.senders import SenderGate


class PgChangeSource:
    """``source.ChangeSource`` over LISTEN/NOTIFY and an asyncpg pool."""

    def __init__(
        self,
        database: PgDatabase,
        *,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        query_timeout: float,
        hears: Callable[[str, str], bool] = lambda schema, table: True,
        check_senders: bool = True,
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
        # (``hears``: whether a table's changes matter here; others cost nothing to check)
        self.senders: SenderGate | None = None
        if check_senders:
            self.senders = SenderGate(
                deliver=self._deliver, check=self._may_write, hears=hears, on_error=self.listener.crash
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

    async def _may_write(self, pid: int, schema: str, table: str) -> bool | None:
        """Whether backend ``pid``'s role may change the table (None: gone, or no such table);
        asked on the LISTEN session, where no pool under load keeps the held events waiting."""
        try:
            # (as long as a ping may take: a LISTEN session slower than that is dead anyway)
            known, may = await self.listener.fetchrow(
                MAY_WRITE_SQL, pid, schema, table, timeout=self.listener.ping_timeout
            )
        except (
            ConnectionError,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # (the connection in a state it cannot take a query in)
        ) as exc:
            raise Unavailable(f"looking up backend {pid}: {type(exc).__name__}: {exc}") from None
        return bool(may) if known else None

    async def close(self) -> None:
        if self.senders is not None:
            await self.senders.close()

    def _event(self, event: events.Event, pid: int) -> None:
        if self.senders is not None:
            self.senders.receive(event, pid)
        else:
            self._deliver(event)

    def _deliver(self, event: events.Event) -> None:
        assert self._sink is not None
        self._sink.handle(event)

    def _up(self) -> None:
        assert self._sink is not None
        self._sink.source_connected()

    def _down(self, reason: str) -> None:
        assert self._sink is not None
        if self.senders is not None:
            self.senders.clear()  # (held events are lost with the connection: a rebuild follows)
        self._sink.source_lost(reason)

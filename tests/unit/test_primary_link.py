"""The barrier's one connection to the primary (``primary.Primary``): a connection the driver
cannot go on with is dropped, the round fails ``Unavailable``, and the next round connects
anew -- else every later barrier would fail on it."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import config as cfg
from sidecar.errors import Unavailable
from sidecar.pg import primary as primary_module


class Broken(Exception):
    """As asyncpg's InternalClientError after a server shutdown (not a connection error)."""


class FakeConn:
    def __init__(self, fail: bool) -> None:
        self.fail, self.terminated, self.statements = fail, False, 0

    def is_closed(self) -> bool:
        return self.terminated

    def terminate(self) -> None:
        self.terminated = True

    async def fetchval(self, sql: str, *args: Any, timeout: float) -> Any:
        self.statements += 1
        if self.fail:
            raise Broken("cannot switch to state 12; another operation (2) is in progress")
        return "0/3000100"


@pytest.mark.asyncio
async def test_a_broken_connection_is_dropped_and_the_next_barrier_connects_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = [FakeConn(fail=True), FakeConn(fail=False)]

    async def connect(config: cfg.Config, application_name: str) -> FakeConn:
        assert config.dsn == "host=primary" and application_name == primary_module.APPLICATION_NAME
        return made.pop(0)

    monkeypatch.setattr(primary_module, "connect", connect)
    link = primary_module.Primary(cfg.Config(dsn="host=standby", primary_dsn="host=primary", capture="logical"))
    with pytest.raises(Unavailable, match="cannot switch to state"):
        await link.emit("cache_sidecar_sync", "t1")
    await link.emit("cache_sidecar_sync", "t2")
    assert link.position == "0/3000100" and not made

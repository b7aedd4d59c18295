"""preflight.check_standby / check_primary: what a hub on a standby refuses (exit 2, the
setting named), on fake connections (the real layout: tests/integration/standby)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import config as cfg
from sidecar.config.settings import validate
from sidecar.errors import ConfigError
from sidecar.pg import preflight


class FakeConn:
    def __init__(self, *, standby: bool, version: int = 160004, feedback: bool = True, wal_level: str = "logical"):
        self.standby, self.version, self.feedback, self.wal_level = standby, version, feedback, wal_level
        self.system = "7000000000000000001"

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any]:
        return {
            "standby": self.standby,
            "version": self.version,
            "feedback": self.feedback,
            "wal_level": self.wal_level,
        }

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if "hot_standby_feedback" in sql:
            return self.feedback
        if "pg_control_system" in sql:
            return self.system
        raise AssertionError(sql)


def _config(**values: Any) -> cfg.Config:
    return cfg.Config(dsn="host=standby", **values)


@pytest.mark.asyncio
async def test_a_primary_is_no_standby_and_primary_dsn_is_then_unused() -> None:
    assert not await preflight.check_standby(FakeConn(standby=False), _config(capture="logical", primary_dsn="x=1"))


@pytest.mark.parametrize(
    ("values", "conn", "key", "words"),
    [
        ({"capture": "notify"}, FakeConn(standby=True), "database.capture", "hot standby"),
        ({"capture": "logical"}, FakeConn(standby=True), "database.primary_dsn", "hot standby"),
        (
            {"capture": "logical", "primary_dsn": "host=p"},
            FakeConn(standby=True, version=150004),
            "database.dsn",
            "PostgreSQL 16",
        ),
    ],
)
@pytest.mark.asyncio
async def test_what_a_standby_refuses(values: dict[str, Any], conn: FakeConn, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await preflight.check_standby(conn, _config(**values))
    assert caught.value.key == key and words in caught.value.problem


@pytest.mark.asyncio
async def test_a_standby_may_be_decoded_on() -> None:
    assert await preflight.check_standby(FakeConn(standby=True), _config(capture="logical", primary_dsn="host=p"))


@pytest.mark.asyncio
async def test_what_the_primary_and_standby_must_be() -> None:
    await preflight.check_primary(FakeConn(standby=False), FakeConn(standby=True))
    other = FakeConn(standby=True, feedback=False)
    other.system = "7000000000000000002"
    with pytest.raises(ConfigError) as caught:
        await preflight.check_primary(FakeConn(standby=True, wal_level="replica"), other)
    problem = caught.value.problem
    assert caught.value.key == "database.primary_dsn"
    for words in ("is a standby too", "wal_level is replica", "hot_standby_feedback is off", "another cluster"):
        assert words in problem, words


def test_primary_dsn_needs_logical_capture() -> None:
    with pytest.raises(ConfigError) as caught:
        validate(_config(primary_dsn="host=p"))
    assert caught.value.key == "database.primary_dsn"
    with pytest.raises(ConfigError) as caught:
        validate(_config(capture="logical", primary_dsn="host=p port=notaport"))
    assert caught.value.key == "database.primary_dsn"

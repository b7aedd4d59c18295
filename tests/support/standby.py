"""A primary and a streaming hot standby from the embedded server's binaries (both local,
each its own directory and port), for hubs that decode on a standby (issue 23, item 2).

The primary runs with ``wal_level = logical`` (a standby decodes only what the primary
logs for it) and logs every statement with its application name (``statements``), so a
test can count what the sidecar asked of it. The standby is ``pg_basebackup -R`` of it
over a physical slot (the primary keeps what the standby has not received, and the
standby's ``hot_standby_feedback`` reaches it through that slot even while the link is
down: without that, the primary could vacuum away catalog rows a logical slot on the
standby still needs, and PostgreSQL 16 would invalidate that slot). Logical decoding on a
standby (PostgreSQL >= 16) also needs ``wal_level = logical`` on the standby itself.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import psycopg2  # type: ignore[import-untyped]

from tests.support.pg import LOGICAL_SETTINGS, LocalCluster, pgserver_bindir

PRIMARY_SETTINGS = {
    **LOGICAL_SETTINGS,
    "max_replication_slots": "30",
    "max_wal_senders": "20",
    "log_statement": "all",
    "log_line_prefix": "app=%a@@",
}
STANDBY_SETTINGS = {
    **LOGICAL_SETTINGS,
    "max_replication_slots": "30",
    "max_wal_senders": "20",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1",
}


@dataclass
class StandbyPair:
    primary: LocalCluster
    standby: LocalCluster

    def stop(self) -> None:
        try:
            self.standby.stop()
        finally:
            self.primary.stop()

    def query(self, dsn: str, sql: str) -> list[tuple[object, ...]]:
        """One statement in a connection of its own (autocommit), its rows."""
        conn = psycopg2.connect(dsn, application_name="standby-test-support")
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()

    def caught_up(self) -> bool:
        """The standby has replayed everything the primary had logged when this asked."""
        (end,) = self.query(self.primary.dsn, "SELECT pg_current_wal_lsn()::text")[0]
        (replayed,) = self.query(self.standby.dsn, f"SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '{end}') >= 0")[0]
        return bool(replayed)

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.caught_up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not catch up with the primary in {timeout:g}s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 60) -> str:
        """The standby's log without the statements (what a failed run shows)."""
        text = (self.standby.base / "log").read_text(errors="replace").splitlines()
        kept = [line for line in text if not line.startswith("app=") and "STATEMENT:" not in line]
        return "\n".join(kept[-lines:])

    def statements(self, application_prefix: str) -> list[str]:
        """The statements the primary has logged for sessions whose application name
        starts with ``application_prefix`` (simple and extended protocol alike)."""
        text = (self.primary.base / "log").read_text(errors="replace")
        return [m.group(2) for m in _STATEMENT.finditer(text) if m.group(1).startswith(application_prefix)]


# (a statement's text runs on to the next line the server logs: SQL may span lines)
_STATEMENT = re.compile(
    r"^app=([^\n]*?)@@[A-Z]+:  (?:statement|execute [^:\n]*): (.*?)(?=^app=|\Z)", re.MULTILINE | re.DOTALL
)


def start_standby_pair(bindir: str | None = None) -> StandbyPair:
    """A logical primary and its hot standby, the standby streaming when this returns."""
    bindir = bindir or pgserver_bindir()
    primary = LocalCluster(bindir, run_as="pgserver", settings=PRIMARY_SETTINGS)
    try:
        standby = LocalCluster(bindir, run_as="pgserver", settings=STANDBY_SETTINGS, standby_of=primary)
    except BaseException:
        primary.stop()
        raise
    pair = StandbyPair(primary, standby)
    try:
        deadline = time.monotonic() + 60
        while not pair.query(primary.dsn, "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'"):
            if time.monotonic() > deadline:
                raise TimeoutError("the standby is not streaming from the primary after 60s")
            time.sleep(0.05)
    except BaseException:
        pair.stop()
        raise
    return pair

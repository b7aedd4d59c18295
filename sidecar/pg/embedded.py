"""The embedded PostgreSQL of the quick start: a throwaway cluster from the
``pgserver`` wheel (it ships the server binaries) with a small demo table.

Only used when no database is configured; production images do not install
``pgserver``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from sidecar.config import IndexConfig, TableConfig
from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_TABLE = TableConfig(
    schema="public",
    name="patron",
    indexes=(IndexConfig("by_dish", ("fav_dish",)), IndexConfig("by_name", ("name",), range=True)),
)

# The patron table of the asyncio case study ("Using Asyncio in Python").
DEMO_SQL = """
CREATE TABLE IF NOT EXISTS public.patron (
    id serial PRIMARY KEY,
    name text NOT NULL,
    fav_dish text
);
INSERT INTO public.patron (id, name, fav_dish) VALUES
    (1, 'Ada', 'pancakes'),
    (2, 'Grace', 'curry'),
    (3, 'Linus', 'herring'),
    (4, 'Barbara', 'ramen'),
    (5, 'Edsger', 'stroopwafel')
ON CONFLICT (id) DO NOTHING;
SELECT setval('public.patron_id_seq', (SELECT max(id) FROM public.patron));
"""


class EmbeddedPostgres:
    """A PostgreSQL server in a local directory, reachable over a Unix socket."""

    def __init__(self, data_dir: str | None = None, logical: bool = False) -> None:
        self._keep = data_dir is not None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="cache-sidecar-pg-"))
        self.logical = logical  # wal_level = logical (for --capture logical)
        self._server: Any = None
        self._restarted = False

    def start(self) -> str:
        """Start (or reuse) the cluster; return its DSN. Blocking: run in a thread."""
        # pgserver's platformdirs warns about XDG_RUNTIME_DIR, also at exit
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            import pgserver
        except ImportError:
            raise ConfigError(
                "database.dsn",
                "no database is configured and the embedded PostgreSQL is not installed; "
                "give --dsn (or PGHOST...), or install the 'embedded' extra (pgserver): "
                "pip install 'pgserver>=0.1.4', or reinstall cache-sidecar with [embedded] (see the README)",
            ) from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", self.data_dir)
        self._server = pgserver.get_server(  # type: ignore[attr-defined]
            self.data_dir, cleanup_mode="stop" if self._keep else "delete"
        )
        dsn: str = self._server.get_uri()
        if self.logical:
            self._enable_logical(pgserver)
        return dsn

    def _enable_logical(self, pgserver: Any) -> None:
        """``wal_level = logical`` (a restart, once per data directory)."""
        level = self._server.psql("SHOW wal_level;")
        if "logical" in level:
            return
        log.info("restarting the embedded PostgreSQL with wal_level = logical")
        self._server.psql(
            "ALTER SYSTEM SET wal_level = logical; ALTER SYSTEM SET max_replication_slots = 20; "
            "ALTER SYSTEM SET max_wal_senders = 20; ALTER SYSTEM SET max_prepared_transactions = 10;"
        )
        pgserver.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self._server.pgdata, user=self._server.system_user)
        self._restarted = True

    @property
    def psql(self) -> str:
        import pgserver

        return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")

    def stop(self) -> None:
        if self._server is not None:
            # pgserver stops only the postmaster it started: after a restart, this one.
            if self._restarted and (Path(self._server.pgdata) / "postmaster.pid").exists():
                import pgserver

                with contextlib.suppress(Exception):
                    pgserver.pg_ctl(  # type: ignore[attr-defined]
                        ["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user
                    )
            self._server.cleanup()
            self._server = None

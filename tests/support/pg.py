"""PostgreSQL servers for the tests: the embedded one (pgserver), an external
one (SIDECAR_TEST_DSN), or a system installation's binaries."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Postgres:
    """A server the tests may use; ``restart`` is None when they may not restart it."""

    dsn: str
    version: str
    handle: Any = None
    kind: str = "embedded"
    wal_level: str = "replica"

    @property
    def logical(self) -> bool:
        """Logical decoding is possible (``database.capture = logical`` can run)."""
        return self.wal_level == "logical"

    @property
    def can_restart(self) -> bool:
        return self.handle is not None and hasattr(self.handle, "restart")

    @property
    def socket_path(self) -> str | None:
        """The server's Unix socket, for a proxy to front (None for external servers)."""
        return getattr(self.handle, "socket_path", None)

    def restart(self) -> None:
        self.handle.restart()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()


class EmbeddedServer:
    """pgserver's cluster (works as root: it runs the server as a 'pgserver' user).

    ``settings`` go to ``postgresql.auto.conf`` (``ALTER SYSTEM``) followed by one restart:
    pgserver starts the server itself and takes no server options, and settings such as
    ``wal_level`` take effect only at a start."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver

        self._pgserver = pgserver
        self.server = pgserver.get_server(tempfile.mkdtemp(prefix="sidecar-test-pg-"), cleanup_mode="delete")
        self.dsn = self.server.get_uri()
        self.socket_path = os.path.join(self.dsn.split("host=")[-1], ".s.PGSQL.5432")
        self._restarted = False  # (then the postmaster is no longer the one pgserver started)
        if settings:
            self.server.psql("".join(f"ALTER SYSTEM SET {name} = '{value}';\n" for name, value in settings.items()))
            self.restart()

    def restart(self) -> None:
        self._pgserver.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.server.pgdata, user=self.server.system_user)
        self._restarted = True

    def stop(self) -> None:
        # pgserver stops only the postmaster it started: after a restart() that one is gone
        # and the new one would outlive the session (holding its CPU and port), so stop it here.
        if self._restarted and (Path(self.server.pgdata) / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                user = self.server.system_user
                self._pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=user)
            # (else pgserver tries to stop the first postmaster -- an unreaped zombie, here
            # -- logs an error and signals it)
            self.server._postmaster_info = None
        self.server.cleanup()

    def postmaster_pid(self) -> int:
        """The running postmaster's process id (its children are the server's processes)."""
        return int((Path(self.server.pgdata) / "postmaster.pid").read_text().split()[0])


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A DSN for scripts (benchmarks): SIDECAR_TEST_DSN, else an embedded server for the duration."""
    external = os.environ.get("SIDECAR_TEST_DSN")
    if external:
        yield external
        return
    server = EmbeddedServer()
    try:
        yield server.dsn
    finally:
        server.stop()


def system_bindir() -> str | None:
    """A system PostgreSQL's bin directory, if one is installed."""
    explicit = os.environ.get("SIDECAR_TEST_PG_BINDIR")
    if explicit:
        return explicit
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if candidates:
        return os.path.dirname(candidates[0])
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if os.path.exists(os.path.join(bindir, "postgres")):
            return bindir
    return None


class LocalCluster:
    """A throwaway cluster from a bin directory, on a Unix socket. As root, the
    server runs as a non-root user (PostgreSQL refuses root)."""

    def __init__(
        self,
        bindir: str,
        run_as: str | None = None,
        settings: dict[str, str] | None = None,
        standby_of: LocalCluster | None = None,
    ) -> None:
        """A new cluster (initdb), or with ``standby_of`` a streaming standby of that one:
        ``pg_basebackup -R`` from it over a physical slot of its own (``standby_slot``), so
        the primary keeps the WAL the standby has not received and hears its feedback."""
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="sidecar-test-syspg-"))
        self.data = self.base / "data"
        self.user = run_as if os.geteuid() == 0 else None
        self.standby_slot = ""
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.base, 0o755)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        if standby_of is None:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        else:
            self.standby_slot = f"standby_{self.base.name.replace('-', '_').lower()}"
            self._run(
                "pg_basebackup",
                *("-D", str(self.data), "-R", "-X", "stream", "-C", "-S", self.standby_slot),
                *("-h", str(standby_of.base), "-p", str(standby_of.port), "-U", "postgres"),
            )
        self.port = _free_port()
        extra = "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.base / "log"),
            "-w",
            "-o",
            f"-h '' -k {self.base} -p {self.port} -c fsync=off{extra}",
            "start",
        )
        self.dsn = f"postgresql://postgres@/postgres?host={self.base}&port={self.port}"
        self.socket_path = str(self.base / f".s.PGSQL.{self.port}")

    def _run(self, program: str, *args: str) -> None:
        command = [os.path.join(self.bindir, program), *args]
        user = self.user
        runuser = shutil.which("runuser") if user else None
        if user and runuser:
            # (subprocess's user= forks without vfork, so the fork handlers of the threads
            # a test runs -- gRPC's -- run in the child: pg_ctl restart died of SIGSEGV
            # there now and then; runuser switches user after a plain vfork and exec)
            command, user = [runuser, "-u", user, "--", *command], None
        subprocess.run(command, check=True, capture_output=True, user=user, timeout=PG_CTL_SECONDS + 30)

    def restart(self) -> None:
        # (-l again: pg_ctl does not remember it, and a server logging to the pipe _run reads
        # would hold that pipe open: the restart would seem to hang until _run's timeout)
        log = str(self.base / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", str(PG_CTL_SECONDS), "-m", "fast", "restart")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", str(PG_CTL_SECONDS), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


# Seconds pg_ctl waits for a stop or restart: with logical capture a fast shutdown waits until
# every walsender has sent its WAL and its client confirmed it, and a sidecar behind a burst of
# writes on a loaded machine takes a while to read its backlog (pg_ctl's own default is 60 s).
PG_CTL_SECONDS = 300


def pgserver_bindir() -> str:
    """The bin directory of the pgserver wheel's PostgreSQL (the embedded server's version)."""
    import pgserver._commands

    return str(pgserver._commands.POSTGRES_BIN_PATH)


# What logical decoding needs (issue 21), with room for the tests' slots and prepared
# transactions; a small logical_decoding_work_mem makes modest transactions stream.
LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "10",
    "max_prepared_transactions": "10",
    "logical_decoding_work_mem": "64kB",
}

# The test session's shared server: every capture mode can run on it (each daemon in
# logical mode holds one replication connection and one temporary slot, and tests start
# several daemons at once, in parallel sessions too); logical_decoding_work_mem keeps its
# default, so the daemons' transactions decode in memory as they would in production.
SESSION_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "64",
    "max_wal_senders": "64",
    "max_prepared_transactions": "10",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

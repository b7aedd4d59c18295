"""``cache-sidecar capture`` (and its older name ``triggers``) in logical mode, as a process:
the publication's script for a DBA, install, uninstall; the mode from a flag, the file or the
environment."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

CLI = str(Path(sys.executable).parent / "cache-sidecar")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env={**clean, **env}, timeout=60)


@pytest.fixture
async def tables(logical_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    conn = await asyncpg.connect(logical_dsn)
    schema = f"c_{secrets.token_hex(4)}"
    await conn.execute(f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.a (id int PRIMARY KEY);
        CREATE TABLE {schema}.b (id int PRIMARY KEY)""")
    try:
        yield conn, schema
    finally:
        rows = await conn.fetch("SELECT DISTINCT pubname FROM pg_publication_tables WHERE schemaname = $1", schema)
        for row in rows:
            await conn.execute(f'DROP PUBLICATION "{row["pubname"]}"')
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def test_capture_manages_the_publication_in_logical_mode(logical_dsn, tables, tmp_path) -> None:
    conn, schema = tables
    flags = ["--dsn", logical_dsn, "--table", f"{schema}.a", "--table", f"{schema}.b"]
    sql = run("capture", "sql", "--capture", "logical", *flags)
    assert sql.returncode == 0, sql.stderr
    assert "-- Logical capture also needs:\n--   wal_level = logical" in sql.stdout and "REPLICATION" in sql.stdout
    assert f'FOR TABLE "{schema}"."a", "{schema}"."b" WITH (publish = ' in sql.stdout
    assert "CREATE TRIGGER" not in sql.stdout
    name = sql.stdout.split("CREATE PUBLICATION ")[1].split()[0].strip('"')
    # A DBA runs the script as it is:
    await conn.execute(sql.stdout)
    assert await conn.fetchval("SELECT count(*) FROM pg_publication_tables WHERE pubname = $1", name) == 2
    assert "nothing to run" in run("capture", "sql", "--capture", "logical", *flags).stdout
    install = run("capture", "install", "--capture", "logical", *flags)
    assert install.returncode == 0 and install.stdout == "already installed: nothing to do\n", install.stderr
    assert not await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cache_sidecar_%'")

    removal = run("capture", "sql", "--uninstall-sql", "--capture", "logical", *flags)
    assert f'DROP PUBLICATION IF EXISTS "{name}";' in removal.stdout
    assert run("triggers", "uninstall", "--capture", "logical", *flags).stdout == f"removed: publication {name}\n"
    assert not await conn.fetchval("SELECT count(*) FROM pg_publication WHERE pubname = $1", name)
    assert run("capture", "uninstall", "--capture", "logical", *flags).stdout.startswith("not installed")

    # the mode from the file or the environment, as for 'serve'
    config = tmp_path / "sidecar.toml"
    config.write_text('[database]\ncapture = "logical"\n')
    assert run("capture", "install", "--config", str(config), *flags).stdout == f"installed: publication {name}\n"
    assert run("triggers", "install", *flags, CACHE_SIDECAR_DATABASE_CAPTURE="logical").stdout.startswith(
        "already installed"
    )
    await conn.execute(f'ALTER PUBLICATION "{name}" DROP TABLE {schema}.b')
    script = run("capture", "sql", "--capture", "logical", *flags).stdout
    assert (
        f"-- it exists but it lacks {schema}.b\n" in script and f'SET TABLE "{schema}"."a", "{schema}"."b";' in script
    )
    assert run("capture", "install", "--capture", "logical", *flags).stdout == f"installed: publication {name}\n"


async def test_capture_install_refuses_a_table_without_replica_identity(logical_dsn, tables) -> None:
    conn, schema = tables
    await conn.execute(f"ALTER TABLE {schema}.a REPLICA IDENTITY NOTHING")
    done = run("capture", "install", "--capture", "logical", "--dsn", logical_dsn, "--table", f"{schema}.a")
    assert done.returncode == 2
    assert f"table {schema}.a has REPLICA IDENTITY NOTHING" in done.stderr and "REPLICA IDENTITY FULL" in done.stderr
    assert not await conn.fetchval("SELECT count(*) FROM pg_publication_tables WHERE schemaname = $1", schema)

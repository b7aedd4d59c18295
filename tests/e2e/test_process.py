"""The daemon as a separate process, driven over gRPC by the client: start-up,
the embedded quick start, signals, the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import grpc
import pytest
from cache_sidecar_client import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.waiting import wait_until

EXE = [sys.executable, "-m", "sidecar"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    env.update(extra)
    return env


def wait_serving(target: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode}: {process.stderr.read()}")
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_until(serving, timeout, 0.05, what="daemon SERVING")


@pytest.fixture
def table(postgres, schema) -> Iterator[str]:
    import asyncio

    async def create() -> None:
        conn = await asyncpg.connect(postgres.dsn)
        await conn.execute(f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)")
        await conn.execute(f"INSERT INTO {schema}.patron VALUES (1, 'Ada'), (2, 'Grace')")
        await conn.close()

    asyncio.run(create())
    yield f"{schema}.patron"


def run_sql(dsn: str, sql: str) -> None:
    import asyncio

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute(sql)
        await conn.close()

    asyncio.run(go())


def eventually(check, timeout: float = 10.0):
    return wait_until(check, timeout, 0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_then_signal_exits_zero(postgres, table, tmp_path, signum):
    port = free_port()
    sock = tmp_path / "grpc.sock"
    process = subprocess.Popen(
        [
            *EXE,
            "serve",
            "--dsn",
            postgres.dsn,
            "--table",
            table,
            "--install-triggers",
            "--listen",
            f"127.0.0.1:{port}",
            "--listen",
            f"unix://{sock}",
            "--grace-period",
            "5",
        ],
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with Client(f"unix://{sock}") as cache:
            assert cache.get(table, 1) == {"id": 1, "name": "Ada"}
            run_sql(postgres.dsn, f"UPDATE {table} SET name = 'Ada L.' WHERE id = 1")
            eventually(lambda: cache.get(table, 1)["name"] == "Ada L.")
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
        log = process.stderr.read()
        assert "shutting down" in log and "stopped" in log
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()


def test_embedded_quick_start(tmp_path):
    """`cache-sidecar serve` with nothing configured: embedded PostgreSQL + demo table."""
    port = free_port()
    process = subprocess.Popen(
        [*EXE, "serve", "--listen", f"127.0.0.1:{port}"],
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout=120)
        banner = ""
        while "Stop with Ctrl-C" not in banner:
            banner += process.stderr.readline()
        dsn = re.search(r"database\s+(\S+)", banner).group(1)
        assert f"get public.patron 1 --target 127.0.0.1:{port}" in banner
        with Client(f"127.0.0.1:{port}") as cache:
            assert cache.get("public.patron", 1)["name"] == "Ada"
            run_sql(dsn, "UPDATE patron SET fav_dish = 'waffles' WHERE id = 1")
            eventually(lambda: cache.get("public.patron", 1)["fav_dish"] == "waffles")
        got = subprocess.run(
            [*EXE, "get", "public.patron", "1", "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.returncode == 0 and '"waffles"' in got.stdout
        # the demo table's indexes, through the CLI
        listing = subprocess.run([*EXE, "tables", "--target", f"127.0.0.1:{port}"], capture_output=True, text=True)
        assert "index by_dish (fav_dish) equality" in listing.stdout and "index by_name (name) range" in listing.stdout
        by_dish = subprocess.run(
            [*EXE, "query", "public.patron", "by_dish", "waffles", "curry", "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
        )
        assert by_dish.returncode == 0, by_dish.stderr
        assert [json.loads(line)["name"] for line in by_dish.stdout.splitlines()] == ["Ada", "Grace"]
        by_name = subprocess.run(
            [
                *EXE,
                "query",
                "public.patron",
                "by_name",
                "--lower",
                "B",
                "--limit",
                "2",
                "--target",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
        )
        assert [json.loads(line)["name"] for line in by_name.stdout.splitlines()] == ["Barbara", "Edsger"]
        assert "more rows matched" in by_name.stderr
        wrong = subprocess.run(
            [*EXE, "query", "public.patron", "by_dish", "--lower", "a", "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
        )
        assert wrong.returncode == 1 and "INVALID_ARGUMENT" in wrong.stderr and "not a range index" in wrong.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_help_and_version():
    out = subprocess.run([*EXE, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout and "triggers" in out.stdout
    out = subprocess.run([*EXE, "serve", "--help"], capture_output=True, text=True)
    assert "CACHE_SIDECAR_SERVER_LISTEN" in out.stdout and "--install-triggers" in out.stdout
    out = subprocess.run([*EXE, "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"cache-sidecar \d+\.\d+\.\d+\n", out.stdout)


def test_config_errors_exit_2_and_name_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nlisten = ['127.0.0.1:99999']\n")
    out = subprocess.run([*EXE, "serve", "--config", str(config)], capture_output=True, text=True, env=clean_env())
    assert out.returncode == 2
    assert "server.listen" in out.stderr and "0-65535" in out.stderr
    out = subprocess.run(
        [*EXE, "serve", "--dsn", "postgresql://u:pw-secret@127.0.0.1:1/db", "--print-config"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert out.returncode == 0 and "pw-secret" not in out.stdout and "u:***@" in out.stdout


def test_triggers_command(postgres, table):
    base = [*EXE, "triggers"]
    flags = ["--dsn", postgres.dsn, "--table", table]
    sql = subprocess.run([*base, "sql", *flags], capture_output=True, text=True, env=clean_env())
    assert sql.returncode == 0 and re.search(r"CREATE TRIGGER cache_sidecar_[0-9a-f]{10}_update ", sql.stdout)
    first = subprocess.run([*base, "install", *flags], capture_output=True, text=True, env=clean_env())
    again = subprocess.run([*base, "install", *flags], capture_output=True, text=True, env=clean_env())
    assert first.stdout.startswith("installed:") and again.stdout.startswith("already installed")
    gone = subprocess.run([*base, "uninstall", *flags], capture_output=True, text=True, env=clean_env())
    assert gone.returncode == 0 and gone.stdout.startswith("removed:")
    missing = subprocess.run(
        [*base, "install", "--dsn", postgres.dsn, "--table", "public.no_such"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_capture_is_the_triggers_command_by_a_better_name(postgres, table):
    flags = ["--dsn", postgres.dsn, "--table", table]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EXE, *args, *flags], capture_output=True, text=True, env=clean_env())

    sql = run("capture", "sql")
    assert sql.returncode == 0 and sql.stdout == run("triggers", "sql").stdout  # notify: the triggers
    assert re.search(r"CREATE TRIGGER cache_sidecar_[0-9a-f]{10}_update ", sql.stdout)
    assert run("capture", "install").stdout.startswith("installed:")
    assert run("triggers", "install").stdout.startswith("already installed")
    assert run("capture", "uninstall").stdout.startswith("removed:")
    # logical mode's publication can be made before the server is ready for it, and it says so
    install = run("capture", "install", "--capture", "logical")
    assert install.returncode == 0 and install.stdout.startswith("installed: publication cache_sidecar_")
    note = "and logical capture needs logical"  # (the session's server may run either way)
    assert (note in install.stdout) == (not postgres.logical), install.stdout
    assert run("capture", "uninstall", "--capture", "logical").stdout.startswith("removed: publication")


def test_unreachable_sidecar_is_a_clear_cli_error():
    out = subprocess.run(
        [*EXE, "get", "public.patron", "1", "--target", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr

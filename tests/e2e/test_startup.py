"""The first minutes, through the real console script: a DSN that cannot parse
exits 2 at once, SIGTERM while the database is still unreachable exits 0,
a config file that is not UTF-8 is a config error, --print-config is TOML."""

from __future__ import annotations

import asyncio
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

SCRIPT = Path(sys.executable).with_name("cache-sidecar")
EXE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sidecar"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens once the probe is closed


def read_until(process: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """stderr up to the first line containing ``needle`` (fails after ``timeout``)."""
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    # (the file descriptor itself: a buffered readline may take several lines off the pipe
    # and return one, and select() then waits for more output that a quiet daemon never writes)
    fd = process.stderr.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not logged within {timeout}s: {seen}")
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # end of file: the process is gone
                raise AssertionError(f"exited with {process.wait()} before logging {needle!r}: {seen}")
            seen += chunk.decode(errors="replace")
    return seen


def test_a_dsn_that_cannot_parse_exits_2_at_once():
    started = time.monotonic()
    out = subprocess.run(
        [*EXE, "serve", "--dsn", "postgres//app:hunter2@db", "--table", "x"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 30
    assert "config database.dsn" in out.stderr and "postgresql://" in out.stderr
    assert "hunter2" not in out.stderr and "retrying" not in out.stderr
    unknown = subprocess.run(
        [*EXE, "serve", "--dsn", "host=db dbnme=shop", "--table", "x"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert unknown.returncode == 2 and "did you mean dbname?" in unknown.stderr


def test_sigterm_while_the_database_is_unreachable_exits_0():
    port = closed_port()
    process = subprocess.Popen(
        [*EXE, "serve", "--dsn", f"host=127.0.0.1 port={port} user=app dbname=shop", "--table", "x"],
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = read_until(process, "retrying in", timeout=60)
        assert f"cannot connect to 127.0.0.1:{port}" in before  # the refusal names where it was tried
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = before + process.stderr.read()  # type: ignore[union-attr]
        assert "SIGTERM: shutting down" in log and "stopped during start-up" in log
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            process.kill()


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "sidecar.toml"
    path.write_bytes('[database]\ndsn = "host=db user=jos\xe9"\n'.encode("latin-1"))
    out = subprocess.run([*EXE, "serve", "--config", str(path)], capture_output=True, text=True, env=clean_env())
    assert out.returncode == 2
    assert str(path) in out.stderr and "UTF-8" in out.stderr and "Traceback" not in out.stderr


def test_print_config_is_toml_and_a_command_line_password_is_warned_about(tmp_path):
    out = subprocess.run(
        [*EXE, "serve", "--dsn", "host=db user=app password=pw-secret", "--table", "shop.item", "--print-config"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    data = tomllib.loads(out.stdout)
    assert data["database"]["dsn"] == "host=db user=app"  # loads back; the password comes from PGPASSWORD etc.
    assert "password is left out: give it in PGPASSWORD" in out.stdout
    assert data["server"]["listen"] == ["127.0.0.1:50051"] and data["tables"] == [{"name": "shop.item", "mode": "full"}]
    assert "pw-secret" not in out.stdout + out.stderr
    assert "warning:" in out.stderr and "CACHE_SIDECAR_DATABASE_DSN" in out.stderr


# ---------------------------------------------------------------- before any side effect


def run_sql(dsn: str, *statements: str) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [await conn.fetch(sql) for sql in statements]
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.fixture
def role(postgres, schema) -> Iterator[tuple[str, str]]:
    """A login role that may use the test's schema and nothing more yet: (name, DSN)."""
    parts = urllib.parse.urlsplit(postgres.dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        pytest.skip("needs a URI DSN to derive another role's")
    name, password = f"op_{secrets.token_hex(4)}", secrets.token_hex(8)
    run_sql(
        postgres.dsn, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'", f"GRANT USAGE ON SCHEMA {schema} TO {name}"
    )
    host = parts.netloc.rpartition("@")[2]
    try:
        yield name, urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:{password}@{host}"))
    finally:
        run_sql(postgres.dsn, f"DROP OWNED BY {name}", f"DROP ROLE {name}")


def serve_until_exit(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``serve`` that must stop by itself (a start that goes on serving fails the test)."""
    process = subprocess.Popen([*EXE, "serve", *args], env=clean_env(), stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"serve did not stop within {timeout}s: {stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


def has_triggers(dsn: str, table: str) -> bool:
    (rows,) = run_sql(dsn, f"SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND NOT tgisinternal")
    return bool(rows[0][0])


def test_a_role_without_select_stops_the_start_naming_table_and_privilege(postgres, schema, role):
    name, role_dsn = role
    run_sql(
        postgres.dsn,
        f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)",
        f"CREATE TABLE {schema}.price (id int PRIMARY KEY, amount numeric)",
        f"CREATE TABLE {schema}.city (id int PRIMARY KEY, name text)",
        f"GRANT SELECT ON {schema}.city TO {name}",
    )
    # The triggers exist (a DBA installed them): only the privilege is missing.
    installed = subprocess.run(
        [*EXE, "triggers", "install", "--dsn", postgres.dsn]
        + [f"--table={schema}.{t}" for t in ("patron", "price", "city")],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    # Before the fix it logged "ready", said SERVING and failed every read with UNAVAILABLE.
    out = serve_until_exit(
        "--dsn", role_dsn, "--listen", "127.0.0.1:0",
        "--table", f"{schema}.patron", "--table", f"{schema}.price:lazy", "--table", f"{schema}.city",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"SELECT on table {schema}.patron" in out.stderr
    assert f"SELECT on table {schema}.price" in out.stderr  # a lazy table too: it would fail at the first miss
    assert f"{schema}.city" not in out.stderr.split("lacks", 1)[1]
    assert "Traceback" not in out.stderr and "ready" not in out.stderr


def test_a_missing_socket_directory_stops_the_start_before_any_trigger_is_installed(postgres, schema, tmp_path):
    run_sql(postgres.dsn, f"CREATE TABLE {schema}.patron (id int PRIMARY KEY)")
    missing = tmp_path / "run" / "cache-sidecar"
    out = serve_until_exit(
        "--dsn", postgres.dsn, "--table", f"{schema}.patron", "--install-triggers",
        "--listen", "127.0.0.1:0", "--listen", f"unix://{missing}/grpc.sock",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "config server.listen" in out.stderr and f"directory {missing} does not exist" in out.stderr
    assert not has_triggers(postgres.dsn, f"{schema}.patron")  # (before the fix: installed, then the start failed)


def test_a_port_in_use_is_said_plainly_before_any_trigger_is_installed(postgres, schema):
    run_sql(postgres.dsn, f"CREATE TABLE {schema}.patron (id int PRIMARY KEY)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = serve_until_exit(
            "--dsn", postgres.dsn, "--table", f"{schema}.patron", "--install-triggers", "--listen", f"127.0.0.1:{port}"
        )
    assert out.returncode == 2, out.stderr
    assert f"port {port} is in use" in out.stderr and "config server.listen" in out.stderr
    assert not has_triggers(postgres.dsn, f"{schema}.patron")


def test_a_table_without_triggers_and_a_role_that_cannot_install_them_exit_2(postgres, schema, role):
    name, role_dsn = role
    run_sql(
        postgres.dsn, f"CREATE TABLE {schema}.patron (id int PRIMARY KEY)", f"GRANT SELECT ON {schema}.patron TO {name}"
    )
    no_triggers = serve_until_exit("--dsn", postgres.dsn, "--table", f"{schema}.patron", "--listen", "127.0.0.1:0")
    assert no_triggers.returncode == 2, no_triggers.stderr  # (was 1)
    assert "has no cache-sidecar triggers" in no_triggers.stderr
    cannot_install = serve_until_exit(
        "--dsn", role_dsn, "--table", f"{schema}.patron", "--install-triggers", "--listen", "127.0.0.1:0"
    )
    assert cannot_install.returncode == 2, cannot_install.stderr  # (was 1)
    assert f"permission denied for schema {schema}" in cannot_install.stderr


def test_a_privilege_revoked_at_run_time_is_failed_precondition_with_the_cause(postgres, schema, role):
    import grpc

    from sidecar.api.v1 import cache_pb2 as pb
    from sidecar.api.v1 import cache_pb2_grpc as pb_grpc

    name, role_dsn = role
    table = f"{schema}.price"
    run_sql(
        postgres.dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, amount numeric)", f"GRANT SELECT ON {table} TO {name}"
    )
    installed = subprocess.run(
        [*EXE, "triggers", "install", "--dsn", postgres.dsn, "--table", table],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{probe.getsockname()[1]}"
    process = subprocess.Popen(
        [*EXE, "serve", "--dsn", role_dsn, "--table", f"{table}:lazy", "--listen", target],
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(process, "ready:", timeout=60)
        run_sql(postgres.dsn, f"REVOKE SELECT ON {table} FROM {name}")
        with grpc.insecure_channel(target) as channel:
            key = pb.Key(parts=[pb.KeyPart(int_value=7)])
            with pytest.raises(grpc.RpcError) as failed:
                pb_grpc.CacheStub(channel).Get(pb.GetRequest(table=table, key=key), timeout=10)
        # Not UNAVAILABLE, which clients retry for ever: asking again cannot help.
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failed.value
        assert "permission denied for table price" in failed.value.details()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_relation_whose_source_or_query_cannot_be_read_stops_the_start(postgres, schema, role, tmp_path):
    name, role_dsn = role
    run_sql(
        postgres.dsn,
        f"CREATE TABLE {schema}.users (user_id int PRIMARY KEY, city_id int)",
        f"CREATE TABLE {schema}.cities (city_id int PRIMARY KEY, name text)",
        f"CREATE TABLE {schema}.secret (city_id int PRIMARY KEY)",
        f"GRANT SELECT ON {schema}.users TO {name}",
    )
    config = tmp_path / "sidecar.toml"

    def relation(query: str, sources: str) -> str:
        head = f'[[tables]]\nname = "{schema}.user_city"\nquery = "{query}"\nkey = ["user_id"]\n'
        return f"{head}[tables.sources]\n{sources}"

    config.write_text(
        relation(
            f"SELECT u.user_id, city_id, c.name FROM {schema}.users u JOIN {schema}.cities c USING (city_id)",
            f'"{schema}.users" = {{ user_id = "user_id" }}\n"{schema}.cities" = {{ city_id = "city_id" }}\n',
        )
    )
    out = serve_until_exit("--config", str(config), "--dsn", role_dsn, "--listen", "127.0.0.1:0")
    assert out.returncode == 2, out.stderr
    assert f"SELECT on table {schema}.cities" in out.stderr and f"{schema}.users" not in out.stderr.split("lacks")[1]
    # A table its query reads but that is not a declared source: found by planning the query.
    run_sql(postgres.dsn, f"GRANT SELECT ON {schema}.cities TO {name}")
    config.write_text(
        relation(
            f"SELECT u.user_id FROM {schema}.users u WHERE u.city_id NOT IN (SELECT city_id FROM {schema}.secret)",
            f'"{schema}.users" = {{ user_id = "user_id" }}\n',
        )
    )
    out = serve_until_exit("--config", str(config), "--dsn", role_dsn, "--listen", "127.0.0.1:0")
    assert out.returncode == 2, out.stderr
    assert (
        f"relation {schema}.user_city's query reads" in out.stderr
        and "permission denied for table secret" in out.stderr
    )

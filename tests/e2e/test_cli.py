"""The command line as a new user meets it: the console script as a process, against a
daemon process. Rows print byte for byte, a reader that stops early is no error, the
errors say what to do, every command explains itself."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.cli import build_parser
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "cache-sidecar")  # the console script, as installed
# Values JSON cannot round-trip through floats or ASCII escapes.
BIG = "12345678901234567890.0123456789"
LABEL = "crème brûlée"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a process SIGPIPE killed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CACHE_SIDECAR_"))}


def run_sql(dsn: str, *statements: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CLI, *args], capture_output=True, env=clean_env(), timeout=timeout)


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if process.poll() is not None:
                assert process.stderr is not None
                raise RuntimeError(f"daemon exited with {process.returncode}: {process.stderr.read().decode()}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, timeout=timeout, interval=0.05, what="the daemon SERVING")


@dataclass
class Daemon:
    target: str
    health_port: int
    table: str
    config: Path
    dsn: str


@pytest.fixture
def daemon(postgres, schema, tmp_path) -> Iterator[Daemon]:
    """A sidecar process serving a table whose row the CLI must not change."""
    table = f"{schema}.price"
    run_sql(
        postgres.dsn,
        f"CREATE TABLE {table} (id int PRIMARY KEY, amount numeric, exact numeric(10, 3), label text)",
        f"INSERT INTO {table} VALUES (1, {BIG}, 1.000, '{LABEL}')",
    )
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[[tables]]\nname = "{table}"\n[[tables.indexes]]\nname = "by_label"\ncolumns = ["label"]\n',
        encoding="utf-8",
    )
    port, health_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            CLI,
            "serve",
            "--config",
            str(config),
            "--dsn",
            postgres.dsn,
            "--install-triggers",
            "--listen",
            f"127.0.0.1:{port}",
            "--health-listen",
            f"127.0.0.1:{health_port}",
        ],
        env=clean_env(),
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        yield Daemon(f"127.0.0.1:{port}", health_port, table, config, postgres.dsn)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def served_row(daemon: Daemon) -> bytes:
    with grpc.insecure_channel(daemon.target) as channel:
        key = pb.Key(parts=[pb.KeyPart(string_value="1")])
        reply = pb_grpc.CacheStub(channel).Get(pb.GetRequest(table=daemon.table, key=key), timeout=10)
    assert reply.found
    return bytes(reply.row)


def test_get_and_query_print_the_row_byte_for_byte(daemon):
    row = served_row(daemon)
    assert BIG.encode() in row and b"1.000" in row and LABEL.encode() in row  # what the daemon serves
    got = cli("get", daemon.table, "1", "--target", daemon.target)
    assert got.returncode == 0, got.stderr
    assert got.stdout == row + b"\n"
    found = cli("query", daemon.table, "by_label", LABEL, "--target", daemon.target)
    assert found.returncode == 0, found.stderr
    assert found.stdout == row + b"\n"
    pretty = cli("get", daemon.table, "1", "--target", daemon.target, "--pretty")
    assert pretty.returncode == 0, pretty.stderr
    assert pretty.stdout.count(b"\n") > 2  # one member a line
    assert b"".join(pretty.stdout.split()) == b"".join(row.split())  # whitespace is all that changed
    assert f'"label": "{LABEL}"'.encode() in pretty.stdout


def test_health_answers_on_the_health_only_port(daemon):
    """As deploy/README.md suggests for that port, which has no reflection for grpcurl."""
    for service in ("", "liveness"):
        answer = cli("health", "--target", f"127.0.0.1:{daemon.health_port}", "--service", service)
        assert answer.returncode == 0 and answer.stdout == b"SERVING\n", answer


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI writing to a pipe nobody reads any more (``| head -1`` once head has
    exited): every write fails with EPIPE, deterministically."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.Popen([CLI, *args], stdout=write_end, stderr=subprocess.PIPE, env=clean_env())
    finally:
        os.close(write_end)
    _, stderr = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, b"", stderr)


def test_a_reader_that_stops_early_is_no_error(daemon):
    commands = [
        ["tables", "--target", daemon.target],
        ["get", daemon.table, "1", "--target", daemon.target],
        ["get", daemon.table, "1", "--target", daemon.target, "--pretty"],
        ["query", daemon.table, "by_label", LABEL, "--target", daemon.target],
        ["health", "--target", daemon.target],
        ["triggers", "sql", "--config", str(daemon.config), "--dsn", daemon.dsn],
        ["serve", "--dsn", "postgresql://u@127.0.0.1:1/db", "--print-config"],  # (no password: no warning)
    ]
    for args in commands:
        result = closed_pipe_run(*args)
        assert result.stderr == b"", (args, result.stderr.decode())
        assert result.returncode == EXIT_BROKEN_PIPE, (args, result.returncode)
    helped = closed_pipe_run("serve", "--help")  # argparse ignores the failed write itself: exit 0
    assert helped.stderr == b"" and helped.returncode == 0


@pytest.fixture
def reader_role(postgres, schema) -> Iterator[str]:
    """A DSN for a role that may read the table but neither create in its schema nor own it,
    as a sidecar's role should be."""
    parts = urllib.parse.urlsplit(postgres.dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        pytest.skip("needs a URI DSN to derive another role's")
    role, password = f"reader_{secrets.token_hex(4)}", secrets.token_hex(8)
    run_sql(
        postgres.dsn,
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
        f"CREATE TABLE {schema}.patron (id int PRIMARY KEY, name text)",
        f"GRANT USAGE ON SCHEMA {schema} TO {role}",
        f"GRANT SELECT ON {schema}.patron TO {role}",
    )
    host = parts.netloc.rpartition("@")[2]
    try:
        yield urllib.parse.urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))
    finally:
        run_sql(postgres.dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_triggers_install_without_privileges_says_which_and_what_to_do_instead(reader_role, schema):
    table = f"{schema}.patron"
    result = cli("triggers", "install", "--dsn", reader_role, "--table", table)
    assert result.returncode == 2  # a permission problem: the user's to fix, as the README's exit rule says
    message = result.stderr.decode()
    assert "permission denied" in message  # PostgreSQL's own words, first
    assert f"CREATE on schema {schema}" in message and f"ownership of table {table}" in message
    assert "cache-sidecar triggers sql" in message
    assert "Traceback" not in message


def test_a_second_sidecar_on_the_same_health_port_fails_naming_the_setting(daemon):
    process = subprocess.Popen(
        [
            CLI,
            "serve",
            "--config",
            str(daemon.config),
            "--dsn",
            daemon.dsn,
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            f"127.0.0.1:{daemon.health_port}",
        ],
        env=clean_env(),
        stderr=subprocess.PIPE,
    )
    try:
        # Before the fix it shared the port and served on: the wait times out.
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, stderr.decode()
    assert "server.health_listen" in stderr.decode() and f"127.0.0.1:{daemon.health_port}" in stderr.decode()


def test_an_unknown_dev_task_says_so_and_exits_2():
    result = subprocess.run([str(ROOT / "dev"), "nosuch"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown task 'nosuch'" in result.stderr and "./dev test" in result.stdout
    helped = subprocess.run([str(ROOT / "dev"), "help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "unknown" not in helped.stderr and "./dev test" in helped.stdout


def test_make_forwards_every_dev_task():
    tasks = set(re.findall(r"^  ([a-z]+)\)$", (ROOT / "dev").read_text(), re.MULTILINE))
    assert {"run", "test", "dist"} <= tasks  # (the pattern still finds the case labels)
    (phony,) = re.findall(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert tasks | {"help"} <= set(phony.split()), "README: `make` forwards every ./dev command"


def test_the_readme_speaks_to_users():
    """No per-release notes, no internal targets, no path that holds for one Python only."""
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"python3\.\d+/", readme), "./dev picks 3.11, 3.12 or 3.13: write python3.*"
    for words in ("previous release", "the final code", "provisional", "target ≥", "target ≤", "goal ≥", "goal ≤"):
        assert words not in readme.lower(), words
    assert not re.search(r"short of the [0-9.]+\S target", readme)
    numbers = [int(n) for n in re.findall(r"^(\d+)\. \*\*", readme.split("### What is guaranteed")[1], re.MULTILINE)]
    numbers = numbers[: numbers.index(1, 1)] if 1 in numbers[1:] else numbers  # (the first list only)
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_every_command_has_help_and_a_description():
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, subparser in commands.choices.items():
        assert listed.get(name), f"'{name}' has no help line in 'cache-sidecar --help'"
        assert subparser.description, f"'cache-sidecar {name} --help' has no description"
        shown = cli(name, "--help")
        assert shown.returncode == 0, shown.stderr
        first_words = " ".join(subparser.description.split()[:6])
        assert first_words in " ".join(shown.stdout.decode().split()), name
        for action in subparser._actions:
            assert action.help, f"'cache-sidecar {name}': {action.dest} has no help"


def test_through_a_follower_whose_hub_is_down_the_error_names_the_hub(postgres, schema, tmp_path):
    table = f"{schema}.patron"
    run_sql(
        postgres.dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, name text)", f"INSERT INTO {table} VALUES (1, 'Ada')"
    )
    hub, follower = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    hub_log, follower_log = tmp_path / "hub.log", tmp_path / "follower.log"
    with hub_log.open("wb") as out:
        hub_process = subprocess.Popen(
            [CLI, "serve", "--dsn", postgres.dsn, "--table", table, "--install-triggers", "--listen", hub],
            env=clean_env(),
            stderr=out,
        )
    with follower_log.open("wb") as out:
        follower_process = subprocess.Popen(
            [CLI, "serve", "--upstream", hub, "--listen", follower], env=clean_env(), stderr=out
        )
    try:
        wait_serving(hub, hub_process)
        wait_serving(follower, follower_process)
        assert cli("get", table, "1", "--target", follower).returncode == 0
        log = follower_log.read_text()
        assert "the upstream stream is up" in log and "the listener is up" not in log, log
        hub_process.terminate()
        assert hub_process.wait(timeout=30) == 0
        # (the follower serves from memory until it notices the stream is gone)
        failed = wait_until(
            lambda: (result := cli("get", table, "1", "--target", follower)).returncode != 0 and result,
            60,
            0.1,
            what="the follower to stop answering from memory",
        )
        for result in (failed, cli("get", table, "1", "--target", follower, "--strong")):
            message = result.stderr.decode()
            assert f"the follower at {follower} is up, but its upstream {hub} is unreachable" in message, message
            assert "database" not in message and "listener" not in message
        with grpc.insecure_channel(follower) as channel, pytest.raises(grpc.RpcError) as synced:
            pb_grpc.CacheStub(channel).Sync(pb.SyncRequest(), timeout=10)
        assert synced.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream {hub} unreachable" in synced.value.details(), synced.value.details()
    finally:
        for process in (hub_process, follower_process):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


async def test_watch_prints_changes_with_rows_as_get_does_resumes_and_ends_on_ctrl_c(daemon):
    import json
    import signal

    from tests.support.proxy import Proxy

    host, port = daemon.target.rsplit(":", 1)
    proxy = Proxy(host=host, port=int(port))
    await proxy.start()
    watcher = await asyncio.create_subprocess_exec(
        CLI, "watch", daemon.table, "--initial-state", "--target", f"127.0.0.1:{proxy.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    assert watcher.stdout is not None and watcher.stderr is not None

    async def line() -> bytes:
        return await asyncio.wait_for(watcher.stdout.readline(), 60)  # type: ignore[union-attr]

    async def update(label: str) -> bytes:
        conn = await asyncpg.connect(daemon.dsn)
        try:
            await conn.execute(f"UPDATE {daemon.table} SET label = $1 WHERE id = 1", label)
        finally:
            await conn.close()
        got = await asyncio.to_thread(cli, "get", daemon.table, "1", "--target", daemon.target, "--strong")
        assert got.returncode == 0, got.stderr
        return got.stdout.rstrip(b"\n")

    def change(printed: bytes, row: bytes, op: str) -> None:
        assert printed.endswith(b', "row": ' + row + b"}\n"), printed  # the row byte for byte, as get prints it
        document = json.loads(printed)
        assert document["table"] == daemon.table and document["op"] == op and document["key"] == [1], document

    try:
        change(await line(), served_row(daemon), "snapshot")
        assert "initial_state_done" in json.loads(await line())
        updated = await update(f"{LABEL} 2")
        change(await line(), updated, "update")
        proxy.cut()  # the connection breaks: the watch resumes from the last revision
        newer = await update(f"{LABEL} 3")
        resumed = await line()
        assert b"reset" not in resumed
        change(resumed, newer, "update")
        watcher.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(watcher.wait(), 30) == 0
        errors = (await watcher.stderr.read()).decode()
        assert "resuming" in errors and "Traceback" not in errors, errors
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        await proxy.close()


async def test_watch_across_a_sidecar_restart_prints_a_reset_and_goes_on(postgres, schema):
    import json

    table = f"{schema}.patron"
    conn = await asyncpg.connect(postgres.dsn)
    await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text); INSERT INTO {table} VALUES (1, 'Ada')")
    target = f"127.0.0.1:{free_port()}"
    serve = [CLI, "serve", "--dsn", postgres.dsn, "--table", table, "--install-triggers", "--listen", target]

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(serve, env=clean_env(), stderr=subprocess.DEVNULL)
        wait_serving(target, process)
        return process

    sidecar = await asyncio.to_thread(start)
    watcher = await asyncio.create_subprocess_exec(
        CLI, "watch", table, "--target", target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
    )  # fmt: skip
    assert watcher.stdout is not None

    async def line() -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(watcher.stdout.readline(), 60))  # type: ignore[union-attr]

    async def until_printed(name: str) -> dict[str, Any]:
        # (the watch may not be subscribed yet when the first update commits: update until one shows)
        while True:
            await conn.execute(f"UPDATE {table} SET name = $1 WHERE id = 1", name)
            try:
                return json.loads(await asyncio.wait_for(watcher.stdout.readline(), 2))  # type: ignore[union-attr]
            except TimeoutError:
                continue

    try:
        assert (await until_printed("Grace"))["op"] == "update"
        sidecar.terminate()
        assert await asyncio.to_thread(sidecar.wait, 30) == 0
        sidecar = await asyncio.to_thread(start)  # a new epoch: the old revision is gone
        restarted = await asyncio.wait_for(watcher.stdout.readline(), 60)
        assert b'"reset"' in restarted, (restarted, await watcher.stderr.read())  # type: ignore[union-attr]
        printed = await until_printed("Hedy")
        assert printed["op"] == "update" and printed["key"] == [1] and b'"Hedy"' in json.dumps(printed).encode()
    finally:
        watcher.kill()
        await watcher.wait()
        sidecar.terminate()
        await asyncio.to_thread(sidecar.wait, 30)
        await conn.close()

"""The first minutes, through the real console script: a DSN that cannot parse
exits 2 at once, SIGTERM while the database is still unreachable exits 0,
a config file that is not UTF-8 is a config error, --print-config is TOML."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

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
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not logged within {timeout}s: {seen}")
            if not selector.select(left):
                continue
            line = process.stderr.readline()
            if not line:  # end of file: the process is gone
                raise AssertionError(f"exited with {process.wait()} before logging {needle!r}: {seen}")
            seen += line
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
    assert data["database"]["dsn"] == "host=db user=app password=***"
    assert data["server"]["listen"] == ["127.0.0.1:50051"] and data["tables"] == [{"name": "shop.item", "mode": "full"}]
    assert "pw-secret" not in out.stdout + out.stderr
    assert "warning:" in out.stderr and "CACHE_SIDECAR_DATABASE_DSN" in out.stderr

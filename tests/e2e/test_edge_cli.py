"""A hub as an operator runs one: the daemon as a process with TLS and tokens, the
command line reaching it with --tls-ca-file and --token-file, and bad setups that say
what is wrong (a bad file at start, a plaintext bind beyond loopback)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_cli import CLI, clean_env, cli, free_port, run_sql, wait_serving
from tests.support.certs import Authority
from tests.support.waiting import wait_until

ADMIN_TOKEN = "admin-" + "a" * 32
READ_TOKEN = "read-" + "r" * 32


@dataclass
class Hub:
    target: str
    health: str
    table: str
    ca: Path
    reader: Path
    admin: Path
    process: subprocess.Popen[bytes]


def stop(process: subprocess.Popen[bytes]) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err.decode()


@pytest.fixture
def hub(postgres, schema, tmp_path) -> Iterator[Hub]:
    table = f"{schema}.item"
    run_sql(
        postgres.dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, label text)", f"INSERT INTO {table} VALUES (1, 'one')"
    )
    ca = Authority(tmp_path / "ca")
    issued = ca.issue("hub")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {ADMIN_TOKEN}\n{READ_TOKEN}\n")
    (tmp_path / "reader").write_text(READ_TOKEN + "\n")
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    port, health_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            CLI,
            "serve",
            "--dsn",
            postgres.dsn,
            "--table",
            table,
            "--install-triggers",
            "--listen",
            f"127.0.0.1:{port}",
            "--health-listen",
            f"127.0.0.1:{health_port}",
            "--tls-cert-file",
            str(issued.cert),
            "--tls-key-file",
            str(issued.key),
            "--auth-token-file",
            str(tokens),
        ],
        env=clean_env(),
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(f"127.0.0.1:{health_port}", process)  # (plaintext, no token)
        yield Hub(
            f"127.0.0.1:{port}",
            f"127.0.0.1:{health_port}",
            table,
            ca.cert_file,
            tmp_path / "reader",
            tmp_path / "admin",
            process,
        )
    finally:
        stop(process)


def test_the_command_line_reaches_a_hub_over_tls_with_a_token(hub):
    got = cli("get", hub.table, "1", "--target", hub.target, "--tls-ca", str(hub.ca), "--token-file", str(hub.reader))
    assert got.returncode == 0, got.stderr
    assert b'"label":"one"' in got.stdout.replace(b" ", b"")
    listed = cli("tables", "--target", hub.target, "--tls-ca-file", str(hub.ca), "--token-file", str(hub.admin))
    assert listed.returncode == 0 and hub.table.encode() in listed.stdout, listed.stderr
    health = cli("health", "--target", hub.health)
    assert health.returncode == 0 and health.stdout == b"SERVING\n", health


def test_the_command_line_says_why_a_hub_refuses(hub, tmp_path):
    plaintext = cli("get", hub.table, "1", "--target", hub.target, "--token-file", str(hub.reader))
    assert plaintext.returncode == 1 and b"probably requires TLS" in plaintext.stderr, plaintext.stderr
    no_token = cli("get", hub.table, "1", "--target", hub.target, "--tls-ca", str(hub.ca))
    assert no_token.returncode == 1, no_token.stderr
    assert b"requires a token and none was sent; give --token-file" in no_token.stderr
    other = Authority(tmp_path / "other", "other CA")
    wrong_ca = cli("tables", "--target", hub.target, "--tls-ca", str(other.cert_file), "--token-file", str(hub.admin))
    assert wrong_ca.returncode == 1 and b"not signed by a CA in" in wrong_ca.stderr, wrong_ca.stderr
    missing = cli("tables", "--target", hub.target, "--tls-ca", str(tmp_path / "nowhere.pem"))
    assert missing.returncode == 2 and b"--tls-ca-file: file not found" in missing.stderr, missing.stderr


def test_a_deleted_token_file_refuses_every_call_until_a_valid_one_is_back(hub, tmp_path):
    tokens = tmp_path / "tokens"

    def listing(token_file: Path) -> subprocess.CompletedProcess[bytes]:
        return cli("tables", "--target", hub.target, "--tls-ca", str(hub.ca), "--token-file", str(token_file))

    assert listing(hub.reader).returncode == 0
    tokens.unlink()
    refused = wait_until(lambda: (r := listing(hub.reader)).returncode == 1 and r, 30, what="the reader refused")
    assert b"refused the token" in refused.stderr, refused.stderr
    assert listing(hub.admin).returncode == 1
    replacement = tmp_path / "tokens.new"
    replacement.write_text(f"{READ_TOKEN}\n")
    replacement.replace(tokens)
    wait_until(lambda: listing(hub.reader).returncode == 0, 30, what="the recreated file's token taken")
    assert listing(hub.admin).returncode == 1  # (revoked: not in the new file)
    err = stop(hub.process)
    assert f"cannot re-read the auth tokens ({tokens}): cannot read {tokens}: file not found" in err, err
    assert "every call is refused until it holds a valid token again" in err


def test_a_bad_certificate_file_at_start_exits_2_naming_the_key_and_the_file(postgres, schema, tmp_path):
    run_sql(postgres.dsn, f"CREATE TABLE {schema}.item (id int PRIMARY KEY)")
    ca = Authority(tmp_path / "ca")
    issued, other = ca.issue("hub"), ca.issue("other")
    started = subprocess.run(
        [
            *(CLI, "serve", "--dsn", postgres.dsn, "--table", f"{schema}.item", "--listen", f"127.0.0.1:{free_port()}"),
            *("--tls-cert-file", str(issued.cert), "--tls-key-file", str(other.key)),
        ],
        env=clean_env(),
        capture_output=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert f"config server.tls_cert_file: {issued.cert}".encode() in started.stderr
    assert b"is not this certificate's" in started.stderr


def test_an_expired_certificate_at_start_exits_2_naming_the_key_and_the_file(postgres, schema, tmp_path):
    run_sql(postgres.dsn, f"CREATE TABLE {schema}.item (id int PRIMARY KEY)")
    expired = Authority(tmp_path / "ca").issue("hub", expired=True)
    started = subprocess.run(
        [
            *(CLI, "serve", "--dsn", postgres.dsn, "--table", f"{schema}.item", "--listen", f"127.0.0.1:{free_port()}"),
            *("--tls-cert-file", str(expired.cert), "--tls-key-file", str(expired.key)),
        ],
        env=clean_env(),
        capture_output=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert f"config server.tls_cert_file: {expired.cert}: the certificate expired on".encode() in started.stderr


def test_a_plaintext_bind_beyond_loopback_warns_at_start(postgres, schema):
    run_sql(postgres.dsn, f"CREATE TABLE {schema}.item (id int PRIMARY KEY)")
    port = free_port()
    process = subprocess.Popen(
        [
            CLI,
            "serve",
            "--dsn",
            postgres.dsn,
            "--table",
            f"{schema}.item",
            "--install-triggers",
            "--listen",
            f"0.0.0.0:{port}",
        ],
        env=clean_env(),
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process)
    finally:
        err = stop(process)
    assert f"INSECURE: gRPC listening on all interfaces (0.0.0.0:{port}) in plaintext and without authentication" in err

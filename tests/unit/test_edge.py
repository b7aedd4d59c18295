"""The network edge, in process on loopback: TLS (good and bad certificates, client
certificates), bearer tokens (none, wrong, read-only against admin), rotation of both
without a restart, the warning on an exposed plaintext bind, the health-only port, and
the client side's sentence for each failure (sidecar/edge/auth.py, sidecar/fleet/channels.py)."""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar import config as cfg
from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.core.assembly import Direct, direct
from sidecar.edge import auth, filewatch, server
from sidecar.edge import tls as tls_files
from sidecar.errors import ConfigError
from sidecar.fleet import channels
from sidecar.fleet.channels import UpstreamSecurity
from sidecar.metrics import CredentialCollector
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.certs import Authority, Issued
from tests.support.waiting import eventually

ADMIN_TOKEN = "admin-" + "a" * 32
READ_TOKEN = "read-" + "r" * 32
OTHER_TOKEN = "other-" + "o" * 32


@dataclass
class Pki:
    directory: Path
    ca: Authority
    other_ca: Authority
    server: Issued
    expired_server: Issued
    future_server: Issued  # not valid yet
    other_server: Issued  # signed by other_ca
    client: Issued
    rogue_client: Issued  # signed by other_ca
    expired_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory / "ca", "test CA"), Authority(directory / "other", "other CA")
    return Pki(
        directory,
        ca,
        other,
        server=ca.issue("server"),
        expired_server=ca.issue("expired server", expired=True),
        future_server=ca.issue("future server", not_yet_valid=True),
        other_server=other.issue("other server"),
        client=ca.issue("client", server=False),
        rogue_client=other.issue("rogue client", server=False),
        expired_client=ca.issue("expired client", server=False, expired=True),
    )


def write(path: Path, text: str) -> Path:
    """Replace ``path`` atomically (as a Kubernetes Secret update does)."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return write(tmp_path / "tokens", f"# the hub's tokens\n\nadmin {ADMIN_TOKEN}\n{READ_TOKEN}\n")


def token_file(tmp_path: Path, token: str, name: str = "client-token") -> str:
    return str(write(tmp_path / name, token + "\n"))


Serve = Callable[..., Awaitable[server.Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(**settings)``: the gRPC server over an in-memory table, on loopback."""
    started: list[server.Server] = []
    following: list[tuple[asyncio.Task[None], Direct]] = []

    async def start(listen: tuple[str, ...] = ("127.0.0.1:0",), health_listen: tuple[str, ...] = (), **settings: Any):
        config = cfg.Config(listen=listen, **settings)
        database = MemoryDatabase(int_key_schema())
        database.put("public.items", (1,), id=1, name="one")
        core = direct(database, list(database.schemas.values()))
        source = MemoryChangeSource(database)
        core.notices.attach(source)
        following.append((asyncio.create_task(source.follow(core.notices)), core))
        await eventually(lambda: core.engine.ready)
        core.fanout.send_timeout = config.watch_send_timeout
        result = await server.start(
            core,
            config.listen,
            None,
            health_listen,
            auth.load(config),
            max_concurrent_calls=config.max_concurrent_calls,
            max_health_watches=config.max_health_watches,
        )
        started.append(result)
        await result.set_serving(True)
        return result

    yield start
    for each in started:
        await each.stop(0)
    for task, core in following:
        task.cancel()
        await core.close()


@dataclass
class Outcome:
    code: grpc.StatusCode
    explained: str


CALL_TIMEOUT = 30.0  # a deadline, not a pace: a busy machine's handshakes take seconds


async def call(target: str, security: UpstreamSecurity | None = None, method: str = "ListTables") -> Outcome:
    """One call on a new channel (so a new handshake): OK, or the code and the client's sentence."""
    security = security or UpstreamSecurity()
    channel = channels.aio_channel(target, security)
    stub = pb_grpc.CacheStub(channel)
    try:
        if method == "ListTables":
            await stub.ListTables(pb.ListTablesRequest(), timeout=CALL_TIMEOUT)
        elif method == "Get":
            await stub.Get(
                pb.GetRequest(table="public.items", key=pb.Key(parts=[pb.KeyPart(int_value=1)])), timeout=CALL_TIMEOUT
            )
        elif method == "Invalidate":
            await stub.Invalidate(
                pb.InvalidateRequest(table="public.items", keys=[pb.Key(parts=[pb.KeyPart(int_value=1)])]),
                timeout=CALL_TIMEOUT,
            )
        elif method == "Watch":
            stream = stub.Watch(pb.WatchRequest(tables=["public.items"], initial_state=True), timeout=CALL_TIMEOUT)
            await stream.read()
        elif method == "Health":
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        elif method == "Reflection":
            # No request is written: a client write that races the server's refusal turns the
            # status into INTERNAL on the client (grpc/grpc#36066), which a loaded machine hit.
            requests: Iterator[reflection_pb2.ServerReflectionRequest] = iter([])
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                requests, timeout=CALL_TIMEOUT
            )
            await stream.read()
        else:
            raise AssertionError(method)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), channels.explain(exc, target, security))
    finally:
        await channel.close()
    return Outcome(grpc.StatusCode.OK, "")


def tls(pki: Pki, issued: Issued | None = None, client_ca: bool = False) -> dict[str, Any]:
    issued = issued or pki.server
    settings: dict[str, Any] = {"tls_cert_file": str(issued.cert), "tls_key_file": str(issued.key)}
    if client_ca:
        settings["tls_client_ca_file"] = str(pki.ca.cert_file)
    return settings


def trusting(pki: Pki, ca: Authority | None = None, client: Issued | None = None, **rest: Any) -> UpstreamSecurity:
    return UpstreamSecurity(
        tls_ca_file=str((ca or pki.ca).cert_file),
        tls_cert_file=str(client.cert) if client else None,
        tls_key_file=str(client.key) if client else None,
        **rest,
    )


# ---------------------------------------------------------------- certificates


async def test_tls_with_a_good_certificate_serves_and_a_plaintext_client_is_told_why_not(serve, pki):
    hub = await serve(**tls(pki))
    target = hub.addresses[0]
    assert (await call(target, trusting(pki))).code == grpc.StatusCode.OK
    plaintext = await call(target)
    assert plaintext.code == grpc.StatusCode.UNAVAILABLE
    assert "requires TLS" in plaintext.explained


async def test_a_certificate_from_another_ca_is_refused_naming_the_ca_file(serve, pki):
    hub = await serve(**tls(pki))
    outcome = await call(hub.addresses[0], trusting(pki, ca=pki.other_ca))
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert f"not signed by a CA in {pki.other_ca.cert_file}" in outcome.explained


async def test_an_expired_server_certificate_is_named(pki):
    # (The sidecar refuses to serve one, see below: a plain grpc server does.)
    other = grpc.aio.server()
    credentials = grpc.ssl_server_credentials(
        [(pki.expired_server.key.read_bytes(), pki.expired_server.cert.read_bytes())]
    )
    port = other.add_secure_port("127.0.0.1:0", credentials)
    await other.start()
    try:
        outcome = await call(f"127.0.0.1:{port}", trusting(pki))
    finally:
        await other.stop(0)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert "certificate has expired" in outcome.explained


def test_a_certificate_not_valid_now_is_a_start_up_error_naming_the_key_and_the_file(pki):
    for issued, words in ((pki.expired_server, "the certificate expired on"), (pki.future_server, "not valid before")):
        with pytest.raises(ConfigError) as error:
            auth.load(cfg.Config(**tls(pki, issued)))
        assert error.value.key == "server.tls_cert_file"
        assert str(issued.cert) in str(error.value) and words in str(error.value), str(error.value)


def test_the_validity_dates_are_read_from_every_certificate_of_the_chain(pki):
    from cryptography import x509

    for issued in (pki.server, pki.expired_server, pki.future_server):
        parsed = x509.load_pem_x509_certificate(issued.cert.read_bytes())
        der = parsed.public_bytes(serialization.Encoding.DER)
        assert tls_files.validity(der) == (parsed.not_valid_before_utc, parsed.not_valid_after_utc)
    tls_files.check_dates(pki.server.cert.read_bytes() + pki.ca.cert_file.read_bytes())
    with pytest.raises(filewatch.FileProblem, match="certificate 2 of the chain expired"):
        tls_files.check_dates(pki.server.cert.read_bytes() + pki.expired_server.cert.read_bytes())
    with pytest.raises(filewatch.FileProblem, match="cannot read its validity dates"):
        tls_files.check_dates(b"-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n")


def test_a_problem_time_may_cure_is_looked_at_again_though_the_file_stays_the_same(tmp_path, monkeypatch):
    path = write(tmp_path / "f", "x")
    answers: list[str | None] = [None, "not yet", None]

    def parse(_paths: Any, contents: Any) -> bytes:
        problem = answers.pop(0)
        if problem is not None:
            raise filewatch.FileProblem(problem, retry=True)
        return bytes(contents[0])

    monkeypatch.setattr(filewatch, "RETRY_INTERVAL", 0.0)
    watched = filewatch.Watched([("k", str(path))], parse, "a file", interval=3600)
    write(path, "y")
    assert not watched.refresh() and watched.failing  # not yet: the old value stays
    assert watched.refresh()  # the same file, parsed again
    assert watched.value == b"y" and not watched.failing


async def test_a_rotated_certificate_that_is_not_valid_now_is_not_taken(serve, pki, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(filewatch, "RETRY_INTERVAL", 0.0)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write(cert, pki.server.cert.read_text())
    write(key, pki.server.key.read_text())
    hub = await serve(tls_cert_file=str(cert), tls_key_file=str(key))
    target = hub.addresses[0]
    caplog.set_level(logging.ERROR, logger="sidecar.edge.filewatch")
    for bad, words in ((pki.expired_server, "expired on"), (pki.future_server, "not valid before")):
        caplog.clear()
        write(key, bad.key.read_text())
        write(cert, bad.cert.read_text())
        outcome = await call(target, trusting(pki))  # the last good certificate, still
        assert outcome.code == grpc.StatusCode.OK, outcome.explained
        assert any(words in r.getMessage() and "keeping the previous one" in r.getMessage() for r in caplog.records)
        assert hub_security(hub).certificates.failing  # type: ignore[union-attr]
    # A good one is taken again.
    write(key, pki.other_server.key.read_text())
    write(cert, pki.other_server.cert.read_text())
    assert (await call(target, trusting(pki, ca=pki.other_ca))).code == grpc.StatusCode.OK


async def test_a_certificate_for_another_host_is_named(serve, pki):
    wrong = pki.ca.issue("elsewhere", hosts=("elsewhere.example",))
    hub = await serve(**tls(pki, wrong))
    outcome = await call(hub.addresses[0], trusting(pki))
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert "is not for" in outcome.explained


async def test_tls_to_a_plaintext_sidecar_is_named(serve, pki):
    hub = await serve()
    outcome = await call(hub.addresses[0], trusting(pki))
    assert "does not speak TLS" in outcome.explained


async def test_with_a_client_ca_only_certificates_it_signed_and_that_are_valid_get_in(serve, pki):
    hub = await serve(**tls(pki, client_ca=True))
    target = hub.addresses[0]
    assert (await call(target, trusting(pki, client=pki.client))).code == grpc.StatusCode.OK
    missing = await call(target, trusting(pki))
    assert missing.code == grpc.StatusCode.UNAVAILABLE
    assert "requires a client certificate" in missing.explained
    for refused in (pki.rogue_client, pki.expired_client):
        outcome = await call(target, trusting(pki, client=refused))
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, refused
        assert f"refused our client certificate ({refused.cert}" in outcome.explained


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(serve, pki, tmp_path, caplog):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    write(cert, pki.server.cert.read_text())
    write(key, pki.server.key.read_text())
    hub = await serve(tls_cert_file=str(cert), tls_key_file=str(key))
    target = hub.addresses[0]
    assert (await call(target, trusting(pki))).code == grpc.StatusCode.OK
    assert (await call(target, trusting(pki, ca=pki.other_ca))).code == grpc.StatusCode.UNAVAILABLE

    # A bad file (half a certificate) is not taken: the last good one is still served.
    with caplog.at_level(logging.ERROR, logger="sidecar.edge.filewatch"):
        write(cert, pki.server.cert.read_text()[:100])
        assert (await call(target, trusting(pki))).code == grpc.StatusCode.OK
    assert any("keeping the previous one" in r.getMessage() for r in caplog.records)

    # The key first, then the certificate (a mismatched pair in between is refused too).
    write(key, pki.other_server.key.read_text())
    assert (await call(target, trusting(pki))).code == grpc.StatusCode.OK
    write(cert, pki.other_server.cert.read_text())
    assert (await call(target, trusting(pki, ca=pki.other_ca))).code == grpc.StatusCode.OK
    assert (await call(target, trusting(pki))).code == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_client_ca_is_used_without_a_restart(serve, pki, tmp_path):
    client_ca = write(tmp_path / "client-ca.pem", pki.ca.cert_file.read_text())
    hub = await serve(**tls(pki), tls_client_ca_file=str(client_ca))
    target = hub.addresses[0]
    assert (await call(target, trusting(pki, client=pki.rogue_client))).code == grpc.StatusCode.UNAVAILABLE
    write(client_ca, pki.other_ca.cert_file.read_text())
    assert (await call(target, trusting(pki, client=pki.rogue_client))).code == grpc.StatusCode.OK
    assert (await call(target, trusting(pki, client=pki.client))).code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- tokens


async def test_without_a_valid_token_every_call_is_unauthenticated(serve, tokens, tmp_path):
    hub = await serve(auth_token_file=str(tokens))
    target = hub.addresses[0]
    for method in ("ListTables", "Get", "Watch", "Invalidate", "Reflection"):
        none = await call(target, method=method)
        assert none.code == grpc.StatusCode.UNAUTHENTICATED, method
        assert "requires a token and none was sent" in none.explained
        wrong = await call(target, UpstreamSecurity(token_file=token_file(tmp_path, OTHER_TOKEN)), method=method)
        assert wrong.code == grpc.StatusCode.UNAUTHENTICATED, method
        assert "refused the token" in wrong.explained


async def test_health_needs_no_token(serve, tokens):
    hub = await serve(auth_token_file=str(tokens))
    assert (await call(hub.addresses[0], method="Health")).code == grpc.StatusCode.OK


async def test_a_read_only_token_reads_and_only_an_admin_token_invalidates(serve, tokens, tmp_path):
    hub = await serve(auth_token_file=str(tokens))
    target = hub.addresses[0]
    reader = UpstreamSecurity(token_file=token_file(tmp_path, READ_TOKEN, "reader"))
    admin = UpstreamSecurity(token_file=token_file(tmp_path, ADMIN_TOKEN, "admin"))
    for method in ("ListTables", "Get", "Watch"):
        assert (await call(target, reader, method)).code == grpc.StatusCode.OK, method
    denied = await call(target, reader, "Invalidate")
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    assert "needs an admin token" in denied.explained
    assert (await call(target, admin, "Invalidate")).code == grpc.StatusCode.OK


async def test_tokens_and_tls_together(serve, pki, tokens, tmp_path):
    hub = await serve(**tls(pki), auth_token_file=str(tokens))
    target = hub.addresses[0]
    assert (await call(target, trusting(pki))).code == grpc.StatusCode.UNAUTHENTICATED
    good = trusting(pki, token_file=token_file(tmp_path, READ_TOKEN))
    assert (await call(target, good)).code == grpc.StatusCode.OK


async def test_a_rotated_token_file_is_used_without_a_restart(serve, tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(filewatch, "CHECK_INTERVAL", 0.0)
    hub = await serve(auth_token_file=str(tokens))
    target = hub.addresses[0]
    old = UpstreamSecurity(token_file=token_file(tmp_path, READ_TOKEN, "old"))
    new = UpstreamSecurity(token_file=token_file(tmp_path, OTHER_TOKEN, "new"))
    assert (await call(target, old)).code == grpc.StatusCode.OK
    assert (await call(target, new)).code == grpc.StatusCode.UNAUTHENTICATED

    write(tokens, f"{OTHER_TOKEN}\n")
    assert (await call(target, new)).code == grpc.StatusCode.OK
    assert (await call(target, old)).code == grpc.StatusCode.UNAUTHENTICATED


def token_complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if getattr(r, "event", None) in ("reload_failed", "token_line_skipped")
    ]


async def test_revoking_a_token_fails_closed(serve, tokens, tmp_path, monkeypatch, caplog):
    """Whatever an operator does to the file to revoke a leaked token -- overwrite its line
    with a mistyped or short one, empty the file, delete it -- the old token stops working."""
    monkeypatch.setattr(filewatch, "CHECK_INTERVAL", 0.0)
    hub = await serve(auth_token_file=str(tokens))
    target = hub.addresses[0]
    watched = hub_security(hub).tokens
    leaked = UpstreamSecurity(token_file=token_file(tmp_path, READ_TOKEN, "leaked"))
    admin = UpstreamSecurity(token_file=token_file(tmp_path, ADMIN_TOKEN, "admin"))
    assert (await call(target, leaked)).code == grpc.StatusCode.OK

    caplog.set_level(logging.ERROR, logger="sidecar")
    # The leaked line replaced by a short token, and by a mistyped one: that line is
    # skipped (and logged, naming the line, never a token); the other lines still work.
    for replacement in ("short", "not a token at all", f"amdin {ADMIN_TOKEN}x"):
        caplog.clear()
        write(tokens, f"admin {ADMIN_TOKEN}\n{replacement}\n")
        assert (await call(target, leaked)).code == grpc.StatusCode.UNAUTHENTICATED, replacement
        assert (await call(target, admin)).code == grpc.StatusCode.OK
        (complaint,) = token_complaints(caplog)
        assert str(tokens) in complaint and "line 2" in complaint and "skipped" in complaint
        assert READ_TOKEN not in complaint and ADMIN_TOKEN not in complaint
    assert len(watched.value) == 1 and len(watched.value.skipped) == 1

    # Emptied (or only comments): no token at all, every call refused, and said so.
    write(tokens, f"admin {ADMIN_TOKEN}\n{READ_TOKEN}\n")
    assert (await call(target, leaked)).code == grpc.StatusCode.OK
    failures = watched.failures
    caplog.clear()
    write(tokens, "")
    for who in (leaked, admin):
        assert (await call(target, who)).code == grpc.StatusCode.UNAUTHENTICATED
    (complaint,) = token_complaints(caplog)
    assert "holds no valid token" in complaint and "every call is refused" in complaint
    assert watched.failing and watched.failures == failures + 1 and len(watched.value) == 0

    # Deleted: every call refused; recreated: its tokens are taken.
    write(tokens, f"{READ_TOKEN}\n")
    assert (await call(target, leaked)).code == grpc.StatusCode.OK
    caplog.clear()
    tokens.unlink()
    assert (await call(target, leaked)).code == grpc.StatusCode.UNAUTHENTICATED
    (complaint,) = token_complaints(caplog)
    assert "file not found" in complaint and "every call is refused" in complaint
    assert watched.failing
    assert credential_metrics(hub) == {
        ("cache_sidecar_credential_reload_failures", "tokens"): failures + 2,
        ("cache_sidecar_credential_file_failing", "tokens"): 1,
        ("cache_sidecar_auth_tokens", ""): 0,
        ("cache_sidecar_auth_token_lines_skipped", ""): 0,
    }
    assert (await call(target, leaked)).code == grpc.StatusCode.UNAUTHENTICATED  # (logged once, not per look)
    assert len(token_complaints(caplog)) == 1
    write(tokens, f"admin {ADMIN_TOKEN}\n")
    assert (await call(target, admin)).code == grpc.StatusCode.OK
    assert (await call(target, leaked)).code == grpc.StatusCode.UNAUTHENTICATED
    assert not watched.failing


def credential_metrics(hub: server.Server) -> dict[tuple[str, str], float]:
    """The credential metrics as Prometheus would scrape them: (name, file label) -> value."""
    found = {}
    for family in CredentialCollector(hub_security(hub)).collect():
        for sample in family.samples:
            found[(sample.name.removesuffix("_total"), sample.labels.get("file", ""))] = sample.value
    return found


def hub_security(hub: server.Server) -> auth.ServerSecurity:
    assert hub.security is not None
    return hub.security


async def test_the_client_rereads_its_token_file(serve, tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(filewatch, "CHECK_INTERVAL", 0.0)
    hub = await serve(auth_token_file=str(tokens))
    path = token_file(tmp_path, READ_TOKEN)
    channel = channels.aio_channel(hub.addresses[0], UpstreamSecurity(token_file=path))
    stub = pb_grpc.CacheStub(channel)
    try:
        await stub.ListTables(pb.ListTablesRequest(), timeout=5)
        write(Path(path), OTHER_TOKEN + "\n")  # the same channel, the new token
        with pytest.raises(grpc.RpcError) as refused:
            await stub.ListTables(pb.ListTablesRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        write(Path(path), ADMIN_TOKEN + "\n")
        await stub.ListTables(pb.ListTablesRequest(), timeout=5)
    finally:
        await channel.close()


# ---------------------------------------------------------------- bad files at start


def test_a_bad_file_at_start_is_a_config_error_naming_the_key_and_the_file(pki, tmp_path):
    missing = str(tmp_path / "nowhere.pem")
    cases = [
        ({"tls_cert_file": missing, "tls_key_file": str(pki.server.key)}, "server.tls_cert_file", missing),
        (
            {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.client.key)},
            "server.tls_cert_file",
            "is not this certificate's",
        ),
        (
            {"tls_cert_file": str(pki.server.cert), "tls_key_file": str(pki.server.cert)},
            "server.tls_key_file",
            "swapped",
        ),
        ({**tls(pki), "tls_client_ca_file": str(pki.server.key)}, "server.tls_client_ca_file", "no PEM certificate"),
        ({"auth_token_file": missing}, "server.auth_token_file", missing),
        ({"auth_token_file": str(write(tmp_path / "t1", "# none\n"))}, "server.auth_token_file", "no token"),
        ({"auth_token_file": str(write(tmp_path / "t2", "short\n"))}, "server.auth_token_file", "line 1"),
        ({"auth_token_file": str(write(tmp_path / "t3", f"root {READ_TOKEN}\n"))}, "server.auth_token_file", "line 1"),
    ]
    for settings, key, words in cases:
        with pytest.raises(ConfigError) as error:
            auth.load(cfg.Config(**settings))
        assert error.value.key == key, settings
        assert words in str(error.value), (settings, str(error.value))
        assert READ_TOKEN not in str(error.value)


def test_client_side_bad_files_name_the_setting(pki, tmp_path):
    with pytest.raises(ConfigError) as error:
        channels.aio_channel("127.0.0.1:1", UpstreamSecurity(tls_ca_file=str(pki.server.key)))
    assert error.value.key == "upstream.tls_ca_file"
    with pytest.raises(ConfigError) as error:
        channels.sync_channel(
            "127.0.0.1:1", UpstreamSecurity(token_file=str(write(tmp_path / "t", f"admin {READ_TOKEN}\n")))
        )
    assert error.value.key == "upstream.token_file" and "alone" in str(error.value)


def test_config_pairs_the_settings_that_need_each_other():
    for settings, key in (
        ({"tls_cert_file": "a"}, "server.tls_cert_file"),
        ({"tls_key_file": "a"}, "server.tls_key_file"),
        ({"tls_client_ca_file": "a"}, "server.tls_client_ca_file"),
        ({"upstream_tls_cert_file": "a"}, "upstream.tls_cert_file"),
    ):
        flags = {cfg.SETTINGS_BY_KEY[k].key: v for k, v in ((key, "a"),)}
        with pytest.raises(ConfigError) as error:
            cfg.load(env={}, flags=flags)
        assert error.value.key == key, settings
    loaded = cfg.load(
        env={"CACHE_SIDECAR_SERVER_AUTH_TOKEN_FILE": "/t", "CACHE_SIDECAR_UPSTREAM_TOKEN_FILE": "/u"},
        flags={"upstream.tls_ca_file": "/ca"},
    )
    assert (loaded.auth_token_file, loaded.upstream_token_file, loaded.upstream_tls_ca_file) == ("/t", "/u", "/ca")
    assert UpstreamSecurity.from_config(loaded) == UpstreamSecurity("/ca", None, None, "/u")


# ---------------------------------------------------------------- exposure and the health port


def insecure_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "insecure_listen"]


async def test_an_exposed_plaintext_unauthenticated_bind_warns_loudly(serve, pki, tokens, caplog):
    with caplog.at_level(logging.WARNING, logger="sidecar.edge.server"):
        await serve(listen=("127.0.0.1:0",))
        assert insecure_warnings(caplog) == []
        await serve(listen=("0.0.0.0:0",))
        (warning,) = insecure_warnings(caplog)
        assert warning.startswith("INSECURE") and "0.0.0.0:0" in warning
        caplog.clear()
        await serve(listen=("0.0.0.0:0",), **tls(pki, client_ca=True))
        await serve(listen=("0.0.0.0:0",), **tls(pki), auth_token_file=str(tokens))
        assert insecure_warnings(caplog) == []
        await serve(listen=("0.0.0.0:0",), auth_token_file=str(tokens))  # tokens in the clear
        await serve(listen=("0.0.0.0:0",), **tls(pki))  # encrypted, but anyone may read
        plaintext, unauthenticated = insecure_warnings(caplog)
        assert "plaintext" in plaintext and "without authentication" in unauthenticated


async def test_the_health_port_is_plaintext_and_serves_health_alone(serve, pki, tokens):
    hub = await serve(health_listen=("127.0.0.1:0",), **tls(pki, client_ca=True), auth_token_file=str(tokens))
    (health_target,) = hub.health_addresses
    assert (await call(health_target, method="Health")).code == grpc.StatusCode.OK
    for method in ("ListTables", "Get", "Watch", "Invalidate", "Reflection"):
        assert (await call(health_target, method=method)).code == grpc.StatusCode.UNIMPLEMENTED, method
    # The main port still wants TLS and a client certificate for health.
    assert (await call(hub.addresses[0], method="Health")).code == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- bounded streams


async def open_health_watch(channel: grpc.aio.Channel) -> Any:
    """A health Watch stream that has delivered its first status."""
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    await asyncio.wait_for(call.read(), 10)
    return call


async def test_health_watch_streams_are_capped_on_every_server_and_check_still_answers(serve):
    hub = await serve(health_listen=("127.0.0.1:0",), max_health_watches=2)
    for target in (hub.addresses[0], hub.health_addresses[0]):
        async with grpc.aio.insecure_channel(target) as channel:
            open_calls = [await open_health_watch(channel) for _ in range(2)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await open_health_watch(channel)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_health_watches = 2" in refused.value.details()
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert (await check).status == health_pb2.HealthCheckResponse.SERVING
            open_calls.pop().cancel()  # a slot freed is taken again
            await eventually(lambda: all(s.watching < 2 for s in hub.health_services), what="a slot freed")
            open_calls.append(await open_health_watch(channel))
            for call in open_calls:
                call.cancel()
    assert [s.refused for s in hub.health_services] == [1, 1]


async def test_concurrent_calls_are_capped_on_every_server(serve):
    hub = await serve(health_listen=("127.0.0.1:0",), max_concurrent_calls=2, watch_max_streams=2)
    request = pb.WatchRequest(tables=["public.items"])
    async with grpc.aio.insecure_channel(hub.addresses[0]) as channel:
        streams = [pb_grpc.CacheStub(channel).Watch(request) for _ in range(2)]
        for stream in streams:
            await asyncio.wait_for(stream.initial_metadata(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.cancel()
    async with grpc.aio.insecure_channel(hub.health_addresses[0]) as channel:
        watches = [await open_health_watch(channel) for _ in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in watches:
            call.cancel()


def test_watch_max_streams_may_not_exceed_the_concurrent_calls():
    with pytest.raises(ConfigError) as error:
        cfg.load(env={"CACHE_SIDECAR_WATCH_MAX_STREAMS": "500", "CACHE_SIDECAR_SERVER_MAX_CONCURRENT_CALLS": "100"})
    assert error.value.key == "watch.max_streams" and "server.max_concurrent_calls" in str(error.value)


class StuckContext:
    """A servicer context whose client takes nothing: a write never completes, and the final
    status queues behind it."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.writes = 0

    async def write(self, _message: Any) -> None:
        self.writes += 1
        if self.writes > 1:
            await asyncio.Future()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        await asyncio.Future()


async def test_a_health_watch_whose_client_takes_nothing_is_ended_after_the_send_timeout():
    from grpc_health.v1 import health

    statuses = health.aio.HealthServicer()
    service = server.HealthOfOneServer(statuses, max_watches=10, send_timeout=0.2)
    context = StuckContext()
    watching = asyncio.create_task(service.Watch(health_pb2.HealthCheckRequest(), context))  # type: ignore[arg-type]
    await eventually(lambda: context.writes == 1, what="the first status sent")
    await statuses.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # the second: never taken
    with pytest.raises(asyncio.CancelledError):  # (the status stays queued behind the data)
        await asyncio.wait_for(watching, 10)
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "took no message for 0.2 s" in context.aborted[1]
    assert service.watching == 0
    # ... and health can still change (the stuck stream held the status lock while it wrote)
    await asyncio.wait_for(statuses.set("", health_pb2.HealthCheckResponse.SERVING), 5)


# ---------------------------------------------------------------- not a sidecar


@pytest.fixture
def http_server() -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    listening = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    listening.close()


async def test_pointed_at_something_that_is_not_a_sidecar(http_server, echo_server, pki):
    for target in (http_server, echo_server):
        outcome = await call(target)
        assert outcome.code == grpc.StatusCode.UNAVAILABLE
        assert "not a gRPC server" in outcome.explained, target
        assert "TLS" in (await call(target, trusting(pki))).explained
    other = grpc.aio.server()
    port = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    try:
        outcome = await call(f"127.0.0.1:{port}")
        assert outcome.code == grpc.StatusCode.UNIMPLEMENTED
        assert "not a cache-sidecar" in outcome.explained
    finally:
        await other.stop(0)
    refused = await call("127.0.0.1:1")
    assert "nothing listens there" in refused.explained


async def test_a_client_certificate_snapshot_tells_when_a_new_channel_would_present_a_new_one(serve, pki, tmp_path):
    hub = await serve(**tls(pki, client_ca=True))
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    write(cert, pki.rogue_client.cert.read_text())
    write(key, pki.rogue_client.key.read_text())
    security = trusting(pki, client=Issued(cert, key))
    snapshot = channels.CertificateSnapshot(security)
    assert (await call(hub.addresses[0], security)).code == grpc.StatusCode.UNAVAILABLE
    assert not snapshot.changed()
    write(key, pki.client.key.read_text())
    write(cert, pki.client.cert.read_text())
    assert snapshot.changed()
    assert (await call(hub.addresses[0], security)).code == grpc.StatusCode.OK


async def test_tls_and_tokens_on_a_unix_socket(serve, pki, tokens, tmp_path):
    socket = tmp_path / "grpc.sock"  # (the certificate names localhost, as one for a socket must)
    hub = await serve(listen=(f"unix://{socket}",), **tls(pki), auth_token_file=str(tokens))
    security = trusting(pki, token_file=token_file(tmp_path, READ_TOKEN))
    assert (await call(hub.addresses[0], security)).code == grpc.StatusCode.OK
    assert (await call(hub.addresses[0], trusting(pki))).code == grpc.StatusCode.UNAUTHENTICATED


def test_which_listen_addresses_stay_on_this_host():
    from sidecar.config.addresses import parse_listen_address

    local = ("127.0.0.1:1", "127.3.4.5:1", "localhost:1", "[::1]:1", "unix:///run/s.sock")
    exposed = ("0.0.0.0:1", ":1", "[::]:1", "10.0.0.7:1", "[fe80::1]:1", "hub.example:1", "127.example:1")
    assert [parse_listen_address(a).loopback for a in local] == [True] * len(local)
    assert [parse_listen_address(a).loopback for a in exposed] == [False] * len(exposed)

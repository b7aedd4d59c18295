"""Channels to another sidecar (an upstream hub, or the one the command line talks to):
TLS, a client certificate and a bearer token, and what a failed call means, in a sentence.

``UpstreamSecurity`` says how to reach it (``upstream.tls_ca_file``,
``upstream.tls_cert_file``, ``upstream.tls_key_file``, ``upstream.token_file``,
or the command line's ``--tls-ca-file`` ...). ``aio_channel`` and
``sync_channel`` build a channel from it; the token goes as ``authorization:
Bearer <token>`` metadata on every call and is re-read when its file changes.
Certificate files are read when a channel is built: a long-lived client that
wants a rotated client certificate or CA builds a new channel (a
``CertificateSnapshot`` taken with the channel tells it when), e.g. when it
reconnects after losing its stream.

``explain`` turns a failed call into the cause an operator can act on: not a
sidecar, wrong CA, expired certificate, a client certificate missing or refused,
a missing or wrong token, TLS on one side only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from sidecar.config import Config
from sidecar.config.addresses import parse_listen_address
from sidecar.edge import tls
from sidecar.edge.filewatch import FileProblem, Watched, read_bytes
from sidecar.edge.tokens import client_token_from_files
from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

# Where each setting comes from, for error messages: the config keys of a follower.
UPSTREAM_KEYS = {
    "ca": "upstream.tls_ca_file",
    "cert": "upstream.tls_cert_file",
    "key": "upstream.tls_key_file",
    "token": "upstream.token_file",
}


@dataclass(frozen=True)
class UpstreamSecurity:
    """How to reach a sidecar: TLS (on when a CA or a client certificate is given; without a
    CA file the system's roots are trusted), a client certificate, a token file."""

    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    token_file: str | None = None
    keys: dict[str, str] = field(default_factory=lambda: dict(UPSTREAM_KEYS), compare=False)

    @classmethod
    def from_config(cls, config: Config) -> UpstreamSecurity:
        """From a ``Config``'s ``upstream.*`` settings."""
        return cls(
            config.upstream_tls_ca_file,
            config.upstream_tls_cert_file,
            config.upstream_tls_key_file,
            config.upstream_token_file,
        )

    @property
    def tls(self) -> bool:
        return self.tls_ca_file is not None or self.tls_cert_file is not None

    def certificate_files(self) -> list[tuple[str, str]]:
        """(setting, path) of each certificate file given."""
        return [
            (self.keys[name], path)
            for name, path in (("ca", self.tls_ca_file), ("cert", self.tls_cert_file), ("key", self.tls_key_file))
            if path is not None
        ]


def _stat(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenSource:
    """The token of a token file, current (re-read when the file changes; a bad new file
    keeps the last good token and logs)."""

    def __init__(self, key: str, path: str) -> None:
        self._watched = Watched([(key, path)], client_token_from_files, "the upstream token")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._watched.value}"),)


def channel_credentials(security: UpstreamSecurity) -> grpc.ChannelCredentials | None:
    """The TLS credentials (None: plaintext), files read and checked now; a bad one is a
    ``ConfigError`` naming its setting and path."""
    if not security.tls:
        return None
    if (security.tls_cert_file is None) != (security.tls_key_file is None):
        given, missing = ("cert", "key") if security.tls_key_file is None else ("key", "cert")
        raise ConfigError(security.keys[given], f"needs {security.keys[missing]} too")
    ca = None
    if security.tls_ca_file is not None:
        ca = read_bytes(security.keys["ca"], security.tls_ca_file)
        try:
            tls.check_ca_bundle(ca)
        except FileProblem as exc:
            raise ConfigError(security.keys["ca"], f"{security.tls_ca_file}: {exc}") from None
    key = chain = None
    if security.tls_cert_file is not None and security.tls_key_file is not None:
        chain = read_bytes(security.keys["cert"], security.tls_cert_file)
        key = read_bytes(security.keys["key"], security.tls_key_file)
        try:
            tls.check_identity(security.tls_cert_file, security.tls_key_file, chain, key)
        except FileProblem as exc:
            name, path = ("cert", security.tls_cert_file) if exc.index == 0 else ("key", security.tls_key_file)
            raise ConfigError(security.keys[name], f"{path}: {exc}") from None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def _token(security: UpstreamSecurity, target: str) -> TokenSource | None:
    if security.token_file is None:
        return None
    source = TokenSource(security.keys["token"], security.token_file)
    if not security.tls and not _local(target):
        log.warning(
            "sending the token to %s in plaintext: anyone on the path can read and reuse it (give a TLS CA file)",
            target,
        )
    return source


def _local(target: str) -> bool:
    if target.startswith("unix:"):
        return True
    try:
        return parse_listen_address(target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")).loopback
    except ConfigError:
        return False


class CertificateSnapshot:
    """The certificate files' identities now; ``changed()``: whether any has changed since
    (then a new channel would use new certificates)."""

    def __init__(self, security: UpstreamSecurity) -> None:
        self.security = security
        self.seen = [_stat(path) for _key, path in security.certificate_files()]

    def changed(self) -> bool:
        return [_stat(path) for _key, path in self.security.certificate_files()] != self.seen


def _options(target: str, security: UpstreamSecurity, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    chosen = list(options)
    # A Unix socket has no host name for the certificate to match: it must name localhost.
    if security.tls and target.startswith("unix:") and not any(k == "grpc.ssl_target_name_override" for k, _ in chosen):
        chosen.append(("grpc.ssl_target_name_override", "localhost"))
    return chosen


def aio_channel(
    target: str, security: UpstreamSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` (host:port or unix:///path) as ``security`` says."""
    security = security or UpstreamSecurity()
    credentials = channel_credentials(security)
    token = _token(security, target)
    interceptors = _aio_interceptors(token) if token is not None else None
    chosen = _options(target, security, options)
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=chosen, interceptors=interceptors)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=chosen, interceptors=interceptors)
    return channel


def sync_channel(
    target: str, security: UpstreamSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to ``target``, as ``aio_channel`` (for the command line)."""
    security = security or UpstreamSecurity()
    credentials = channel_credentials(security)
    token = _token(security, target)
    chosen = _options(target, security, options)
    if credentials is None:
        sync: grpc.Channel = grpc.insecure_channel(target, options=chosen)
    else:
        sync = grpc.secure_channel(target, credentials, options=chosen)
    if token is not None:
        sync = grpc.intercept_channel(sync, _SyncToken(token))
    return sync


# ---------------------------------------------------------------- the token on every call


def _with_token(details: Any, token: TokenSource, aio: bool) -> Any:
    given = list(details.metadata or ())
    if any(key == "authorization" for key, _ in given):
        return details  # (a caller's own credential, forwarded by a follower: it goes instead of ours)
    metadata = [*given, *token.metadata]
    if aio:
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
    return _SyncDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
    )


def _aio_interceptors(token: TokenSource) -> list[Any]:
    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_with_token(details, token, True), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_with_token(details, token, True), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
        async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await continuation(_with_token(details, token, True), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
        async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await continuation(_with_token(details, token, True), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: TokenSource) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.token, False), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.token, False), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_token(details, self.token, False), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_token(details, self.token, False), requests)


# ---------------------------------------------------------------- what a failure means


def explain(
    error: grpc.RpcError, target: str, security: UpstreamSecurity | None = None, established: bool = False
) -> str:
    """A failed call to ``target`` as a sentence naming the likely cause (and grpc's own words).
    ``established``: the call had been answered (a stream running), so a closed connection
    says nothing of the handshake."""
    security = security or UpstreamSecurity()
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    lowered = details.lower()
    cause = _cause(code, lowered, target, security, established)
    if cause is None:
        return f"{target}: {code.name}: {details}"
    return f"{target}: {cause} ({code.name}: {details})"


def _cause(
    code: grpc.StatusCode, details: str, target: str, security: UpstreamSecurity, established: bool = False
) -> str | None:
    keys = security.keys
    ca = security.tls_ca_file or keys["ca"]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "needs a token" in details:
            return f"the sidecar requires a token and none was sent; give {keys['token']}"
        if "not valid" in details:
            return f"the sidecar refused the token in {security.token_file or keys['token']}: not one of its tokens"
        return "the sidecar refused the credentials"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "the token is read-only; this call needs an admin token"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "something answers gRPC there, but not a cache-sidecar (or one too old for this call): no such method"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time (a busy sidecar, a stalled network, or not a gRPC server)"
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return None
    behind = re.match(r"upstream (\S+) unreachable", details)
    if behind is not None:  # the follower answered: it is the hop behind it that is down
        return f"the follower at {target} is up, but its upstream {behind.group(1)} is unreachable"
    if "certificate has expired" in details:
        return "the sidecar's certificate has expired"
    if "certificate is not yet valid" in details:
        return "the sidecar's certificate is not valid yet (clock skew?)"
    if "unable to get local issuer" in details or "self signed" in details or "self-signed" in details:
        return f"the sidecar's certificate is not signed by a CA in {ca} (wrong CA file?)"
    if "peer name" in details or "hostname" in details or "subject alternative" in details:
        return f"the sidecar's certificate is not for {target} (its names do not include this host)"
    if "certificate_verify_failed" in details:
        return f"the sidecar's certificate could not be verified with {ca}"
    if "wrong_version_number" in details or "packet_length_too_long" in details:
        return "TLS was asked for but the other side does not speak TLS (a plaintext sidecar, or not a gRPC server)"
    if "failed parsing http/2" in details:
        return "not a gRPC server: it does not speak HTTP/2 (a web server, or another protocol)"
    if "tls handshake failed" in details or "ssl_error" in details:
        return "the TLS handshake failed: the other side is not a TLS gRPC server"
    if "socket closed" in details or "connection reset" in details:
        if established:
            return "the connection was closed (the sidecar stopped or restarted, or the network cut it)"
        if security.tls and security.tls_cert_file is None:
            return (
                "the sidecar closed the connection during the TLS handshake: it probably requires a client "
                f"certificate; give {keys['cert']} and {keys['key']}"
            )
        if security.tls:
            return (
                f"the sidecar closed the connection during the TLS handshake: it refused our client certificate "
                f"({security.tls_cert_file}: not signed by a CA it trusts, or expired)"
            )
        return "the connection was closed at once: the sidecar probably requires TLS (give a CA file)"
    if "connection refused" in details:
        return "nothing listens there (connection refused)"
    return None

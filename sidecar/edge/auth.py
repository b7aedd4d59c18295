"""The server's network edge: TLS credentials (certificates re-read when they change)
and the bearer-token check (an interceptor), for a sidecar reached over a pod network.

- TLS (``server.tls_cert_file``, ``server.tls_key_file``) on every main listen
  address; with ``server.tls_client_ca_file`` a client must present a
  certificate that CA signed (mutual TLS). grpc asks for the certificate
  configuration before every handshake, so a rotated file is used by the next
  connection; connections already open keep theirs.
- Tokens (``server.auth_token_file``): a call without ``authorization: Bearer
  <token>`` naming one of the file's tokens fails ``UNAUTHENTICATED``; one with a
  read-only token calling a method in ``ADMIN_METHODS`` fails
  ``PERMISSION_DENIED``. Health is exempt: it is served without a token on the
  plaintext health-only port anyway, and a probe has no token to give.
  Revocation fails closed: a token file that is deleted, unreadable or left with
  no valid token refuses every call until it is fixed; a bad line is skipped.

The file formats and checks are in ``tokens.py`` and ``tls.py``; re-reading in
``filewatch.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from sidecar.config import Config
from sidecar.edge import tls
from sidecar.edge.filewatch import Watched
from sidecar.edge.names import SERVICE_NAME
from sidecar.edge.tokens import REFUSE_ALL, Role, TokenSet, bearer, reread_token_set, token_set_from_files

log = logging.getLogger(__name__)

ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/Invalidate"})
# Callable without a token (see the module's docstring).
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
AUTHORIZATION = "authorization"


@dataclass
class ServerSecurity:
    """What the main server's listen addresses need: credentials (None: plaintext) and
    interceptors (the token check, when tokens are configured)."""

    credentials: grpc.ServerCredentials | None = None
    certificates: Watched[tuple[bytes, bytes, bytes | None]] | None = None
    tokens: Watched[TokenSet] | None = None
    client_certificates: bool = False

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.tokens)] if self.tokens is not None else []

    @property
    def authenticates(self) -> bool:
        """Whether a caller must prove who it is (a client certificate or a token)."""
        return self.client_certificates or self.tokens is not None


def load(config: Config) -> ServerSecurity:
    """Read and check the configured files; a bad one is a ``ConfigError`` naming its key and path."""
    security = ServerSecurity()
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        files = [("server.tls_cert_file", config.tls_cert_file), ("server.tls_key_file", config.tls_key_file)]
        if config.tls_client_ca_file is not None:
            files.append(("server.tls_client_ca_file", config.tls_client_ca_file))
        security.certificates = certificates = Watched(files, tls.parse_server_files, "the TLS certificate")
        security.client_certificates = config.tls_client_ca_file is not None
        security.credentials = grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(certificates.value),
            _fetcher(certificates),
            require_client_authentication=security.client_certificates,
        )
    if config.auth_token_file is not None:
        security.tokens = Watched(
            [("server.auth_token_file", config.auth_token_file)],
            token_set_from_files,
            "the auth tokens",
            reread=reread_token_set,
            closed=lambda: REFUSE_ALL,
            closed_means="every call is refused until it holds a valid token again",
        )
    return security


def _certificate_configuration(files: tuple[bytes, bytes, bytes | None]) -> Any:
    key, chain, client_ca = files
    return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)


def _fetcher(certificates: Watched[tuple[bytes, bytes, bytes | None]]) -> Callable[[], Any]:
    """grpc's per-handshake question "a new certificate?": one only when the files changed."""

    def fetch() -> Any:
        try:
            if certificates.refresh():
                return _certificate_configuration(certificates.value)
        except Exception:  # never into grpc's C core: the handshake goes on with the last good one
            log.exception("checking the TLS certificate files failed")
        return None

    return fetch


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuse calls without a valid token (``UNAUTHENTICATED``) and admin methods to
    read-only tokens (``PERMISSION_DENIED``), before the request is even parsed."""

    def __init__(self, tokens: Watched[TokenSet]) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        refusal = self._refusal(method, details.invocation_metadata or ())
        handler = await continuation(details)
        if refusal is None:
            return handler
        if handler is None:  # an unknown method: UNAUTHENTICATED still, not a hint of what exists
            return grpc.unary_unary_rpc_method_handler(_refuse(*refusal))
        return _refusing(handler, *refusal)

    def _refusal(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        values = [value for key, value in metadata if key == AUTHORIZATION]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "this sidecar needs a token: send 'authorization: Bearer <token>'"
        if len(values) > 1 or not isinstance(values[0], str):
            return grpc.StatusCode.UNAUTHENTICATED, "send one 'authorization: Bearer <token>' header"
        token = bearer(values[0])
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, "the authorization header must be 'Bearer <token>'"
        role = self.tokens.value.role(token)
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "the token is not valid for this sidecar"
        if method in ADMIN_METHODS and role is not Role.ADMIN:
            name = method.rsplit("/", 1)[-1]
            return grpc.StatusCode.PERMISSION_DENIED, f"{name} needs an admin token; this one is read-only"
        return None


def _refuse(code: grpc.StatusCode, details: str) -> Callable[[Any, Any], Awaitable[None]]:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return refuse


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails at once; its request is not
    deserialized (an unauthenticated caller's bytes are never parsed)."""

    refuse = _refuse(code, details)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)

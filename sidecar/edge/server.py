"""The gRPC server: binds the listen addresses and serves the Cache service,
standard health (``grpc.health.v1``) and server reflection.

Health is SERVING only while the engine serves from memory (listener up,
every table loaded); both the overall status ("") and the Cache service's
follow it. The service name ``liveness`` is SERVING while the process runs
(for a liveness probe: a database outage is no reason to restart us).

``server.health_listen`` adds a second, health-only server (no cache data)
for the kubelet's gRPC probes, which must reach the pod's IP. It is always
plaintext (the kubelet's gRPC probes cannot do TLS) and serves nothing but
``grpc.health.v1``.

Every server is bounded: at most ``server.max_concurrent_calls`` calls in flight
(grpc refuses more with RESOURCE_EXHAUSTED before any handler runs) and at most
``server.max_health_watches`` health Watch streams (``HealthOfOneServer``; Check
is never refused by it); health Watch messages, as Cache Watch ones, are sent
within ``watch.send_timeout``.

TLS and tokens on the main addresses (``auth.py``): a ``ServerSecurity``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.config.addresses import ListenAddress, parse_listen_address
from sidecar.core.assembly import Core
from sidecar.edge.auth import ServerSecurity
from sidecar.edge.names import SERVICE_NAME
from sidecar.edge.service import CacheService, add_to_server, end_stream, send_within
from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

# The largest message the server sends: a row (or an answer, or a Watch
# message) above it is refused with FAILED_PRECONDITION before sending (see
# service.py), never cut by grpc's own RESOURCE_EXHAUSTED, which clients read as
# "fell behind, resume". Clients must accept at least this much (the Python
# client's channels do). A plain variable so that tests can lower it.
MAX_SEND_BYTES = 64 * 1024 * 1024
# What one request key may take on the wire: PostgreSQL cannot index a key
# above about 2.7 kB (a btree entry is at most a third of a page), so 4 KiB
# leaves room for the protobuf framing of a composite key.
KEY_BYTES = 4096
# Table and index names, read options, range bounds.
REQUEST_SLACK_BYTES = 1024 * 1024


def max_receive_bytes(max_batch_keys: int) -> int:
    """The largest request the limits allow: a bigger one is refused by grpc
    (RESOURCE_EXHAUSTED) before a byte of it is parsed."""
    return max_batch_keys * KEY_BYTES + REQUEST_SLACK_BYTES


LIVENESS = "liveness"
MAX_HEALTH_WATCHES = 1_000  # (server.max_health_watches' default)
MAX_CONCURRENT_CALLS = 20_000  # (server.max_concurrent_calls' default)


class _SendTimedOut(Exception):
    pass


class _TimedWrites:
    """A servicer context whose ``write`` gives up after ``timeout`` seconds (``_SendTimedOut``)."""

    def __init__(self, context: grpc.aio.ServicerContext, timeout: float) -> None:
        self._context = context
        self._timeout = timeout

    async def write(self, message: Any) -> None:
        if not await send_within(self._context, message, self._timeout):
            raise _SendTimedOut

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthOfOneServer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1`` on one server: the shared statuses' Check and Watch, with at most
    ``max_watches`` Watch streams open at once and each message sent within ``send_timeout``
    (health needs no token: without a cap, anyone who can connect could open streams
    until the process runs out of memory)."""

    def __init__(self, statuses: health.aio.HealthServicer, max_watches: int, send_timeout: float) -> None:
        self.statuses = statuses
        self.max_watches = max_watches
        self.send_timeout = send_timeout
        self.watching = 0
        self.refused = 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self.statuses.Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self.watching >= self.max_watches:
            self.refused += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams: {self.watching} are open, the most this server serves "
                f"(server.max_health_watches = {self.max_watches}); use Check, or raise server.max_health_watches",
            )
        self.watching += 1
        try:
            await self.statuses.Watch(request, _TimedWrites(context, self.send_timeout))
        except _SendTimedOut:
            await end_stream(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"health Watch ended: its client took no message for {self.send_timeout:g} s (watch.send_timeout)",
            )
        finally:
            self.watching -= 1


@dataclass
class Server:
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    addresses: list[str] = field(default_factory=list)  # as bound (ports resolved)
    health_server: grpc.aio.Server | None = None
    health_services: list[HealthOfOneServer] = field(default_factory=list)  # (main server's first)
    health_addresses: list[str] = field(default_factory=list)
    stopped: bool = False
    security: ServerSecurity | None = None  # the main addresses' (its files' state: metrics)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls; give those in flight ``grace`` seconds. Once stopped, a no-op
        (the daemon's teardown stops it at once whether or not a graceful stop came first)."""
        if self.stopped:
            return
        self.stopped = True
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        stops = [self.grpc_server.stop(grace)]
        if self.health_server is not None:
            stops.append(self.health_server.stop(grace))
        await asyncio.gather(*stops)


async def start(
    core: Core,
    listen: Sequence[str],
    observe: Callable[[str, float], None] | None = None,
    health_listen: Sequence[str] = (),
    security: ServerSecurity | None = None,
    *,
    max_concurrent_calls: int = MAX_CONCURRENT_CALLS,
    max_health_watches: int = MAX_HEALTH_WATCHES,
) -> Server:
    """Bind every address and start serving; health starts NOT_SERVING (liveness SERVING)."""
    result = _build(core, listen, observe, security or ServerSecurity(), max_concurrent_calls, max_health_watches)
    if health_listen:
        # As on the main server: with SO_REUSEPORT a second sidecar would share the port
        # and the kubelet would probe either at random.
        result.health_server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=max_concurrent_calls
        )
        _add_health(result, result.health_server, max_health_watches, core.options.watch_send_timeout)
        for text in health_listen:
            port = _bind(result.health_server, text, text, None, "server.health_listen")
            result.health_addresses.append(f"{parse_listen_address(text).host}:{port}")
    await result.set_serving(False)
    await result.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    await result.grpc_server.start()
    if result.health_server is not None:
        await result.health_server.start()
    return result


def _add_health(result: Server, server: grpc.aio.Server, max_watches: int, send_timeout: float) -> None:
    service = HealthOfOneServer(result.health, max_watches, send_timeout)
    health_pb2_grpc.add_HealthServicer_to_server(service, server)
    result.health_services.append(service)


def _build(
    core: Core,
    listen: Sequence[str],
    observe: Callable[[str, float], None] | None,
    security: ServerSecurity,
    max_concurrent_calls: int,
    max_health_watches: int,
) -> Server:
    server = grpc.aio.server(
        interceptors=security.interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.max_receive_message_length", max_receive_bytes(core.options.max_batch_keys)),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_calls,
    )
    add_to_server(CacheService(core, observe, max_message_bytes=MAX_SEND_BYTES), server)
    health_servicer = health.aio.HealthServicer()
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    result = Server(server, health_servicer, security=security)
    _add_health(result, server, max_health_watches, core.options.watch_send_timeout)
    for text in listen:
        address = parse_listen_address(text)
        if address.unix_path is not None:
            _clear_stale_socket(address.unix_path)
            target = f"unix:{address.unix_path}"
            _bind(server, target, text, security.credentials)
            result.addresses.append(f"unix://{os.path.abspath(address.unix_path)}")
        else:
            port = _bind(server, text, text, security.credentials)
            host = address.host or "0.0.0.0"
            result.addresses.append(f"{host}:{port}")
        _warn_if_exposed(address, security)
    return result


def _warn_if_exposed(address: ListenAddress, security: ServerSecurity) -> None:
    """Say loudly at start what a listen address beyond this host exposes."""
    if address.loopback:
        return
    where = "all interfaces" if address.all_interfaces else "a non-loopback address"
    tls = security.credentials is not None
    if not tls and not security.authenticates:
        log.warning(
            "INSECURE: gRPC listening on %s (%s) in plaintext and without authentication: any host that can "
            "reach it can read the cache and call Invalidate, and anyone on the path can read the traffic; "
            "set server.tls_cert_file/server.tls_key_file and server.auth_token_file or "
            "server.tls_client_ca_file (README, 'Running a hub safely')",
            where,
            address.text,
            extra={"event": "insecure_listen", "listen": address.text},
        )
    elif not tls:
        log.warning(
            "gRPC listening on %s (%s) in plaintext: tokens and rows cross the network unencrypted and can be "
            "read or replayed on the path; set server.tls_cert_file and server.tls_key_file",
            where,
            address.text,
            extra={"event": "insecure_listen", "listen": address.text},
        )
    elif not security.authenticates:
        log.warning(
            "gRPC listening on %s (%s) over TLS but without authentication: any host that can reach it can "
            "read the cache and call Invalidate; set server.auth_token_file or server.tls_client_ca_file",
            where,
            address.text,
            extra={"event": "insecure_listen", "listen": address.text},
        )


def _bind(
    server: grpc.aio.Server,
    target: str,
    text: str,
    credentials: grpc.ServerCredentials | None,
    key: str = "server.listen",
) -> int:
    try:
        if credentials is None:
            port: int = server.add_insecure_port(target)
        else:
            port = server.add_secure_port(target, credentials)
    except RuntimeError as exc:
        raise ConfigError(key, f"cannot listen on {text}: {exc}") from None
    if port == 0 and not target.startswith("unix:"):
        raise ConfigError(key, f"cannot listen on {text} (address in use?)")
    return port


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a previous run (never a regular file)."""
    import socket
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError("server.listen", f"directory {directory} does not exist") from None
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError("server.listen", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listening: stale
    else:
        raise ConfigError("server.listen", f"{path} is in use by another process")
    finally:
        probe.close()

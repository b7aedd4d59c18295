"""Which client connection a Watch call counts against (watch.max_streams_per_connection)."""

from __future__ import annotations

import pytest

from sidecar.edge.service import _connection


@pytest.mark.parametrize(
    ("peer", "connection"),
    [
        ("ipv4:127.0.0.1:50123", "ipv4:127.0.0.1:50123"),
        ("ipv6:[::1]:50123", "ipv6:[::1]:50123"),
        ("unix:", None),  # every Unix-socket client looks alike to grpc: only the total bounds them
        ("unix:/run/cache-sidecar/grpc.sock", None),
        ("", None),
    ],
)
def test_the_connection_is_the_peer_unless_grpc_cannot_tell_peers_apart(peer, connection):
    assert _connection(peer) == connection

"""Which Watch endings the Python client resumes from."""

from __future__ import annotations

import grpc
from cache_sidecar_client.errors import TooLarge, from_rpc_error
from cache_sidecar_client.watch import resumable


def test_fell_behind_resumes_but_a_request_refused_as_too_large_does_not():
    assert resumable(grpc.StatusCode.RESOURCE_EXHAUSTED, established=True)
    assert not resumable(grpc.StatusCode.RESOURCE_EXHAUSTED, established=False)


def test_a_row_too_large_to_send_is_never_resumed():
    assert not resumable(grpc.StatusCode.FAILED_PRECONDITION, established=True)
    assert resumable(grpc.StatusCode.UNAVAILABLE, established=False)


def test_failed_precondition_is_too_large():
    class Error(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self) -> str:
            return "row (7) of public.blob is 131101 bytes"

    assert isinstance(from_rpc_error(Error()), TooLarge)

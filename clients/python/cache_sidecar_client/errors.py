"""The client's exceptions, one per gRPC status the sidecar uses."""

from __future__ import annotations

from typing import Any

import grpc


class CacheSidecarError(Exception):
    """A call to the sidecar failed."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class TableNotFound(CacheSidecarError):
    """The table is not cached by this sidecar (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CacheSidecarError):
    """The request was malformed, e.g. a key that does not fit the primary key (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(CacheSidecarError):
    """The sidecar (or its database) cannot answer correctly right now; safe to retry (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CacheSidecarError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OutOfRange(CacheSidecarError):
    """A revision is older than the sidecar's history: resync (OUT_OF_RANGE)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class TooLarge(CacheSidecarError):
    """A row (or an answer) is larger than the sidecar may send in one message: retrying
    or resuming cannot help (FAILED_PRECONDITION). The message names the table, the key
    and the limit."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UndecodableRow(CacheSidecarError):
    """The decoder could not read a row the sidecar sent (the message names its table and
    key, and the decoder's error). Only that read fails: other rows, the near-cache and a
    watch stream go on (in a stream the change comes with ``undecodable=True``)."""

    def __init__(self, table: str, key: Any, error: BaseException) -> None:
        super().__init__(f"a row of {table} (key {key!r}) could not be decoded: {type(error).__name__}: {error}")
        self.table = table
        self.key = key
        self.error = error


_BY_CODE: dict[grpc.StatusCode, type[CacheSidecarError]] = {
    cls.code: cls for cls in (TableNotFound, InvalidArgument, Unavailable, DeadlineExceeded, OutOfRange, TooLarge)
}


def from_rpc_error(exc: grpc.RpcError) -> CacheSidecarError:
    """The client exception for a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, CacheSidecarError) if code is not None else CacheSidecarError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{name}: {details}", code)

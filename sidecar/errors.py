"""The daemon's exceptions: one root, and each docstring is the default message."""

from __future__ import annotations


class SidecarError(Exception):
    """cache-sidecar failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(SidecarError):
    """The configuration is invalid."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config {key}: {problem}")


class SchemaError(SidecarError):
    """A configured table cannot be cached as it is defined in the database."""


class MissingPrivilege(SidecarError):
    """The database role lacks a privilege the configured tables need."""


class UnknownTable(SidecarError):
    """The table is not cached by this sidecar."""


class InvalidRequest(SidecarError):
    """The request is malformed."""


class InvalidKey(InvalidRequest):
    """The key does not fit the table's primary key."""


class Unavailable(SidecarError):
    """The database cannot be reached; the cache cannot answer correctly right now."""


class QueryFailed(SidecarError):
    """A query failed in a way that would fail again if it were retried as it is."""


class PayloadError(SidecarError):
    """A notification payload could not be parsed."""


class Unauthenticated(SidecarError):
    """The call needs the caller's own credential."""


class UpstreamUnavailable(Unavailable):
    """The upstream sidecar could not answer now."""

    def __init__(self, message: str, status: str) -> None:
        self.status = status  # the upstream's status code's name, passed on unchanged
        super().__init__(message)


class UpstreamFailed(QueryFailed):
    """The upstream sidecar refused the call."""

    def __init__(self, message: str, status: str) -> None:
        self.status = status  # the upstream's status code's name, passed on unchanged
        super().__init__(message)

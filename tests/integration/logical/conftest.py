"""Clusters of their own with ``wal_level = logical`` for the logical decoding tests (the
session's shared server keeps its settings; a wal_level change needs a restart)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.logical import start_logical_cluster
from tests.support.pg import system_bindir


@pytest.fixture(scope="session")
def logical_dsn() -> Iterator[str]:
    """The embedded server's version (the one the stored capture was made with)."""
    cluster = start_logical_cluster()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def system_logical_dsn() -> Iterator[str]:
    """The machine's own PostgreSQL, if installed (skipped otherwise)."""
    bindir = system_bindir()
    if bindir is None:
        pytest.skip("no system PostgreSQL installed (set SIDECAR_TEST_PG_BINDIR to use one)")
    cluster = start_logical_cluster(bindir)
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


@pytest.fixture(params=["embedded", "system"])
def any_logical_dsn(request: pytest.FixtureRequest) -> str:
    """Each available PostgreSQL version in turn."""
    name = "logical_dsn" if request.param == "embedded" else "system_logical_dsn"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]

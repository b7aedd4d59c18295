"""A cluster of its own with ``wal_level = logical`` for the logical decoding tests (the
session's shared server keeps its settings; a wal_level change needs a restart)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.logical import start_logical_cluster


@pytest.fixture(scope="session")
def logical_dsn() -> Iterator[str]:
    cluster = start_logical_cluster()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()

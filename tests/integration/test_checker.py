"""The consistency checker's short run (the long one: python -m tests.checker --duration 300)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests import checker
from tests.support.logical import start_logical_cluster
from tests.support.pg import LocalCluster


@pytest.fixture(scope="module")
def logical_cluster() -> Iterator[LocalCluster]:
    """A cluster with wal_level = logical of the checker's own (it is restarted mid-run)."""
    cluster = start_logical_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_checker_finds_no_broken_promise_under_faults(postgres):
    restart = postgres.restart if postgres.can_restart else None
    report = await asyncio.to_thread(checker.run, postgres.dsn, restart, duration=25.0)
    print(report.table())
    assert report.reads > 1000 and report.strong_reads > 100 and report.writes_acked > 1000
    assert report.listener_kills >= 2  # (3 are planned; on a busy machine a recovery may outlast the run)
    assert report.barrier_kills >= 1 and max(report.kill_to_epoch) < 3.0  # noticed at once (not at a ping: 5 s + 5 s)
    assert report.restarts == (1 if restart else 0)
    assert report.stale_strong_reads == 0, report.examples
    assert report.backwards_reads == 0, report.examples
    assert report.mismatched_rows == 0 and report.compared_rows == 3 * checker.ROWS, report.examples


async def test_checker_with_logical_capture_finds_no_broken_promise_under_faults(logical_cluster):
    """The sidecar captures by logical decoding; the walsender of its replication connection
    is terminated (every other time while barrier tokens are in flight in the stream) and
    PostgreSQL restarts."""
    report = await asyncio.to_thread(
        checker.run, logical_cluster.dsn, logical_cluster.restart, duration=25.0, writers=2, seed=4, capture="logical"
    )
    print(report.table())
    assert report.capture == "logical"
    # (two writers: unthrottled by triggers, writers outrun the sidecar's decoding on a busy
    # 2-core machine, and reads -- STRONG ones wait behind the stream's lag -- become few)
    assert report.reads > 20 and report.strong_reads > 5 and report.writes_acked > 1000
    # (walsenders: 4 kills are planned, 2 of them while barriers are in flight; a recovery --
    # a new slot, every table loaded under its snapshot -- takes longer than LISTEN's, and on a
    # busy machine a kill may find no walsender yet to terminate)
    assert report.listener_kills + report.barrier_kills >= 1  # noticed at once, reconnected soon
    assert not report.kill_to_epoch or max(report.kill_to_epoch) < 3.0
    # (the restart is due mid-run, after the faults before it; a kill waiting for a slow
    # recovery can push it past the end of a short run: the restart fault has its own test,
    # test_logical_faults.py::test_postgresql_restart)
    assert report.restarts <= 1
    assert report.stale_strong_reads == 0, report.examples
    assert report.backwards_reads == 0, report.examples
    assert report.mismatched_rows == 0 and report.compared_rows == 3 * checker.ROWS, report.examples


async def test_checker_through_followers_finds_no_broken_promise_under_faults(postgres):
    """Fleet mode: readers read through two followers while the hub's listener is killed,
    PostgreSQL restarts, the hub process is killed and restarted, each follower's link
    is stalled past its bound and cut, and each follower is switched between two hubs
    (A -> B -> A -> B) while reads name either hub's revision."""
    restart = postgres.restart if postgres.can_restart else None
    report = await asyncio.to_thread(
        checker.run, postgres.dsn, restart, duration=30.0, readers=3, writers=4, seed=2, fleet=2
    )
    print(report.table())
    assert report.reads > 500 and report.strong_reads > 100 and report.writes_acked > 1000
    assert report.hub_restarts == 1 and report.link_stalls == 2 and report.link_cuts == 2
    assert report.hub_switches >= 2 * 2 and report.revision_reads > 50  # (late ones may fall past the end)
    assert report.epochs_seen >= 2  # the hub's restart is a new epoch, seen through the followers
    assert report.stale_strong_reads == 0, report.examples
    assert report.backwards_reads == 0, report.examples
    assert report.mismatched_rows == 0 and report.compared_rows == 2 * 3 * checker.ROWS, report.examples


async def test_checker_through_the_shared_memory_store_finds_no_broken_promise_under_faults(postgres):
    """The readers read the sidecar's shared-memory store whenever it may answer (the full table
    and the relation; the lazy table over gRPC), STRONG reads through it too, under the same faults."""
    restart = postgres.restart if postgres.can_restart else None
    report = await asyncio.to_thread(
        checker.run, postgres.dsn, restart, duration=25.0, readers=3, writers=4, seed=3, fleet=0, shared_memory=True
    )
    print(report.table())
    assert report.reads > 1000 and report.strong_reads > 100 and report.writes_acked > 1000
    assert report.store_reads > 500  # (the rest: the lazy table, and reads around the faults)
    assert report.listener_kills >= 2  # (3 are planned; on a busy machine a recovery may outlast the run)
    assert report.stale_strong_reads == 0, report.examples
    assert report.backwards_reads == 0, report.examples
    assert report.mismatched_rows == 0 and report.compared_rows == 3 * checker.ROWS, report.examples

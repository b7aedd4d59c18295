"""The consistency checker: randomized writes, reads from several processes,
and real faults, then a count of every broken promise.

    python -m tests.checker --duration 300        # the long run
    python -m tests.checker --duration 300 --fleet 2   # readers through 2 followers of the sidecar
    python -m tests.checker --duration 300 --capture logical   # changes by logical decoding
    (tests/integration/test_checker.py runs a short one of each in CI)

Writers (asyncio tasks here) bump a version counter on rows of a full and a
lazy table -- single rows, two-row transactions, and statements big enough
to degrade to whole-table events -- recording when each commit was
acknowledged. A relation joins the two (each full row feeds two relation
rows, through a column that is not the relation's key), so it is refreshed
from both. Reader processes read the tables and the relation through a
sidecar process with EVENTUAL and STRONG consistency; a relation row's two
versions are checked against the writes of their source rows. Meanwhile the listener's backend is terminated
several times and PostgreSQL is restarted once. Then it checks:

  (a) STRONG reads older than the last write acknowledged before the read began  -> must be 0
      (in fleet mode also min_revision reads naming a hub's revision taken after it)
  (b) a row's version going backwards for one reader within one epoch           -> must be 0
  (c) after Sync, every cached row compared with the database                   -> must be identical
  (d) requests that failed, by status (expected around the faults)

Logical mode (``--capture logical``): the cluster runs with ``wal_level = logical``,
the sidecar(s) capture changes by logical decoding, and the faults fit: instead of the
listener's backend, the walsender of the sidecar's replication connection is
terminated (PostgreSQL is restarted as in the default mode). The big statements do not
degrade there: each of their rows comes in the stream. With ``--fleet N`` both hubs
capture so (a slot each); the followers follow as in the default mode.

Standby mode (``--standby``, with ``--capture logical``): a primary and a streaming hot
standby (``pg_basebackup``, both local); the hubs decode on the standby (``--dsn`` the
standby, ``--primary-dsn`` the primary: their barrier tokens are written there), the
writers write to the primary and (c) compares with the primary. The faults move to the
standby: its walsenders serving the hubs are terminated, the standby (not the primary) is
restarted once, and the primary->standby link (a TCP proxy in the standby's
``primary_conninfo``) is stalled for a few seconds twice: STRONG reads wait, never stale.

Fleet mode (``--fleet N``): the sidecar above is a hub, and a second hub runs on
the same database (the shipped two-hub layout); N followers (``serve
--upstream``) follow the first, each through its own TCP proxy, and the readers
read through the followers. Besides the hub's faults, the first hub process is
killed and restarted (a new epoch: the followers rebuild), each follower's link
is stalled past its stall bound and cut, and each follower is switched to the
other hub and back, and over again (its proxy routes elsewhere, as a Service
does). Some reads are read-your-writes across the fleet: ``Sync`` on either hub,
then a read on a follower with ``min_revision`` set to that revision, checked
as (a). (c) is checked on every follower.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from sidecar.identifiers import quote_ident

ROWS = 200
BULK_THRESHOLD = 50  # triggers degrade bigger statements to whole-table events
TABLES = ("checker_full", "checker_lazy")
RELATION = "checker_joined"  # keyed by checker_lazy.id; checker_full row (id - 1) / 2 + 1 joined
RELATION_QUERY = (
    "SELECT l.id, l.version AS lazy_version, f.id AS full_id, f.version AS full_version "
    "FROM public.checker_lazy l JOIN public.checker_full f ON f.id = (l.id - 1) / 2 + 1"
)
CONFIG = f"""
[[tables]]
name = "public.checker_full"

[[tables]]
name = "public.checker_lazy"
mode = "lazy"

[[tables]]
name = "public.{RELATION}"
query = "{RELATION_QUERY}"
key = ["id"]
sources = {{ "public.checker_lazy" = {{ id = "id" }}, "public.checker_full" = {{ id = "full_id" }} }}
"""
BUMP = "UPDATE public.{table} SET version = version + 1 WHERE id = $1 RETURNING id, version"


CAPTURES = ("notify", "logical")
# The backend each capture mode's fault terminates: the LISTEN connection, or the
# walsender of the replication connection (sidecar/pg/logical.py names it).
CAPTURE_BACKENDS = {
    "notify": "application_name = 'cache-sidecar-listener'",
    "logical": "backend_type = 'walsender' AND application_name = 'cache-sidecar replication'",
}


@dataclass
class Report:
    duration: float
    capture: str = "notify"
    standby: bool = False  # the hubs decode on a standby of the primary written to
    standby_stalls: int = 0  # the primary->standby link stalled
    writes_acked: int = 0
    write_errors: int = 0
    reads: int = 0
    strong_reads: int = 0
    strong_seconds: list[float] = field(default_factory=list)  # each STRONG request's time (a batch once)
    stale_strong_reads: int = 0  # (a)
    backwards_reads: int = 0  # (b)
    mismatched_rows: int = 0  # (c)
    compared_rows: int = 0
    failed_by_status: dict[str, int] = field(default_factory=dict)  # (d)
    listener_kills: int = 0
    barrier_kills: int = 0  # kills while Sync barriers were in flight
    kill_to_epoch: list[float] = field(default_factory=list)  # seconds from such a kill to the new epoch
    restarts: int = 0
    followers: int = 0
    hub_restarts: int = 0
    link_stalls: int = 0
    link_cuts: int = 0
    hub_switches: int = 0
    revision_reads: int = 0  # reads with min_revision of a hub's Sync (checked as (a))
    store_reads: int = 0  # reads answered from the shared-memory store (shared_memory=True)
    epochs_seen: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.stale_strong_reads == 0 and self.backwards_reads == 0 and self.mismatched_rows == 0

    def table(self) -> str:
        lines = [
            f"duration                         {self.duration:.0f} s",
            f"writes acknowledged              {self.writes_acked}  (failed: {self.write_errors})",
            f"reads                            {self.reads}  (STRONG: {self.strong_reads})",
            f"STRONG requests' time            {_percentiles(self.strong_seconds)}",
            f"capture                          {self.capture}",
            (
                f"faults: walsender terminated     {self.listener_kills}"
                if self.capture == "logical"
                else f"faults: listener killed          {self.listener_kills}"
            ),
            f"  of them with barriers in flight {self.barrier_kills}; kill -> new epoch: "
            + (
                f"max {max(self.kill_to_epoch) * 1000:.0f} ms, median "
                f"{sorted(self.kill_to_epoch)[len(self.kill_to_epoch) // 2] * 1000:.0f} ms"
                if self.kill_to_epoch
                else "-"
            ),
            f"faults: PostgreSQL restarted     {self.restarts}" + (" (the standby)" if self.standby else ""),
        ]
        if self.standby:
            lines.append(
                f"standby: hubs decode on a standby; primary->standby link stalled {self.standby_stalls}x "
                f"{STANDBY_STALL_SECONDS:g} s"
            )
        if self.followers:
            lines += [
                f"fleet: followers                 {self.followers} (readers read through them)",
                f"faults: hub killed and restarted {self.hub_restarts}",
                f"faults: follower links stalled   {self.link_stalls}, cut {self.link_cuts}",
                f"faults: followers switched hubs  {self.hub_switches} (between 2 hubs on one database)",
                f"reads with a hub's min_revision  {self.revision_reads}",
            ]
        if self.store_reads:
            lines.append(f"reads from the shared-memory store {self.store_reads} (checked as all others)")
        lines += [
            f"epochs seen by readers           {self.epochs_seen}",
            f"(a) stale STRONG reads           {self.stale_strong_reads}"
            + (" (min_revision reads included)" if self.followers else ""),
            f"(b) versions going backwards     {self.backwards_reads}",
            f"(c) rows differing after Sync    {self.mismatched_rows} of {self.compared_rows}",
            f"(d) failed requests by status    {dict(sorted(self.failed_by_status.items())) or 'none'}",
        ]
        lines += [f"    e.g. {example}" for example in self.examples[:5]]
        return "\n".join(lines)


# ---------------------------------------------------------------- readers


def reader_process(
    target: str, seed: int, until: float, out: str, hubs: tuple[str, ...] = (), store: str | None = None
) -> None:
    """One reader: sequential reads until ``until`` (time.monotonic), records to ``out``.
    With ``hubs``, some reads are read-your-writes across the fleet: a Sync on one of the
    hubs, then a read of ``target`` with that revision as ``min_revision``. With ``store``,
    the client reads the sidecar's shared-memory store there whenever it may."""
    from cache_sidecar_client import CacheSidecarError, Client

    rng = random.Random(seed)
    records: list[tuple[Any, ...]] = []
    failures: collections.Counter[str] = collections.Counter()
    hub_clients = [Client(hub, timeout=5) for hub in hubs]
    with Client(target, timeout=5, shared_memory=store) as cache:
        while time.monotonic() < until:
            table = rng.choice((*TABLES, RELATION))
            dice = rng.random()
            consistency = "strong" if dice < 0.3 else "revision" if hub_clients and dice < 0.45 else "eventual"
            ids = rng.sample(range(1, ROWS + 1), 5) if rng.random() < 0.2 else [rng.randrange(1, ROWS + 1)]
            start = time.monotonic()
            try:
                if consistency == "revision":
                    written = rng.choice(hub_clients).sync()
                    rows = cache.batch_get(table, ids, min_revision=written)
                else:
                    rows = cache.batch_get(table, ids, consistency=consistency)  # type: ignore[arg-type]
            except CacheSidecarError as exc:
                failures[exc.code.name if exc.code else "UNKNOWN"] += 1
                time.sleep(0.01)
                continue
            end = time.monotonic()
            epoch = cache.last_revision.epoch if cache.last_revision else ""
            for key, row in zip(ids, rows, strict=True):
                for source, source_key, version in versions(table, key, row):
                    records.append((start, end, table, source, source_key, version, epoch, consistency))
        store_reads = cache._store.reads if cache._store is not None else 0
    for hub in hub_clients:
        hub.close()
    Path(out).write_text(json.dumps({"records": records, "failures": failures, "store_reads": store_reads}))


def versions(table: str, key: int, row: dict[str, Any] | None) -> list[tuple[str, int, int | None]]:
    """What a read row says about source rows: (source table, source key, version)."""
    if table != RELATION:
        return [(table, key, row["version"] if row else None)]
    return [
        ("checker_lazy", key, row["lazy_version"] if row else None),
        ("checker_full", (key - 1) // 2 + 1, row["full_version"] if row else None),
    ]


# ---------------------------------------------------------------- the run


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _setup(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # A publication of an earlier run's tables would outlive them, empty, under the name the
        # sidecar looks for: drop it with them (the sidecar creates it again, --install-triggers).
        for name in await conn.fetch(
            "SELECT DISTINCT pubname FROM pg_catalog.pg_publication_tables "
            "WHERE schemaname = 'public' AND tablename = ANY($1::text[])",
            list(TABLES),
        ):
            await conn.execute(f"DROP PUBLICATION {quote_ident(name['pubname'])}")
        for table in TABLES:
            await conn.execute(f"DROP TABLE IF EXISTS public.{table}")
            await conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, version bigint NOT NULL)")
            await conn.execute(f"INSERT INTO public.{table} SELECT g, 0 FROM generate_series(1, {ROWS}) g")
    finally:
        await conn.close()


class Writers:
    def __init__(self, dsn: str, count: int, seed: int) -> None:
        self.dsn, self.count, self.seed = dsn, count, seed
        self.acks: dict[tuple[str, int], list[tuple[float, int]]] = collections.defaultdict(list)
        self.errors = 0
        self.acked = 0
        self._index: dict[tuple[str, int], tuple[list[float], list[int]]] = {}

    def ack_index(self, table: str, key: int) -> tuple[list[float], list[int]]:
        """A row's acknowledgement times, sorted, with the highest version acknowledged by each."""
        if (table, key) not in self._index:
            acks = sorted(self.acks.get((table, key), []))
            maxima: list[int] = []
            best = 0
            for _, version in acks:
                best = max(best, version)
                maxima.append(best)
            self._index[(table, key)] = ([t for t, _ in acks], maxima)
        return self._index[(table, key)]

    def _ack(self, table: str, rows: list[Any]) -> None:
        now = time.monotonic()
        for row in rows:
            self.acks[(table, row["id"])].append((now, row["version"]))
            self.acked += 1

    async def run(self, until: float) -> None:
        await asyncio.gather(*(self._writer(self.seed + i, until) for i in range(self.count)))

    async def _writer(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        conn: asyncpg.Connection | None = None
        while time.monotonic() < until:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=2)
                table = rng.choice(TABLES)
                dice = rng.random()
                if dice < 0.8:
                    key = rng.randrange(1, ROWS + 1)
                    rows = await conn.fetch(
                        BUMP.format(table=table),
                        key,
                    )
                    self._ack(table, rows)
                elif dice < 0.97:  # two rows in one transaction
                    keys = rng.sample(range(1, ROWS + 1), 2)
                    async with conn.transaction():
                        rows = [
                            *await conn.fetch(
                                BUMP.format(table=table),
                                keys[0],
                            ),
                            *await conn.fetch(
                                BUMP.format(table=table),
                                keys[1],
                            ),
                        ]
                    self._ack(table, rows)
                else:  # a statement the triggers degrade to a whole-table event
                    low = rng.randrange(1, ROWS - BULK_THRESHOLD - 10)
                    rows = await conn.fetch(
                        f"UPDATE public.{table} SET version = version + 1 "
                        f"WHERE id BETWEEN $1 AND $1 + {BULK_THRESHOLD + 9} RETURNING id, version",
                        low,
                    )
                    self._ack(table, rows)
            except Exception:  # around a restart anything may break: count it, reconnect
                self.errors += 1
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.05)
        if conn is not None:
            await conn.close()


async def _faults(dsn: str, target: str, restart: Any, start: float, until: float, report: Report, seed: int) -> None:
    """Kill the capture's backend (the listener's, or the walsender in logical mode) several
    times (every other time while Sync barriers are in flight on it); restart PostgreSQL once,
    mid-run."""
    rng = random.Random(seed)
    duration = until - start
    kills = max(3, int(duration / 8))
    moments = sorted(start + duration * rng.uniform(0.1, 0.85) for _ in range(kills))
    restart_at = start + duration * 0.5 if restart is not None else None
    while time.monotonic() < until - 1:
        now = time.monotonic()
        if restart_at is not None and now >= restart_at:
            restart_at = None
            await asyncio.to_thread(restart)
            report.restarts += 1
        elif moments and now >= moments[0]:
            moments.pop(0)
            if len(moments) % 2:
                await _kill_during_barriers(dsn, target, report)
            else:
                report.listener_kills += await _kill_capture(dsn, report.capture)
        await asyncio.sleep(0.05)


STANDBY_STALL_SECONDS = 3.0


async def _stall_standby_link(
    standby_dsn: str, primary_socket: str, start: float, until: float, report: Report
) -> None:
    """Route the standby's primary_conninfo through a TCP proxy; stall it twice for
    STANDBY_STALL_SECONDS (the standby falls behind; the hubs' STRONG reads must wait)."""
    from tests.support.proxy import Proxy

    proxy = Proxy(unix_path=primary_socket)
    port = await proxy.start()
    conn = await asyncpg.connect(standby_dsn)
    original = str(await conn.fetchval("SHOW primary_conninfo"))
    await conn.close()

    async def configure(conninfo: str) -> None:
        for _ in range(600):  # (the standby may be restarting: another fault)
            try:
                conn = await asyncpg.connect(standby_dsn, timeout=2)
                try:
                    quoted = conninfo.replace("'", "''")
                    await conn.execute(f"ALTER SYSTEM SET primary_conninfo = '{quoted}'")
                    await conn.execute("SELECT pg_reload_conf()")
                    return
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await asyncio.sleep(0.1)

    await configure(f"host=127.0.0.1 port={port} user=postgres application_name=checker_standby")
    try:
        duration = until - start
        for at in (0.3, 0.7):
            await asyncio.sleep(max(0.0, start + duration * at - time.monotonic()))
            if time.monotonic() > until - STANDBY_STALL_SECONDS - 1:
                break
            proxy.stall()
            await asyncio.sleep(STANDBY_STALL_SECONDS)
            proxy.resume()
            report.standby_stalls += 1
    finally:
        proxy.resume()
        await configure(original)
        await proxy.close()


async def _kill_capture(dsn: str, capture: str) -> int:
    """Terminate the backends the sidecars capture changes through; how many."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                f"WHERE {CAPTURE_BACKENDS[capture]}"
            )
        finally:
            await conn.close()
        return int(killed or 0)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return 0


async def _kill_during_barriers(dsn: str, target: str, report: Report) -> None:
    """Kill the capture's backend while Sync calls keep barriers in flight on its connection
    (NOTIFYs, or tokens coming back in the stream), and time how long the sidecar takes to
    notice (a rebuild: a new epoch, or in logical capture -- whose epoch is the database's
    history and outlives a reconnect -- the Watch streams' reset)."""
    from cache_sidecar_client import AsyncClient, CacheSidecarError, Reset

    async with AsyncClient(target, timeout=5) as cache:
        epoch = None
        give_up = time.monotonic() + 20
        while epoch is None and time.monotonic() < give_up:  # (maybe still rebuilding after an earlier fault)
            try:
                epoch = (await cache.sync(timeout=2)).epoch
            except CacheSidecarError:
                await asyncio.sleep(0.05)
        if epoch is None:
            return

        async def barriers() -> None:
            while True:
                try:
                    await cache.sync(timeout=2)
                except CacheSidecarError:
                    await asyncio.sleep(0.005)

        reset, watching = asyncio.Event(), asyncio.Event()

        async def watch() -> None:
            with contextlib.suppress(CacheSidecarError):
                async for item in cache.watch(progress_interval=0.2):
                    watching.set()  # (the first message: subscribed before the kill)
                    if isinstance(item, Reset):
                        reset.set()

        syncs = [asyncio.create_task(barriers()) for _ in range(4)]
        syncs.append(asyncio.create_task(watch()))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watching.wait(), 5)
            await asyncio.sleep(0.05)
            killed = await _kill_capture(dsn, report.capture)
            killed_at = time.monotonic()
            if not killed:
                return
            report.listener_kills += killed
            report.barrier_kills += 1
            while time.monotonic() - killed_at < 30:
                with contextlib.suppress(CacheSidecarError):
                    await cache.list_tables(timeout=1)
                revision = cache.last_revision
                if reset.is_set() or (revision is not None and revision.epoch != epoch):
                    report.kill_to_epoch.append(time.monotonic() - killed_at)
                    return
                await asyncio.sleep(0.002)
            report.kill_to_epoch.append(float("inf"))
        finally:
            for task in syncs:
                task.cancel()
            await asyncio.gather(*syncs, return_exceptions=True)


FINAL_SYNC_SECONDS = 300.0  # how long the final comparison waits for a Sync to succeed


async def _final_comparison(dsn: str, target: str, report: Report) -> None:
    from cache_sidecar_client import AsyncClient, CacheSidecarError

    async with AsyncClient(target, timeout=10) as cache:
        # (the sidecar may still be rebuilding after the last fault, or reading the backlog
        # unthrottled writers left: logical hubs on a loaded machine take minutes)
        deadline = time.monotonic() + FINAL_SYNC_SECONDS
        while True:
            try:
                await cache.sync()
                break
            except CacheSidecarError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        conn = await asyncpg.connect(dsn)
        try:
            for table, query in [*((t, f"SELECT * FROM public.{t}") for t in TABLES), (RELATION, RELATION_QUERY)]:
                truth = {r["id"]: dict(r) for r in await conn.fetch(query)}
                ids = sorted(truth)
                served = await cache.batch_get(table, ids)
                for key, row in zip(ids, served, strict=True):
                    report.compared_rows += 1
                    if row != truth[key]:
                        report.mismatched_rows += 1
                        report.examples.append(f"(c) {table} id {key}: served {row}, database {truth[key]}")
        finally:
            await conn.close()


def _percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    ordered = sorted(seconds)
    at = [ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 for q in (0.5, 0.99)]
    return f"p50 {at[0]:.0f} ms, p99 {at[1]:.0f} ms, max {ordered[-1] * 1000:.0f} ms"


def _check_reads(records: list[list[Any]], writers: Writers, report: Report, reader: int) -> set[str]:
    epochs: set[str] = set()
    last_seen: dict[tuple[str, str, int, str], int] = {}
    timed: set[tuple[float, float]] = set()  # (a batch's keys are records of one request)
    for start, end, read, table, key, version, epoch, consistency in records:
        if consistency == "strong" and (start, end) not in timed:
            timed.add((start, end))
            report.strong_seconds.append(end - start)
        report.reads += 1
        epochs.add(epoch)
        what = f"{table} id {key}" + (f" (through {read})" if read != table else "")
        if version is None:
            report.examples.append(f"reader {reader}: {what} missing")
            report.mismatched_rows += 1
            continue
        if consistency == "revision":
            report.revision_reads += 1
        if consistency in ("strong", "revision"):  # (a revision: a hub's Sync begun after ``start``)
            report.strong_reads += consistency == "strong"
            times, maxima = writers.ack_index(table, key)
            position = bisect.bisect_left(times, start)
            if position and version < maxima[position - 1]:
                report.stale_strong_reads += 1
                report.examples.append(
                    f"(a) reader {reader}: {consistency.upper()} {what} read version {version}, "
                    f"but {maxima[position - 1]} was acknowledged before the read began"
                )
        previous = last_seen.get((read, table, key, epoch))
        if previous is not None and version < previous:
            report.backwards_reads += 1
            report.examples.append(f"(b) reader {reader}: {what} went from {previous} to {version} in epoch {epoch}")
        last_seen[(read, table, key, epoch)] = max(version, previous or 0)
    return epochs


FOLLOWER_ENV = {  # notice a stalled link soon, reconnect soon
    "CACHE_SIDECAR_UPSTREAM_PROGRESS_INTERVAL": "0.2",
    "CACHE_SIDECAR_UPSTREAM_STALL_TIMEOUT": "1.5",
    "CACHE_SIDECAR_LISTENER_RECONNECT_MIN_DELAY": "0.05",
    "CACHE_SIDECAR_LISTENER_RECONNECT_MAX_DELAY": "0.5",
}
LINK_STALL_SECONDS = 2.5  # longer than the followers' stall bound


class Daemon:
    """A sidecar process on a fixed port, which may be killed and started again there."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = env or {}
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "serve", *self.args, "--listen", self.target, "--log-level", "info"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.process is not None
        _wait_ready(self.target, self.process, self.log_path, timeout)

    def restart(self) -> None:
        """Killed at once (no graceful stop), then started again on the same port."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.start()
        self.wait_ready()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        return f"{self.name} log ({self.log_path}):\n" + self.log_path.read_text()[-5000:]


class Links:
    """TCP proxies between the followers and the hub, on an event loop of their own (a
    thread), so that they move bytes whatever the checker's own loop is doing."""

    def __init__(self) -> None:
        from tests.support.proxy import Proxy

        self._proxy_class = Proxy
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="links", daemon=True)
        self.thread.start()
        self.proxies: list[Any] = []

    def add(self, port: int) -> int:
        """A proxy to 127.0.0.1:``port``; its own port."""

        async def make() -> tuple[Any, int]:
            proxy = self._proxy_class(host="127.0.0.1", port=port)
            return proxy, await proxy.start()

        proxy, own = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        self.proxies.append(proxy)
        return int(own)

    def stall(self, index: int) -> None:
        self.loop.call_soon_threadsafe(self.proxies[index].stall)

    def resume(self, index: int) -> None:
        self.loop.call_soon_threadsafe(self.proxies[index].resume)

    def cut(self, index: int) -> None:
        self.loop.call_soon_threadsafe(self.proxies[index].cut)

    def switch(self, index: int, port: int) -> None:
        """Send proxy ``index``'s connections to 127.0.0.1:``port`` from now on (and cut them)."""
        self.loop.call_soon_threadsafe(self.proxies[index].retarget, "127.0.0.1", port)

    def close(self) -> None:
        async def close_all() -> None:
            for proxy in self.proxies:
                await proxy.close()

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _fleet_faults(
    hub: Daemon, other: Daemon, links: Links, start: float, until: float, report: Report, seed: int
) -> None:
    """Stall each follower's link past its stall bound once and cut it once; switch each
    follower to the other hub, back, and to it again (A -> B -> A -> B: back on a hub
    followed before, the other's epoch is a live hub's, never past); kill and restart the
    first hub once (a new epoch: the followers on it rebuild)."""
    rng = random.Random(seed + 7)
    duration = until - start
    events: list[tuple[float, str, int]] = []
    for index in range(len(links.proxies)):
        events.append((start + duration * rng.uniform(0.15, 0.4), "stall", index))
        events.append((start + duration * rng.uniform(0.55, 0.65), "cut", index))
        events.append((start + duration * rng.uniform(0.1, 0.2), "to-other", index))
        events.append((start + duration * rng.uniform(0.3, 0.5), "to-first", index))
        events.append((start + duration * rng.uniform(0.66, 0.72), "to-other", index))
        events.append((start + duration * rng.uniform(0.8, 0.9), "to-first", index))
    events.append((start + duration * 0.75, "hub", -1))
    for at, kind, index in sorted(events):
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if time.monotonic() > until - 1:
            return
        if kind == "stall":
            links.stall(index)
            report.link_stalls += 1
            await asyncio.sleep(LINK_STALL_SECONDS)
            links.resume(index)
        elif kind == "cut":
            links.cut(index)
            report.link_cuts += 1
        elif kind in ("to-other", "to-first"):
            links.switch(index, (other if kind == "to-other" else hub).port)
            report.hub_switches += 1
        else:
            await asyncio.to_thread(hub.restart)
            report.hub_restarts += 1


def run(
    dsn: str,
    restart: Any,
    *,
    duration: float,
    readers: int = 3,
    writers: int = 4,
    seed: int = 1,
    fleet: int = 0,
    shared_memory: bool = False,
    capture: str = "notify",
    standby: Any = None,
) -> Report:
    """Run the checker against the PostgreSQL at ``dsn``; ``restart`` restarts it (or None).
    ``fleet``: that many followers of the sidecar, through which the readers read.
    ``shared_memory`` (without a fleet): the sidecar keeps a shared-memory store, and the
    readers read it whenever it may answer. ``capture``: the hubs' capture mode ("logical"
    needs ``wal_level = logical``; followers take what their hub sends either way).
    ``standby``: a ``tests.support.standby.StandbyPair`` whose primary ``dsn`` is: the hubs
    decode on its standby, and ``restart`` restarts the standby."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {', '.join(CAPTURES)}, not {capture!r}")
    if standby is not None and capture != "logical":
        raise ValueError("a standby needs capture logical")
    asyncio.run(_setup(dsn))
    report = Report(duration=duration, capture=capture, followers=fleet, standby=standby is not None)
    hub_dsn = ["--dsn", dsn]
    capture_dsn = dsn  # where the capture's backends run (the faults terminate them there)
    if standby is not None:
        standby.wait_caught_up()
        hub_dsn = ["--dsn", standby.standby.dsn, "--primary-dsn", dsn]
        capture_dsn = standby.standby.dsn
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-checker-"))
    config_path = workdir / "sidecar.toml"
    config_path.write_text(CONFIG)
    hub = Daemon(
        "sidecar",
        [
            *hub_dsn,
            "--config",
            str(config_path),
            "--install-triggers",
            "--bulk-threshold",
            str(BULK_THRESHOLD),
            "--ping-interval",
            "1",
            "--capture",
            capture,
            *(["--shared-memory", str(workdir / "store")] if shared_memory and not fleet else []),
        ],
        workdir,
    )
    links = Links() if fleet else None
    other = Daemon("sidecar-b", hub.args, workdir) if fleet else None  # the second hub, same database
    followers: list[Daemon] = []
    try:
        hub.start()
        hub.wait_ready()
        if other is not None:
            other.start()
            other.wait_ready()
        for index in range(fleet):
            assert links is not None
            link = links.add(hub.port)
            followers.append(Daemon(f"follower{index}", ["--upstream", f"127.0.0.1:{link}"], workdir, FOLLOWER_ENV))
            followers[-1].start()
        for follower in followers:
            follower.wait_ready()
        read_targets = [f.target for f in followers] or [hub.target]
        start = time.monotonic()
        until = start + duration
        context = multiprocessing.get_context("spawn")
        outs = [str(workdir / f"reader{i}.json") for i in range(readers)]
        hubs = (hub.target, other.target) if other is not None else ()
        processes = [
            context.Process(
                target=reader_process,
                args=(
                    read_targets[i % len(read_targets)],
                    seed * 100 + i,
                    until,
                    outs[i],
                    hubs,
                    str(workdir / "store") if shared_memory and not fleet else None,
                ),
            )
            for i in range(readers)
        ]
        for process in processes:
            process.start()
        writer = Writers(dsn, writers, seed)

        async def write_and_fault() -> None:
            jobs = [writer.run(until), _faults(capture_dsn, hub.target, restart, start, until, report, seed)]
            if standby is not None:
                jobs.append(_stall_standby_link(standby.standby.dsn, standby.primary.socket_path, start, until, report))
            if links is not None and other is not None:
                jobs.append(_fleet_faults(hub, other, links, start, until, report, seed))
            await asyncio.gather(*jobs)

        asyncio.run(write_and_fault())
        for process in processes:
            process.join(timeout=duration + 60)
        report.writes_acked, report.write_errors = writer.acked, writer.errors
        epochs: set[str] = set()
        failures: collections.Counter[str] = collections.Counter()
        for index, out in enumerate(outs):
            data = json.loads(Path(out).read_text())
            failures.update(data["failures"])
            report.store_reads += data.get("store_reads", 0)
            epochs |= _check_reads(data["records"], writer, report, index)
        report.failed_by_status = dict(failures)
        report.epochs_seen = len(epochs)
        for target in read_targets:
            asyncio.run(_final_comparison(dsn, target, report))
    except BaseException:
        for daemon in (hub, *([other] if other is not None else []), *followers):
            print(daemon.log_tail(), file=sys.stderr)
        raise
    finally:
        for daemon in (*followers, *([other] if other is not None else []), hub):
            daemon.stop()
        if links is not None:
            links.close()
    return report


def _wait_ready(target: str, sidecar: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if sidecar.poll() is not None:
                raise RuntimeError(f"sidecar exited: {log_path.read_text()[-2000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError("sidecar never became ready")


def main() -> None:
    parser = argparse.ArgumentParser(description="cache-sidecar consistency checker")
    parser.add_argument("--duration", type=float, default=60, help="seconds of writes, reads and faults")
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet", type=int, default=0, help="followers of the sidecar to read through (0: none)")
    parser.add_argument(
        "--shared-memory", action="store_true", help="readers read the sidecar's shared-memory store (no fleet)"
    )
    parser.add_argument(
        "--capture",
        choices=CAPTURES,
        default="notify",
        help="how the sidecar captures changes (logical: a cluster with wal_level = logical)",
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="the hubs decode on a hot standby of the primary written to (needs --capture logical)",
    )
    args = parser.parse_args()
    if args.standby and args.capture != "logical":
        parser.error("--standby needs --capture logical")
    settings = {
        "duration": args.duration,
        "readers": args.readers,
        "writers": args.writers,
        "seed": args.seed,
        "fleet": args.fleet,
        "shared_memory": args.shared_memory,
        "capture": args.capture,
    }
    external = os.environ.get("SIDECAR_TEST_DSN")
    if args.standby:
        from tests.support.standby import start_standby_pair

        pair = start_standby_pair()
        try:
            report = run(pair.primary.dsn, pair.standby.restart, standby=pair, **settings)
        except BaseException:
            print(f"standby log:\n{pair.log_tail()}", file=sys.stderr)
            raise
        finally:
            pair.stop()
    elif external:
        print("SIDECAR_TEST_DSN set: PostgreSQL will not be restarted", file=sys.stderr)
        report = run(external, None, **settings)
    else:
        from tests.support.logical import start_logical_cluster
        from tests.support.pg import EmbeddedServer, LocalCluster

        server: EmbeddedServer | LocalCluster = (
            start_logical_cluster() if args.capture == "logical" else EmbeddedServer()
        )
        try:
            report = run(server.dsn, server.restart, **settings)
        finally:
            server.stop()
    print(report.table())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()

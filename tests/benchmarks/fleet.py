"""Fleet mode's cost on PostgreSQL, side by side in one run (``./dev bench``).

For K = 1, 10, 30 sidecars (each its own process), two layouts on one table:

  * direct: K sidecars, each with its own LISTEN connection and pool;
  * fleet:  1 hub (a sidecar on PostgreSQL) + K followers (``serve --upstream``).

For each: pgbench single-row UPDATE tps on the cached table (8 clients,
``synchronous_commit`` on and off) beside the same with no sidecar at all;
PostgreSQL backends the sidecars hold (pg_stat_activity); database
transactions per committed change (pg_stat_database's commits beyond
pgbench's own: the sidecars' refetches and loads); and commit -> visible
latency (p50/p99) on the hub and on the followers (or on the direct sidecars),
from Watch streams, for paced single-row UPDATEs.

In production PostgreSQL has a machine of its own and the sidecars run in pods elsewhere,
so by default (``--cpus split``) PostgreSQL's processes have CPU 0 to themselves and
pgbench, the sidecars and this script share the others, every sidecar at ``nice 10``
(``--nice``) so that pgbench's clients are not starved by them; for commit -> visible,
the bootstraps and the hub restart (the sidecars' own speed) they get every CPU. pgbench
runs twice per setting, interleaved (on, off, on, off), and each tps is the mean. ``--cpus shared`` puts
everything on every CPU (sidecars still niced): then the run also measures how 31 sidecar
processes on PostgreSQL's own 2 cores slow it, which no deployment does.

Then a follower's bootstrap (start -> SERVING) and RSS beside a direct sidecar
loading the same table from PostgreSQL, and K followers re-bootstrapping at
once after their hub restarts.

    python -m tests.benchmarks.fleet [--sizes 1,10,30] [--seconds 5] [--cpus split|shared]
                                     [--bootstrap-rows 100000,1000000]

Hub failover (``--failover``, on a logical-decoding cluster of its own): two hubs, K
followers of hub A, each a process of its own behind a TCP proxy (a Service) and with a
watcher of its own; under write load hub A is killed (SIGKILL) and every proxy routes its
follower to hub B: per follower the time until it follows again (from its log), the rows it
read again, its watcher's Resets, and the CPU and memory this took -- hubs in logical
capture (resume by commit LSN) beside NOTIFY (rebuild). ``--failover-switch`` only moves the
proxies, hub A lives on.

    python -m tests.benchmarks.fleet --failover [--failover-followers 30] [--failover-rows 50000]

Hubs on a standby (``--standby``, issue 23): a primary and its streaming hot standby
(tests/support/standby.py, the primary alone on the first CPU with ``--cpus split``), logical
capture, three layouts in interleaved rounds (each fleet started afresh, the order reversed
every other round): no fleet; 2 hubs on the primary + N followers; 2 hubs on the standby
(``--primary-dsn``) + N followers. Per layout: pgbench tps on the primary (sync on and off)
and its ratio to no fleet; the daemon's statements on the primary (the primary logs every
statement with its application name; pgbench's and this script's sessions are not logged),
split into barrier tokens and the rest, per second, per Sync and per change; the daemon's
backends on the primary; Syncs through the followers (a steady trickle, under pgbench and
under paced writes) that succeeded or failed; commit -> visible on followers p50/p99.

    python -m tests.benchmarks.fleet --standby [--standby-followers 30] [--standby-rounds 2]
                                     [--standby-sync-rate 20] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.benchmarks.run import free_port

TABLE = "public.fleet_rows"
ROWS = 10_000  # pgbench updates these
VISIBLE = 2_000  # and the visibility writes the ones after them, so no backlog is taken for theirs
LOGS = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
# Sidecars run niced: pgbench shares their CPUs (see --cpus) and must not be starved by them.
NICE = 10
APP_NAME = "cache-sidecar%"  # every connection the daemon opens says so in pg_stat_activity


# ---------------------------------------------------------------- processes


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    target: str
    started: float = field(default_factory=time.perf_counter)

    def stop(self, signalled: bool = False) -> None:
        """SIGTERM (unless ``signalled`` already: a second one exits at once), then wait."""
        if self.process.poll() is None and not signalled:
            self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) / 1024 if match else float("nan")


_PORTS: set[int] = set()  # given out this run: free_port() may hand a freed port out again


def start(args: list[str], port: int | None = None) -> Sidecar:
    if port is None:  # (a port given is meant: the hub's again, when it restarts)
        port = free_port()
        while port in _PORTS:
            port = free_port()
    _PORTS.add(port)
    command = ["nice", "-n", str(NICE), sys.executable, "-m", "sidecar", "serve", *args]
    command += ["--listen", f"127.0.0.1:{port}", "--log-level", "info"]
    log = LOGS / f"sidecar-{port}.log"
    with log.open("ab") as out:  # (each process's log, for a look after the run)
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out)
    return Sidecar(process, f"127.0.0.1:{port}")


def direct(dsn: str, table: str = TABLE) -> Sidecar:
    return start(["--dsn", dsn, "--table", table])


def follower(hub: Sidecar) -> Sidecar:
    return start(["--upstream", hub.target])


async def serving(sidecars: list[Sidecar], timeout: float = 600) -> list[float]:
    """Wait until each is SERVING; seconds from its start to then."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def one(sidecar: Sidecar) -> float:
        async with grpc.aio.insecure_channel(sidecar.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline:
                if sidecar.process.poll() is not None:
                    raise SystemExit(f"sidecar {sidecar.target} exited with {sidecar.process.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - sidecar.started
                await asyncio.sleep(0.02)
        raise SystemExit(f"sidecar {sidecar.target} did not become ready in {timeout:.0f} s")

    return list(await asyncio.gather(*(one(s) for s in sidecars)))


@contextlib.contextmanager
def running(sidecars: list[Sidecar]) -> Iterator[list[Sidecar]]:
    try:
        yield sidecars
    finally:
        for sidecar in sidecars:
            if sidecar.process.poll() is None:
                sidecar.process.terminate()
        for sidecar in sidecars:
            sidecar.stop(signalled=True)


# ---------------------------------------------------------------- database side


async def prepare(dsn: str, table: str, rows: int, triggers: bool = True) -> None:
    """The table, filled; with ``triggers`` NOTIFY capture's triggers too (logical capture's
    publication is installed by its hubs: ``--install-capture``)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, v bigint NOT NULL, name text NOT NULL, "
            "email text NOT NULL, created timestamptz NOT NULL)"
        )
        await conn.execute(
            f"INSERT INTO {table} SELECT g, 0, 'user ' || g, 'user' || g || '@example.com', "
            "now() - g * interval '1 minute' FROM generate_series(1, $1) g",
            rows,
        )
        await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    if not triggers:
        return
    installed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sidecar", "triggers", "install", "--dsn", dsn, "--table", table],
        capture_output=True,
        text=True,
    )
    if installed.returncode != 0:
        raise SystemExit(installed.stderr)


def pgbench_binary() -> str:
    with contextlib.suppress(ImportError):
        import pgserver  # the embedded server ships its own

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench not found (it comes with pgserver's binaries or Debian's postgresql-client)")
    return found


def pgbench(
    dsn: str, seconds: float, synchronous_commit: bool, clients: int = 8, options: str = ""
) -> tuple[float, int]:
    """Single-row UPDATEs of the cached table: (tps, transactions); ``options`` more
    server settings for its sessions (``-c name=value ...``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(f"\\set id random(1, {ROWS})\nUPDATE {TABLE} SET v = v + 1 WHERE id = :id;\n")
    sync = f"-c synchronous_commit={'on' if synchronous_commit else 'off'}"
    env = {**os.environ, "PGOPTIONS": f"{sync} {options}".strip()}
    try:
        result = subprocess.run(
            [pgbench_binary(), "-n", "-f", script.name, "-c", str(clients), "-j", "2", "-T", str(int(seconds)), dsn],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=None if PGBENCH_CPUS is None else lambda: os.sched_setaffinity(0, PGBENCH_CPUS or set()),
        )
    finally:
        os.unlink(script.name)
    if result.returncode != 0:
        raise SystemExit(f"pgbench failed: {result.stderr}")
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"number of transactions actually processed: (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    return tps, done


async def backends(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1", APP_NAME))


async def commits(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))


# ---------------------------------------------------------------- visibility latency


async def visibility(
    dsn: str, watched: list[Sidecar], rate: float, seconds: float, everyone: list[Sidecar], settle: bool = True
) -> list[list[float]]:
    """Paced single-row UPDATEs; for each watched sidecar, commit -> batch-on-its-Watch
    latencies in ms (the commit time is when the UPDATE returned to the writer). Every one
    of ``everyone`` has caught up first: none is still working off pgbench's backlog."""
    committed: dict[int, float] = {}
    arrived: list[dict[int, float]] = [{} for _ in watched]
    channels = [grpc.aio.insecure_channel(s.target) for s in watched]
    ready = [asyncio.Event() for _ in watched]

    async def follow(index: int) -> None:
        stub = pb_grpc.CacheStub(channels[index])
        # (accept_batches, as the clients do: a stream behind gets several batches a message)
        call = stub.Watch(pb.WatchRequest(tables=[TABLE], progress_interval_ms=50, accept_batches=True))
        async for message in call:
            now = time.perf_counter()
            ready[index].set()
            kind = message.WhichOneof("kind")
            batches = [message.changes] if kind == "changes" else message.batches.batches if kind == "batches" else []
            for batch in batches:
                for change in batch.events:
                    if change.key.parts:
                        arrived[index].setdefault(change.key.parts[0].int_value, now)

    # Every sidecar has applied what came before (pgbench's backlog): a Sync each
    # (a follower that fell behind during pgbench rebuilds first: Sync fails until it follows;
    # ten direct sidecars on one CPU refetch a 10-second pgbench run's changes for minutes).
    async def synced(channel: grpc.aio.Channel) -> None:
        deadline = time.perf_counter() + 900
        while True:
            try:
                await pb_grpc.CacheStub(channel).Sync(pb.SyncRequest(), timeout=10)
                return
            except grpc.RpcError:
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.2)

    settling = [grpc.aio.insecure_channel(s.target) for s in everyone] if settle else []
    try:
        await asyncio.gather(*(synced(c) for c in settling))
    finally:
        for channel in settling:
            await channel.close()
    tasks = [asyncio.create_task(follow(i)) for i in range(len(watched))]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)
        conn = await asyncpg.connect(dsn)
        try:
            interval = 1 / rate
            next_at = time.perf_counter()
            for n in range(int(rate * seconds)):
                key = ROWS + 1 + n % VISIBLE
                await conn.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE id = $1", key)
                committed.setdefault(key, time.perf_counter())
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        finally:
            await conn.close()
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline and any(len(a) < len(committed) for a in arrived):
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return [[(a[k] - t) * 1000 for k, t in committed.items() if k in a] for a in arrived]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------- the runs


@dataclass
class Layout:
    name: str
    size: int
    tps_on: float = 0.0
    tps_off: float = 0.0
    backends: int = 0
    per_change: float = 0.0
    hub_ms: tuple[float, float] = (float("nan"), float("nan"))
    edge_ms: tuple[float, float] = (float("nan"), float("nan"))


async def measure_layout(
    dsn: str, layout: Layout, sidecars: list[Sidecar], hub: Sidecar | None, args: argparse.Namespace
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        layout.backends = await backends(conn)
        before = await commits(conn)
        layout.tps_on, layout.tps_off, done = await tps_both(dsn, args.seconds)
        await asyncio.sleep(1)  # let the last refetches land and the statistics flush
        after = await commits(conn)
        layout.per_change = max(0, (after - before) - done) / done
        layout.backends = max(layout.backends, await backends(conn))
    finally:
        await conn.close()
    watched = ([hub] if hub is not None else []) + sidecars[: args.watched]
    # Latency is the sidecars' own speed, not PostgreSQL's cost: with the CPUs split, they
    # (and this client) get every CPU for it, or 32 processes would share one.
    with every_cpu([*sidecars, *([hub] if hub is not None else [])]):
        everyone = [*([hub] if hub is not None else []), *sidecars]
        latencies = await visibility(dsn, watched, args.rate, args.visibility_seconds, everyone)
    if hub is not None:
        layout.hub_ms = (pct(latencies[0], 0.5), pct(latencies[0], 0.99))
        latencies = latencies[1:]
    edge = [v for per in latencies for v in per]
    layout.edge_ms = (pct(edge, 0.5), pct(edge, 0.99))


async def tps_both(dsn: str, seconds: float) -> tuple[float, float, int]:
    """pgbench with synchronous commit on, off, on, off: the mean tps of each, and the
    transactions in all (commits wait on the disk, whose speed here drifts from minute to
    minute: two runs of each, interleaved, drift less)."""
    on: list[float] = []
    off: list[float] = []
    done = 0
    for _ in range(2):
        for synchronous, into in ((True, on), (False, off)):
            tps, count = await asyncio.to_thread(pgbench, dsn, seconds / 2, synchronous)
            into.append(tps)
            done += count
    return sum(on) / len(on), sum(off) / len(off), done


async def run_layouts(dsn: str, args: argparse.Namespace) -> list[Layout]:
    results = []
    baseline = Layout("no sidecar", 0)
    baseline.tps_on, baseline.tps_off, _ = await tps_both(dsn, args.seconds)
    results.append(baseline)
    for size in args.sizes:
        print(f"direct: {size} sidecar(s) ... (logs in {LOGS})", file=sys.stderr)
        with running([direct(dsn) for _ in range(size)]) as sidecars:
            await serving(sidecars)
            layout = Layout("direct", size)
            await measure_layout(dsn, layout, sidecars, None, args)
            results.append(layout)
        print(f"fleet: 1 hub + {size} follower(s) ...", file=sys.stderr)
        with running([direct(dsn)]) as (hub,):
            await serving([hub])
            with running([follower(hub) for _ in range(size)]) as followers:
                await serving(followers)
                layout = Layout("fleet (1 hub)", size)
                await measure_layout(dsn, layout, followers, hub, args)
                results.append(layout)
    return results


async def run_bootstrap(dsn: str, args: argparse.Namespace) -> list[tuple[int, str, float, float]]:
    rows_out = []
    for rows in args.bootstrap_rows:
        table = f"public.fleet_boot_{rows}"
        print(f"bootstrap: {rows:,} rows ...", file=sys.stderr)
        await prepare(dsn, table, rows)
        with running([direct(dsn, table)]) as (hub,):
            (hub_seconds,) = await serving([hub])
            rows_out.append((rows, "direct sidecar, from PostgreSQL", hub_seconds, hub.rss_mb()))
            with running([follower(hub)]) as (one,):
                (seconds,) = await serving([one])
                rows_out.append((rows, "follower, from the hub's stream", seconds, one.rss_mb()))
    return rows_out


async def run_restart(dsn: str, args: argparse.Namespace) -> tuple[int, float, float]:
    """K followers of a hub that restarts (a new epoch): the time until all are SERVING again."""
    size = max(args.sizes)
    port = free_port()
    hub = start(["--dsn", dsn, "--table", TABLE], port)
    with running([hub]):
        await serving([hub])
        with running([follower(hub) for _ in range(size)]) as followers:
            await serving(followers)
            hub.stop()
            restarted = time.perf_counter()
            new_hub = start(["--dsn", dsn, "--table", TABLE], port)
            with running([new_hub]):
                await serving([new_hub])
                hub_ready = time.perf_counter() - restarted
                for f in followers:
                    f.started = restarted
                times = await serving(followers)
    return size, hub_ready, max(times)


# ---------------------------------------------------------------- hub failover


@dataclass
class Failover:
    capture: str
    followers: int
    seconds: list[float]  # per follower that follows again: the loss -> following again
    never: int  # followers not following again within the deadline
    rows_reread: int  # rows the followers read again (their logs' initial states after the loss)
    watchers_reset: int  # Resets the followers' own watchers got (one watcher per follower)
    rebuilds: int
    resumes: int
    hub_cpu: float  # CPU seconds of the surviving hub from the loss until every follower followed
    followers_cpu: float  # and of the followers together
    rss_mb: tuple[float, float]  # before the loss: one hub, the followers together
    load: tuple[float, float]  # 1-minute load average at the loss and when every follower followed


async def _scrape(port: int) -> dict[str, float]:
    """A follower's upstream metrics (``cache_sidecar_upstream_*``), by name."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    values = {}
    for line in body.splitlines():
        if line.startswith("cache_sidecar_upstream_") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


async def _write(dsn: str, rate: float, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        n = 0
        while True:
            n += 1
            await conn.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE id = $1", 1 + n % rows)
            await asyncio.sleep(1 / rate)
    finally:
        await conn.close()


async def _count_resets(target: str, resets: list[int], index: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        async for message in pb_grpc.CacheStub(channel).Watch(pb.WatchRequest(tables=[TABLE])):
            if message.WhichOneof("kind") == "reset":
                resets[index] += 1


# The follower's log lines that say it follows (again): a resume, or an initial state taken.
_RESUMED = re.compile(r"^(\S+ \S+) INFO .*: following \S+ again at revision")
_BEGAN = re.compile(r"^(\S+ \S+) INFO .*: following \S+ from its revision \S+ \((\d+) rows\)")


def _log_time(stamp: str) -> float:
    """A log line's time (``logging``'s asctime: local time, milliseconds) as a Unix time."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _followed_again(log: Path, offset: int) -> tuple[float, int] | None:
    """From the follower's log past ``offset``: (the time it first follows again, the rows
    of the initial states it took meanwhile), or None while it does not follow yet."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    rows = 0
    for line in text.splitlines():
        if began := _BEGAN.match(line):
            return _log_time(began.group(1)), rows + int(began.group(2))
        if resumed := _RESUMED.match(line):
            return _log_time(resumed.group(1)), rows
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _total(after: list[dict[str, float]], before: list[dict[str, float]], name: str) -> int:
    """A counter's growth, summed over the followers."""
    return int(sum(x[name] - y[name] for x, y in zip(after, before, strict=True)))


def _log_of(sidecar: Sidecar) -> Path:
    return LOGS / f"sidecar-{sidecar.target.rsplit(':', 1)[1]}.log"


async def run_failover(dsn: str, args: argparse.Namespace) -> list[Failover]:
    """Two hubs; K followers of hub A, each behind a TCP proxy (a Service), each with a
    watcher of its own; under write load hub A is killed (SIGKILL: ``--failover-switch``
    only moves the proxies) and every proxy sends its follower to hub B: per follower, the
    time until it follows again (from its log), the rows it read again, its watcher's
    Resets -- logical capture (a resume by LSN) beside NOTIFY (a rebuild)."""
    from tests.support.proxy import Proxy

    rows = args.failover_rows
    await prepare(dsn, TABLE, rows)
    results = []
    for capture in ("logical", "notify"):
        print(f"failover: {capture} capture, {args.failover_followers} followers ...", file=sys.stderr)
        hub_args = ["--dsn", dsn, "--table", TABLE, "--capture", capture, "--install-triggers"]
        with running([start(hub_args), start(hub_args)]) as (a, b):
            await serving([a, b])
            port_of = {hub.target: int(hub.target.rsplit(":", 1)[1]) for hub in (a, b)}
            proxies = [Proxy(host="127.0.0.1", port=port_of[a.target]) for _ in range(args.failover_followers)]
            for proxy in proxies:
                await proxy.start()
            metrics = [free_port() for _ in proxies]
            followers = [
                start(["--upstream", f"127.0.0.1:{proxy.port}", "--metrics-listen", f"127.0.0.1:{port}"])
                for proxy, port in zip(proxies, metrics, strict=True)
            ]
            resets = [0] * len(followers)
            tasks: list[asyncio.Task[None]] = []
            try:
                with running(followers):
                    await serving(followers)
                    tasks = [asyncio.create_task(_count_resets(f.target, resets, i)) for i, f in enumerate(followers)]
                    tasks.append(asyncio.create_task(_write(dsn, args.rate, rows)))
                    await asyncio.sleep(3.0)  # (write load under way; the followers past B's first revision)
                    before = [await _scrape(port) for port in metrics]
                    rss = (a.rss_mb(), sum(f.rss_mb() for f in followers))
                    logs = [_log_of(f) for f in followers]
                    offsets = [log.stat().st_size for log in logs]
                    cpu = [_cpu_seconds(p.process.pid) for p in (b, *followers)]
                    load_then = os.getloadavg()[0]
                    lost = time.time()
                    if not args.failover_switch:
                        a.process.kill()  # (the hub's pod is gone; the Service routes to the other)
                    moment = datetime.datetime.fromtimestamp(lost).isoformat(sep=" ", timespec="milliseconds")
                    print(f"failover: hub A {a.target} lost at {moment}, hub B {b.target}", file=sys.stderr)
                    for proxy in proxies:
                        proxy.retarget("127.0.0.1", port_of[b.target])

                    found: list[tuple[float, int] | None] = [None] * len(followers)
                    deadline = time.perf_counter() + args.failover_deadline
                    while time.perf_counter() < deadline and None in found:
                        await asyncio.sleep(0.1)
                        for i, log in enumerate(logs):
                            if found[i] is None:
                                found[i] = _followed_again(log, offsets[i])
                    cpu = [_cpu_seconds(p.process.pid) - c for p, c in zip((b, *followers), cpu, strict=True)]
                    load_now = os.getloadavg()[0]
                    await asyncio.sleep(1.0)  # (the watchers' Resets, if any, are on their way)
                    after = [await _scrape(port) for port in metrics]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for proxy in proxies:
                    await proxy.close()

            done = [f for f in found if f is not None]
            results.append(
                Failover(
                    capture,
                    len(followers),
                    [max(0.0, at - lost) for at, _ in done],
                    len(found) - len(done),
                    sum(n for _, n in done),
                    sum(resets),
                    _total(after, before, "cache_sidecar_upstream_rebuilds_total"),
                    _total(after, before, "cache_sidecar_upstream_resumes_total"),
                    cpu[0],
                    sum(cpu[1:]),
                    rss,
                    (load_then, load_now),
                )
            )
    return results


def report_failover(results: list[Failover], rows: int, rate: float, switch: bool) -> None:
    what = "hub A's followers sent to hub B by their proxies" if switch else "hub A killed (SIGKILL)"
    print(f"hub failover: {what}, its followers moved to hub B at once; {rows:,} rows, ~{rate:.0f} writes/s")
    print()
    print(
        "| capture | followers | following again p50 / max s | never | rows re-read | watchers reset "
        "| rebuilds | resumes | CPU s: hub B / followers | RSS MB: hub / followers | load 1 min |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        seconds = f"{pct(r.seconds, 0.5):.3f} / {max(r.seconds):.3f}" if r.seconds else "--"
        print(
            f"| {r.capture} | {r.followers} | {seconds} | {r.never} | {r.rows_reread:,} | {r.watchers_reset} "
            f"| {r.rebuilds} | {r.resumes} | {r.hub_cpu:.1f} / {r.followers_cpu:.1f} "
            f"| {r.rss_mb[0]:.0f} / {r.rss_mb[1]:.0f} | {r.load[0]:.2f} → {r.load[1]:.2f} |"
        )
    print()
    print(f"(logs: {LOGS})")


# ---------------------------------------------------------------- hubs on a standby

# What the benchmark's own sessions on the primary run is not logged (the primary logs every
# statement, with its application name, so that the daemon's can be counted).
QUIET = "-c log_statement=none"


@dataclass
class Syncs:
    """Syncs through the followers in a window: succeeded, failed (and why), their times."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)

    def cell(self) -> str:
        if not self.ok and not self.failed:
            return "--"
        times = f"{pct(self.ms, 0.5):.0f} / {pct(self.ms, 0.99):.0f}" if self.ms else "-- / --"
        return f"{self.ok} / {sum(self.failed.values())}; {times}"


@dataclass
class StandbyLayout:
    name: str
    hubs: int = 0
    followers: int = 0
    tps_on: list[float] = field(default_factory=list)
    tps_off: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the windows (pgbench with the Sync trickle) in all
    changes: int = 0  # pgbench's transactions in them
    statements: int = 0  # the daemon's statements on the primary in them
    tokens: int = 0  # of which barrier tokens (pg_logical_emit_message)
    others: list[str] = field(default_factory=list)  # the rest, a few for the report
    syncs: list[Syncs] = field(default_factory=lambda: [Syncs(), Syncs()])  # under pgbench, under paced writes
    barrier_waits: int = 0  # reads the hubs' barriers answered (cache_sidecar_barrier_seconds_count)
    backends: int = 0  # the daemon's backends on the primary (most seen)
    edge_ms: list[float] = field(default_factory=list)  # commit -> visible on followers

    def tps(self, synchronous: bool) -> float:
        values = self.tps_on if synchronous else self.tps_off
        return sum(values) / len(values) if values else float("nan")


def _postmaster(base: Path) -> int:
    return int((base / "data" / "postmaster.pid").read_text().split()[0])


def _statements_since(log: Path, offset: int) -> list[tuple[str, str]]:
    """(application name, statement) the primary logged past ``offset``."""
    from tests.support.standby import _STATEMENT

    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(m.group(1), m.group(2).strip()) for m in _STATEMENT.finditer(text)]


async def _hub_barriers(port: int) -> float:
    """How many reads a hub's read barriers have answered (its barrier histogram's count)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    for line in body.splitlines():
        if line.startswith("cache_sidecar_barrier_seconds_count"):
            return float(line.rpartition(" ")[2])
    return 0.0


async def _sync_trickle(followers: list[Sidecar], rate: float, count: Syncs) -> None:
    """Syncs through the followers in turn, ``rate`` a second (each its own call, not waiting
    for the one before): read barriers on their hubs, as STRONG reads would make."""
    channels = [grpc.aio.insecure_channel(f.target) for f in followers]
    pending: set[asyncio.Task[None]] = set()

    async def one(channel: grpc.aio.Channel) -> None:
        began = time.perf_counter()
        try:
            await pb_grpc.CacheStub(channel).Sync(pb.SyncRequest(), timeout=10)
        except grpc.RpcError as exc:
            why = f"{exc.code().name}: {(exc.details() or '')[:80]}"
            count.failed[why] = count.failed.get(why, 0) + 1
            return
        count.ok += 1
        count.ms.append((time.perf_counter() - began) * 1000)

    try:
        n = 0
        next_at = time.perf_counter()
        while True:
            task = asyncio.create_task(one(channels[n % len(channels)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    finally:
        if pending:
            await asyncio.wait(pending, timeout=15)
        for channel in channels:
            await channel.close()


async def _standby_round(pair: Any, layout: StandbyLayout, args: argparse.Namespace, first: bool) -> None:
    """One round of one layout: its fleet started (if any); pgbench on the primary, then
    paced single-row UPDATEs timed commit -> visible on followers, each with a trickle of
    Syncs through the followers and the daemon's statements on the primary counted; the
    fleet stopped."""
    primary = pair.primary.dsn
    hubs: list[Sidecar] = []
    metrics: list[int] = []
    if layout.name != "no fleet":
        common = ["--table", TABLE, "--capture", "logical", "--install-capture"]
        where = ["--dsn", primary]
        if layout.name == "hubs on the standby":
            where = ["--dsn", pair.standby.dsn, "--primary-dsn", primary]
        metrics = [free_port() for _ in range(args.standby_hubs)]
        hubs = [start([*where, *common, "--metrics-listen", f"127.0.0.1:{port}"]) for port in metrics]
    with running(hubs):
        await serving(hubs)
        followers = [follower(hubs[i % len(hubs)]) for i in range(args.standby_followers)] if hubs else []
        with running(followers):
            await serving(followers)
            layout.hubs, layout.followers = len(hubs), len(followers)
            everyone = [*hubs, *followers]
            conn = await asyncpg.connect(primary, server_settings={"log_statement": "none"})
            try:

                @contextlib.asynccontextmanager
                async def window(count: Syncs) -> Any:
                    """The daemon's statements on the primary, hub barriers and Syncs meanwhile."""
                    if everyone:  # every follower caught up (no backlog counted here)
                        await visibility(primary, [], args.rate, 0, everyone)
                    log = pair.primary.base / "log"
                    offset = log.stat().st_size
                    barriers = [await _hub_barriers(port) for port in metrics]
                    layout.backends = max(layout.backends, await backends(conn))
                    rate = args.standby_sync_rate
                    trickle = asyncio.create_task(_sync_trickle(followers, rate, count)) if followers else None
                    began = time.perf_counter()
                    try:
                        yield
                    finally:
                        if trickle is not None:
                            trickle.cancel()
                            await asyncio.gather(trickle, return_exceptions=True)
                    layout.seconds += time.perf_counter() - began
                    layout.backends = max(layout.backends, await backends(conn))
                    layout.barrier_waits += int(sum([await _hub_barriers(p) for p in metrics]) - sum(barriers))
                    for app, statement in _statements_since(log, offset):
                        if not app.startswith("cache-sidecar"):
                            continue
                        layout.statements += 1
                        if "pg_logical_emit_message(true" in statement:
                            layout.tokens += 1
                        elif len(layout.others) < 6:
                            layout.others.append(f"{app}: {' '.join(statement.split())[:100]}")

                async with window(layout.syncs[0]):
                    # (the order of sync on/off alternates from round to round)
                    for synchronous in (True, False) if first else (False, True):
                        tps, done = await asyncio.to_thread(pgbench, primary, args.seconds, synchronous, 8, QUIET)
                        (layout.tps_on if synchronous else layout.tps_off).append(tps)
                        layout.changes += done
                if followers:
                    async with window(layout.syncs[1]):
                        watched = followers[: args.watched]
                        with every_cpu(everyone):
                            latencies = await visibility(
                                primary, watched, args.rate, args.visibility_seconds, everyone, settle=False
                            )
                        layout.edge_ms += [v for per in latencies for v in per]
                        layout.changes += int(args.rate * args.visibility_seconds)
            finally:
                await conn.close()


async def run_standby(pair: Any, args: argparse.Namespace, loads: list[float]) -> list[StandbyLayout]:
    """No fleet, hubs on the primary, hubs on the standby: ``--standby-rounds`` rounds, each
    layout once a round (its fleet started afresh), the order reversed every other round."""
    await prepare(pair.primary.dsn, TABLE, ROWS + VISIBLE, triggers=False)
    await asyncio.to_thread(pair.wait_caught_up)
    layouts = [StandbyLayout("no fleet"), StandbyLayout("hubs on the primary"), StandbyLayout("hubs on the standby")]
    for n in range(args.standby_rounds):
        for layout in layouts if n % 2 == 0 else layouts[::-1]:
            loads.append(os.getloadavg()[0])
            print(f"standby: round {n + 1}, {layout.name}, load {loads[-1]:.1f} ... (logs in {LOGS})", file=sys.stderr)
            await _standby_round(pair, layout, args, n % 2 == 0)
    return layouts


def report_standby(layouts: list[StandbyLayout], args: argparse.Namespace, cpus: str, loads: list[float]) -> None:
    print(cpus)
    print(
        f"{args.standby_rounds} rounds, the layouts interleaved; per round per layout pgbench (8 clients, "
        f"single-row UPDATEs) {args.seconds:g} s with synchronous_commit on and {args.seconds:g} s off; "
        f"~{args.standby_sync_rate:g} Syncs/s through the followers meanwhile; "
        f"load average (1 min) {' / '.join(f'{x:.1f}' for x in loads)}"
    )
    print()
    base = layouts[0]
    print(
        "| layout | hubs + followers | tps sync on | x no fleet | tps sync off | x no fleet "
        "| daemon backends on the primary | daemon statements on the primary /s | barrier tokens "
        "| other statements | statements per Sync | other statements per change "
        "| Syncs ok / failed; p50 / p99 ms, under pgbench | the same, under paced writes "
        "| commit→visible on followers p50/p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in layouts:
        syncs = sum(c.ok + sum(c.failed.values()) for c in r.syncs)
        per_sync = f"{r.statements / syncs:.3f}" if syncs else "--"
        per_change = f"{(r.statements - r.tokens) / r.changes:.4f}" if r.changes else "--"
        rate = r.statements / r.seconds if r.seconds else 0.0
        edge = f"{pct(r.edge_ms, 0.5):.1f} / {pct(r.edge_ms, 0.99):.1f}" if r.edge_ms else "--"
        print(
            f"| {r.name} | {r.hubs} + {r.followers} | {r.tps(True):,.0f} | {r.tps(True) / base.tps(True):.3f} "
            f"| {r.tps(False):,.0f} | {r.tps(False) / base.tps(False):.3f} | {r.backends} | {rate:.2f} "
            f"| {r.tokens} | {r.statements - r.tokens} | {per_sync} | {per_change} "
            f"| {r.syncs[0].cell()} | {r.syncs[1].cell()} | {edge} |"
        )
    print()
    for r in layouts:
        tps = " ".join(f"{x:,.0f}" for x in r.tps_on) + " (on); " + " ".join(f"{x:,.0f}" for x in r.tps_off)
        print(
            f"{r.name}: tps per round {tps} (off); hub barrier waits {r.barrier_waits}; changes {r.changes:,}; "
            f"windows {r.seconds:.0f} s"
        )
        for c in r.syncs:
            for why, n in c.failed.items():
                print(f"  Sync failed {n}x: {why}")
        for line in r.others:
            print(f"  other statement: {line}")
    print()
    print(
        "(statements per Sync: the daemon's statements on the primary per Sync issued; other statements "
        "per change: those that are not barrier tokens, per committed change)"
    )
    print(f"(logs: {LOGS})")


# ---------------------------------------------------------------- CPUs


SPLIT: tuple[set[int], set[int]] | None = None  # (every CPU, the sidecars' CPUs) once split
PGBENCH_CPUS: set[int] | None = None  # pgbench's CPUs when they are not this process's (--cpus apart)


def _set_cpus(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, OSError):
            os.sched_setaffinity(int(task.name), cpus)


@contextlib.contextmanager
def every_cpu(sidecars: list[Sidecar]) -> Iterator[None]:
    """With the CPUs split: the sidecars and this process on every CPU for the duration."""
    if SPLIT is None:
        yield
        return
    every, theirs = SPLIT
    for sidecar in sidecars:
        _set_cpus(sidecar.process.pid, every)
    _set_cpus(os.getpid(), every)
    try:
        yield
    finally:
        _set_cpus(os.getpid(), theirs)  # (sidecars started later inherit it again)


def split_cpus(postmaster: int) -> str:
    """PostgreSQL's processes (the postmaster, its children, and the backends it forks from
    now on) on the first CPU alone; this process and what it starts (pgbench, the sidecars)
    on the others. Returns a line saying which layout the run has."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"CPUs: shared (only {len(cpus)} CPU: no split possible)"
    database, others = {cpus[0]}, set(cpus[1:])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    for pid in [postmaster, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):  # (a child may end meanwhile)
            os.sched_setaffinity(pid, database)
    os.sched_setaffinity(0, others)  # before any thread or child: they inherit it
    global SPLIT
    SPLIT = (set(cpus), others)
    return (
        f"CPUs: PostgreSQL alone on CPU {cpus[0]}; pgbench and the sidecars on {sorted(others)} "
        "(commit -> visible, bootstraps and the hub restart: the sidecars on every CPU)"
    )


def report(
    layouts: list[Layout],
    boot: list[tuple[int, str, float, float]],
    restart: tuple[int, float, float],
    cpus: str,
) -> None:
    print(cpus)
    print()
    base = layouts[0]
    print(
        "| layout | sidecars | tps (sync on) | x no sidecar | tps (sync off) | x no sidecar | PG backends "
        "| DB transactions per change | commit→visible on hub p50/p99 ms | on the sidecars p50/p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in layouts:
        print(
            f"| {r.name} | {r.size} | {r.tps_on:,.0f} | {r.tps_on / base.tps_on:.2f} | {r.tps_off:,.0f} "
            f"| {r.tps_off / base.tps_off:.2f} | {r.backends} | {r.per_change:.2f} "
            f"| {r.hub_ms[0]:.1f} / {r.hub_ms[1]:.1f} | {r.edge_ms[0]:.1f} / {r.edge_ms[1]:.1f} |"
        )
    by = {(r.name, r.size): r for r in layouts}
    print()
    one_direct = by.get(("direct", 1))
    for r in layouts:
        if r.name.startswith("fleet") and one_direct is not None:
            print(
                f"fleet of {r.size}: tps {r.tps_on / one_direct.tps_on:.2f}x (sync on) and "
                f"{r.tps_off / one_direct.tps_off:.2f}x (sync off) of one direct sidecar; "
                f"follower p99 / hub p99 = {r.edge_ms[1] / r.hub_ms[1]:.2f}x"
            )
    print()
    print("| rows | bootstrap | start → SERVING s | RSS MB |")
    print("|---:|---|---:|---:|")
    for rows, what, seconds, rss in boot:
        print(f"| {rows:,} | {what} | {seconds:.2f} | {rss:.0f} |")
    size, hub_ready, all_ready = restart
    print()
    print(
        f"hub restart with {size} followers: the new hub SERVING after {hub_ready:.2f} s, "
        f"every follower SERVING again after {all_ready:.2f} s"
    )


async def run(dsn: str, args: argparse.Namespace, cpus: str) -> None:
    await prepare(dsn, TABLE, ROWS + VISIBLE)
    layouts = await run_layouts(dsn, args)
    if SPLIT is not None:  # bootstraps are the sidecars' own speed too: every CPU from here on
        _set_cpus(os.getpid(), SPLIT[0])
    boot = await run_bootstrap(dsn, args)
    restart = await run_restart(dsn, args)
    report(layouts, boot, restart, cpus)


def main() -> None:
    global NICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,30", help="numbers of sidecars, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each pgbench run")
    parser.add_argument("--rate", type=float, default=200.0, help="paced UPDATEs per second for visibility")
    parser.add_argument("--visibility-seconds", type=float, default=3.0)
    parser.add_argument("--watched", type=int, default=5, help="sidecars/followers whose Watch is timed")
    parser.add_argument("--bootstrap-rows", default="100000,1000000", help="table sizes, comma-separated")
    parser.add_argument("--nice", type=int, default=NICE, help="niceness of every sidecar process (0: none)")
    parser.add_argument(
        "--cpus",
        choices=("split", "shared", "apart"),
        default="split",
        help="split: PostgreSQL alone on the first CPU, the rest elsewhere (as deployed); shared: all on all; "
        "apart (--standby only): the primary and pgbench on the first CPU, the standby and the fleet on the "
        "others (as if they ran on machines of their own)",
    )
    parser.add_argument(
        "--failover",
        action="store_true",
        help="only the hub failover comparison (logical vs NOTIFY), on a logical-decoding cluster of its own",
    )
    parser.add_argument("--failover-followers", type=int, default=3, help="followers switched in --failover")
    parser.add_argument("--failover-rows", type=int, default=50_000, help="table rows in --failover")
    parser.add_argument(
        "--failover-switch",
        action="store_true",
        help="in --failover, only send hub A's followers to hub B (their proxies), without killing hub A",
    )
    parser.add_argument(
        "--failover-deadline", type=float, default=300.0, help="seconds the followers have to follow again"
    )
    parser.add_argument(
        "--standby",
        action="store_true",
        help="only the hubs-on-a-standby comparison: no fleet, hubs on the primary, hubs on a standby",
    )
    parser.add_argument("--standby-hubs", type=int, default=2, help="hubs in --standby")
    parser.add_argument("--standby-followers", type=int, default=30, help="followers in --standby")
    parser.add_argument("--standby-rounds", type=int, default=2, help="interleaved rounds in --standby")
    parser.add_argument(
        "--standby-sync-rate", type=float, default=20.0, help="Syncs per second through the followers in --standby"
    )
    args = parser.parse_args()
    NICE = args.nice
    if args.standby:
        run_standby_main(args)
        return
    if args.failover:
        from tests.support.logical import start_logical_cluster

        cluster = start_logical_cluster()
        try:
            results = asyncio.run(run_failover(cluster.dsn, args))
        finally:
            cluster.stop()
        report_failover(results, args.failover_rows, args.rate, args.failover_switch)
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.bootstrap_rows = [int(s) for s in args.bootstrap_rows.split(",") if s]
    from sidecar.cli import GRPC_EXPERIMENTS

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    external = os.environ.get("SIDECAR_TEST_DSN")
    if external:
        asyncio.run(run(external, args, "CPUs: PostgreSQL is SIDECAR_TEST_DSN's, not on this machine's CPUs"))
        return
    from tests.support.pg import EmbeddedServer

    server = EmbeddedServer()
    try:
        # 30 direct sidecars hold up to 30 x (1 + database.pool_max_size) backends: room for
        # them, so that direct mode is measured as it would run, not refused.
        asyncio.run(_allow_connections(server.dsn, 500))
        server.restart()
        cpus = split_cpus(server.postmaster_pid()) if args.cpus == "split" else "CPUs: shared by everything"
        asyncio.run(run(server.dsn, args, cpus))
    finally:
        server.stop()


def run_standby_main(args: argparse.Namespace) -> None:
    """A primary and its streaming standby (tests/support/standby.py); with ``--cpus split``
    the primary alone on the first CPU, the standby with everything else."""
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.standby import start_standby_pair

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    pair = start_standby_pair()
    try:
        cpus = "CPUs: shared by everything"
        if args.cpus == "apart":
            cpus = _apart(pair)
        if args.cpus == "split":
            cpus = split_cpus(_postmaster(pair.primary.base)).replace("PostgreSQL", "the primary", 1)
            if SPLIT is not None:
                standby = _postmaster(pair.standby.base)
                children = subprocess.run(["pgrep", "-P", str(standby)], capture_output=True, text=True).stdout.split()
                for pid in [standby, *map(int, children)]:
                    _set_cpus(pid, SPLIT[1])
                cpus += "; the standby with them"
        loads: list[float] = []
        layouts = asyncio.run(run_standby(pair, args, loads))
        loads.append(os.getloadavg()[0])
    finally:
        pair.stop()
    report_standby(layouts, args, cpus, loads)


def _apart(pair: Any) -> str:
    """The primary and pgbench on the first CPU; the standby, this process and what it starts
    (hubs, followers) on the others: the fleet's CPU is not the primary's, as when the
    standby and the fleet run on machines of their own (pgbench's client work stays beside
    the primary in every layout alike)."""
    global PGBENCH_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"CPUs: shared (only {len(cpus)} CPU)"
    primary, others = {cpus[0]}, set(cpus[1:])
    for base, where in ((pair.primary.base, primary), (pair.standby.base, others)):
        postmaster = _postmaster(base)
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            _set_cpus(pid, where)
    os.sched_setaffinity(0, others)  # (before the fleet starts: its processes inherit it)
    PGBENCH_CPUS = primary
    return f"CPUs: the primary and pgbench on CPU {cpus[0]}; the standby, hubs and followers on {sorted(others)}"


async def _allow_connections(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET max_connections = {count}")
    finally:
        await conn.close()


if __name__ == "__main__":
    main()

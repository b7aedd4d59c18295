"""What change capture costs PostgreSQL's writers, side by side in one run: no capture
(no slot, no trigger) vs NOTIFY (the daemon with its triggers, ``--capture notify``) vs
logical decoding (the daemon streaming from its slot, ``--capture logical``).

One throwaway cluster of the embedded server's binaries with ``wal_level = logical`` and
``fsync`` on (as ``tests.support.logical`` starts one); three tables of 100 000 rows, one
per mode; each daemon caches its mode's table (full) and connects as a role of its own.

First, per capture mode, on the quiet server, the daemon not niced (its own speed):
  * commit -> visible: one writer commits single-row UPDATEs (synchronous_commit on, paced
    at ``--rate``, each a key of its own) while a Watch stream on the daemon waits for them;
    the time from the writer's UPDATE returning (the commit acknowledged) to the Watch
    message naming the key arriving at this client, p50/p99. (Watch sends a change once
    the cache holds it; a Get polled at that moment returns the new row.)
  * Sync p50: ``--syncs`` sequential Sync calls, nothing else running.

Then writer throughput: pgbench (the embedded server's, ``-M prepared``) runs single-row
UPDATE by random id, single-row INSERT and a 500-row UPDATE, with 1 and 8 connections,
``synchronous_commit`` on and off, in ``--rounds`` interleaved rounds: each (connections,
synchronous_commit) setting runs every mode's three workloads back to back, the modes'
order rotating from one setting and round to the next. During a mode's block only its own
capture exists: the NOTIFY daemon runs throughout (idle unless its table is written); the
logical daemon is started for its block and stopped after it (its temporary slot goes with
it), so no slot decodes the other modes' writes. After each pgbench run the mode's daemon
is asked for a ``Sync``: the seconds until it answers (``catch-up``) say whether it kept up.
The NOTIFY daemon is waited for (its backlog would load the next run with its refetches);
a logical daemon not caught up after ``--catch-up-limit`` seconds is stopped and a new one
started for the next run. (A consumer that falls behind lets the walsender wait on its
socket: while it lags, PostgreSQL does less of the decoding work, so read the logical tps
with the catch-up beside it.) tps: the mean of the rounds; ratio to no capture: the median
of the rounds' ratios (each round's pair ran side by side).

Statements per committed transaction: every statement the daemon's own sessions run, as the
server logs them: each daemon's role has ``log_statement = all`` (``ALTER ROLE ... SET``;
the writers' role logs nothing, ``log_line_prefix`` names the role), and that role's
statements are counted from a pgbench run's start until the Sync after it answered, over
the transactions pgbench committed. This is what PostgreSQL ran for the daemon -- refetches,
reloads, the catalog check every 10 s, the Sync's own, and asyncpg's reset query each time
a pooled connection goes back -- not the daemon's own count. "Reading the table": those
that name the cached table (refetches and reloads). The kinds run most are listed.

The daemons run at ``--nice`` (10) during the throughput runs: on a machine this small
pgbench and PostgreSQL must not be starved by them (a sidecar runs off the database's host).
``--cpus split`` puts PostgreSQL alone on the first CPU and everything else on the others
(``tests.benchmarks.fleet``); by default everything shares every CPU.

``--recvlogical`` adds a fourth mode: a slot streamed by pg_recvlogical (C; it discards what
it reads), i.e. PostgreSQL's own decoding cost without the daemon's CPU beside it.

    python -m tests.benchmarks.write_cost [--quick] [--seconds 2] [--rounds 2] [--cpus shared|split]
                                          [--nice 10] [--recvlogical]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.benchmarks.run import free_port, wait_serving

ROWS = 100_000
MODES = ("none", "notify", "logical")
# --recvlogical: a slot streamed by PostgreSQL's own pg_recvlogical (C, discards what it reads):
# PostgreSQL's decoding cost alone, without the daemon's
RECVLOGICAL = "recvlogical"
TABLES = {mode: f"public.write_{mode}" for mode in (*MODES, RECVLOGICAL)}
HEADINGS = {"notify": "NOTIFY", "logical": "logical", RECVLOGICAL: "slot + pg_recvlogical"}
ROLES = {"notify": "bench_notify", "logical": "bench_logical"}  # the daemons' roles (their statements are logged)
WORKLOADS = {  # name: (pgbench script, rows changed per transaction)
    "UPDATE 1 row": ("\\set id random(1, {rows})\nUPDATE {table} SET v = v + 1 WHERE id = :id;\n", 1),
    "INSERT 1 row": ("INSERT INTO {table} (v, note) VALUES (0, 'new');\n", 1),
    "UPDATE 500 rows": (
        "\\set id random(1, {rows} - 499)\nUPDATE {table} SET v = v + 1 WHERE id BETWEEN :id AND :id + 499;\n",
        500,
    ),
}
SETTINGS = {  # the cluster: logical decoding possible, commits durable, no checkpoint in the middle of a run
    "wal_level": "logical",
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "fsync": "on",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
}
ENTRY = re.compile(r"^(\w*)\|([A-Z]+):  (.*)$")  # a log entry's first line: 'role|LOG:  ...' (log_line_prefix '%u|')
STATEMENT = re.compile(r"^(?:statement|execute [^:]*): ?(.*)$")  # what log_statement = all writes
NICE = 10  # the daemons' niceness: pgbench shares their CPUs and must not be starved by them


# ---------------------------------------------------------------- results

STARTED = time.perf_counter()


def elapsed() -> str:
    return f"[{time.perf_counter() - STARTED:5.0f} s]"


@dataclass
class Run:
    """One workload at one setting in one mode, over the rounds."""

    tps: list[float] = field(default_factory=list)
    transactions: int = 0
    statements: int = 0  # every statement the daemon's sessions ran
    reads: int = 0  # of them, those naming the cached table (refetches, reloads)
    catch_up: list[float] = field(default_factory=list)  # seconds until Sync returned after the run
    # logical: the share of the run's WAL the walsender had decoded and sent when pgbench ended
    decoded: list[float] = field(default_factory=list)


@dataclass
class Latency:
    visible_ms: list[float]
    sync_ms: list[float]
    samples: int
    watch_error: str = ""  # how the Watch stream ended early, if it did


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------- the cluster and the daemons


class ServerLog:
    """The server's log: the statements each daemon's role ran since a mark."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kinds: dict[str, collections.Counter[str]] = {role: collections.Counter() for role in ROLES.values()}

    def mark(self) -> int:
        return self.path.stat().st_size

    def statements(self, since: int, role: str) -> list[str]:
        """Each statement's text (its continuation lines joined) that ``role`` ran since ``since``."""
        with self.path.open("rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        found: list[str] = []
        current: list[str] | None = None
        for line in lines:
            entry = ENTRY.match(line)
            if entry is None:
                if current is not None:
                    current.append(line)
                continue
            if current is not None:
                found.append(" ".join(" ".join(current).split()))
                current = None
            if entry.group(1) == role and entry.group(2) == "LOG":
                statement = STATEMENT.match(entry.group(3))
                if statement is not None:
                    current = [statement.group(1)]
        if current is not None:
            found.append(" ".join(" ".join(current).split()))
        for text in found:
            self.kinds[role][text[:80] + ("..." if len(text) > 80 else "")] += 1
        return found


async def prepare(dsn: str, modes: tuple[str, ...]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for mode in modes:
            table = TABLES[mode]
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.execute(
                f"CREATE TABLE {table} (id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH {ROWS + 1}) "
                "PRIMARY KEY, v int NOT NULL, note text NOT NULL)"
            )
            await conn.execute(f"INSERT INTO {table} SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g")
            await conn.execute(f"VACUUM ANALYZE {table}")
            if mode in ROLES:
                role = ROLES[mode]
                await conn.execute(f"DROP ROLE IF EXISTS {role}")
                # (superuser: it installs its triggers or publication and streams; a benchmark's shortcut)
                await conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
                await conn.execute(f"ALTER ROLE {role} SET log_statement = 'all'")
            if mode == RECVLOGICAL:
                await conn.execute(f"DROP PUBLICATION IF EXISTS bench_{RECVLOGICAL}")
                await conn.execute(f"CREATE PUBLICATION bench_{RECVLOGICAL} FOR TABLE {table}")
        await conn.execute("ALTER SYSTEM SET log_line_prefix = '%u|'")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.execute("CHECKPOINT")  # (the runs start with the loads on disk)
    finally:
        await conn.close()


def as_role(dsn: str, role: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


@dataclass
class Daemon:
    mode: str
    process: subprocess.Popen[bytes]
    target: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def start_daemon(dsn: str, mode: str, logs: Path, nice: int = NICE) -> Daemon:
    target = f"127.0.0.1:{free_port()}"
    command = [
        "nice",
        "-n",
        str(NICE),
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--dsn",
        as_role(dsn, ROLES[mode]),
        "--install-triggers",
    ]
    command += ["--capture", mode, "--table", TABLES[mode], "--listen", target, "--log-level", "info"]
    log = logs / f"sidecar-{mode}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out)
    daemon = Daemon(mode, process, target, log)
    try:
        await wait_serving(target, process)
    except BaseException:
        daemon.stop()
        raise SystemExit(f"the {mode} daemon did not start: see {log}") from None
    return daemon


async def sync(daemon: Daemon, limit: float | None = None) -> float:
    """Sync until it answers (it fails while the daemon rebuilds): the seconds it took, or
    ``math.inf`` once ``limit`` seconds passed (None: wait up to 10 minutes)."""
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.CacheStub(channel)
        while True:
            left = (limit if limit is not None else 600) - (time.perf_counter() - started)
            try:
                await stub.Sync(pb.SyncRequest(), timeout=max(0.01, min(60, left)))
                return time.perf_counter() - started
            except grpc.RpcError as exc:
                if limit is not None and time.perf_counter() - started >= limit:
                    return math.inf
                if left <= 0 or daemon.process.poll() is not None:
                    raise SystemExit(
                        f"the {daemon.mode} daemon did not answer Sync: {exc} (see {daemon.log})"
                    ) from None
                await asyncio.sleep(0.2)


# ---------------------------------------------------------------- writers


def recvlogical_command(dsn: str, *args: str) -> list[str]:
    from tests.support.pg import pgserver_bindir

    return [os.path.join(pgserver_bindir(), "pg_recvlogical"), "-d", dsn, "--slot", f"bench_{RECVLOGICAL}", *args]


def start_recvlogical(dsn: str) -> subprocess.Popen[bytes]:
    """pg_recvlogical streaming pgoutput (as the daemon asks for it) into /dev/null."""
    options = ["-o", "proto_version=4", "-o", f"publication_names=bench_{RECVLOGICAL}", "-o", "messages=true"]
    command = recvlogical_command(dsn, "--create-slot", "--start", "-P", "pgoutput", *options, "-f", "/dev/null")
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    time.sleep(1)  # (its slot created and streaming)
    if process.poll() is not None:
        raise SystemExit(f"pg_recvlogical exited with {process.returncode}")
    return process


def stop_recvlogical(dsn: str, process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(20)
    subprocess.run(recvlogical_command(dsn, "--drop-slot"), check=True, capture_output=True)


def pgbench(dsn: str, script: str, clients: int, seconds: int, synchronous: bool) -> tuple[float, int]:
    """(tps, transactions) of one pgbench run."""
    from tests.benchmarks.fleet import pgbench_binary

    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as file:
        file.write(script)
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={'on' if synchronous else 'off'}"}
    command = [pgbench_binary(), "-n", "-M", "prepared", "-f", file.name, "-c", str(clients)]
    command += ["-j", str(min(clients, 2)), "-T", str(seconds), dsn]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        os.unlink(file.name)
    tps = re.search(r"tps = ([\d.]+)", result.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    if result.returncode != 0 or tps is None or done is None:
        raise SystemExit(f"pgbench failed: {result.stdout}\n{result.stderr}")
    return float(tps.group(1)), int(done.group(1))


Key = tuple[str, int, bool, str]  # (workload, connections, synchronous_commit, mode)


@dataclass
class Bench:
    """What the throughput runs share."""

    dsn: str
    args: argparse.Namespace
    server_log: ServerLog
    notify: Daemon
    logs: Path
    admin: asyncpg.Connection  # the benchmark's own (it reads the server's WAL positions)
    runs: dict[Key, Run] = field(default_factory=lambda: collections.defaultdict(Run))


async def throughput(bench: Bench) -> dict[Key, Run]:
    args = bench.args
    settings = [(c, s) for c in args.connections for s in (True, False)]
    for round_ in range(args.rounds):
        for index, (connections, synchronous) in enumerate(settings):
            shift = (round_ + index) % len(args.modes)
            order = args.modes[shift:] + args.modes[:shift]
            print(
                f"{elapsed()} round {round_ + 1}/{args.rounds}: {connections} connection(s), synchronous_commit "
                f"{'on' if synchronous else 'off'}: {', '.join(order)}",
                file=sys.stderr,
            )
            for mode in order:
                await block(bench, mode, connections, synchronous)
    return bench.runs


async def wal_position(admin: asyncpg.Connection) -> tuple[int, int | None]:
    """The server's WAL end, and how far the walsender has decoded and sent (None: none runs)."""
    row = await admin.fetchrow(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8 AS at, "
        "(SELECT max(pg_wal_lsn_diff(sent_lsn, '0/0'))::int8 FROM pg_stat_replication) AS sent"
    )
    return int(row["at"]), None if row["sent"] is None else int(row["sent"])


async def block(bench: Bench, mode: str, connections: int, synchronous: bool) -> None:
    """One mode's three workloads. The logical daemon is started for them and stopped after
    (its temporary slot with it); when it has not caught up ``--catch-up-limit`` seconds after
    a run, it is stopped then and a new one follows (no backlog is carried into the next run)."""
    args = bench.args
    daemon: Daemon | None = bench.notify if mode == "notify" else None
    consumer = start_recvlogical(bench.dsn) if mode == RECVLOGICAL else None
    try:
        for workload, (script, _) in WORKLOADS.items():
            if mode == "logical" and daemon is None:
                daemon = await start_daemon(bench.dsn, mode, bench.logs, args.nice)
            mark = bench.server_log.mark()
            start, _ = await wal_position(bench.admin)
            tps, done = await asyncio.to_thread(
                pgbench, bench.dsn, script.format(rows=ROWS, table=TABLES[mode]), connections, args.seconds, synchronous
            )
            end, sent = await wal_position(bench.admin)
            run = bench.runs[(workload, connections, synchronous, mode)]
            run.tps.append(tps)
            run.transactions += done
            if mode in ("logical", RECVLOGICAL) and sent is not None and end > start:
                run.decoded.append(min(1.0, max(0.0, (sent - start) / (end - start))))
            if daemon is None:
                continue
            caught_up = await sync(daemon, args.catch_up_limit if mode == "logical" else None)
            run.catch_up.append(caught_up)
            ran = bench.server_log.statements(mark, ROLES[mode])
            run.statements += len(ran)
            run.reads += sum(TABLES[mode].split(".")[1] in statement for statement in ran)
            if mode == "logical" and caught_up == math.inf:
                daemon.stop()
                daemon = None
    finally:
        if mode == "logical" and daemon is not None:
            daemon.stop()
        if consumer is not None:
            stop_recvlogical(bench.dsn, consumer)


# ---------------------------------------------------------------- latency


async def latency(dsn: str, daemon: Daemon, table: str, args: argparse.Namespace) -> Latency:
    """Commit -> Watch message for paced single-row UPDATEs; then sequential Syncs."""
    await sync(daemon)
    committed: dict[int, float] = {}
    arrived: dict[int, float] = {}
    ready = asyncio.Event()
    channel = grpc.aio.insecure_channel(daemon.target)
    stub = pb_grpc.CacheStub(channel)

    async def follow() -> None:
        call = stub.Watch(pb.WatchRequest(tables=[table], progress_interval_ms=50, accept_batches=True))
        async for message in call:
            now = time.perf_counter()
            ready.set()
            kind = message.WhichOneof("kind")
            batches = [message.changes] if kind == "changes" else message.batches.batches if kind == "batches" else []
            for batch in batches:
                for change in batch.events:
                    if change.key.parts:
                        arrived.setdefault(change.key.parts[0].int_value, now)

    watching = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(ready.wait(), 60)
        conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "on"})
        try:
            interval = 1 / args.rate
            next_at = time.perf_counter()
            for key in range(1, int(args.rate * args.latency_seconds) + 1):
                await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE id = $1", key)
                committed[key] = time.perf_counter()
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        finally:
            await conn.close()
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline and len(arrived) < len(committed) and not watching.done():
            await asyncio.sleep(0.05)
        error = ""
        if watching.done() and not watching.cancelled() and watching.exception() is not None:
            error = " ".join(str(watching.exception()).split())[:300]
            print(f"the {daemon.mode} daemon's Watch stream ended: {error}", file=sys.stderr)
        syncs = []
        for index in range(args.syncs + 10):
            started = time.perf_counter()
            await stub.Sync(pb.SyncRequest(), timeout=10)
            if index >= 10:  # (the first ones warm up)
                syncs.append((time.perf_counter() - started) * 1000)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            await watching
        await channel.close()
    visible = [(arrived[k] - t) * 1000 for k, t in committed.items() if k in arrived]
    return Latency(visible, syncs, len(committed), error)


# ---------------------------------------------------------------- report


def _seconds(value: float, limit: float) -> str:
    return f"> {limit:g}" if value == math.inf else f"{value:.2f}"


def _share(values: list[float]) -> str:
    return f"{min(values):.0%} / {statistics.mean(values):.0%}" if values else "-"


def report(
    runs: dict[Key, Run], latencies: dict[str, Latency], server_log: ServerLog, args: argparse.Namespace, cpus: str
) -> None:
    print(
        f"\n{cpus}; daemons at nice {args.nice}; fsync on, wal_level logical; pgbench -M prepared, "
        f"{args.rounds} round(s) of {args.seconds} s per run; {ROWS:,} rows per table\n"
    )
    shown = [m for m in args.modes if m != "none"]
    print(
        "| workload | connections | synchronous_commit | no capture tps | "
        + " | ".join(f"{HEADINGS[m]} tps | x" for m in shown)
        + " |"
    )
    print("|---|---:|---|---:|" + "---:|---:|" * len(shown))
    ratios: dict[tuple[str, int, bool, str], float] = {}
    for connections in args.connections:
        for synchronous in (True, False):
            for workload in WORKLOADS:
                base = runs[(workload, connections, synchronous, "none")]
                cells = [f"{statistics.mean(base.tps):,.0f}"]
                for mode in shown:
                    run = runs[(workload, connections, synchronous, mode)]
                    ratio = statistics.median(m / b for m, b in zip(run.tps, base.tps, strict=True))
                    ratios[(workload, connections, synchronous, mode)] = ratio
                    cells += [f"{statistics.mean(run.tps):,.0f}", f"{ratio:.2f}"]
                print(f"| {workload} | {connections} | {'on' if synchronous else 'off'} | " + " | ".join(cells) + " |")
    print()
    print("| capture | commit → visible p50 / p99 ms | seen | Sync p50 ms |")
    print("|---|---:|---:|---:|")
    for mode in ("notify", "logical"):
        lat = latencies[mode]
        print(
            f"| {mode} | {pct(lat.visible_ms, 0.5):.2f} / {pct(lat.visible_ms, 0.99):.2f} "
            f"| {len(lat.visible_ms)}/{lat.samples} | {pct(lat.sync_ms, 0.5):.2f} |"
        )
    for mode in ("notify", "logical"):
        if latencies[mode].watch_error:
            print(f"({mode}: the Watch stream ended early: {latencies[mode].watch_error})")
    print()
    print(
        "| capture | workload | transactions | statements the daemon ran | per transaction "
        "| of them reading the table, per transaction | catch-up after a run, max s "
        "| the run's WAL decoded and sent when it ended, min / mean |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in ("notify", "logical"):
        for workload in WORKLOADS:
            mine = [r for (w, _, _, m), r in runs.items() if (w, m) == (workload, mode)]
            done, ran, reads = (sum(getattr(r, f) for r in mine) for f in ("transactions", "statements", "reads"))
            print(
                f"| {mode} | {workload} | {done:,} | {ran:,} | {ran / max(1, done):.4f} | {reads / max(1, done):.4f} "
                f"| {_seconds(max(c for r in mine for c in r.catch_up), args.catch_up_limit)} "
                f"| {_share([d for r in mine for d in r.decoded])} |"
            )
    if RECVLOGICAL in args.modes:
        print("\npg_recvlogical: the run's WAL decoded and sent when it ended, min / mean: ", end="")
        shares = []
        for workload in WORKLOADS:
            mine = [r for (w, _, _, m), r in runs.items() if (w, m) == (workload, RECVLOGICAL)]
            shares.append(f"{workload} {_share([d for r in mine for d in r.decoded])}")
        print("; ".join(shares))
    for mode in ("notify", "logical"):
        kinds = server_log.kinds[ROLES[mode]].most_common(5)
        print(f"\n{mode}: the statements it ran most: " + "; ".join(f"{n}x {k}" for k, n in kinds))
    print("\nThe issue's targets (logical capture):")
    for workload in WORKLOADS:
        on, off = ratios[(workload, 8, True, "logical")], ratios[(workload, 8, False, "logical")]
        print(
            f"  {workload}, 8 connections: {on:.2f}x no capture with synchronous_commit on (≥ 0.9: "
            f"{'met' if on >= 0.9 else 'NOT met'}), {off:.2f}x off (≥ 0.85: {'met' if off >= 0.85 else 'NOT met'})"
        )
    logical, notify = latencies["logical"], latencies["notify"]
    p99 = pct(logical.visible_ms, 0.99)
    print(f"  commit → visible p99 {p99:.2f} ms (≤ 10: {'met' if p99 <= 10 else 'NOT met'})")
    sync_ratio = pct(logical.sync_ms, 0.5) / pct(notify.sync_ms, 0.5)
    print(f"  Sync p50 {sync_ratio:.2f}x NOTIFY mode's (≤ 2: {'met' if sync_ratio <= 2 else 'NOT met'})")


# ---------------------------------------------------------------- main


async def run(dsn: str, args: argparse.Namespace, server_log: ServerLog, cpus: str) -> None:
    print(f"preparing {ROWS:,} rows x {len(args.modes)} tables ...", file=sys.stderr)
    await prepare(dsn, args.modes)
    logs = Path(tempfile.mkdtemp(prefix="write-cost-"))
    print(f"(the daemons' logs: {logs})", file=sys.stderr)
    # Latency first, on a quiet server (no vacuum or checkpoint of the writes to come), and
    # not niced: it is the daemon's own speed, not PostgreSQL's cost.
    print(f"{elapsed()} commit -> visible and Sync ...", file=sys.stderr)
    latencies = {}
    for mode in ("notify", "logical"):
        daemon = await start_daemon(dsn, mode, logs, 0)
        try:
            latencies[mode] = await latency(dsn, daemon, TABLES[mode], args)
        finally:
            daemon.stop()
    notify = await start_daemon(dsn, "notify", logs, args.nice)
    admin = await asyncpg.connect(dsn)
    try:
        runs = await throughput(Bench(dsn, args, server_log, notify, logs, admin))
    finally:
        await admin.close()
        notify.stop()
    report(runs, latencies, server_log, args, cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=2, help="duration of each pgbench run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (ratios: the rounds' median)")
    parser.add_argument("--rate", type=float, default=100.0, help="paced UPDATEs per second for commit -> visible")
    parser.add_argument("--latency-seconds", type=float, default=5.0, help="duration of the commit -> visible run")
    parser.add_argument("--syncs", type=int, default=300, help="Sync calls timed per mode")
    parser.add_argument(
        "--catch-up-limit",
        type=float,
        default=3.0,
        help="seconds the logical daemon is given to catch up after a run (then a new one replaces it)",
    )
    parser.add_argument("--nice", type=int, default=NICE, help="niceness of the daemons (0: none)")
    parser.add_argument(
        "--cpus",
        choices=("shared", "split"),
        default="shared",
        help="shared: everything on every CPU; split: PostgreSQL alone on the first CPU, the rest on the others",
    )
    parser.add_argument(
        "--recvlogical",
        action="store_true",
        help="a fourth mode: a slot streamed by pg_recvlogical (PostgreSQL's decoding cost without the daemon's)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of about a minute (8 connections, 1 round of 1 s runs)"
    )
    args = parser.parse_args()
    args.connections = (1, 8)
    args.modes = (*MODES, RECVLOGICAL) if args.recvlogical else MODES
    if args.quick:
        args.seconds, args.rounds, args.latency_seconds, args.syncs = 1, 1, 1.5, 50
        args.connections, args.catch_up_limit = (8,), 2.0
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.benchmarks.fleet import split_cpus
    from tests.support.pg import LocalCluster, pgserver_bindir

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    cluster = LocalCluster(pgserver_bindir(), run_as="pgserver", settings=SETTINGS)
    try:
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        cpus = split_cpus(postmaster) if args.cpus == "split" else "CPUs: shared by everything"
        asyncio.run(run(cluster.dsn, args, ServerLog(cluster.base / "log"), cpus))
    finally:
        cluster.stop()
    print(f"\n({time.perf_counter() - STARTED:.0f} s in all)")


if __name__ == "__main__":
    main()

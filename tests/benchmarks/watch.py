"""Watch fan-out, side by side in one run (``./dev bench``).

1. **Get latency under many streams.** Get p50/p99 (``--get-callers``
   concurrent callers in a process of their own) while a writer commits
   single-row UPDATEs at ``--stream-rate`` (20/s), with 0 and then
   ``--streams`` (2 000) Watch streams open, and the ratio of the two.
2. **Commit -> subscriber latency.** A writer commits at ``--rate`` (500/s);
   for each we note when the statement was sent; then
     * an asyncpg connection LISTENing on the sidecar's own channel notes when
       the raw notification arrives (the floor: NOTIFY -> asyncpg listener), and
     * 1, 10, 100 and ``--subscribers`` (1 000) Watch subscribers note when the
       batch with that transaction id arrives.
3. **Burst.** Writes with no pacing: how many batches per second one sidecar
   fans out to 10 subscribers.

Subscribers are raw gRPC streams that ask for several batches per message
(``accept_batches``, as the clients do), spread over ``--processes`` worker
processes (one channel, so one TCP connection, each); the sidecar runs as a
process of its own. ``--py-spy FILE`` profiles the sidecar during the
many-streams phase (py-spy's raw, collapsed-stack format).

    python -m tests.benchmarks.watch [--rate 500] [--seconds 4] [--streams 2000] [--subscribers 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.watch_rows"
ROWS = 1000


def subscriber_process(target: str, streams: int, stop_at: Any, out: str, ready: Any, nice: int) -> None:
    """Open ``streams`` Watch streams; record (xid, arrival) of every batch until ``stop_at``
    (a shared monotonic time, set by the benchmark once it knows when its writes end)."""
    import grpc

    from sidecar.api.v1 import cache_pb2 as pb
    from sidecar.api.v1 import cache_pb2_grpc as pb_grpc

    os.nice(nice)

    messages = 0

    async def main() -> list[list[tuple[int, float]]]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CacheStub(channel)
            seen: list[list[tuple[int, float]]] = [[] for _ in range(streams)]
            established = 0

            async def follow(index: int) -> None:
                nonlocal established, messages
                call = stub.Watch(pb.WatchRequest(tables=[TABLE], accept_batches=True))
                record = seen[index].append
                try:
                    await call.initial_metadata()
                    established += 1
                    if established == streams:
                        with ready.get_lock():
                            ready.value += 1
                    async for message in call:
                        messages += 1
                        kind = message.WhichOneof("kind")
                        now = time.monotonic()
                        if kind == "changes":
                            record((message.changes.xid, now))
                        elif kind == "batches":
                            for batch in message.batches.batches:
                                record((batch.xid, now))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        record((-1, float(exc.code().value[0])))

            tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
            while not stop_at.value or time.monotonic() < stop_at.value:
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return seen

    seen = asyncio.run(main())
    Path(out).write_text(json.dumps({"streams": seen, "messages": messages}))


def get_process(target: str, callers: int, start: float, seconds: float, out: str) -> None:
    """From ``start`` on, ``callers`` concurrent Get loops for ``seconds``; write their latencies (µs)."""
    import grpc

    from sidecar.api.v1 import cache_pb2 as pb
    from sidecar.api.v1 import cache_pb2_grpc as pb_grpc

    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CacheStub(channel)
            requests = [
                pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=i)])) for i in range(1, ROWS + 1)
            ]
            for request in requests[:200]:  # warm up the connection and code paths
                await stub.Get(request)
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            deadline = time.monotonic() + seconds
            latencies: list[float] = []

            async def caller(seed: int) -> None:
                rng = random.Random(seed)
                while time.monotonic() < deadline:
                    began = time.perf_counter()
                    await stub.Get(rng.choice(requests))
                    latencies.append((time.perf_counter() - began) * 1e6)

            await asyncio.gather(*(caller(s) for s in range(callers)))
            return latencies

    Path(out).write_text(json.dumps(asyncio.run(main())))


def note(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def write_steadily(dsn: str, rate: float, seconds: float, sent: dict[int, float]) -> None:
    conn = await asyncpg.connect(dsn)
    rng = random.Random(1)
    interval = 1 / rate if rate else 0.0
    start = time.monotonic()
    count = 0
    try:
        while time.monotonic() - start < seconds:
            t0 = time.monotonic()
            xid = await conn.fetchval(
                f"UPDATE {TABLE} SET version = version + 1 WHERE id = $1 RETURNING txid_current()",
                rng.randrange(1, ROWS + 1),
            )
            sent[int(xid)] = t0
            count += 1
            if interval:
                delay = start + count * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    finally:
        await conn.close()


class Subscribers:
    """``count`` Watch streams in ``processes`` worker processes, open until ``stop``."""

    def __init__(self, target: str, count: int, processes: int, nice: int = 0) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-watch-bench-"))
        processes = max(1, min(count, processes)) if count else 0
        per = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
        context = multiprocessing.get_context("spawn")
        self.ready = context.Value("i", 0)
        self.stop_at = context.Value("d", 0.0)
        self.outs = [str(self.workdir / f"sub{i}.json") for i in range(processes)]
        self.workers = [
            context.Process(target=subscriber_process, args=(target, n, self.stop_at, self.outs[i], self.ready, nice))
            for i, n in enumerate(per)
        ]
        for worker in self.workers:
            worker.start()

    async def established(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready.value < len(self.workers):
            if time.monotonic() > deadline or any(w.exitcode not in (None, 0) for w in self.workers):
                raise RuntimeError(f"only {self.ready.value} of {len(self.workers)} subscriber processes subscribed")
            await asyncio.sleep(0.05)  # (a benchmark's pacing, not a test's wait)

    def arrivals(self, stop_at: float) -> tuple[list[list[tuple[int, float]]], int]:
        """What every stream received until ``stop_at``, and in how many messages."""
        self.stop_at.value = stop_at
        for worker in self.workers:
            worker.join(120)
        results = [json.loads(Path(out).read_text()) for out in self.outs]
        return [stream for r in results for stream in r["streams"]], sum(r["messages"] for r in results)


def deliveries(received: tuple[list[list[tuple[int, float]]], int], sent: dict[int, float]) -> dict[str, Any]:
    arrivals, messages = received
    latencies = [(t - sent[xid]) * 1e6 for stream in arrivals for xid, t in stream if xid in sent]
    times = [t for stream in arrivals for xid, t in stream if xid in sent]
    span = (max(times) - min(sent.values())) if times else float("nan")
    return {
        "watch p50": pct(latencies, 0.5),
        "watch p99": pct(latencies, 0.99),
        "delivered": len(latencies),
        "expected": len(sent) * len(arrivals),
        "dropped streams": sum(1 for stream in arrivals for xid, _ in stream if xid == -1),
        "events/s": len(latencies) / span if times else 0.0,
        "messages": messages,
    }


async def gets_under_streams(
    dsn: str,
    target: str,
    sidecar: subprocess.Popen[bytes],
    streams: int,
    args: argparse.Namespace,
    profile: str | None,
) -> dict[str, Any]:
    """Get latency while ``streams`` streams are open and the writer commits at ``args.stream_rate``."""
    settle, seconds = 1.0, args.seconds
    subscribers = Subscribers(target, streams, args.processes, args.nice)
    await subscribers.established()
    note(f"{streams} streams open; timing Gets")
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-get-bench-"))
    out = str(workdir / "gets.json")
    start = time.monotonic() + settle + 1.0
    context = multiprocessing.get_context("spawn")
    getter = context.Process(target=get_process, args=(target, args.get_callers, start, seconds, out))
    getter.start()
    spy = None
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "--pid", str(sidecar.pid), "--duration", str(int(seconds))]
        spy = subprocess.Popen(
            [*command, "--format", "raw", "--output", profile, "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    cpu_before = cpu_seconds(sidecar.pid)
    sent: dict[int, float] = {}
    began = time.monotonic()
    await write_steadily(dsn, args.stream_rate, seconds, sent)
    elapsed = time.monotonic() - began
    cpu = (cpu_seconds(sidecar.pid) - cpu_before) / elapsed
    getter.join(120)
    arrivals = subscribers.arrivals(time.monotonic() + 2.0)
    if spy is not None:
        spy.wait(60)
    latencies = json.loads(Path(out).read_text())
    return {
        **deliveries(arrivals, sent),
        "streams": streams,
        "get p50": pct(latencies, 0.5),
        "get p99": pct(latencies, 0.99),
        "gets/s": len(latencies) / seconds,
        "txn/s": len(sent) / elapsed,
        "sidecar cpu": cpu,
    }


async def fan_out_measured(
    dsn: str,
    target: str,
    sidecar: subprocess.Popen[bytes],
    subscribers_wanted: int,
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One fan-out run: its subscribers record until a deadline just after the writes end."""
    seconds = args.seconds if rate else args.seconds / 2
    subscribers = Subscribers(target, subscribers_wanted, args.processes)
    raw: dict[int, float] = {}
    listener = await asyncpg.connect(dsn)

    def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
        data = json.loads(payload)
        if "x" in data:
            raw.setdefault(int(data["x"]), time.monotonic())

    await listener.add_listener("cache_sidecar", heard)
    await subscribers.established()
    note(f"{subscribers_wanted} subscribers open; writing at {rate or 'full speed'}")
    await asyncio.sleep(0.5)  # (a benchmark's pacing, not a test's wait)
    sent: dict[int, float] = {}
    cpu_before = cpu_seconds(sidecar.pid)
    began = time.monotonic()
    await write_steadily(dsn, rate, seconds, sent)
    elapsed = time.monotonic() - began
    cpu = (cpu_seconds(sidecar.pid) - cpu_before) / elapsed
    arrivals = subscribers.arrivals(time.monotonic() + 3.0)
    await listener.close()
    raw_latencies = [(raw[xid] - t0) * 1e6 for xid, t0 in sent.items() if xid in raw]
    return {
        "subscribers": subscribers_wanted,
        "txn/s": len(sent) / elapsed,
        "raw p50": pct(raw_latencies, 0.5),
        "raw p99": pct(raw_latencies, 0.99),
        "sidecar cpu": cpu,
        **deliveries(arrivals, sent),
    }


def start_sidecar(dsn: str, target: str, env: dict[str, str], baseline: str | None) -> subprocess.Popen[bytes]:
    """The sidecar as a process (``baseline``: from the ``sidecar`` package in that directory)."""
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--listen", target, "--install-triggers"]
    return subprocess.Popen(
        [*command, "--table", TABLE, "--log-level", "warning"],
        env={**os.environ, **env},
        cwd=os.path.abspath(baseline) if baseline else None,  # (python -m finds the package in its cwd first)
    )


async def run(dsn: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, version int NOT NULL, note text NOT NULL)")
    await conn.execute(f"INSERT INTO {TABLE} SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g")
    await conn.close()
    target = f"127.0.0.1:{free_port()}"
    # Let a burst's subscribers lag rather than be ended (this measures delivery capacity),
    # and let each worker process hold its share of the streams on its one connection.
    per_process = -(-max(args.streams, args.subscribers) // args.processes)
    sidecar = start_sidecar(
        dsn,
        target,
        {
            "CACHE_SIDECAR_WATCH_MAX_LAG": "1000000",
            "CACHE_SIDECAR_WATCH_MAX_STREAMS_PER_CONNECTION": str(max(1000, per_process)),
        },
        args.baseline,
    )
    try:
        await wait_serving(target, sidecar)
        gets: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        burst = None
        if args.only != "fan-out":
            gets.append(await gets_under_streams(dsn, target, sidecar, 0, args, None))
            gets.append(await gets_under_streams(dsn, target, sidecar, args.streams, args, args.py_spy))
        if args.only != "gets":
            for count in (1, 10, 100, args.subscribers):
                results.append(await fan_out_measured(dsn, target, sidecar, count, args.rate, args))
            burst = await fan_out_measured(dsn, target, sidecar, 10, 0, args)
    finally:
        sidecar.terminate()
        sidecar.wait(10)

    if gets:
        print_gets(gets, args)
    if burst is not None:
        print_fan_out(results, burst, args)


def print_gets(gets: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = gets[0]
    print(
        f"Get latency ({args.get_callers} concurrent callers, one process) while {args.stream_rate:g} "
        "writes/s fan out to N Watch streams"
    )
    print(
        "| streams | txn/s | Get p50 µs | p99 µs | p50 / no streams | p99 / no streams | Gets/s | sidecar CPU "
        "| batches delivered | in messages | Watch p50 µs | p99 µs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in gets:
        print(
            f"| {r['streams']:,} | {r['txn/s']:,.1f} | {r['get p50']:,.0f} | {r['get p99']:,.0f} "
            f"| {r['get p50'] / base['get p50']:.2f}x | {r['get p99'] / base['get p99']:.2f}x "
            f"| {r['gets/s']:,.0f} | {r['sidecar cpu']:.0%} | {r['delivered']:,}/{r['expected']:,} "
            f"| {r['messages']:,} | {r['watch p50']:,.0f} | {r['watch p99']:,.0f} |"
        )


def print_fan_out(results: list[dict[str, Any]], burst: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\ncommit -> subscriber, {args.rate:g} txn/s asked, subscribers in {args.processes} processes")
    print(
        "| subscribers | txn/s | raw NOTIFY p50 µs | p99 µs | Watch p50 µs | p99 µs | p50 / raw | delivered "
        "| in messages | sidecar CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['subscribers']:,} | {r['txn/s']:,.0f} | {r['raw p50']:,.0f} | {r['raw p99']:,.0f} "
            f"| {r['watch p50']:,.0f} | {r['watch p99']:,.0f} | {r['watch p50'] / r['raw p50']:.1f}x "
            f"| {r['delivered']:,}/{r['expected']:,} (dropped streams: {r['dropped streams']}) | {r['messages']:,} "
            f"| {r['sidecar cpu']:.0%} |"
        )
    print(
        f"\nfan-out burst, 10 subscribers: {burst['txn/s']:,.0f} txn/s written, "
        f"{burst['events/s']:,.0f} batches/s delivered in all "
        f"({burst['delivered']:,} of {burst['expected']:,} within the window; "
        f"dropped streams: {burst['dropped streams']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="transactions per second (fan-out latency)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--streams", type=int, default=2000, help="streams open while Gets are timed")
    parser.add_argument("--stream-rate", type=float, default=20.0, help="writes per second while Gets are timed")
    parser.add_argument("--get-callers", type=int, default=16)
    parser.add_argument("--subscribers", type=int, default=1000, help="the largest fan-out latency run")
    parser.add_argument("--processes", type=int, default=4, help="subscriber processes")
    parser.add_argument(
        "--nice",
        type=int,
        default=19,
        help="niceness of the subscriber processes while Gets are timed (19: in production they run elsewhere; "
        "on a small machine at equal priority they take the CPU the sidecar and the Get client need)",
    )
    parser.add_argument("--py-spy", metavar="FILE", help="profile the sidecar while the streams are open")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="run the sidecar from the sidecar package under DIR (e.g. `git archive main sidecar | tar -x -C DIR`)",
    )
    parser.add_argument("--only", choices=("gets", "fan-out"), help="run one part only")
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args))


if __name__ == "__main__":
    main()

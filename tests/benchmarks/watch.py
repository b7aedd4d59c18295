"""Watch fan-out latency and throughput, side by side in one run (``./dev bench``).

A writer commits single-row UPDATEs at a steady rate (default 500/s). For
each, we note when the statement was sent; then
  * an asyncpg connection LISTENing on the sidecar's own channel notes when
    the raw notification arrives (the floor: NOTIFY -> asyncpg listener), and
  * 1, 10 and 100 Watch subscribers (raw gRPC streams, spread over worker
    processes) note when the batch with that transaction id arrives.
Then a burst with no pacing measures how many events per second one sidecar
fans out to 10 subscribers.

    python -m tests.benchmarks.watch [--rate 500] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.watch_rows"
ROWS = 1000


def subscriber_process(target: str, streams: int, until: float, out: str) -> None:
    """Open ``streams`` Watch streams; record (xid, arrival) of every batch until ``until``."""
    import grpc

    from sidecar.api.v1 import cache_pb2 as pb
    from sidecar.api.v1 import cache_pb2_grpc as pb_grpc

    async def main() -> list[list[tuple[int, float]]]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CacheStub(channel)
            seen: list[list[tuple[int, float]]] = [[] for _ in range(streams)]

            async def follow(index: int) -> None:
                call = stub.Watch(pb.WatchRequest(tables=[TABLE]))
                try:
                    async for message in call:
                        if message.WhichOneof("kind") == "changes":
                            seen[index].append((message.changes.xid, time.monotonic()))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.CANCELLED:
                        seen[index].append((-1, float(exc.code().value[0])))

            tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return seen

    Path(out).write_text(json.dumps(asyncio.run(main())))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


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


async def scenario(dsn: str, target: str, subscribers: int, rate: float, seconds: float) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-watch-bench-"))
    processes = min(subscribers, 4)
    per = [subscribers // processes + (1 if i < subscribers % processes else 0) for i in range(processes)]
    settle = 2.0
    until = time.monotonic() + settle + seconds + 1.0
    context = multiprocessing.get_context("spawn")
    outs = [str(workdir / f"sub{i}.json") for i in range(processes)]
    workers = [context.Process(target=subscriber_process, args=(target, n, until, outs[i])) for i, n in enumerate(per)]
    for worker in workers:
        worker.start()

    raw: dict[int, float] = {}
    listener = await asyncpg.connect(dsn)

    def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
        data = json.loads(payload)
        if "x" in data:
            raw.setdefault(int(data["x"]), time.monotonic())

    await listener.add_listener("cache_sidecar", heard)
    await asyncio.sleep(settle)  # subscriptions established (a benchmark's pacing, not a test's wait)
    sent: dict[int, float] = {}
    began = time.monotonic()
    await write_steadily(dsn, rate, seconds, sent)
    elapsed = time.monotonic() - began
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    await listener.close()
    for worker in workers:
        worker.join(60)
    arrivals = [stream for out in outs for stream in json.loads(Path(out).read_text())]
    latencies = [(t - sent[xid]) * 1e6 for stream in arrivals for xid, t in stream if xid in sent]
    raw_latencies = [(raw[xid] - t0) * 1e6 for xid, t0 in sent.items() if xid in raw]
    dropped = sum(1 for stream in arrivals for xid, _ in stream if xid == -1)
    delivered = sum(1 for stream in arrivals for xid, _ in stream if xid in sent)
    times = [t for stream in arrivals for xid, t in stream if xid in sent]
    span = (max(times) - min(sent.values())) if times else float("nan")
    return {
        "subscribers": subscribers,
        "txn/s": len(sent) / elapsed,
        "raw p50": pct(raw_latencies, 0.5),
        "raw p99": pct(raw_latencies, 0.99),
        "watch p50": pct(latencies, 0.5),
        "watch p99": pct(latencies, 0.99),
        "delivered": delivered,
        "expected": len(sent) * subscribers,
        "dropped streams": dropped,
        "events/s": delivered / span if times else 0.0,
    }


async def run(dsn: str, rate: float, seconds: float) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, version int NOT NULL, note text NOT NULL)")
    await conn.execute(f"INSERT INTO {TABLE} SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g")
    await conn.close()
    target = f"127.0.0.1:{free_port()}"
    sidecar = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--dsn",
            dsn,
            "--listen",
            target,
            "--install-triggers",
            "--table",
            TABLE,
            "--log-level",
            "warning",
        ],
        # let a burst's subscribers lag rather than be ended: this measures delivery capacity
        env={**os.environ, "CACHE_SIDECAR_WATCH_MAX_LAG": "1000000"},
    )
    try:
        await wait_serving(target, sidecar)
        results = [await scenario(dsn, target, n, rate, seconds) for n in (1, 10, 100)]
        burst = await scenario(dsn, target, 10, 0, seconds / 2)
    finally:
        sidecar.terminate()
        sidecar.wait(10)
    print("| subscribers | txn/s | raw NOTIFY p50 µs | p99 µs | Watch p50 µs | p99 µs | p50 / raw | delivered |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['subscribers']} | {r['txn/s']:,.0f} | {r['raw p50']:,.0f} | {r['raw p99']:,.0f} "
            f"| {r['watch p50']:,.0f} | {r['watch p99']:,.0f} | {r['watch p50'] / r['raw p50']:.1f}x "
            f"| {r['delivered']:,}/{r['expected']:,} (dropped streams: {r['dropped streams']}) |"
        )
    print(
        f"\nfan-out burst, 10 subscribers: {burst['txn/s']:,.0f} txn/s written, "
        f"{burst['events/s']:,.0f} batches/s delivered in all "
        f"({burst['delivered']:,} of {burst['expected']:,} within the window; "
        f"dropped streams: {burst['dropped streams']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="transactions per second")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args.rate, args.seconds))


if __name__ == "__main__":
    main()

"""Freshness latency, side by side in one run (``./dev bench``):

  * raw NOTIFY round trip: pg_notify on one asyncpg connection until an
    asyncpg listener on another hears it (the floor for anything LISTEN-based)
  * Sync through the sidecar (the read barrier: one NOTIFY round trip plus gRPC)
  * a do-nothing Get through the sidecar (the gRPC round trip alone, for scale)
  * commit -> visible: from an UPDATE's commit being acknowledged until a Get
    through the sidecar returns the new version (polling), full and lazy tables

Sequential, light load.

    python -m tests.benchmarks.latency [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import sys
import time

import asyncpg
from cache_sidecar_client import AsyncClient

from tests.benchmarks.run import free_port, wait_serving

ROWS = 1000


def stats(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return ordered[len(ordered) // 2] / 1000, ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] / 1000


async def raw_notify_rtt(dsn: str, samples: int) -> list[int]:
    sender, listener = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    waiting: dict[str, asyncio.Future[None]] = {}

    def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
        future = waiting.pop(payload, None)
        if future is not None:
            future.set_result(None)

    await listener.add_listener("bench_rtt", heard)
    results = []
    try:
        for _ in range(samples):
            token = secrets.token_hex(4)
            future = waiting[token] = asyncio.get_running_loop().create_future()
            start = time.perf_counter_ns()
            await sender.execute("SELECT pg_notify('bench_rtt', $1)", token)
            await future
            results.append(time.perf_counter_ns() - start)
    finally:
        await sender.close()
        await listener.close()
    return results


async def commit_to_visible(dsn: str, cache: AsyncClient, table: str, samples: int) -> list[int]:
    conn = await asyncpg.connect(dsn)
    rng = random.Random(3)
    results = []
    try:
        for _ in range(samples):
            key = rng.randrange(1, ROWS + 1)
            await cache.get(table, key)  # cached (lazy tables fill here)
            version = await conn.fetchval(
                f"UPDATE {table} SET version = version + 1 WHERE id = $1 RETURNING version", key
            )
            start = time.perf_counter_ns()  # the commit is acknowledged
            while (await cache.get(table, key))["version"] < version:
                pass
            results.append(time.perf_counter_ns() - start)
    finally:
        await conn.close()
    return results


async def timed(call, samples: int) -> list[int]:  # type: ignore[no-untyped-def]
    for _ in range(20):
        await call()
    results = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        await call()
        results.append(time.perf_counter_ns() - start)
    return results


async def run(dsn: str, samples: int) -> None:
    conn = await asyncpg.connect(dsn)
    for table in ("latency_full", "latency_lazy"):
        await conn.execute(f"DROP TABLE IF EXISTS public.{table}")
        await conn.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, version int NOT NULL)")
        await conn.execute(f"INSERT INTO public.{table} SELECT g, 0 FROM generate_series(1, {ROWS}) g")
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
            "public.latency_full",
            "--table",
            "public.latency_lazy:lazy",
            "--log-level",
            "warning",
        ],
        env={**os.environ},
    )
    try:
        await wait_serving(target, sidecar)
        async with AsyncClient(target) as cache:
            full, lazy = "public.latency_full", "public.latency_lazy"
            rows = [
                ("raw NOTIFY round trip (asyncpg)", await raw_notify_rtt(dsn, samples)),
                ("sidecar Sync", await timed(cache.sync, samples)),
                ("sidecar Get (gRPC round trip)", await timed(lambda: cache.get(full, 1), samples)),
                ("commit -> visible, full table", await commit_to_visible(dsn, cache, full, samples)),
                ("commit -> visible, lazy table", await commit_to_visible(dsn, cache, lazy, samples)),
            ]
    finally:
        sidecar.terminate()
        sidecar.wait(10)
    print(f"| {'measure':<34} | {'p50 µs':>8} | {'p99 µs':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|")
    for name, samples_ns in rows:
        p50, p99 = stats(samples_ns)
        print(f"| {name:<34} | {p50:>8,.0f} | {p99:>8,.0f} |")
    raw, sync = stats(rows[0][1])[0], stats(rows[1][1])[0]
    print(
        f"\nSync p50 / raw NOTIFY round trip p50 = {sync / raw:.2f}x; "
        f"commit -> visible p99 (full) = {stats(rows[3][1])[1] / 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args.samples))


if __name__ == "__main__":
    main()

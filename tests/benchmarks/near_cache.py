"""Per-read latency, side by side in one run (``./dev bench``): a near-cache
hit (blocking and asyncio clients) vs a Get through the sidecar vs a direct
asyncpg primary-key SELECT. Sequential reads of random keys of 10 000 rows.

    python -m tests.benchmarks.near_cache [--reads 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
from cache_sidecar_client import AsyncClient, Client

from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.near_rows"
ROWS = 10_000


def stats(samples: list[int]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] / 1000, ordered[int(0.99 * len(ordered))] / 1000


async def timed_async(read: Callable[[int], Awaitable[object]], keys: list[int]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        await read(key)
        samples.append(clock() - start)
    return samples


def timed_sync(read: Callable[[int], object], keys: list[int]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for key in keys:
        start = clock()
        read(key)
        samples.append(clock() - start)
    return samples


async def run(dsn: str, reads: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, score int)")
    await conn.execute(
        f"INSERT INTO {TABLE} SELECT g, 'user ' || g, 'user' || g || '@example.com', g % 100 "
        f"FROM generate_series(1, {ROWS}) g"
    )
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
        env={**os.environ},
    )
    rng = random.Random(11)
    keys = [rng.randrange(1, ROWS + 1) for _ in range(reads)]
    try:
        await wait_serving(target, sidecar)
        results = {}
        async with AsyncClient(target, near_cache={TABLE: ROWS}) as near, AsyncClient(target) as plain:
            while not near.near_cache.connected:
                await asyncio.sleep(0.01)
            for key in range(1, ROWS + 1):  # warm: every row near-cached
                await near.get(TABLE, key)
            misses = near.near_cache.stats.misses
            results["near-cache hit (AsyncClient)"] = await timed_async(lambda k: near.get(TABLE, k), keys)
            assert near.near_cache.stats.misses == misses, "the measured reads were not all hits"
            results["sidecar Get (AsyncClient)"] = await timed_async(lambda k: plain.get(TABLE, k), keys[: reads // 4])
        with Client(target, near_cache={TABLE: ROWS}) as blocking:
            while not blocking.near_cache.connected:
                time.sleep(0.01)
            for key in range(1, ROWS + 1):
                blocking.get(TABLE, key)
            results["near-cache hit (Client)"] = timed_sync(lambda k: blocking.get(TABLE, k), keys)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        results["asyncpg SELECT by id"] = await timed_async(
            lambda k: pool.fetchrow(f"SELECT * FROM {TABLE} WHERE id = $1", k), keys[: reads // 4]
        )
        await pool.close()
    finally:
        sidecar.terminate()
        sidecar.wait(10)
    base = stats(results["asyncpg SELECT by id"])[0]
    print(f"| {'read':<30} | {'p50 µs':>9} | {'p99 µs':>9} | {'asyncpg p50 / this p50':>22} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 11}|{'-' * 24}|")
    for name, samples in results.items():
        p50, p99 = stats(samples)
        print(f"| {name:<30} | {p50:>9,.2f} | {p99:>9,.2f} | {base / p50:>21,.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20_000)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args.reads))


if __name__ == "__main__":
    main()

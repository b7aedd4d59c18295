"""Write-path cost of the change triggers, side by side in one run.

The same statements against two identical tables, one with cache-sidecar's
triggers and one without: single-row UPDATE and INSERT (the OLTP case, where
NOTIFY's commit-time lock matters most) and a 500-row UPDATE (chunked
notifications), sequentially and from 8 concurrent connections.

    python -m tests.benchmarks.write_cost [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections.abc import Callable

import asyncpg

from sidecar.config import TableConfig
from sidecar.pg import triggers
from sidecar.pg.db import describe_table

ROWS = 100_000


async def prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name in ("plain", "captured"):
            await conn.execute(f"DROP TABLE IF EXISTS public.write_{name}")
            await conn.execute(f"CREATE TABLE public.write_{name} (id bigint PRIMARY KEY, v int, note text)")
            await conn.execute(
                f"INSERT INTO public.write_{name} SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g"
            )
        schema = await describe_table(conn, TableConfig(schema="public", name="write_captured"))
        await triggers.install(conn, [triggers.TriggerSet(schema, "cache_sidecar_bench", 1000)])
    finally:
        await conn.close()


async def measure(
    pool: asyncpg.Pool, sql: str, args: Callable[[random.Random], tuple[int]], callers: int, seconds: float
) -> tuple[float, float]:
    """Statements per second and p50 latency in µs."""
    latencies: list[int] = []
    deadline = time.perf_counter() + seconds

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            start = time.perf_counter_ns()
            async with pool.acquire() as conn:
                await conn.execute(sql, *args(rng))
            latencies.append(time.perf_counter_ns() - start)

    started = time.perf_counter()
    await asyncio.gather(*(caller(s) for s in range(callers)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, sorted(latencies)[len(latencies) // 2] / 1000


async def run(dsn: str, seconds: float) -> None:
    await prepare(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
    ids = itertools.count(ROWS + 1)
    cases = {
        "UPDATE 1 row": (
            "UPDATE public.write_{t} SET v = v + 1 WHERE id = $1",
            lambda r: (r.randrange(1, ROWS),),
        ),
        "INSERT 1 row": ("INSERT INTO public.write_{t} VALUES ($1, 0, 'new')", lambda r: (next(ids) * 2,)),
        "UPDATE 500 rows": (
            "UPDATE public.write_{t} SET v = v + 1 WHERE id BETWEEN $1 AND $1 + 499",
            lambda r: (r.randrange(1, ROWS - 500),),
        ),
    }
    print(
        f"| {'statement':<16} | callers | {'plain/s':>8} | {'triggers/s':>10} | {'ratio':>5} "
        f"| {'plain p50 µs':>12} | {'trig p50 µs':>11} |"
    )
    print(f"|{'-' * 18}|---------|{'-' * 10}|{'-' * 12}|{'-' * 7}|{'-' * 14}|{'-' * 13}|")
    try:
        for callers in (1, 8):
            for name, (sql, args) in cases.items():
                plain = await measure(pool, sql.format(t="plain"), args, callers, seconds)
                captured = await measure(pool, sql.format(t="captured"), args, callers, seconds)
                print(
                    f"| {name:<16} | {callers:>7} | {plain[0]:>8,.0f} | {captured[0]:>10,.0f} "
                    f"| {captured[0] / plain[0]:>5.2f} | {plain[1]:>12,.0f} | {captured[1]:>11,.0f} |"
                )
    finally:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    from tests.support.pg import database

    with database() as dsn:
        asyncio.run(run(dsn, args.seconds))


if __name__ == "__main__":
    main()

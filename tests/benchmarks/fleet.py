"""Fleet mode, side by side in one run: a direct sidecar (its own load from
PostgreSQL) vs a follower of a hub (its initial state from the hub's Watch).

  * start -> SERVING and RSS after it, for ``--rows`` rows
  * PostgreSQL backends each one holds
  * commit -> visible on the hub and on its follower (the same commits, polled on both)

Not yet here (issue 12): pgbench tps with K = 1, 10, 30 direct sidecars vs 1 hub + K
followers, and 30 followers re-bootstrapping at once.

    python -m tests.benchmarks.fleet [--rows 100000] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

import asyncpg
from cache_sidecar_client import AsyncClient

from tests.benchmarks.latency import stats
from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.fleet_items"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def backends(dsn: str, application: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1 AND pid <> pg_backend_pid()",
            f"{application}%",
        )
        return int(count)
    finally:
        await conn.close()


def start(args: list[str], env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    target = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--listen", target, "--log-level", "warning", *args],
        env=env,
    )
    return target, process


async def timed_start(args: list[str], env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes], float]:
    began = time.perf_counter()
    target, process = start(args, env)
    await wait_serving(target, process)
    return target, process, time.perf_counter() - began


async def commit_to_visible(dsn: str, hub: AsyncClient, follower: AsyncClient, rows: int, samples: int) -> tuple:
    conn = await asyncpg.connect(dsn)
    rng = random.Random(5)
    on_hub, on_follower = [], []
    try:
        for _ in range(samples):
            key = rng.randrange(1, rows + 1)
            version = await conn.fetchval(
                f"UPDATE {TABLE} SET version = version + 1 WHERE id = $1 RETURNING version", key
            )
            began = time.perf_counter_ns()
            pending = {"hub": hub, "follower": follower}
            while pending:
                for name, cache in list(pending.items()):
                    if (await cache.get(TABLE, key))["version"] >= version:
                        (on_hub if name == "hub" else on_follower).append(time.perf_counter_ns() - began)
                        del pending[name]
    finally:
        await conn.close()
    return on_hub, on_follower


async def run(dsn: str, rows: int, samples: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, version int NOT NULL, name text NOT NULL)")
    await conn.execute(f"INSERT INTO {TABLE} SELECT g, 0, 'name ' || g FROM generate_series(1, {rows}) g")
    await conn.close()
    env = {**os.environ}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        hub_args = ["--dsn", dsn, "--install-triggers", "--table", TABLE]
        hub, hub_process, hub_seconds = await timed_start(hub_args, env)
        processes.append(hub_process)
        hub_backends = await backends(dsn, "")  # (every backend but ours, counted before and after)
        follower, follower_process, follower_seconds = await timed_start(["--upstream", hub], env)
        processes.append(follower_process)
        hub_rss, follower_rss = rss_mib(hub_process.pid), rss_mib(follower_process.pid)
        follower_backends = await backends(dsn, "") - hub_backends
        hub_backends = await backends(dsn, "cache-sidecar")
        async with AsyncClient(hub) as on_hub, AsyncClient(follower) as on_follower:
            visible_hub, visible_follower = await commit_to_visible(dsn, on_hub, on_follower, rows, samples)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(15)
    print(f"{rows:,} rows, {samples} commits")
    print(f"| {'':<34} | {'direct (hub)':>14} | {'follower':>14} | {'ratio':>6} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
    print(
        f"| {'start -> SERVING, s':<34} | {hub_seconds:>14.2f} | {follower_seconds:>14.2f} | "
        f"{follower_seconds / hub_seconds:>6.2f} |"
    )
    print(
        f"| {'RSS after start, MiB':<34} | {hub_rss:>14.1f} | {follower_rss:>14.1f} | {follower_rss / hub_rss:>6.2f} |"
    )
    print(f"| {'PostgreSQL backends held':<34} | {hub_backends:>14} | {follower_backends:>14} |        |")
    for label, index in (("commit -> visible p50, µs", 0), ("commit -> visible p99, µs", 1)):
        a, b = stats(visible_hub)[index], stats(visible_follower)[index]
        print(f"| {label:<34} | {a:>14,.0f} | {b:>14,.0f} | {b / a:>6.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args.rows, args.samples))


if __name__ == "__main__":
    main()

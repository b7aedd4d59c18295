"""Reads through the shared-memory store vs over gRPC vs a near-cache hit, side by
side in one run: Get and BatchGet(100) latency from one process, then Get
throughput from 1 and 2 reader processes at once (keys/s), store vs gRPC.

    python -m tests.benchmarks.shared_memory [--rows 100000] [--reads 20000] [--seconds 2]

Every measured store read is a fresh LMDB read transaction, in a process that
never read the key before (keys drawn at random from the whole table).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import asyncpg
from cache_sidecar_client import Client

from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.shm_rows"
BATCH = 100


def stats(samples: list[int]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] / 1000, ordered[int(0.99 * len(ordered))] / 1000


def timed(read: Callable[[object], object], items: list[object]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for item in items:
        start = clock()
        read(item)
        samples.append(clock() - start)
    return samples


def _throughput(target: str, store: str | None, rows: int, seconds: float, start_at: float, results) -> None:  # type: ignore[no-untyped-def]
    """In a reader process: Gets of random keys for ``seconds``, from ``start_at`` on."""
    rng = random.Random(os.getpid())
    with Client(target, shared_memory=store) as client:
        client.get(TABLE, 1)  # (connected / store opened before the clock starts)
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.perf_counter() + seconds
        done = 0
        while time.perf_counter() < end:
            for _ in range(100):
                client.get(TABLE, rng.randrange(1, rows + 1))
            done += 100
        reads = client._store.reads if client._store is not None else 0
    results.put((done / seconds, reads))


def keys_per_second(target: str, store: str | None, rows: int, processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0  # (spawned interpreters import the client first)
    workers = [
        context.Process(target=_throughput, args=(target, store, rows, seconds, start_at, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    answers = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    if store is not None:
        assert all(reads > 0 for _, reads in answers), "the store answered no read"
    return sum(rate for rate, _ in answers)


async def load(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, score int)")
    await conn.execute(
        f"INSERT INTO {TABLE} SELECT g, 'user ' || g, 'user' || g || '@example.com', g % 100 "
        f"FROM generate_series(1, {rows}) g"
    )
    await conn.close()


def time_to_serving(dsn: str) -> float:
    """Seconds from a sidecar's start (without the store) to SERVING: the table loaded."""
    target = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--listen", target, "--install-triggers"]
    started = time.perf_counter()
    sidecar = subprocess.Popen([*command, "--table", TABLE, "--log-level", "warning"], env={**os.environ})
    try:
        asyncio.run(wait_serving(target, sidecar))
        return time.perf_counter() - started
    finally:
        sidecar.terminate()
        sidecar.wait(30)


def run(dsn: str, rows: int, reads: int, seconds: float) -> None:
    asyncio.run(load(dsn, rows))
    without_store = time_to_serving(dsn)
    store = tempfile.mkdtemp(prefix="cache-sidecar-shm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    target = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--listen", target, "--install-triggers"]
    command += ["--table", TABLE, "--log-level", "warning", "--shared-memory", store]
    started = time.perf_counter()
    sidecar = subprocess.Popen(command, env={**os.environ})
    rng = random.Random(7)
    keys: list[object] = [rng.randrange(1, rows + 1) for _ in range(reads)]
    batches: list[object] = [[rng.randrange(1, rows + 1) for _ in range(BATCH)] for _ in range(max(10, reads // 100))]
    results: dict[str, list[int]] = {}
    try:
        asyncio.run(wait_serving(target, sidecar))
        with Client(target, shared_memory=store) as local:
            while local._store is not None and local._store.refusal(TABLE) is not None:
                time.sleep(0.01)
        loaded = time.perf_counter() - started
        with Client(target, shared_memory=store) as local, Client(target) as remote:
            results["Get, store"] = timed(lambda k: local.get(TABLE, k), keys)
            assert local._store is not None and local._store.reads == len(keys), "not every Get came from the store"
            results["Get, gRPC"] = timed(lambda k: remote.get(TABLE, k), keys[: reads // 10])
            results["BatchGet(100), store"] = timed(lambda b: local.batch_get(TABLE, b), batches)  # type: ignore[arg-type]
            results["BatchGet(100), gRPC"] = timed(lambda b: remote.batch_get(TABLE, b), batches[: len(batches) // 4])  # type: ignore[arg-type]
        near_keys = keys[: reads // 10]
        with Client(target, near_cache={TABLE: rows}) as near:
            while not near.near_cache.connected:  # type: ignore[union-attr]
                time.sleep(0.01)
            for key in near_keys:  # warm: the measured keys near-cached
                near.get(TABLE, key)
            for batch in batches:
                near.batch_get(TABLE, batch)  # type: ignore[arg-type]
            results["Get, near-cache hit"] = timed(lambda k: near.get(TABLE, k), near_keys)
            results["BatchGet(100), near-cache hit"] = timed(lambda b: near.batch_get(TABLE, b), batches)  # type: ignore[arg-type]
        rates = {
            (kind, n): keys_per_second(target, store if kind == "store" else None, rows, n, seconds)
            for kind in ("store", "gRPC")
            for n in (1, 2)
        }
    finally:
        sidecar.terminate()
        sidecar.wait(30)
        shutil.rmtree(store, ignore_errors=True)
    base = stats(results["Get, gRPC"])[0]
    batch_base = stats(results["BatchGet(100), gRPC"])[0]
    print(
        f"\n{rows:,} rows; sidecar start to SERVING without the store {without_store:.1f} s, to the store "
        f"served {loaded:.1f} s ({loaded / without_store:.2f}x); machine: {os.cpu_count()} cores\n"
    )
    print(f"| {'read (one process)':<30} | {'p50 µs':>9} | {'p99 µs':>9} | {'gRPC p50 / this p50':>20} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 11}|{'-' * 22}|")
    for name, samples in results.items():
        p50, p99 = stats(samples)
        ratio = (batch_base if name.startswith("Batch") else base) / p50
        print(f"| {name:<30} | {p50:>9,.1f} | {p99:>9,.1f} | {ratio:>19,.1f}x |")
    print(f"\n| {'Get throughput':<16} | {'1 process keys/s':>17} | {'2 processes keys/s':>19} | {'2 / 1':>6} |")
    print(f"|{'-' * 18}|{'-' * 19}|{'-' * 21}|{'-' * 8}|")
    for kind in ("store", "gRPC"):
        one, two = rates[(kind, 1)], rates[(kind, 2)]
        print(f"| {kind:<16} | {one:>17,.0f} | {two:>19,.0f} | {two / one:>5.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        run(dsn, args.rows, args.reads, args.seconds)


if __name__ == "__main__":
    main()

"""Read-path benchmark, everything side by side in one run (``./dev bench``).

On one table of 100 000 rows:
  * unary Get through the sidecar (a separate daemon process)
  * a direct asyncpg primary-key SELECT (pool of as many connections as callers)
  * a do-nothing grpc.aio server answering the same message (the transport floor)
  * BatchGet of 100 keys vs asyncpg ``= ANY($1)``
each sequentially (1 caller) and with 16 concurrent callers, from one asyncio
client process. Prints a table and the ratios; there is no pass/fail.

    python -m tests.benchmarks.run [--seconds 2] [--rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc

TABLE = "public.bench_rows"


@dataclass
class Result:
    name: str
    callers: int
    calls: int
    keys_per_call: int
    seconds: float
    latencies_ns: list[int]

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


async def measure(
    name: str,
    call: Callable[[int], Awaitable[object]],
    callers: int,
    seconds: float,
    keys_per_call: int = 1,
    warmup: int = 200,
) -> Result:
    latencies: list[int] = []
    for i in range(warmup):  # warm up connections and code paths
        await call(i)
    deadline = time.perf_counter() + seconds

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            start = time.perf_counter_ns()
            await call(rng.randrange(1 << 30))
            latencies.append(time.perf_counter_ns() - start)

    started = time.perf_counter()
    await asyncio.gather(*(caller(s) for s in range(callers)))
    return Result(name, callers, len(latencies), keys_per_call, time.perf_counter() - started, latencies)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_serving(target: str, process: subprocess.Popen[bytes]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"sidecar exited with {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("sidecar did not become ready")


async def prepare(dsn: str, rows: int) -> bytes:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await conn.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, "
            "score integer NOT NULL, created timestamptz NOT NULL)"
        )
        await conn.execute(
            f"INSERT INTO {TABLE} SELECT g, 'user ' || g, 'user' || g || '@example.com', g % 1000, "
            f"now() - g * interval '1 minute' FROM generate_series(1, $1) g",
            rows,
        )
        await conn.execute(f"ANALYZE {TABLE}")
        row = await conn.fetchval(f"SELECT row_to_json(t)::text FROM {TABLE} t WHERE id = 1")
        return str(row).encode()
    finally:
        await conn.close()


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def table(results: list[Result]) -> str:
    lines = [
        f"| {'target':<34} | callers | {'calls/s':>9} | {'keys/s':>10} | {'p50 µs':>8} | {'p99 µs':>8} |",
        f"|{'-' * 36}|---------|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 10}|",
    ]
    for r in results:
        lines.append(
            f"| {r.name:<34} | {r.callers:>7} | {_rate(r.throughput):>9} "
            f"| {_rate(r.throughput * r.keys_per_call):>10} | {r.pct(0.5):>8,.0f} | {r.pct(0.99):>8,.0f} |"
        )
    return "\n".join(lines)


async def run(dsn: str, rows: int, seconds: float) -> None:
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    sample_row = await prepare(dsn, rows)
    sidecar_port, floor_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # GRPC_EXPERIMENTS as main() set it: same for all
    sidecar = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--dsn",
            dsn,
            "--table",
            TABLE,
            "--install-triggers",
            "--listen",
            f"127.0.0.1:{sidecar_port}",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    with tempfile.NamedTemporaryFile() as row_file:
        row_file.write(sample_row)
        row_file.flush()
        floor = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.floor_server", f"127.0.0.1:{floor_port}", row_file.name],
            env=env,
            stdout=subprocess.PIPE,
        )
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
            await wait_serving(f"127.0.0.1:{sidecar_port}", sidecar)
            results = await compare(dsn, rows, seconds, f"127.0.0.1:{sidecar_port}", f"127.0.0.1:{floor_port}")
        finally:
            for process in (sidecar, floor):
                process.terminate()
                process.wait(10)
    print(table(results))
    by = {(r.name, r.callers): r for r in results}
    print()
    for callers in (1, 16):
        get = by[("sidecar Get", callers)].throughput / by[("do-nothing grpc.aio server Get", callers)].throughput
        pg = by[("sidecar Get", callers)].throughput / by[("asyncpg SELECT by id", callers)].throughput
        batch = by[("sidecar BatchGet(100)", callers)].throughput / by[("asyncpg = ANY(100 ids)", callers)].throughput
        print(
            f"{callers:>2} caller(s): sidecar Get / transport floor = {get:.2f}x   "
            f"sidecar Get / asyncpg = {pg:.2f}x   BatchGet(100) / asyncpg ANY = {batch:.2f}x keys/s"
        )


async def compare(dsn: str, rows: int, seconds: float, sidecar: str, floor: str) -> list[Result]:
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
    sidecar_channel = grpc.aio.insecure_channel(sidecar)
    floor_channel = grpc.aio.insecure_channel(floor)
    side, flo = pb_grpc.CacheStub(sidecar_channel), pb_grpc.CacheStub(floor_channel)
    rng = random.Random(7)
    ids = [rng.randrange(1, rows + 1) for _ in range(4096)]
    gets = [pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=i)])) for i in ids]
    batches = [
        pb.BatchGetRequest(
            table=TABLE,
            keys=[pb.Key(parts=[pb.KeyPart(int_value=i)]) for i in rng.sample(range(1, rows + 1), 100)],
        )
        for _ in range(256)
    ]
    batch_ids = [[k.parts[0].int_value for k in b.keys] for b in batches]
    select = f"SELECT * FROM {TABLE} WHERE id = $1"
    select_any = f"SELECT * FROM {TABLE} WHERE id = ANY($1::bigint[])"

    async def sidecar_get(n: int) -> object:
        reply = await side.Get(gets[n % len(gets)])
        assert reply.found
        return reply

    async def floor_get(n: int) -> object:
        return await flo.Get(gets[n % len(gets)])

    async def pg_get(n: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetchrow(select, ids[n % len(ids)])

    async def sidecar_batch(n: int) -> object:
        return await side.BatchGet(batches[n % len(batches)])

    async def pg_batch(n: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetch(select_any, batch_ids[n % len(batch_ids)])

    results = []
    try:
        for callers in (1, 16):
            results.append(await measure("sidecar Get", sidecar_get, callers, seconds))
            results.append(await measure("do-nothing grpc.aio server Get", floor_get, callers, seconds))
            results.append(await measure("asyncpg SELECT by id", pg_get, callers, seconds))
            results.append(await measure("sidecar BatchGet(100)", sidecar_batch, callers, seconds, 100))
            results.append(
                await measure("do-nothing server BatchGet(100)", floor_batch(flo, batches), callers, seconds, 100)
            )
            results.append(await measure("asyncpg = ANY(100 ids)", pg_batch, callers, seconds, 100))
    finally:
        await sidecar_channel.close()
        await floor_channel.close()
        await pool.close()
    return results


def floor_batch(stub: pb_grpc.CacheStub, batches: list[pb.BatchGetRequest]) -> Callable[[int], Awaitable[object]]:
    async def call(n: int) -> object:
        return await stub.BatchGet(batches[n % len(batches)])

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS

    # The sidecar sets this for itself; the floor server and this client get the same.
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from tests.support.pg import database

    with database() as dsn:
        asyncio.run(run(dsn, args.rows, args.seconds))


if __name__ == "__main__":
    main()

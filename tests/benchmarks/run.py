"""Read-path benchmark, everything side by side in one run (``./dev bench``).

On one table of 100 000 rows, the database on loopback:
  * unary Get through the sidecar (a separate daemon process)
  * a direct asyncpg primary-key SELECT (pool of as many connections as callers)
  * a do-nothing grpc.aio server answering the same message (the transport floor;
    on uvloop, as the sidecar)
  * BatchGet of 100 random keys -- as the clients send them (``int_keys``) and as
    Key messages -- vs asyncpg ``= ANY($1)``
Then the same with the database behind a link that adds ``--link-delay-ms`` (0.5)
of round trip (``link.py``, a relay process; the sidecar on localhost reads its
database through it too, as in a deployment), with a relation Get vs the join it
replaces; and asyncpg through the relay without delay, to show the relay's own cost.
Each sequentially (1 caller) and with 16 concurrent callers, from one asyncio
client process, in ``--rounds`` interleaved rounds (calls/s: the median round's; a
ratio: the median of the rounds' ratios). Prints tables and the ratios; there is
no pass/fail.

    python -m tests.benchmarks.run [--seconds 2] [--rounds 3] [--rows 100000] [--link-delay-ms 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    per_round: list[float] = field(default_factory=list)  # calls/s of each round (``interleaved``)

    @property
    def throughput(self) -> float:
        """Calls/s: the median round's, when measured in rounds."""
        return statistics.median(self.per_round) if self.per_round else self.calls / self.seconds

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


Target = tuple[str, Callable[[int], Awaitable[object]], int]  # (name, one call, keys per call)


async def interleaved(targets: list[Target], callers: int, seconds: float, rounds: int) -> list[Result]:
    """Each target measured ``rounds`` times for ``seconds``, round-robin: a slow spell of
    the machine then hits every target alike, instead of whichever ran during it."""
    results = [Result(name, callers, 0, keys, 0.0, []) for name, _, keys in targets]
    for index in range(rounds):
        for result, (name, call, keys) in zip(results, targets, strict=True):
            one = await measure(name, call, callers, seconds, keys, warmup=200 if index == 0 else 20)
            result.calls += one.calls
            result.seconds += one.seconds
            result.latencies_ns += one.latencies_ns
            result.per_round.append(one.throughput)
    return results


def ratio(a: Result, b: Result) -> float:
    """a's throughput over b's: the median of the rounds' ratios (each round's pair ran
    side by side), else of the totals."""
    if a.per_round and len(a.per_round) == len(b.per_round):
        return statistics.median(x / y for x, y in zip(a.per_round, b.per_round, strict=True))
    return a.throughput / b.throughput


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
    width = max([34, *(len(r.name) for r in results)])
    lines = [
        f"| {'target':<{width}} | callers | {'calls/s':>9} | {'keys/s':>10} | {'p50 µs':>8} | {'p99 µs':>8} |",
        f"|{'-' * (width + 2)}|---------|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 10}|",
    ]
    for r in results:
        lines.append(
            f"| {r.name:<{width}} | {r.callers:>7} | {_rate(r.throughput):>9} "
            f"| {_rate(r.throughput * r.keys_per_call):>10} | {r.pct(0.5):>8,.0f} | {r.pct(0.99):>8,.0f} |"
        )
    return "\n".join(lines)


def start_sidecar(dsn: str, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--install-triggers"]
    command += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning", *extra]
    # GRPC_EXPERIMENTS as main() set it: the same for every process
    return subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.terminate()
        process.wait(10)


async def run(dsn: str, rows: int, seconds: float, rounds: int, delay_ms: float, users: int, orders: int) -> None:
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    sample_row = await prepare(dsn, rows)
    sidecar_port, floor_port = free_port(), free_port()
    sidecar = start_sidecar(dsn, sidecar_port, ["--table", TABLE])
    with tempfile.NamedTemporaryFile() as row_file:
        row_file.write(sample_row)
        row_file.flush()
        floor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.floor_server",
                f"127.0.0.1:{floor_port}",
                row_file.name,
                "--loop",
                "uvloop",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert floor.stdout is not None
            floor.stdout.readline()
            await wait_serving(f"127.0.0.1:{sidecar_port}", sidecar)
            results = await compare(dsn, rows, seconds, rounds, f"127.0.0.1:{sidecar_port}", f"127.0.0.1:{floor_port}")
        finally:
            stop(sidecar, floor)
    print("The database on loopback:\n")
    print(table(results))
    by = {(r.name, r.callers): r for r in results}
    print()
    for callers in (1, 16):

        def of(a: str, b: str, callers: int = callers) -> float:
            return ratio(by[(a, callers)], by[(b, callers)])

        print(
            f"{callers:>2} caller(s): sidecar Get / transport floor = {of('sidecar Get', FLOOR_GET):.2f}x   "
            f"sidecar Get / asyncpg = {of('sidecar Get', 'asyncpg SELECT by id'):.2f}x   "
            f"BatchGet(100) / asyncpg ANY = {of(BATCH_INT, 'asyncpg = ANY(100 ids)'):.2f}x keys/s "
            f"({of(BATCH_KEYS, 'asyncpg = ANY(100 ids)'):.2f}x as Key messages)"
        )
    if delay_ms > 0:
        await over_a_link(dsn, rows, seconds, rounds, delay_ms, users, orders)


FLOOR_GET = "do-nothing grpc.aio server Get"
BATCH_INT = "sidecar BatchGet(100) int_keys"
BATCH_KEYS = "sidecar BatchGet(100) Key messages"


def requests(rows: int) -> tuple[list[int], list[pb.GetRequest], list[list[int]]]:
    rng = random.Random(7)
    ids = [rng.randrange(1, rows + 1) for _ in range(4096)]
    gets = [pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=i)])) for i in ids]
    batch_ids = [rng.sample(range(1, rows + 1), 100) for _ in range(256)]
    return ids, gets, batch_ids


async def compare(dsn: str, rows: int, seconds: float, rounds: int, sidecar: str, floor: str) -> list[Result]:
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
    sidecar_channel = grpc.aio.insecure_channel(sidecar)
    floor_channel = grpc.aio.insecure_channel(floor)
    side, flo = pb_grpc.CacheStub(sidecar_channel), pb_grpc.CacheStub(floor_channel)
    ids, gets, batch_ids = requests(rows)
    int_batches = [pb.BatchGetRequest(table=TABLE, int_keys=b) for b in batch_ids]
    key_batches = [
        pb.BatchGetRequest(table=TABLE, keys=[pb.Key(parts=[pb.KeyPart(int_value=i)]) for i in b]) for b in batch_ids
    ]
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
        return await side.BatchGet(int_batches[n % len(int_batches)])

    async def sidecar_key_batch(n: int) -> object:
        return await side.BatchGet(key_batches[n % len(key_batches)])

    async def floor_batch(n: int) -> object:
        return await flo.BatchGet(int_batches[n % len(int_batches)])

    async def pg_batch(n: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetch(select_any, batch_ids[n % len(batch_ids)])

    # the forms answer alike
    assert (await side.BatchGet(int_batches[0])).rows == (await side.BatchGet(key_batches[0])).rows
    results = []
    try:
        for callers in (1, 16):
            targets: list[Target] = [
                ("sidecar Get", sidecar_get, 1),
                (FLOOR_GET, floor_get, 1),
                ("asyncpg SELECT by id", pg_get, 1),
                (BATCH_INT, sidecar_batch, 100),
                (BATCH_KEYS, sidecar_key_batch, 100),
                ("do-nothing server BatchGet(100)", floor_batch, 100),
                ("asyncpg = ANY(100 ids)", pg_batch, 100),
            ]
            results += await interleaved(targets, callers, seconds, rounds)
    finally:
        await sidecar_channel.close()
        await floor_channel.close()
        await pool.close()
    return results


# ---------------------------------------------------------------- over a link


async def database_path(dsn: str) -> str:
    """Where the database listens: a Unix socket's path, or host:port."""
    conn = await asyncpg.connect(dsn)
    try:
        peer = conn._transport.get_extra_info("peername")  # type: ignore[attr-defined]
    finally:
        await conn.close()
    return peer if isinstance(peer, str) else f"{peer[0]}:{peer[1]}"


def via(dsn: str, port: int) -> str:
    """``dsn`` with its host replaced by the relay on 127.0.0.1:``port``."""
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in ("host", "port")]
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), ""))


def start_link(target: str, delay: float) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.link", target, str(delay)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


async def over_a_link(
    dsn: str, rows: int, seconds: float, rounds: int, delay_ms: float, users: int, orders: int
) -> None:
    from tests.benchmarks import relations

    print(f"\npreparing the relation: {users:,} users, {orders} orders each ...", file=sys.stderr)
    await relations.prepare(dsn, users, orders)
    target = await database_path(dsn)
    slow, slow_port = start_link(target, delay_ms / 1000)
    fast, fast_port = start_link(target, 0.0)
    slow_dsn, fast_dsn = via(dsn, slow_port), via(dsn, fast_port)
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "sidecar.toml"
        config.write_text(f'[[tables]]\nname = "{TABLE}"\n' + relations.CONFIG)
        sidecar = start_sidecar(slow_dsn, port, ["--config", str(config)])
        try:
            await wait_serving(f"127.0.0.1:{port}", sidecar)
            results = await compare_over_link(slow_dsn, fast_dsn, rows, users, seconds, rounds, f"127.0.0.1:{port}")
        finally:
            stop(sidecar, slow, fast)
    print(f"\nThe database behind a link adding {delay_ms} ms of round trip (the sidecar on localhost):\n")
    print(table(results))
    print()
    by = {(r.name, r.callers): r for r in results}
    for callers in (1, 16):
        pairs = [(a, b) for a, b in LINK_PAIRS if (a, callers) in by]
        text = "   ".join(f"{a} / {b} = {ratio(by[(a, callers)], by[(b, callers)]):.2f}x" for a, b in pairs)
        print(f"{callers:>2} caller(s): {text}")
    relay = by[("asyncpg SELECT by id, relay without delay", 1)].pct(0.5)
    direct_link = by[("asyncpg SELECT by id", 1)].pct(0.5)
    print(
        f"(asyncpg's p50 through the relay without delay: {relay:,.0f} µs; with the delay: {direct_link:,.0f} µs: "
        f"the link added {(direct_link - relay) / 1000:.2f} ms, for {delay_ms} ms asked)"
    )


LINK_PAIRS = (
    ("sidecar Get", "asyncpg SELECT by id"),
    (BATCH_INT, "asyncpg = ANY(100 ids)"),
    ("relation Get", "the join for one user"),
)


async def compare_over_link(
    slow_dsn: str, fast_dsn: str, rows: int, users: int, seconds: float, rounds: int, sidecar: str
) -> list[Result]:
    from tests.benchmarks import relations

    pool = await asyncpg.create_pool(slow_dsn, min_size=16, max_size=16)
    fast_pool = await asyncpg.create_pool(fast_dsn, min_size=16, max_size=16)
    channel = grpc.aio.insecure_channel(sidecar)
    side = pb_grpc.CacheStub(channel)
    ids, gets, batch_ids = requests(rows)
    int_batches = [pb.BatchGetRequest(table=TABLE, int_keys=b) for b in batch_ids]
    relation_gets = [
        pb.GetRequest(table="bench.user_summary", key=pb.Key(parts=[pb.KeyPart(int_value=1 + i % users)])) for i in ids
    ]
    select = f"SELECT * FROM {TABLE} WHERE id = $1"
    select_any = f"SELECT * FROM {TABLE} WHERE id = ANY($1::bigint[])"

    async def sidecar_get(n: int) -> object:
        reply = await side.Get(gets[n % len(gets)])
        assert reply.found
        return reply

    async def pg_get(n: int) -> object:
        return await pool.fetchrow(select, ids[n % len(ids)])

    async def pg_get_fast(n: int) -> object:
        return await fast_pool.fetchrow(select, ids[n % len(ids)])

    async def sidecar_batch(n: int) -> object:
        return await side.BatchGet(int_batches[n % len(int_batches)])

    async def pg_batch(n: int) -> object:
        return await pool.fetch(select_any, batch_ids[n % len(batch_ids)])

    async def relation_get(n: int) -> object:
        reply = await side.Get(relation_gets[n % len(relation_gets)])
        assert reply.found
        return reply

    async def join(n: int) -> object:
        return await pool.fetch(relations.BY_USER_SQL, relation_gets[n % len(relation_gets)].key.parts[0].int_value)

    results = []
    try:
        for callers in (1, 16):
            print(f"  over the link, {callers} caller(s) ...", file=sys.stderr)
            targets: list[Target] = [
                ("sidecar Get", sidecar_get, 1),
                ("asyncpg SELECT by id", pg_get, 1),
                (BATCH_INT, sidecar_batch, 100),
                ("asyncpg = ANY(100 ids)", pg_batch, 100),
                ("relation Get", relation_get, 1),
                ("the join for one user", join, 1),
                ("asyncpg SELECT by id, relay without delay", pg_get_fast, 1),
            ]
            results += await interleaved(targets, callers, seconds, rounds)
    finally:
        await channel.close()
        await pool.close()
        await fast_pool.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="measurements of each target, interleaved (ratios: the rounds' median)"
    )
    parser.add_argument(
        "--link-delay-ms", type=float, default=0.5, help="round trip the link to the database adds (0: no link run)"
    )
    parser.add_argument("--users", type=int, default=10_000, help="the link run's relation: users")
    parser.add_argument("--orders", type=int, default=100, help="the link run's relation: orders per user")
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS

    # The sidecar sets this for itself; the floor server and this client get the same.
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from tests.support.pg import database

    with database() as dsn:
        asyncio.run(run(dsn, args.rows, args.seconds, args.rounds, args.link_delay_ms, args.users, args.orders))


if __name__ == "__main__":
    main()

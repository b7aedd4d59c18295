"""Big-table reload and initial-state benchmark, side by side in one run.

On one full table (default 1 000 000 rows, 5 columns, ~130 B of JSON a row),
served by a separate daemon process:
  * Get latency (1 caller) idle, then during a whole-table reload
    (``Invalidate(all_rows, refresh)``, which returns once the reload landed);
  * the daemon's RSS: steady, and its peak during the reload;
  * 10 concurrent ``Watch(initial_state=true)`` streams whose clients read slowly:
    the RSS they add, and another client's Get latency meanwhile.
Prints a table; there is no pass/fail.

    python -m tests.benchmarks.reload [--rows 1000000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.benchmarks.run import TABLE, free_port, prepare, wait_serving

STREAMS = 10


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Sampler:
    """The daemon's RSS, sampled every 20 ms while running."""

    pid: int
    peak: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self) -> Sampler:
        self.peak = rss_mb(self.pid)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@dataclass
class Latencies:
    name: str
    values_ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        ordered = sorted(self.values_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def row(self) -> str:
        return (
            f"| {self.name:<44} | {len(self.values_ms):>6} | {self.pct(0.5):>7.2f} | {self.pct(0.99):>8.2f} "
            f"| {max(self.values_ms, default=float('nan')):>8.2f} |"
        )


async def gets(stub: pb_grpc.CacheStub, rows: int, stop: asyncio.Event, into: Latencies) -> None:
    key = 0
    while not stop.is_set():
        key = key * 7919 % rows + 1
        started = time.perf_counter()
        reply = await stub.Get(pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=key)])), timeout=60)
        into.values_ms.append((time.perf_counter() - started) * 1000)
        assert reply.found


async def timed_gets(stub: pb_grpc.CacheStub, rows: int, seconds: float, name: str) -> Latencies:
    result = Latencies(name)
    stop = asyncio.Event()
    task = asyncio.create_task(gets(stub, rows, stop, result))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return result


async def slow_readers(target: str, seconds: float) -> None:
    """``STREAMS`` slow initial-state readers for ``seconds`` (run in a process of their own,
    so their decoding does not delay the measuring client); prints the messages they read."""
    received = [0] * STREAMS
    deadline = time.perf_counter() + seconds

    async def reader(index: int, channel: grpc.aio.Channel) -> None:
        watch = channel.unary_stream(
            "/cachesidecar.v1.Cache/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=None,  # (raw bytes: no decoding cost here)
        )
        call = watch(pb.WatchRequest(tables=[TABLE], initial_state=True))
        try:
            while time.perf_counter() < deadline:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                received[index] += 1
                await asyncio.sleep(0.01)  # a slow client: about 100 messages (50 000 rows) a second
        finally:
            call.cancel()

    channels = [grpc.aio.insecure_channel(target) for _ in range(STREAMS)]  # a connection each
    try:
        await asyncio.gather(*(reader(i, channel) for i, channel in enumerate(channels)))
    finally:
        for channel in channels:
            await channel.close()
    print(sum(received), flush=True)


async def run(dsn: str, rows: int, seconds: float) -> None:
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    await prepare(dsn, rows)
    port = free_port()
    target = f"127.0.0.1:{port}"
    daemon = subprocess.Popen(
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
            target,
            "--log-level",
            "warning",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        started = time.perf_counter()
        await wait_serving(target, daemon)
        load_seconds = time.perf_counter() - started
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.CacheStub(channel)
            await asyncio.sleep(1)
            steady = rss_mb(daemon.pid)
            idle = await timed_gets(stub, rows, seconds, "Get, idle")

            during = Latencies("Get, during a whole-table reload")
            stop = asyncio.Event()
            with Sampler(daemon.pid) as reload_rss:
                reader = asyncio.create_task(gets(stub, rows, stop, during))
                began = time.perf_counter()
                await stub.Invalidate(pb.InvalidateRequest(table=TABLE, all_rows=True, refresh=True), timeout=600)
                reload_seconds = time.perf_counter() - began
                stop.set()
                await reader
            after = rss_mb(daemon.pid)

            await asyncio.sleep(1)
            before_streams = rss_mb(daemon.pid)
            stream_seconds = max(seconds, 5.0)
            with Sampler(daemon.pid) as streams_rss:
                readers = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.benchmarks.reload", "--readers", target,
                    "--seconds", str(stream_seconds + 1), stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                await asyncio.sleep(0.5)  # (the streams start)
                name = f"Get, with {STREAMS} initial-state streams"
                streaming = await timed_gets(stub, rows, stream_seconds, name)
                out, _ = await readers.communicate()
                received = int(out.split()[-1])
    finally:
        daemon.terminate()
        daemon.wait(30)
    lines += [
        f"| {'Get latency (1 caller)':<44} |  calls |  p50 ms |   p99 ms |   max ms |",
        f"|{'-' * 46}|--------|---------|----------|----------|",
        idle.row(),
        during.row(),
        streaming.row(),
        "",
        f"rows {rows:,}; first load (start to SERVING) {load_seconds:.1f} s; reload {reload_seconds:.1f} s",
        f"RSS steady {steady:.0f} MB; peak during the reload {reload_rss.peak:.0f} MB "
        f"({reload_rss.peak / steady:.2f}x steady); after it {after:.0f} MB",
        f"RSS before {STREAMS} initial-state streams {before_streams:.0f} MB; peak with them "
        f"{streams_rss.peak:.0f} MB (+{streams_rss.peak - before_streams:.0f} MB); "
        f"messages read by the slow clients: {received:,} (of {rows // 500 * STREAMS:,})",
        f"Get during the reload: p99 {during.pct(0.99) / idle.pct(0.99):.1f}x idle p99; "
        f"with the streams: max {max(streaming.values_ms) - max(idle.values_ms):+.1f} ms vs idle max",
    ]
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of the idle measurement")
    parser.add_argument("--readers", metavar="TARGET", help=argparse.SUPPRESS)  # (the readers' process)
    args = parser.parse_args()
    if args.readers:
        asyncio.run(slow_readers(args.readers, args.seconds))
        return
    from sidecar.cli import GRPC_EXPERIMENTS

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from tests.support.pg import database

    with database() as dsn:
        asyncio.run(run(dsn, args.rows, args.seconds))


if __name__ == "__main__":
    main()

"""What the network edge costs a read, side by side in one run (``./dev bench``):

a unary Get through a sidecar process in plaintext, with tokens, over TLS, over TLS with
tokens, and over mutual TLS with tokens; 1 and 16 concurrent callers from one asyncio
client process whose channel is built by ``sidecar.fleet.channels`` (as a follower's is). One
sidecar process per mode, all started first, measured in rounds (each mode in turn, so a
machine that gets busier mid-run slows all alike); each channel stays open (the TLS
handshake is paid once).

    python -m tests.benchmarks.edge [--seconds 2] [--rounds 3] [--rows 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from sidecar.fleet import channels
from tests.benchmarks.run import TABLE, Result, free_port, measure, prepare, table, wait_serving
from tests.support.certs import Authority

TOKEN = "bench-" + "t" * 40


def modes(directory: Path) -> list[tuple[str, list[str], channels.UpstreamSecurity]]:
    ca = Authority(directory / "ca")
    server, client = ca.issue("server"), ca.issue("client", server=False)
    (directory / "tokens").write_text(f"{TOKEN}\n")
    (directory / "token").write_text(f"{TOKEN}\n")
    tls = ["--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key)]
    tokens = ["--auth-token-file", str(directory / "tokens")]
    token = str(directory / "token")
    ca_file = str(ca.cert_file)
    return [
        ("plaintext", [], channels.UpstreamSecurity()),
        ("tokens", tokens, channels.UpstreamSecurity(token_file=token)),
        ("TLS", tls, channels.UpstreamSecurity(tls_ca_file=ca_file)),
        ("TLS + tokens", tls + tokens, channels.UpstreamSecurity(tls_ca_file=ca_file, token_file=token)),
        (
            "mutual TLS + tokens",
            [*tls, "--tls-client-ca-file", ca_file, *tokens],
            channels.UpstreamSecurity(ca_file, str(client.cert), str(client.key), token),
        ),
    ]


def start(dsn: str, flags: list[str]) -> tuple[subprocess.Popen[bytes], str, str]:
    port, health = free_port(), free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--table", TABLE, "--install-triggers"),
            *("--listen", f"127.0.0.1:{port}", "--health-listen", f"127.0.0.1:{health}", "--log-level", "warning"),
            *flags,
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return process, f"127.0.0.1:{port}", f"127.0.0.1:{health}"


def merged(results: list[Result]) -> Result:
    first = results[0]
    return Result(
        first.name,
        first.callers,
        sum(r.calls for r in results),
        first.keys_per_call,
        sum(r.seconds for r in results),
        [n for r in results for n in r.latencies_ns],
    )


async def run(dsn: str, rows: int, seconds: float, rounds: int) -> None:
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    await prepare(dsn, rows)
    rng = random.Random(7)
    gets = [
        pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=rng.randrange(1, rows + 1))]))
        for _ in range(4096)
    ]
    measured: dict[tuple[str, int], list[Result]] = {}
    opened_calls: list[tuple[str, Callable[[int], Awaitable[object]]]] = []
    with tempfile.TemporaryDirectory() as directory:
        setups = modes(Path(directory))
        started = [start(dsn, flags) for _name, flags, _security in setups]
        opened = []
        try:
            for process, _target, health in started:
                await wait_serving(health, process)
            for (name, _flags, security), (_process, target, _health) in zip(setups, started, strict=True):
                channel = channels.aio_channel(target, security)
                opened.append(channel)
                stub = pb_grpc.CacheStub(channel)

                def get(stub: pb_grpc.CacheStub = stub) -> Callable[[int], Awaitable[object]]:
                    async def call(n: int) -> object:
                        reply = await stub.Get(gets[n % len(gets)])
                        assert reply.found
                        return reply

                    return call

                opened_calls.append((name, get()))
            # Rounds, each mode in turn: a machine that gets busier mid-run slows all alike.
            for _ in range(rounds):
                for name, call in opened_calls:
                    for callers in (1, 16):
                        result = await measure(f"Get, {name}", call, callers, seconds / rounds)
                        measured.setdefault((name, callers), []).append(result)
        finally:
            for channel in opened:
                await channel.close()
            for process, _target, _health in started:
                process.terminate()
                process.wait(10)
    results = [merged(each) for each in measured.values()]
    results.sort(key=lambda r: r.callers)
    print(table(results))
    print()
    for callers in (1, 16):
        base = next(r for r in results if r.callers == callers and r.name == "Get, plaintext")
        ratios = "   ".join(
            f"{r.name.removeprefix('Get, ')} {r.throughput / base.throughput:.2f}x"
            for r in results
            if r.callers == callers and r is not base
        )
        print(f"{callers:>2} caller(s), calls/s against plaintext: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the modes (each gets seconds/rounds)")
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from tests.support.pg import database

    with database() as dsn:
        asyncio.run(run(dsn, args.rows, args.seconds * args.rounds, args.rounds))


if __name__ == "__main__":
    main()

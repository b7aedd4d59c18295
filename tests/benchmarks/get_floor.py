"""Where a Get's time goes, measured with C clients (``./dev bench`` does not run it).

    python -m tests.benchmarks.get_floor [--seconds 2] [--rounds 3] [--rows 100000] [--profile]

  * ``h2load`` (Debian: ``apt-get install nghttp2-client``) sends one framed gRPC
    request over and over -- sequentially (1 stream), 16 streams on one
    connection (one channel, 16 callers) and 16 connections -- to the sidecar's
    Get and BatchGet(100) and to do-nothing gRPC servers (``floor_server.py``)
    started with each grpcio option worth trying: grpc.aio on asyncio and on
    uvloop, ``grpc.optimization_target``, ``grpc.so_reuseport``, the EventEngine
    experiments on, the sync (thread-pool) server, a Unix socket.
  * ``pgbench`` (the one the ``pgserver`` wheel ships, else PATH) answers a
    primary-key SELECT of the same table: PostgreSQL from a C client.
  * each server's CPU per call (its /proc utime + stime over the run, divided by
    the calls answered), so that the sidecar's own work shows as the difference
    from a do-nothing server on the same loop.
  * ``--profile``: ``py-spy record`` (PyPI: ``pip install py-spy``) on the
    sidecar during a sequential Get run and a 16-stream BatchGet run, summed by
    who runs: the sidecar's code (any ``sidecar/`` frame on the stack), grpcio,
    the event loop, the rest. The collapsed stacks are kept (``--keep DIR``).

Every server runs at once and the measurements go round-robin over them, each
shape ``--rounds`` times, reporting the median: on a busy machine, load that
comes and goes then falls on every server alike instead of on whichever ran at
that moment.

The parts whose tool is missing are skipped with a message saying which tool.
Every h2load request reads the same key (the floor, not cache misses: see
``run.py`` for random keys). h2load counts HTTP status only, and gRPC errors
come with status 200, so each request body is first checked with a real gRPC
call, and each run's received DATA bytes are checked against what its answers
must add up to.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from sidecar.api.v1 import cache_pb2 as pb
from tests.benchmarks.run import TABLE, free_port, prepare, wait_serving

OPTION = ("--option",)
SHAPES = (("sequential", 1, 1), ("16 streams, 1 connection", 1, 16), ("16 connections", 16, 1))
METHOD = "/cachesidecar.v1.Cache/"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    address: str  # host:port or unix:/path

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (every thread)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    server: str
    method: str
    shape: str
    calls_per_second: float
    mean_us: float
    cpu_us_per_call: float | None


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def requests(rows: int) -> dict[str, bytes]:
    keys = list(range(1, rows + 1, rows // 100))[:100]
    return {
        "Get": pb.GetRequest(table=TABLE, key=pb.Key(parts=[pb.KeyPart(int_value=7)])).SerializeToString(),
        "BatchGet": pb.BatchGetRequest(table=TABLE, int_keys=keys).SerializeToString(),
    }


async def check_answers(address: str, bodies: dict[str, bytes]) -> dict[str, int]:
    """The answer's size for each request, after checking that it succeeds (status OK)."""
    target = address if not address.startswith("unix:") else f"unix://{address[5:]}"
    sizes = {}
    async with grpc.aio.insecure_channel(target) as channel:
        for method, body in bodies.items():
            call = channel.unary_unary(METHOD + method)
            answer = await call(body, timeout=10)
            sizes[method] = len(answer)
    return sizes


def h2load(
    tool: str, address: str, method: str, body: Path, seconds: float, clients: int, streams: int
) -> tuple[float, float, int, int]:
    """(calls/s, mean µs, calls done, DATA bytes received)."""
    if address.startswith("unix:"):
        where = ["-B", address, f"http://localhost{METHOD}{method}"]
    else:
        where = [f"http://{address}{METHOD}{method}"]
    # (h2load takes whole seconds)
    command = [tool, "-D", str(max(1, round(seconds))), "-t", "1", "-c", str(clients), "-m", str(streams)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body), *where]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    out = finished.stdout + finished.stderr
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    data = re.search(r"\((\d+)\) data", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if not (rate and done and data and mean):
        raise SystemExit(f"cannot read h2load's output:\n{out}")
    if done.group(1) != done.group(2):
        raise SystemExit(f"h2load: some requests failed:\n{out}")
    unit = {"us": 1, "ms": 1000, "s": 1_000_000}[mean.group(2)]
    return float(rate.group(1)), float(mean.group(1)) * unit, int(done.group(2)), int(data.group(1))


def measure_one(
    tool: str, server: Server, method: str, body: Path, size: int, seconds: float, clients: int, streams: int
) -> tuple[float, float, float | None]:
    """(calls/s, mean µs, server CPU µs per call) of one h2load run."""
    cpu = server.cpu_seconds()
    rate, mean, done, data = h2load(tool, server.address, method, body, seconds, clients, streams)
    cpu = server.cpu_seconds() - cpu
    # Every answer is 5 framing bytes and the message: fewer DATA bytes means failed calls.
    expected = done * (5 + size)
    if data < expected:
        raise SystemExit(f"{server.name} {method}: {data} DATA bytes for {done} calls (expected {expected})")
    # (the CPU window also holds h2load's start and end, a few ms: negligible over seconds)
    return rate, mean, (cpu / done * 1e6 if done else None)


def measure(
    tool: str,
    servers: list[tuple[Server, dict[str, int]]],
    bodies: dict[str, Path],
    seconds: float,
    rounds: int,
) -> list[Load]:
    """Every method and shape on every server, round-robin, ``rounds`` times: the medians."""
    runs: dict[tuple[str, str, str], list[tuple[float, float, float | None]]] = collections.defaultdict(list)
    for server, _ in servers:  # warm up
        for method, body in bodies.items():
            h2load(tool, server.address, method, body, 1, 1, 4)
    for round_ in range(rounds):
        print(f"h2load: round {round_ + 1} of {rounds} ...", file=sys.stderr)
        for method, body in bodies.items():
            for shape, clients, streams in SHAPES:
                for server, sizes in servers:
                    one = measure_one(tool, server, method, body, sizes[method], seconds, clients, streams)
                    runs[(server.name, method, shape)].append(one)
    results = []
    for server, _ in servers:
        for method in bodies:
            for shape, _, _ in SHAPES:
                got = runs[(server.name, method, shape)]
                cpus = [c for _, _, c in got if c is not None]
                results.append(
                    Load(
                        server.name,
                        method,
                        shape,
                        statistics.median(r for r, _, _ in got),
                        statistics.median(m for _, m, _ in got),
                        statistics.median(cpus) if cpus else None,
                    )
                )
    return results


def pgbench_tool() -> str | None:
    with contextlib.suppress(ImportError):
        import pgserver

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    return shutil.which("pgbench")


def pgbench(tool: str, dsn: str, rows: int, seconds: float, clients: int, workdir: Path) -> tuple[float, float]:
    """(transactions/s, mean latency µs) of a prepared primary-key SELECT."""
    script = workdir / "select.sql"
    script.write_text(f"\\set id random(1, {rows})\nSELECT * FROM {TABLE} WHERE id = :id;\n")
    command = [tool, "-n", "-M", "prepared", "-f", str(script), "-T", str(int(max(1, seconds)))]
    command += ["-c", str(clients), "-j", str(min(clients, 2)), dsn]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    tps = re.search(r"tps = ([\d.]+)", out.stdout)
    latency = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    if not (tps and latency):
        raise SystemExit(f"cannot read pgbench's output:\n{out.stdout}\n{out.stderr}")
    return float(tps.group(1)), float(latency.group(1)) * 1000


# ---------------------------------------------------------------- servers

FLOORS: tuple[tuple[str, list[str], dict[str, str], bool], ...] = (
    # (name, floor_server.py flags, environment changes, on a Unix socket)
    ("floor: grpc.aio, asyncio", [], {}, False),
    ("floor: grpc.aio, uvloop", ["--loop", "uvloop"], {}, False),
    (
        "floor: uvloop, optimization_target=latency",
        ["--loop", "uvloop", *OPTION, "grpc.optimization_target=latency"],
        {},
        False,
    ),
    (
        "floor: uvloop, optimization_target=throughput",
        ["--loop", "uvloop", *OPTION, "grpc.optimization_target=throughput"],
        {},
        False,
    ),
    ("floor: uvloop, so_reuseport=1", ["--loop", "uvloop", *OPTION, "grpc.so_reuseport=1"], {}, False),
    ("floor: uvloop, EventEngine on", ["--loop", "uvloop"], {"GRPC_EXPERIMENTS": ""}, False),
    ("floor: sync server, 16 threads", ["--sync"], {}, False),
    ("floor: uvloop, Unix socket", ["--loop", "uvloop"], {}, True),
    # not an option: a handler that holds the CPU 80 µs, about what the sidecar's BatchGet(100) does
    ("floor: uvloop, handler busy 80 µs", ["--loop", "uvloop", "--busy-us", "80"], {}, False),
)


def start_floor(
    name: str, flags: list[str], env: dict[str, str], on_unix: bool, row_file: str, workdir: Path
) -> Server:
    address = f"unix:{workdir / f'floor-{free_port()}.sock'}" if on_unix else f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.floor_server", address, row_file, *flags],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        raise SystemExit(f"{name}: the floor server did not start")
    return Server(name, process, address)


@contextlib.contextmanager
def sidecar(dsn: str, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """The daemon, listening on TCP and on a Unix socket."""
    port, sock = free_port(), workdir / "sidecar.sock"
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--table", TABLE, "--install-triggers"]
    command += ["--listen", f"127.0.0.1:{port}", "--listen", f"unix://{sock}", "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", process))
        yield process, f"127.0.0.1:{port}", f"unix:{sock}"
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------- profile

# Where a frame's code lives, by its file (py-spy's "function (file:line)").
OWN = re.compile(r"\((?:.*/)?sidecar/(?!api/)[\w/]+\.py:\d+\)")
GRPC = re.compile(r"grpc|cygrpc", re.IGNORECASE)
IDLE = re.compile(r"^(epoll_wait|epoll_pwait|futex|pthread_cond_\w*wait|__futex\w*|sem_\w*wait) ")
RUN_LOOP = re.compile(r"run_forever ")
LOOP = re.compile(r"uvloop|asyncio/|selectors|epoll", re.IGNORECASE)


def profile(stacks: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(samples by who runs, the sidecar's samples by its innermost function, total)."""
    who: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        path, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = path.split(";")
        if IDLE.search(frames[-1]):
            continue  # a thread waiting for work, not running
        total += count
        # (the main thread's frames down to the event loop run the daemon, not a call)
        loop_at = next((i for i, f in enumerate(frames) if RUN_LOOP.match(f)), -1)
        ours = [f for f in frames[loop_at + 1 :] if OWN.search(f)]
        if ours:
            who["sidecar's own code (inclusive)"] += count
            own[ours[-1]] += count
            continue
        innermost = frames[-1]
        if GRPC.search(line):
            who["grpcio (no sidecar frame)"] += count
        elif LOOP.search(innermost):
            who["event loop"] += count
        else:
            who[f"other: {innermost[:60]}"] += count
    return who, own, total


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(tool):
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    # (--native: grpcio's C frames too; it pauses the process at each sample, so timings
    # taken meanwhile are not reported)
    command = [tool, "record", "--pid", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw", "-o", str(out)]
    return subprocess.Popen([*command, "--native"], stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- main


def print_loads(loads: list[Load]) -> None:
    print(f"| {'server':<46} | method   | {'load':<24} | {'calls/s':>8} | {'mean µs':>8} | {'CPU µs/call':>11} |")
    print(f"|{'-' * 48}|----------|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for r in loads:
        cpu = f"{r.cpu_us_per_call:,.0f}" if r.cpu_us_per_call is not None else "—"
        print(
            f"| {r.server:<46} | {r.method:<8} | {r.shape:<24} | {r.calls_per_second:>8,.0f} "
            f"| {r.mean_us:>8,.0f} | {cpu:>11} |"
        )


def run(dsn: str, rows: int, seconds: float, rounds: int, profiling: bool, keep: Path | None) -> None:
    tool = shutil.which("h2load")
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    sample_row = asyncio.run(prepare(dsn, rows))
    loads: list[Load] = []
    profiles: list[tuple[str, Path]] = []
    with tempfile.TemporaryDirectory() as temp, contextlib.ExitStack() as stack:
        workdir = Path(temp)
        messages = requests(rows)
        bodies = {}
        for method, message in messages.items():
            bodies[method] = workdir / f"{method}.bin"
            bodies[method].write_bytes(frame(message))
        if tool is None:
            print("h2load not found (Debian: apt-get install nghttp2-client): skipping the gRPC parts", file=sys.stderr)
        else:
            process, tcp, unix = stack.enter_context(sidecar(dsn, workdir))
            servers = [
                (Server("sidecar (uvloop, TCP)", process, tcp), asyncio.run(check_answers(tcp, messages))),
                (Server("sidecar (uvloop, Unix socket)", process, unix), asyncio.run(check_answers(unix, messages))),
            ]
            row_file = workdir / "row.json"
            row_file.write_bytes(sample_row)
            for name, flags, env, on_unix in FLOORS:
                floor = start_floor(name, flags, env, on_unix, str(row_file), workdir)
                stack.callback(stop, floor.process)
                servers.append((floor, asyncio.run(check_answers(floor.address, messages))))
            loads = measure(tool, servers, bodies, seconds, rounds)
            if profiling:
                for method, (label, clients, streams) in (("Get", SHAPES[0]), ("BatchGet", SHAPES[1])):
                    out = (keep or workdir) / f"sidecar-{method}.txt"
                    print(f"py-spy: sidecar {method}, {label} ...", file=sys.stderr)
                    spying = spy(process.pid, seconds + 1, out)
                    if spying is None:
                        break
                    h2load(tool, tcp, method, bodies[method], seconds + 2, clients, streams)
                    spying.wait(30)
                    if out.exists():
                        profiles.append((f"sidecar {method}, h2load {label}", out))
        bench = pgbench_tool()
        pg_results = []
        if bench is None:
            print("pgbench not found (it comes with the pgserver wheel or postgresql-client): skipped", file=sys.stderr)
        else:
            print("pgbench ...", file=sys.stderr)
            for clients in (1, 16):
                runs = [pgbench(bench, dsn, rows, seconds, clients, workdir) for _ in range(rounds)]
                pg_results.append(
                    (clients, statistics.median(t for t, _ in runs), statistics.median(m for _, m in runs))
                )
        if loads:
            print_loads(loads)
            print()
        for clients, tps, latency in pg_results:
            print(
                f"pgbench, prepared SELECT by primary key, {clients:>2} client(s): "
                f"{tps:>8,.0f} /s, mean {latency:,.0f} µs"
            )
        if loads:
            print()
            summarize(loads)
        for label, path in profiles:
            who, own, total = profile(path)
            print(f"\npy-spy, {label}: {total} samples of threads running")
            for name, count in who.most_common(6):
                print(f"  {count / total:6.1%}  {name}")
            print("  the sidecar's samples by innermost sidecar function:")
            for name, count in own.most_common(8):
                print(f"  {count / total:6.1%}    {name}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


def summarize(loads: list[Load]) -> None:
    by = {(r.server, r.method, r.shape): r for r in loads}
    for method in ("Get", "BatchGet"):
        for shape, _, _ in SHAPES:
            side = by.get(("sidecar (uvloop, TCP)", method, shape))
            floor = by.get(("floor: grpc.aio, uvloop", method, shape))
            if side is None or floor is None:
                continue
            extra = ""
            if side.cpu_us_per_call is not None and floor.cpu_us_per_call is not None:
                extra = f", CPU per call {side.cpu_us_per_call - floor.cpu_us_per_call:+,.0f} µs"
            print(
                f"{method:<8} {shape:<24}: sidecar / do-nothing grpc.aio (uvloop) = "
                f"{side.calls_per_second / floor.calls_per_second:.2f}x calls/s{extra}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=2, help="duration of each measurement (whole seconds)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each, the median reported")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="py-spy the sidecar under h2load")
    parser.add_argument("--keep", type=Path, help="a directory to keep py-spy's collapsed stacks in")
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    # As the sidecar sets it for itself (a floor variant turns the EventEngine back on).
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with database() as dsn:
        run(dsn, args.rows, args.seconds, args.rounds, args.profile, args.keep)


if __name__ == "__main__":
    main()

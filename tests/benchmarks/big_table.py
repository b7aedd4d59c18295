"""Big-table benchmark, side by side in one run (``./dev bench``).

One full table of 1 000 000 rows (5 columns, ~130 B of JSON a row), the sidecar
in its own process:
  (a) its load time and RSS above an idle sidecar (one caching an empty table of
      the same shape) vs plain loads of the same JSON into a dict of bytes, each
      in a fresh process on the sidecar's default event loop: asyncpg ``fetch``
      and ``COPY``;
  (b) Get latency of that table (random keys, 2 callers) at rest and during a
      whole-table reload, triggered by ``Invalidate(all_rows)`` and by a bulk
      UPDATE over the trigger's bulk threshold, and peak RSS during each reload
      vs steady state;
  (c) memory added, and other clients' Get latency, while 10
      ``Watch(initial_state=true)`` streams of the table are read slowly.
RSS is VmRSS sampled from /proc/PID/status every 20 ms, and VmHWM (the peak,
reset before each phase where the kernel allows). Prints tables and ratios;
there is no pass/fail.

    python -m tests.benchmarks.big_table [--rows 1000000] [--only-load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.big_rows"
IDLE_TABLE = "public.big_rows_idle"  # the same shape, empty: what an idle sidecar holds
PLAIN_SQL = f"SELECT id, row_to_json(t.*)::text FROM {TABLE} t"
BULK_THRESHOLD = 1000  # the sidecar's default triggers.bulk_threshold
GET_CALLERS = 2
POLL_SECONDS = 0.25  # how often a reload's end is looked for (Gets up to this late count as during it)
WATCHERS = 10
MB = 1024 * 1024


# ---------------------------------------------------------------- memory


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sampler:
    """VmRSS of a process, sampled in the background; its peak since ``start``."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.hwm_reset = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.hwm_reset = reset_peak(self.pid)
        self.peak = memory(self.pid)[0]
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, memory(self.pid)[0])
            await asyncio.sleep(self.interval)

    async def stop(self) -> int:
        """The peak: the samples' and, if it was reset at start, the kernel's."""
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        rss, hwm = memory(self.pid)
        return max(self.peak, rss, hwm if self.hwm_reset else 0)


async def steady_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS after things settle: the lowest of a few samples over ``seconds``."""
    samples = []
    for _ in range(10):
        samples.append(memory(pid)[0])
        await asyncio.sleep(seconds / 10)
    return min(samples)


# ---------------------------------------------------------------- table


async def prepare(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name, count in ((TABLE, rows), (IDLE_TABLE, 0)):
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            await conn.execute(
                f"CREATE TABLE {name} (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL, "
                "score integer NOT NULL, created timestamptz NOT NULL)"
            )
            await conn.execute(
                f"INSERT INTO {name} SELECT g, 'user ' || g, 'user' || g || '@example.com', g % 1000, "
                "now() - g * interval '1 minute' FROM generate_series(1, $1) g",
                count,
            )
            await conn.execute(f"VACUUM ANALYZE {name}")
        size = await conn.fetchval(f"SELECT avg(octet_length(row_to_json(t.*)::text)) FROM {TABLE} t")
        print(f"{rows:,} rows, {float(size or 0):.0f} B of JSON a row on average", file=sys.stderr)
    finally:
        await conn.close()


# ---------------------------------------------------------------- (a) plain baselines


async def plain_load(dsn: str, how: str) -> dict[str, Any]:
    """In a fresh process: load the table's JSON into a dict of bytes; time and memory."""
    conn = await asyncpg.connect(dsn)
    await conn.fetchval("SELECT 1")
    idle = memory(os.getpid())[0]
    rows: dict[int, bytes] = {}
    started = time.perf_counter()
    if how == "fetch":
        rows = {r[0]: r[1].encode() for r in await conn.fetch(PLAIN_SQL)}
    else:
        rest = b""

        async def sink(data: bytes) -> None:
            nonlocal rest
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                key, _, row = line.partition(b"\t")
                # (COPY's text format doubles backslashes; JSON holds no raw control characters)
                rows[int(key)] = row.replace(b"\\\\", b"\\") if b"\\" in row else row

        await conn.copy_from_query(PLAIN_SQL, output=sink, format="text")
    seconds = time.perf_counter() - started
    rss, hwm = memory(os.getpid())
    await conn.close()
    return {"seconds": seconds, "rows": len(rows), "idle": idle, "rss": rss, "hwm": hwm}


def run_loop(main: Any) -> Any:
    """On the event loop the sidecar picks by default (uvloop when installed): the same for both."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_plain(dsn: str, how: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.big_table", "--plain", how, "--dsn", dsn],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- the sidecar


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    target: str
    log: Path
    started: float
    serving_after: float = 0.0

    def load_line(self) -> tuple[int, float] | None:
        """(rows, seconds) from the sidecar's "loaded <table>: N rows in Xs" line."""
        text = self.log.read_text(errors="replace")
        found = re.search(rf"loaded {re.escape(TABLE)}: (\d+) rows(?: \(\d+ dropped\))? in ([0-9.]+)s", text)
        return (int(found[1]), float(found[2])) if found else None


async def start_sidecar(dsn: str, table: str, log_dir: str) -> Sidecar:
    port = free_port()
    log = Path(log_dir) / f"sidecar-{table}-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--dsn",
                dsn,
                "--table",
                table,
                "--install-triggers",
                "--listen",
                f"127.0.0.1:{port}",
                "--log-level",
                "info",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sidecar = Sidecar(process, f"127.0.0.1:{port}", log, time.perf_counter())
    try:
        await wait_serving(sidecar.target, process)
    except BaseException:
        stop(sidecar)
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    sidecar.serving_after = time.perf_counter() - sidecar.started
    return sidecar


def stop(sidecar: Sidecar) -> None:
    sidecar.process.terminate()
    try:
        sidecar.process.wait(20)
    except subprocess.TimeoutExpired:
        sidecar.process.kill()
        sidecar.process.wait()


# ---------------------------------------------------------------- (b), (c) Get latency


@dataclass
class Gets:
    """Get latencies of the table, by start time."""

    samples: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)
    errors: list[str] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for started, seconds in self.samples if start <= started <= end]


async def get_loop(stub: pb_grpc.CacheStub, rows: int, gets: Gets, stop_at: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop_at.is_set():
        key = pb.Key(parts=[pb.KeyPart(int_value=rng.randrange(1, rows + 1))])
        started = time.perf_counter()
        try:
            reply = await stub.Get(pb.GetRequest(table=TABLE, key=key), timeout=120)
            if not reply.found:
                gets.errors.append("not found")
        except grpc.aio.AioRpcError as exc:
            gets.errors.append(exc.code().name)
        gets.samples.append((started, time.perf_counter() - started))


class Getters:
    """``GET_CALLERS`` callers doing Gets until stopped."""

    def __init__(self, stub: pb_grpc.CacheStub, rows: int) -> None:
        self.gets = Gets()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(get_loop(stub, rows, self.gets, self._stop, s)) for s in range(GET_CALLERS)]

    async def stop(self) -> Gets:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.gets


@dataclass
class Latency:
    name: str
    values: list[float]
    note: str = ""

    def pct(self, q: float) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def load_info(stub: pb_grpc.CacheStub) -> pb.LoadProgress | None:
    for info in (await stub.ListTables(pb.ListTablesRequest(), timeout=30)).tables:
        if info.name == TABLE:
            return info.load if info.HasField("load") else None
    raise SystemExit(f"{TABLE} is not listed")


async def reload_phase(
    name: str, stub: pb_grpc.CacheStub, sidecar: Sidecar, rows: int, trigger: Any
) -> tuple[Latency, int, float]:
    """Gets while a reload that ``trigger`` causes runs: (latencies, peak RSS, reload seconds)."""
    before = await load_info(stub)
    assert before is not None
    sampler = Sampler(sidecar.process.pid)
    sampler.start()
    getters = Getters(stub, rows)
    await asyncio.sleep(0.2)  # Gets are flowing when the reload starts
    started = time.perf_counter()
    await trigger()
    deadline = started + 600
    while True:
        info = await load_info(stub)
        assert info is not None
        if info.completed > before.completed and not info.running:
            break
        if time.perf_counter() > deadline:
            raise SystemExit(f"{name}: no reload finished within 600 s")
        # (not more often: ListTables sums the size of every row, ~30 ms at 1 M rows, and
        # polling harder would slow the reload it measures)
        await asyncio.sleep(POLL_SECONDS)
    ended = time.perf_counter()
    gets = await getters.stop()
    peak = await sampler.stop()
    note = f"reload {info.seconds:.2f}s, {len(gets.errors)} errors" if gets.errors else f"reload {info.seconds:.2f}s"
    return Latency(name, gets.between(started, ended), note), peak, info.seconds


def watcher_process(target: str, streams: int, seconds: float, pause: float, out: str) -> None:
    """``streams`` Watch(initial_state) streams, each reading one message per ``pause``."""

    async def main() -> list[dict[str, Any]]:
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            stub = pb_grpc.CacheStub(channel)
            until = asyncio.get_running_loop().time() + seconds

            async def follow() -> dict[str, Any]:
                seen = {"messages": 0, "rows": 0, "done": False, "error": ""}
                call = stub.Watch(pb.WatchRequest(tables=[TABLE], initial_state=True))
                try:
                    async with asyncio.timeout_at(until):  # (also when no message comes at all)
                        async for message in call:
                            seen["messages"] += 1
                            kind = message.WhichOneof("kind")
                            if kind == "changes":
                                seen["rows"] += len(message.changes.events)
                            elif kind == "initial_state_done":
                                seen["done"] = True
                                break
                            await asyncio.sleep(pause)
                except TimeoutError:
                    pass
                except grpc.aio.AioRpcError as exc:
                    seen["error"] = exc.code().name
                finally:
                    call.cancel()
                return seen

            return await asyncio.gather(*(follow() for _ in range(streams)))

    Path(out).write_text(json.dumps(asyncio.run(main())))


async def watch_phase(
    stub: pb_grpc.CacheStub, sidecar: Sidecar, rows: int, seconds: float, pause: float
) -> tuple[Latency, int, list[dict[str, Any]]]:
    sampler = Sampler(sidecar.process.pid)
    sampler.start()
    getters = Getters(stub, rows)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        process = multiprocessing.get_context("spawn").Process(
            target=watcher_process, args=(sidecar.target, WATCHERS, seconds, pause, out.name)
        )
        started = time.perf_counter()
        process.start()
        await asyncio.to_thread(process.join, seconds + 120)
        ended = time.perf_counter()
        if process.is_alive():
            process.kill()
        streams: list[dict[str, Any]] = json.loads(Path(out.name).read_text() or "[]")
    gets = await getters.stop()
    peak = await sampler.stop()
    finished = sum(1 for s in streams if s["done"])
    received = sum(s["rows"] for s in streams)
    failed = [s["error"] for s in streams if s["error"]]
    note = f"{finished}/{WATCHERS} streams done, {received:,} rows sent in {ended - started:.1f}s"
    if failed:
        note += f", streams failed: {', '.join(failed)}"
    return (
        Latency(f"during {WATCHERS} slow initial-state Watch streams", gets.between(started, ended), note),
        peak,
        streams,
    )


# ---------------------------------------------------------------- the run


def _mb(value: float) -> str:
    return f"{value / MB:,.0f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "—"


async def run(args: argparse.Namespace, dsn: str) -> None:
    rows = args.rows
    print(f"preparing {rows:,} rows ...", file=sys.stderr)
    await prepare(dsn, rows)
    plain = {how: await asyncio.to_thread(run_plain, dsn, how) for how in ("fetch", "copy")}
    for how, result in plain.items():
        assert result["rows"] == rows, (how, result)
    with tempfile.TemporaryDirectory(prefix="big-table-") as log_dir:
        idle = await start_sidecar(dsn, IDLE_TABLE, log_dir)
        try:
            idle_rss = await steady_rss(idle.process.pid)
        finally:
            stop(idle)
        sidecar = await start_sidecar(dsn, TABLE, log_dir)
        try:
            await measure_sidecar(args, sidecar, idle_rss, plain)
        finally:
            stop(sidecar)


async def measure_sidecar(
    args: argparse.Namespace, sidecar: Sidecar, idle_rss: int, plain: dict[str, dict[str, Any]]
) -> None:
    rows = args.rows
    pid = sidecar.process.pid
    load_hwm = memory(pid)[1]
    steady = await steady_rss(pid)
    loaded = sidecar.load_line()
    if loaded is None or loaded[0] != rows:
        raise SystemExit(f"the sidecar's log tells no load of {rows} rows: {loaded}")
    load_seconds = loaded[1]
    fastest = min(result["seconds"] for result in plain.values())
    print()
    print(
        f"(a) loading {rows:,} rows (RSS above idle: the idle sidecar's {_mb(idle_rss)} MB; "
        "each plain load in a fresh process)"
    )
    print()
    print("| load | seconds | / fastest plain | RSS above idle, MB | peak above idle, MB |")
    print("|---|---|---|---|---|")
    print(
        f"| sidecar (start to SERVING: {sidecar.serving_after:.2f} s) | {load_seconds:.2f} "
        f"| {_ratio(load_seconds, fastest)} | {_mb(steady - idle_rss)} | {_mb(load_hwm - idle_rss)} |"
    )
    for how, label in (("fetch", "asyncpg fetch -> dict of bytes"), ("copy", "asyncpg COPY -> dict of bytes")):
        result = plain[how]
        print(
            f"| {label} | {result['seconds']:.2f} | {_ratio(result['seconds'], fastest)} "
            f"| {_mb(result['rss'] - result['idle'])} | {_mb(result['hwm'] - result['idle'])} |"
        )
    if args.only_load:
        return

    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.CacheStub(channel)
        if await load_info(stub) is None:
            raise SystemExit("this sidecar does not report its loads in ListTables (TableInfo.load): use --only-load")
        getters = Getters(stub, rows)
        await asyncio.sleep(args.rest_seconds)
        rest = Latency("at rest", [seconds for _, seconds in (await getters.stop()).samples])

        async def invalidate() -> None:
            await stub.Invalidate(pb.InvalidateRequest(table=TABLE, all_rows=True), timeout=600)

        async def bulk_update() -> None:
            conn = await asyncpg.connect(args.dsn)
            try:
                await conn.execute(f"UPDATE {TABLE} SET score = score + 1 WHERE id <= $1", BULK_THRESHOLD * 5)
            finally:
                await conn.close()

        steady = await steady_rss(pid)
        by_invalidate, invalidate_peak, _ = await reload_phase(
            "during a reload: Invalidate(all_rows)", stub, sidecar, rows, invalidate
        )
        steady_after = await steady_rss(pid)
        by_bulk, bulk_peak, _ = await reload_phase(
            f"during a reload: bulk UPDATE of {BULK_THRESHOLD * 5:,} rows", stub, sidecar, rows, bulk_update
        )
        steady_watch = await steady_rss(pid)
        by_watch, watch_peak, _ = await watch_phase(stub, sidecar, rows, args.watch_seconds, args.watch_pause)

    print()
    print(f"(b, c) Get latency of {TABLE}, random keys, {GET_CALLERS} callers")
    print()
    print("| Gets | calls | p50 ms | p99 ms | max ms | p99 / at rest | max / at rest | |")
    print("|---|---|---|---|---|---|---|---|")
    for latency in (rest, by_invalidate, by_bulk, by_watch):
        print(
            f"| {latency.name} | {len(latency.values):,} | {latency.pct(0.5):.2f} | {latency.pct(0.99):.2f} "
            f"| {latency.pct(1.0):.2f} | {_ratio(latency.pct(0.99), rest.pct(0.99))} "
            f"| {_ratio(latency.pct(1.0), rest.pct(1.0))} | {latency.note} |"
        )
    print()
    print("| memory | MB | / steady | added, MB |")
    print("|---|---|---|---|")
    print(f"| steady state, loaded | {_mb(steady)} | 1.00x | |")
    for label, peak, base in (
        ("peak during the Invalidate(all_rows) reload", invalidate_peak, steady),
        ("peak during the bulk-UPDATE reload", bulk_peak, steady_after),
        (f"peak during {WATCHERS} slow initial-state Watch streams", watch_peak, steady_watch),
    ):
        print(f"| {label} | {_mb(peak)} | {_ratio(peak, base)} | {_mb(peak - base)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only-load", action="store_true", help="(a) only: the load against the plain loads")
    parser.add_argument("--rest-seconds", type=float, default=3.0, help="Gets at rest, before the reloads")
    parser.add_argument("--watch-seconds", type=float, default=20.0, help="how long the Watch streams read at most")
    parser.add_argument("--watch-pause", type=float, default=0.005, help="seconds each Watch stream waits per message")
    parser.add_argument("--plain", choices=("fetch", "copy"), help=argparse.SUPPRESS)  # (one plain load, in-process)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(run_loop(plain_load(args.dsn, args.plain))))
        return
    from sidecar.cli import GRPC_EXPERIMENTS

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from tests.support.pg import database

    with database() as dsn:
        args.dsn = dsn
        asyncio.run(run(args, dsn))


if __name__ == "__main__":
    main()

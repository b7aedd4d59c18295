"""The shared-memory store against gRPC, a near-cache and asyncpg, with issue 22's targets.

Side by side in one run, and every figure of issue 22's "Done when" list with its
target in one table at the end:

    python -m tests.benchmarks.shared_memory [--rows 1000000] [--reads 20000] [--seconds 2]
        [--processes 1,2,4] [--visible 200] [--load-rounds 3] [--no-memory] [--no-node]

- latency (p50/p99) of Get and BatchGet(100), measured in a FRESH reader process
  (spawned after the store is served): every store Get reads a key no read of that
  process touched before (distinct keys drawn at random from the whole table), each
  in a fresh LMDB read transaction; gRPC Get and BatchGet in the same process;
  asyncpg and a near-cache hit beside them;
- Get throughput (keys/s) from 1, 2, 4 reader processes at once, store vs gRPC;
- private memory: a fresh process reads the whole table through the store, another
  fills a near-cache with the whole table; each one's growth of anonymous memory
  (RssAnon) -- the store's pages are tmpfs pages, counted once per pod, not per
  process -- and of its resident set;
- the 1 M-row load: sidecar start to SERVING without the store vs to the store served,
  in interleaved rounds (the median ratio);
- commit -> visible, polled (0.1 ms apart) through the store and over gRPC alternately;
- the Node reader (clients/node/bench/shared-memory.js, fresh process), when node
  and the client's node_modules are there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from cache_sidecar_client import Client

from tests.benchmarks.run import free_port, wait_serving

TABLE = "public.shm_rows"
# Between two looks while commit -> visible is measured, on either path: a store reader spinning
# without a pause would take a CPU from the daemon and PostgreSQL on a 2-core machine.
POLL = 0.0001
BATCH = 100
NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


def stats(samples: list[int]) -> tuple[float, float]:
    """(p50, p99) in µs of nanosecond samples."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] / 1000, ordered[int(0.99 * len(ordered))] / 1000


def timed(read: Callable[[Any], object], items: list[Any]) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for item in items:
        start = clock()
        read(item)
        samples.append(clock() - start)
    return samples


def memory() -> dict[str, int]:
    """This process's RssAnon and RssFile (kB), from /proc."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "RssShmem"):
            found[name] = int(value.split()[0])
    return found


# ---------------------------------------------------------------- in fresh reader processes


def _latencies(target: str, store: str, rows: int, reads: int, results) -> None:  # type: ignore[no-untyped-def]
    """Get and BatchGet(100) latency through the store and over gRPC, in a fresh process:
    every store read is the first touch of its keys in this process."""
    rng = random.Random(7)
    keys = rng.sample(range(1, rows + 1), reads)  # distinct: each store Get a first touch
    batch_count = max(10, reads // 100)
    spare = rng.sample(range(1, rows + 1), min(rows, batch_count * BATCH))
    batches = [spare[i : i + BATCH] for i in range(0, len(spare), BATCH)]
    out: dict[str, list[int]] = {}
    with Client(target, shared_memory=store) as local, Client(target) as remote:
        assert local._store is not None and local._store.refusal(TABLE) is None, "the store is not served"
        remote.get(TABLE, 1)  # (the channel connected)
        out["Get, store (first touch)"] = timed(lambda k: local.get(TABLE, k), keys)
        assert local._store.reads == len(keys), "not every Get came from the store"
        out["Get, gRPC"] = timed(lambda k: remote.get(TABLE, k), keys[: reads // 10])
        out["BatchGet(100), store (first touch)"] = timed(lambda b: local.batch_get(TABLE, b), batches)
        out["BatchGet(100), gRPC"] = timed(lambda b: remote.batch_get(TABLE, b), batches[: max(10, len(batches) // 4)])
        out["Get, store (touched before)"] = timed(lambda k: local.get(TABLE, k), keys)
    with Client(target, shared_memory=store, decoder=lambda row: row) as raw:
        out["BatchGet(100), store, rows not decoded"] = timed(lambda b: raw.batch_get(TABLE, b), batches)
    results.put(out)


def _throughput(target: str, store: str | None, rows: int, seconds: float, start_at: float, results) -> None:  # type: ignore[no-untyped-def]
    """In a reader process: Gets of random keys for ``seconds``, from ``start_at`` on."""
    rng = random.Random(os.getpid())
    with Client(target, shared_memory=store) as client:
        client.get(TABLE, 1)  # (connected / store opened before the clock starts)
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.perf_counter() + seconds
        cpu = time.process_time()
        done = 0
        while time.perf_counter() < end:
            for _ in range(100):
                client.get(TABLE, rng.randrange(1, rows + 1))
            done += 100
        cpu = time.process_time() - cpu
        reads = client._store.reads if client._store is not None else 0
    results.put((done / seconds, reads, done / max(cpu, 1e-9)))


def _whole_table(target: str, store: str | None, rows: int, results) -> None:  # type: ignore[no-untyped-def]
    """In a fresh process: read every row once, through the store (``store``) or into a
    near-cache that holds the whole table (``store`` None); the memory before and after."""
    near = None if store is not None else {TABLE: rows}
    with Client(target, shared_memory=store, near_cache=near) as client:
        client.get(TABLE, 1)
        if near is not None:
            while not client.near_cache.connected:  # type: ignore[union-attr]
                time.sleep(0.01)
        before = memory()
        started = time.perf_counter()
        found = 0
        for first in range(1, rows + 1, 1000):
            for row in client.batch_get(TABLE, list(range(first, min(first + 1000, rows + 1)))):
                found += row is not None
        took = time.perf_counter() - started
        after = memory()
        held = len(client.near_cache) if client.near_cache is not None else 0
        store_reads = client._store.reads if client._store is not None else 0
    results.put({"before": before, "after": after, "found": found, "held": held, "reads": store_reads, "s": took})


def in_fresh_process(target: Callable[..., None], *args: Any, timeout: float = 600) -> Any:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    try:
        return results.get(timeout=timeout)
    finally:
        process.join(60)


def keys_per_second(target: str, store: str | None, rows: int, processes: int, seconds: float) -> tuple[float, float]:
    """Keys/s of ``processes`` reader processes at once, and keys per CPU-second of a process
    (their mean: what each gets done with the CPU it gets, whatever else runs on the machine)."""
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
        assert all(reads > 0 for _, reads, _ in answers), "the store answered no read"
    return float(sum(rate for rate, _, _ in answers)), sum(per_cpu for _, _, per_cpu in answers) / len(answers)


# ---------------------------------------------------------------- in this process


async def load(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, score int,"
        " version int NOT NULL DEFAULT 0)"
    )
    await conn.execute(
        f"INSERT INTO {TABLE} SELECT g, 'user ' || g, 'user' || g || '@example.com', g % 100 "
        f"FROM generate_series(1, {rows}) g"
    )
    await conn.execute(f"VACUUM ANALYZE {TABLE}")
    await conn.close()


def time_to_serving(dsn: str, store: str | None) -> float:
    """Seconds from a sidecar's start to SERVING (the table loaded) and, with a store, to the
    store serving the table too."""
    target = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--listen", target, "--install-triggers"]
    command += ["--table", TABLE, "--log-level", "warning", *(["--shared-memory", store] if store else [])]
    started = time.perf_counter()
    sidecar = subprocess.Popen(command, env={**os.environ})
    try:
        asyncio.run(wait_serving(target, sidecar))
        if store is not None:
            with Client(target, shared_memory=store) as probe:
                while probe._store is not None and probe._store.refusal(TABLE) is not None:
                    time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        sidecar.terminate()
        sidecar.wait(30)


def load_times(dsn: str, rounds: int) -> list[tuple[float, float]]:
    """(without the store, with it) of ``rounds`` interleaved starts, each with a new store."""
    times = []
    for _ in range(rounds):
        without = time_to_serving(dsn, None)
        store = new_store()
        try:
            times.append((without, time_to_serving(dsn, store)))
        finally:
            shutil.rmtree(store, ignore_errors=True)
    return times


def new_store() -> str:
    return tempfile.mkdtemp(prefix="cache-sidecar-shm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


async def asyncpg_reads(dsn: str, keys: list[int], batches: list[list[int]]) -> dict[str, list[int]]:
    conn = await asyncpg.connect(dsn)
    try:
        one = await conn.prepare(f"SELECT * FROM {TABLE} WHERE id = $1")
        many = await conn.prepare(f"SELECT * FROM {TABLE} WHERE id = ANY($1::int[])")
        out: dict[str, list[int]] = {"Get, asyncpg SELECT by id": [], "BatchGet(100), asyncpg = ANY": []}
        clock = time.perf_counter_ns
        for key in keys:
            start = clock()
            await one.fetchrow(key)
            out["Get, asyncpg SELECT by id"].append(clock() - start)
        for batch in batches:
            start = clock()
            await many.fetch(batch)
            out["BatchGet(100), asyncpg = ANY"].append(clock() - start)
        return out
    finally:
        await conn.close()


async def commit_to_visible(dsn: str, target: str, store: str, rows: int, samples: int) -> dict[str, list[int]]:
    """From an UPDATE's commit acknowledged until a Get returns the new version, polled
    through the store and over gRPC in turn (same run, same writer, alternating), ``POLL``
    seconds apart."""
    conn = await asyncpg.connect(dsn)
    rng = random.Random(11)
    out: dict[str, list[int]] = {"commit -> visible, store": [], "commit -> visible, gRPC": []}
    try:
        with Client(target, shared_memory=store) as local, Client(target) as remote:
            for i in range(2 * samples):
                path, cache = ("store", local) if i % 2 == 0 else ("gRPC", remote)
                key = rng.randrange(1, rows + 1)
                version = await conn.fetchval(
                    f"UPDATE {TABLE} SET version = version + 1 WHERE id = $1 RETURNING version", key
                )
                start = time.perf_counter_ns()  # the commit is acknowledged
                while (cache.get(TABLE, key) or {"version": -1})["version"] < version:
                    time.sleep(POLL)
                out[f"commit -> visible, {path}"].append(time.perf_counter_ns() - start)
            assert local._store is not None and local._store.refused == 0, "a store read went over gRPC"
    finally:
        await conn.close()
    return out


def node_reads(target: str, store: str, rows: int, reads: int) -> dict[str, Any] | None:
    """The Node reader's figures (a fresh node process), or None when node or the Node
    client's dependencies are not installed (say so in the output)."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "koffi").is_dir():
        return None
    script = NODE_DIR / "bench" / "shared-memory.js"
    done = subprocess.run(
        [node, str(script), target, store, TABLE, str(rows), str(reads)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(
    dsn: str,
    rows: int,
    reads: int,
    seconds: float,
    processes: list[int],
    visible: int,
    measure_memory: bool,
    node: bool,
    load_rounds: int,
) -> None:
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    asyncio.run(load(dsn, rows))
    starts = load_times(dsn, load_rounds)
    store = new_store()
    target = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "sidecar", "serve", "--dsn", dsn, "--listen", target, "--install-triggers"]
    command += ["--table", TABLE, "--log-level", "warning", "--shared-memory", store]
    sidecar = subprocess.Popen(command, env={**os.environ})
    rng = random.Random(5)
    results: dict[str, list[int]] = {}
    rates: dict[tuple[str, int], tuple[float, float]] = {}
    whole: dict[str, dict[str, Any]] = {}
    node_figures: dict[str, Any] | None = None
    try:
        asyncio.run(wait_serving(target, sidecar))
        with Client(target, shared_memory=store) as probe:
            while probe._store is not None and probe._store.refusal(TABLE) is not None:
                time.sleep(0.01)
        results.update(in_fresh_process(_latencies, target, store, rows, reads))
        keys = [rng.randrange(1, rows + 1) for _ in range(reads // 10)]
        batches = [[rng.randrange(1, rows + 1) for _ in range(BATCH)] for _ in range(max(10, reads // 400))]
        results.update(asyncio.run(asyncpg_reads(dsn, keys, batches)))
        with Client(target, near_cache={TABLE: rows}) as near:
            while not near.near_cache.connected:  # type: ignore[union-attr]
                time.sleep(0.01)
            for key in keys:  # warm: the measured keys near-cached
                near.get(TABLE, key)
            for batch in batches:
                near.batch_get(TABLE, batch)
            results["Get, near-cache hit"] = timed(lambda k: near.get(TABLE, k), keys)
            results["BatchGet(100), near-cache hit"] = timed(lambda b: near.batch_get(TABLE, b), batches)
        if node:
            node_figures = node_reads(target, store, rows, reads)
        results.update(asyncio.run(commit_to_visible(dsn, target, store, rows, visible)))
        for kind in ("store", "gRPC"):
            for n in processes:
                rates[(kind, n)] = keys_per_second(target, store if kind == "store" else None, rows, n, seconds)
        if measure_memory:
            whole["store"] = in_fresh_process(_whole_table, target, store, rows)
            whole["near-cache"] = in_fresh_process(_whole_table, target, None, rows)
    finally:
        sidecar.terminate()
        sidecar.wait(30)
        shutil.rmtree(store, ignore_errors=True)
    load_after = os.getloadavg()
    report(rows, started_at, load_before, load_after, starts, results, rates, processes, whole, node_figures)


def report(
    rows: int,
    started_at: str,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    starts: list[tuple[float, float]],
    results: dict[str, list[int]],
    rates: dict[tuple[str, int], tuple[float, float]],
    processes: list[int],
    whole: dict[str, dict[str, Any]],
    node: dict[str, Any] | None,
) -> None:
    print(
        f"\n{started_at}: {rows:,} rows, {os.cpu_count()} cores; load average (1 min) "
        f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end\n"
    )
    base = stats(results["Get, gRPC"])[0]
    batch_base = stats(results["BatchGet(100), gRPC"])[0]
    print(f"| {'read (one process)':<40} | {'p50 µs':>9} | {'p99 µs':>9} | {'gRPC p50 / this p50':>20} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 22}|")
    for name, samples in results.items():
        if name.startswith("commit"):
            continue
        p50, p99 = stats(samples)
        ratio = (batch_base if name.startswith("Batch") else base) / p50
        print(f"| {name:<40} | {p50:>9,.1f} | {p99:>9,.1f} | {ratio:>19,.1f}x |")
    if node is not None:
        for name in ("Get, store (first touch)", "Get, store (touched before)", "BatchGet(100), store", "Get, gRPC"):
            p50, p99 = node[name]
            print(f"| {'Node ' + name:<40} | {p50:>9,.1f} | {p99:>9,.1f} | {node['Get, gRPC'][0] / p50:>19,.1f}x |")
    else:
        print("\n(Node reader not measured: node, or clients/node/node_modules with koffi, missing)")
    heads = [f"{n} process(es)".rjust(14) for n in processes] + [f"{n} / 1".rjust(6) for n in processes[1:]]
    print(f"\n| {'Get throughput, keys/s':<30} | " + " | ".join(heads) + " |")
    for kind in ("store", "gRPC"):
        for what, at in (("", 0), (" per CPU-second", 1)):
            one = rates[(kind, processes[0])][at]
            cells = [f"{rates[(kind, n)][at]:>14,.0f}" for n in processes] + [
                f"{rates[(kind, n)][at] / one:>5.2f}x" for n in processes[1:]
            ]
            print(f"| {kind + what:<30} | " + " | ".join(cells) + " |")
    print("(per CPU-second: keys a reader process read per second of CPU it got: for gRPC the client's CPU only)")
    visible_store, visible_grpc = stats(results["commit -> visible, store"]), stats(results["commit -> visible, gRPC"])
    print(f"\n| {'commit -> visible':<26} | {'p50 µs':>9} | {'p99 µs':>9} |")
    print(f"| {'through the store':<26} | {visible_store[0]:>9,.0f} | {visible_store[1]:>9,.0f} |")
    print(f"| {'over gRPC':<26} | {visible_grpc[0]:>9,.0f} | {visible_grpc[1]:>9,.0f} |")
    growth: dict[str, tuple[int, int]] = {}
    if whole:
        print(f"\n| {'read the whole table':<22} | {'rows':>9} | {'s':>6} ", end="")
        print(f"| {'RssAnon growth kB':>17} | {'Rss growth kB':>13} |")
        for kind, data in whole.items():
            before, after = data["before"], data["after"]
            anon = after["RssAnon"] - before["RssAnon"]
            rss = sum(after.values()) - sum(before.values())
            growth[kind] = (anon, rss)
            print(f"| {kind:<22} | {data['found']:>9,} | {data['s']:>6.1f} | {anon:>17,} | {rss:>13,} |")
        print("(store: its RssFile/RssShmem growth is the store's tmpfs pages, shared by every process of the pod)")
    ratios = sorted(on / off for off, on in starts)
    load_ratio = ratios[len(ratios) // 2]
    print("\nsidecar start to SERVING without the store / to the store served, interleaved rounds: ", end="")
    print(
        ", ".join(f"{off:.1f} s / {on:.1f} s ({on / off:.2f}x)" for off, on in starts) + f"; median {load_ratio:.2f}x"
    )
    # the "Done when", one line each
    store_p50 = stats(results["Get, store (first touch)"])[0]
    batch_p50 = stats(results["BatchGet(100), store (first touch)"])[0]
    checks: list[tuple[str, str, bool | None]] = [
        ("Get from the store p50, first touch, fresh process ≤ 5 µs", f"{store_p50:.1f} µs", store_p50 <= 5),
        ("... ≥ 100x the gRPC Get p50", f"{base / store_p50:,.0f}x ({base:,.0f} µs)", base / store_p50 >= 100),
        ("BatchGet(100) from the store p50 ≤ 100 µs", f"{batch_p50:.1f} µs", batch_p50 <= 100),
    ]
    if 2 in processes:
        scale = rates[("store", 2)][0] / rates[("store", 1)][0]
        checks.append(("2 reader processes ≥ 1.7x the keys/s of 1", f"{scale:.2f}x", scale >= 1.7))
    if growth:
        share = growth["store"][0] / max(1, growth["near-cache"][0])
        checks.append(
            (
                "private memory growth, whole table ≤ 5 % of the near-cache's",
                f"{share:.1%} ({growth['store'][0]:,} kB vs {growth['near-cache'][0]:,} kB)",
                share <= 0.05,
            )
        )
    checks.append(("load with the store ≤ 1.3x without", f"{load_ratio:.2f}x", load_ratio <= 1.3))
    ratio = visible_store[1] / visible_grpc[1]
    checks.append(("commit -> visible p99, store ≤ 2x gRPC's", f"{ratio:.2f}x", ratio <= 2))
    if node is not None:
        node_p50 = node["Get, store (first touch)"][0]
        checks.append(("Node Get from the store p50 ≤ 5 µs", f"{node_p50:.1f} µs", node_p50 <= 5))
    else:
        checks.append(("Node Get from the store p50 ≤ 5 µs", "not measured", None))
    print(f"\n| {'Done when':<62} | {'measured':<34} | met |")
    for what, figure, met in checks:
        print(f"| {what:<62} | {figure:<34} | {'-' if met is None else 'yes' if met else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=20_000, help="store Gets measured (distinct keys)")
    parser.add_argument("--seconds", type=float, default=2.0, help="each throughput run")
    parser.add_argument("--processes", default="1,2,4", help="reader process counts of the throughput runs")
    parser.add_argument("--visible", type=int, default=200, help="commit -> visible samples per path")
    parser.add_argument("--no-memory", action="store_true", help="skip the whole-table memory runs")
    parser.add_argument("--no-node", action="store_true", help="skip the Node reader")
    parser.add_argument("--load-rounds", type=int, default=3, help="interleaved starts without and with the store")
    args = parser.parse_args()
    processes = sorted({int(n) for n in args.processes.split(",")} | {1})
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        run(
            dsn,
            args.rows,
            args.reads,
            args.seconds,
            processes,
            args.visible,
            not args.no_memory,
            not args.no_node,
            args.load_rounds,
        )


if __name__ == "__main__":
    main()

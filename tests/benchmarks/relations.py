"""Relations and index queries, side by side in one run (``./dev bench``).

Three tables of a realistic shape -- cities, users (each in a city) and
orders (PRIMARY KEY (user_id, order_no), inserted interleaved across users as
they would arrive over time) -- and one relation over their join: a row per
user with the city and the user's order statistics. Compared:

  * relation Get through the sidecar  vs  the join for that user with asyncpg
    (and through the Python client's near-cache, the way to microsecond reads)
  * index Query on the relation (the users of a city)  vs  the join filtered by city
  * index Query on the relation (the top 10 spenders, a range index)  vs  the
    join ordered by spend (the database must aggregate every user for it)
  * index Query on a plain cached table (20 users from a name on, a range
    index)  vs  the same SQL served by a btree index

Each with 1 caller and with 16 concurrent callers (asyncpg: a pool of as many
connections), from one asyncio client process. Prints a table and the ratios.

    python -m tests.benchmarks.relations [--users 10000] [--orders 400] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from cache_sidecar_client import AsyncClient

from tests.benchmarks.run import Result, free_port, measure, table, wait_serving

CITIES = 1000
SCHEMA_SQL = """
DROP TABLE IF EXISTS bench.orders, bench.users, bench.cities;
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE bench.cities (city_id int PRIMARY KEY, name text NOT NULL, country text NOT NULL);
CREATE TABLE bench.users (
    user_id int PRIMARY KEY, name text NOT NULL, email text NOT NULL,
    city_id int NOT NULL REFERENCES bench.cities
);
CREATE TABLE bench.orders (
    user_id int NOT NULL REFERENCES bench.users, order_no int NOT NULL,
    total numeric(10, 2) NOT NULL, created timestamptz NOT NULL,
    PRIMARY KEY (user_id, order_no)
);
CREATE INDEX ON bench.users (city_id);
CREATE INDEX ON bench.users (name COLLATE "C");
"""
COLUMNS = """u.user_id, u.name, u.email, c.city_id, c.name AS city, c.country,
       count(o.order_no) AS orders, coalesce(sum(o.total), 0) AS spent, max(o.created) AS last_order,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY o.total) AS median_order"""
JOIN = "bench.users u JOIN bench.cities c USING (city_id) LEFT JOIN bench.orders o USING (user_id)"
RELATION_QUERY = f"SELECT {COLUMNS} FROM {JOIN} GROUP BY u.user_id, c.city_id"
# What an application would run without the sidecar, for the same answers:
BY_USER_SQL = f"SELECT {COLUMNS} FROM {JOIN} WHERE u.user_id = $1 GROUP BY u.user_id, c.city_id"
BY_CITY_SQL = f"SELECT {COLUMNS} FROM {JOIN} WHERE c.city_id = $1 GROUP BY u.user_id, c.city_id ORDER BY u.user_id"
TOP_SPENDERS_SQL = f"{RELATION_QUERY} ORDER BY spent DESC, user_id DESC LIMIT 10"
NAMES_FROM_SQL = 'SELECT * FROM bench.users WHERE name COLLATE "C" >= $1 ORDER BY name COLLATE "C", user_id LIMIT 20'

CONFIG = f'''
[[tables]]
name = "bench.users"
[[tables.indexes]]
name = "by_name"
columns = ["name"]
range = true

[[tables]]
name = "bench.user_summary"
query = """{RELATION_QUERY}"""
key = ["user_id"]
[tables.sources]
"bench.users" = {{ user_id = "user_id" }}
"bench.cities" = {{ city_id = "city_id" }}
"bench.orders" = {{ user_id = "user_id" }}
[[tables.indexes]]
name = "by_city"
columns = ["city_id"]
[[tables.indexes]]
name = "by_spent"
columns = ["spent"]
range = true
'''


async def prepare(dsn: str, users: int, orders: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        await conn.execute(
            "INSERT INTO bench.cities SELECT g, 'City ' || g, 'Country ' || (g % 50) "
            f"FROM generate_series(1, {CITIES}) g"
        )
        await conn.execute(
            "INSERT INTO bench.users SELECT g, 'User ' || md5(g::text), 'user' || g || '@example.com', "
            f"1 + (g * 7919) % {CITIES} FROM generate_series(1, $1) g",
            users,
        )
        # interleaved across users, as orders arrive over time (a user's orders are not adjacent on disk)
        await conn.execute(
            "INSERT INTO bench.orders SELECT u, o, (random() * 200)::numeric(10, 2), "
            "now() - (o * interval '1 hour') FROM generate_series(1, $2) o, generate_series(1, $1) u",
            users,
            orders,
        )
        await conn.execute("ANALYZE bench.cities, bench.users, bench.orders")
    finally:
        await conn.close()


async def compare(dsn: str, target: str, users: int, seconds: float) -> list[Result]:
    pool = await asyncpg.create_pool(dsn, min_size=16, max_size=16)
    names = [r[0] for r in await pool.fetch("SELECT name FROM bench.users ORDER BY random() LIMIT 1000")]
    results: list[Result] = []
    try:
        async with AsyncClient(target, timeout=30) as cache:
            relation = "bench.user_summary"

            async def get(n: int) -> object:
                return await cache.get(relation, 1 + n % users)

            async def join(n: int) -> object:
                return await pool.fetch(BY_USER_SQL, 1 + n % users)

            async def by_city(n: int) -> object:
                return await cache.query(relation, "by_city", [1 + n % CITIES])

            async def join_by_city(n: int) -> object:
                return await pool.fetch(BY_CITY_SQL, 1 + n % CITIES)

            async def top_spenders(n: int) -> object:
                return await cache.query(relation, "by_spent", limit=10, descending=True)

            async def join_top_spenders(n: int) -> object:
                return await pool.fetch(TOP_SPENDERS_SQL)

            async def names_from(n: int) -> object:
                return await cache.query("bench.users", "by_name", lower=names[n % len(names)], limit=20)

            async def sql_names_from(n: int) -> object:
                return await pool.fetch(NAMES_FROM_SQL, names[n % len(names)])

            # check that each pair answers the same before timing them
            (joined,), cached = await join(41), await get(41)
            assert (joined["user_id"], joined["orders"]) == (cached["user_id"], cached["orders"])
            assert [r["user_id"] for r in await join_by_city(7)] == [r["user_id"] for r in await by_city(7)]
            top = await top_spenders(0)
            assert [r["user_id"] for r in await join_top_spenders(0)] == [r["user_id"] for r in top]
            assert [r["user_id"] for r in await sql_names_from(3)] == [r["user_id"] for r in await names_from(3)]

            # the product's way to microsecond reads: the client's near-cache, kept coherent by Watch
            async with AsyncClient(target, timeout=30, near_cache={relation: users}) as near:
                assert near.near_cache is not None
                while not near.near_cache.connected:  # (fills are kept only while the stream is up)
                    await asyncio.sleep(0.01)
                for first in range(1, users + 1, 1000):
                    await near.batch_get(relation, list(range(first, min(first + 1000, users + 1))))
                misses = near.near_cache.stats.misses

                async def near_get(n: int) -> object:
                    return await near.get(relation, 1 + n % users)

                for callers in (1, 16):
                    print(f"  relation Get, {callers} caller(s) ...", file=sys.stderr)
                    results.append(await measure("relation Get (sidecar)", get, callers, seconds))
                    results.append(await measure("the join for one user (asyncpg)", join, callers, seconds))
                    results.append(await measure("relation Get (near-cache hit)", near_get, callers, seconds))
                    results.append(await measure("the join for one user (asyncpg)", join, callers, seconds))
                assert near.near_cache.stats.misses == misses  # every timed read was a hit

            pairs = [
                ("Query by_city (sidecar)", by_city, "the join for one city (asyncpg)", join_by_city),
                ("Query 20 users by_name (sidecar)", names_from, "users by name, btree (asyncpg)", sql_names_from),
            ]
            for callers in (1, 16):
                for sidecar_name, sidecar_call, sql_name, sql_call in pairs:
                    print(f"  {sidecar_name} / {sql_name}, {callers} caller(s) ...", file=sys.stderr)
                    results.append(await measure(sidecar_name, sidecar_call, callers, seconds))
                    results.append(await measure(sql_name, sql_call, callers, seconds))
            # (1 caller only: 16 concurrent full aggregations take minutes on a small machine)
            print("  top 10 spenders, 1 caller ...", file=sys.stderr)
            results.append(await measure("Query top 10 by_spent (sidecar)", top_spenders, 1, seconds))
            results.append(
                await measure("top 10 spenders, join (asyncpg)", join_top_spenders, 1, seconds * 2, warmup=1)
            )
    finally:
        await pool.close()
    return results


async def run(dsn: str, users: int, orders: int, seconds: float) -> None:
    print(f"preparing {users:,} users with {orders} orders each ({users * orders:,} orders) ...", file=sys.stderr)
    started = time.perf_counter()
    await prepare(dsn, users, orders)
    print(f"  prepared in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    target = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "sidecar.toml"
        config.write_text(CONFIG)
        sidecar = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "serve",
                "--dsn",
                dsn,
                "--config",
                str(config),
                "--listen",
                target,
                "--install-triggers",
                "--log-level",
                "warning",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            started = time.perf_counter()
            await wait_serving(target, sidecar)
            print(f"  sidecar loaded the relation in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            results = await compare(dsn, target, users, seconds)
        finally:
            sidecar.terminate()
            sidecar.wait(10)
    print(table(results))
    print()
    for a, b in zip(results[::2], results[1::2], strict=True):
        print(
            f"{a.callers:>2} caller(s): {a.name} vs {b.name}: {a.throughput / b.throughput:,.1f}x calls/s, "
            f"p50 {b.pct(0.5) / a.pct(0.5):,.1f}x lower"
        )
    join_p50 = next(r for r in results if r.name.startswith("the join for one user") and r.callers == 1).pct(0.5)
    print(f"\nthe per-user join costs {join_p50 / 1000:.2f} ms (p50, 1 caller) -- the target applies from 1 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--orders", type=int, default=400, help="orders per user")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()
    from sidecar.cli import GRPC_EXPERIMENTS
    from tests.support.pg import database

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    with database() as dsn:
        asyncio.run(run(dsn, args.users, args.orders, args.seconds))


if __name__ == "__main__":
    main()

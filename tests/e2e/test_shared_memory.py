"""The shared-memory store with the daemon as a process and a real PostgreSQL:
rows read from the store equal rows read over gRPC after every kind of change;
readers see whole transactions only; STRONG reads see every commit before them;
readers stop trusting the store when the daemon dies, stops or loses its listener.

(LMDB allows one open environment per file per process, so the daemon runs in
its own process here, as it does in a pod.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from cache_sidecar_client import AsyncClient
from cache_sidecar_client import shared_memory as shm

from tests.e2e.test_process import EXE, clean_env, free_port, wait_serving
from tests.support.waiting import eventually

Start = Callable[..., tuple[str, subprocess.Popen[str]]]

pytestmark = pytest.mark.captures("notify", "logical")


@pytest.fixture
def start(postgres, tmp_path, capture) -> Iterator[Start]:
    """Start a daemon process keeping ``tables`` in the store: ``(target, process)``."""
    processes: list[subprocess.Popen[str]] = []

    def run(tables: list[str], *flags: str, **environ: str) -> tuple[str, subprocess.Popen[str]]:
        port = free_port()
        command = [*EXE, "serve", "--dsn", postgres.dsn, "--listen", f"127.0.0.1:{port}", "--install-triggers"]
        command += ["--shared-memory", str(tmp_path / "store"), "--channel", f"cs_{secrets.token_hex(4)}"]
        command += ["--capture", capture]
        for table in tables:
            command += ["--table", table]
        process = subprocess.Popen(
            [*command, *flags], env=clean_env(**environ), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        processes.append(process)
        target = f"127.0.0.1:{port}"
        wait_serving(target, process)
        return target, process

    yield run
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


@pytest.fixture
def store_dir(tmp_path) -> str:
    return str(tmp_path / "store")


def snapshot(directory: str, table: str) -> tuple[shm.State | None, shm.TableState | None, dict[bytes, bytes]]:
    """Everything the store holds of ``table``, read in one transaction (the test's own view)."""
    import lmdb

    env = lmdb.open(directory, readonly=True, create=False, lock=True, max_dbs=64)
    try:
        meta = env.open_db(shm.META_DB, create=False)
        rows_db = env.open_db(shm.ROWS_PREFIX + table.encode(), create=False)
        with env.begin() as txn:
            state = shm.parse_state(txn.get(shm.STATE_KEY, db=meta))
            info = shm.parse_table(txn.get(shm.TABLE_PREFIX + table.encode(), db=meta))
            rows = dict(txn.cursor(db=rows_db).iternext())
    finally:
        env.close()
    return state, info, rows


def spawn(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, env=clean_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def serves(store: shm.SharedMemory, table: str) -> bool:
    return isinstance(store.read(table, [], None, False), shm.Answer)


async def same_as_grpc(directory: str, target: str, table: str, keys: list[object]) -> None:
    """Every key reads the same through the store as over gRPC, and the store answered them."""
    async with AsyncClient(target) as remote, AsyncClient(target, shared_memory=directory) as local:
        store = local._store
        assert store is not None
        await remote.sync()  # (the store holds every change before: a table being rewritten says so)
        await eventually(lambda: serves(store, table), what="the store serves the table")
        reads = store.reads
        strong = await local.batch_get(table, keys, consistency="strong")
        assert strong == await remote.batch_get(table, keys, consistency="strong")
        for key in keys:
            assert await local.get(table, key) == await remote.get(table, key)
        assert store.reads >= reads + 1 + len(keys)


@pytest.fixture
async def items(db, schema) -> str:
    await db.execute(
        f"""CREATE TABLE {schema}.items (
            id int8 PRIMARY KEY, name text, price numeric, tags text[], doc jsonb, blob bytea,
            at timestamptz, u uuid);
        INSERT INTO {schema}.items SELECT g, 'item ' || g, g * 1.5, ARRAY['a', 'b'], '{{"k": 1}}',
            '\\x00ff', '2024-01-01T00:00:00Z', gen_random_uuid() FROM generate_series(1, 50) g"""
    )
    return f"{schema}.items"


async def test_rows_through_the_store_equal_rows_over_grpc_after_every_kind_of_change(start, db, items, store_dir):
    target, _ = start([items], "--bulk-threshold", "20")
    keys: list[object] = [*range(1, 60), 1000]
    await same_as_grpc(store_dir, target, items, keys)
    await db.execute(f"INSERT INTO {items} (id, name) VALUES (55, 'new'), (56, NULL)")
    await db.execute(f"UPDATE {items} SET name = 'changed', doc = '[1,2]' WHERE id IN (2, 3)")
    await db.execute(f"DELETE FROM {items} WHERE id = 4")
    await db.execute(f"UPDATE {items} SET id = 1000 WHERE id = 5")  # a key change
    await same_as_grpc(store_dir, target, items, keys)
    await db.execute(f"UPDATE {items} SET price = price + 1")  # 51 rows: a whole-table event
    await same_as_grpc(store_dir, target, items, keys)
    await db.execute(f"TRUNCATE {items}")
    await db.execute(f"INSERT INTO {items} (id, name) VALUES (7, 'after truncate')")
    await same_as_grpc(store_dir, target, items, keys)
    _, info, rows = snapshot(store_dir, items)
    assert info is not None and info.served and len(rows) == 1 == info.rows
    async with AsyncClient(target) as cache:
        await db.execute(f"INSERT INTO {items} (id, name) VALUES (8, 'before the reload')")
        await cache.invalidate(items)  # the whole table: reloaded
    await same_as_grpc(store_dir, target, items, keys)
    _, info, rows = snapshot(store_dir, items)
    assert info is not None and info.served and len(rows) == 2 == info.rows


async def test_a_big_table_is_rewritten_in_chunks_and_then_served(start, db, schema, store_dir):
    table = f"{schema}.big"
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await db.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 25000) g")  # 3 chunks
    target, _ = start([table])
    keys: list[object] = [1, 9_999, 10_000, 10_001, 24_999, 25_000, 25_001]
    await same_as_grpc(store_dir, target, table, keys)
    await db.execute(f"TRUNCATE {table}; INSERT INTO {table} SELECT g, 'w' || g FROM generate_series(5, 25004) g")
    await db.execute(f"UPDATE {table} SET v = 'changed' WHERE id = 10000")
    await same_as_grpc(store_dir, target, table, [*keys, 25_004, 4])
    _, info, rows = snapshot(store_dir, table)
    assert info is not None and info.served and len(rows) == 25_000 == info.rows


async def test_a_reader_keeps_reading_as_the_store_grows_past_lmdbs_default_map(start, db, schema, store_dir):
    table = f"{schema}.growing"
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, padding text)")
    target, _ = start([table])
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        store = cache._store
        assert store is not None
        await eventually(lambda: serves(store, table), what="the store serves the table")
        assert await cache.get(table, 1) is None  # (the reader's map is made now, the store small)
        await db.execute(f"INSERT INTO {table} SELECT g, repeat('x', 300) FROM generate_series(1, 60000) g")
        await cache.sync()  # (30 MB of rows: more than py-lmdb's default 10 MiB map)
        await eventually(lambda: serves(store, table), what="the store serves the table again")
        reads = store.reads
        assert (await cache.get(table, 60000))["id"] == 60000
        assert store.reads == reads + 1 and store.errors == 0, store.last_error


async def test_composite_text_uuid_bool_and_char_keys(start, db, schema, store_dir):
    await db.execute(
        f"CREATE TABLE {schema}.pairs (a int4, b text, c uuid, d bool, v int, PRIMARY KEY (a, b, c, d));"
        f"CREATE TABLE {schema}.codes (code char(5) PRIMARY KEY, v int)"
    )
    u = uuid.uuid4()
    await db.execute(f"INSERT INTO {schema}.pairs VALUES (1, 'x é', $1, true, 10), (2, '', $1, false, 20)", u)
    await db.execute(f"INSERT INTO {schema}.codes VALUES ('ab', 1), ('abcde', 2)")
    target, _ = start([f"{schema}.pairs", f"{schema}.codes"])
    pair_keys: list[object] = [(1, "x é", u, True), (2, "", str(u), False), (1, "x é", u, False)]
    await same_as_grpc(store_dir, target, f"{schema}.pairs", pair_keys)
    await same_as_grpc(store_dir, target, f"{schema}.codes", ["ab", "ab   ", "abcde", "zz"])


# Key types the store holds (layout.KIND_BY_TYPE), as a client passes their values natively;
# tests/integration/test_types.py's KEYS hold the others too (their reads stay on gRPC).
STORE_KEY_TYPES = ("int2", "int4", "int8", "text", "varchar(8)", "char(4)", "uuid", "bool", "bytea")


def as_served(row: bytes) -> bytes:
    return row


async def test_every_type_reads_the_same_bytes_through_the_store_as_over_grpc(start, db, schema, store_dir):
    """The row of every type of the documented mapping, and a table per key type: through a
    store-backed client the exact bytes gRPC serves (the decoder returns them untouched),
    before and after an UPDATE; the key types with an encoding answered by the store."""
    from tests.integration.test_types import KEYS, VALUES

    columns = ", ".join(f"c{i} {t}" for i, (t, _, _) in enumerate(VALUES))
    literals = ", ".join(literal for _, literal, _ in VALUES)
    await db.execute(f"CREATE TABLE {schema}.typed (id int PRIMARY KEY, {columns})")
    await db.execute(f"INSERT INTO {schema}.typed VALUES (1, {literals}), (2, {literals})")
    for i, (sql_type, literal, _) in enumerate(KEYS):
        await db.execute(f"CREATE TABLE {schema}.k{i} (id {sql_type} PRIMARY KEY, tag text)")
        await db.execute(f"INSERT INTO {schema}.k{i} VALUES ({literal}, 'found')")
    await db.execute(f"CREATE TYPE {schema}.mood AS ENUM ('happy', 'sad')")
    await db.execute(f"CREATE TABLE {schema}.kenum (id {schema}.mood, n int2, tag text, PRIMARY KEY (id, n))")
    await db.execute(f"INSERT INTO {schema}.kenum VALUES ('sad', 3, 'found')")
    tables = [f"{schema}.typed", *(f"{schema}.k{i}" for i in range(len(KEYS))), f"{schema}.kenum"]
    target, _ = start(tables)
    async with (
        AsyncClient(target, decoder=as_served) as remote,
        AsyncClient(target, shared_memory=store_dir, decoder=as_served) as local,
    ):
        store = local._store
        assert store is not None
        for update in ("", f"UPDATE {schema}.typed SET c0 = NULL, c8 = 'é' WHERE id = 2"):
            if update:
                await db.execute(update)
            await remote.sync()
            await eventually(lambda: serves(store, f"{schema}.typed"), what="the store serves the table")
            reads = store.reads
            for key in (1, 2, 3):
                got = await local.get(f"{schema}.typed", key, min_revision=remote.last_revision)
                assert got == await remote.get(f"{schema}.typed", key), key
            assert store.reads == reads + 3
        for i, (sql_type, _, key) in enumerate(KEYS):
            table = f"{schema}.k{i}"
            reads = store.reads
            got = await local.get(table, key)
            assert got is not None and got == await remote.get(table, key), sql_type
            # (a string for an integer column goes to the sidecar, which coerces it)
            from_store = sql_type in STORE_KEY_TYPES and not (isinstance(key, str) and sql_type.startswith("int"))
            assert store.reads == reads + from_store, f"{sql_type}: from the store {store.reads - reads} time(s)"
        reads = store.reads
        for key in (("sad", 3), ("happy", 3)):
            assert await local.get(f"{schema}.kenum", key) == await remote.get(f"{schema}.kenum", key)
        assert store.reads == reads + 2


async def test_keys_too_long_for_lmdb_are_read_over_grpc_and_the_daemon_goes_on(start, db, schema, store_dir):
    """LMDB refuses keys over 511 bytes: such rows are not in the store (loaded, changed or
    deleted, the daemon goes on writing the others) and readers ask gRPC for them."""
    table = f"{schema}.names"
    longest, too_long, far_too_long = "m" * 506, "n" * 507, "o" * 3000  # (+5 bytes: tag and length)
    await db.execute(f"CREATE TABLE {table} (name text PRIMARY KEY, v int)")
    await db.execute(
        f"INSERT INTO {table} VALUES ('short', 1), ($1, 2), ($2, 3), ($3, 4)", longest, too_long, far_too_long
    )
    target, process = start([table])
    await same_as_grpc(store_dir, target, table, ["short", longest, "absent"])
    await db.execute(f"UPDATE {table} SET v = v + 10")  # (4 rows: keyed changes)
    await db.execute(f"INSERT INTO {table} VALUES ($1, 5)", "p" * 600)
    await db.execute(f"DELETE FROM {table} WHERE name = $1", too_long)
    await same_as_grpc(store_dir, target, table, ["short", longest, "absent"])
    async with AsyncClient(target) as remote, AsyncClient(target, shared_memory=store_dir) as local:
        store = local._store
        assert store is not None
        for key in (too_long, far_too_long, "p" * 600):
            refused = store.refused
            assert await local.get(table, key) == await remote.get(table, key)
            assert store.refused == refused + 1
        assert [row and row["v"] for row in await local.batch_get(table, ["short", far_too_long])] == [11, 14]
        assert store.errors == 0, store.last_error
    assert process.poll() is None


def relation_config(schema: str, path) -> str:  # type: ignore[no-untyped-def]
    path.write_text(
        f"""[[tables]]
name = "{schema}.cities"
[[tables]]
name = "{schema}.user_city"
query = '''SELECT u.user_id, u.name AS user_name, c.city_id, c.name AS city_name
  FROM {schema}.users u JOIN {schema}.cities c USING (city_id)'''
key = ["user_id"]
[tables.sources]
"{schema}.users" = {{ user_id = "user_id" }}
"{schema}.cities" = {{ city_id = "city_id" }}
"""
    )
    return str(path)


@pytest.fixture
async def users(db, schema) -> str:
    await db.execute(
        f"""CREATE TABLE {schema}.cities (city_id int PRIMARY KEY, name text);
        CREATE TABLE {schema}.users (user_id int PRIMARY KEY, name text, city_id int);
        INSERT INTO {schema}.cities VALUES (1, 'Lyon'), (2, 'Oslo');
        INSERT INTO {schema}.users VALUES (1, 'Ada', 1), (2, 'Grace', 1), (3, 'Joan', 2)"""
    )
    return f"{schema}.user_city"


async def test_a_relation_through_the_store_equals_it_over_grpc(start, db, schema, users, store_dir, tmp_path):
    target, _ = start([], "--config", relation_config(schema, tmp_path / "sidecar.toml"))
    await same_as_grpc(store_dir, target, users, [1, 2, 3, 4])
    await db.execute(f"UPDATE {schema}.users SET city_id = 1, name = 'Joan B' WHERE user_id = 3")  # moves
    await db.execute(f"DELETE FROM {schema}.users WHERE user_id = 2")
    await db.execute(f"INSERT INTO {schema}.users VALUES (4, 'Hedy', 2)")
    await same_as_grpc(store_dir, target, users, [1, 2, 3, 4])
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        rows = await cache.batch_get(users, [3, 4], consistency="strong")
        assert [(row["user_name"], row["city_name"]) for row in rows] == [("Joan B", "Lyon"), ("Hedy", "Oslo")]


async def test_a_table_whose_key_has_no_encoding_stays_on_grpc(start, db, schema, store_dir):
    await db.execute(f"CREATE TABLE {schema}.days (d date PRIMARY KEY, v int)")
    await db.execute(f"INSERT INTO {schema}.days VALUES ('2024-01-01', 1)")
    target, _ = start([f"{schema}.days"])
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        assert (await cache.get(f"{schema}.days", "2024-01-01"))["v"] == 1
        assert cache._store is not None and cache._store.reads == 0 and cache._store.refused >= 1


async def test_strong_and_min_revision_reads_through_the_store(start, db, items, store_dir):
    target, _ = start([items])
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        store = cache._store
        assert store is not None
        await eventually(lambda: serves(store, items), what="the store serves the table")
        for version in range(20):
            await db.execute(f"UPDATE {items} SET name = $1 WHERE id = 1", f"v{version}")
            assert (await cache.get(items, 1, consistency="strong"))["name"] == f"v{version}"
        await db.execute(f"UPDATE {items} SET name = 'later' WHERE id = 1")
        later = await cache.sync()
        assert (await cache.get(items, 1, min_revision=later))["name"] == "later"
        assert store.reads >= 21


async def test_a_min_revision_read_waits_until_the_store_reaches_it(start, db, items, store_dir):
    target, _ = start([items])
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        store = cache._store
        assert store is not None
        await eventually(lambda: serves(store, items), what="the store serves the table")
        now = await cache.sync()

        async def write_later() -> None:
            await asyncio.sleep(0.3)
            await db.execute(f"UPDATE {items} SET name = 'next' WHERE id = 1")

        writer = asyncio.create_task(write_later())
        reads = store.reads
        next_revision = type(now)(now.epoch, now.number + 1)
        assert (await cache.get(items, 1, min_revision=next_revision, timeout=10))["name"] == "next"
        assert store.reads == reads + 1
        await writer


async def test_a_stopped_daemon_marks_the_store_stale_at_once(start, items, store_dir):
    _, process = start([items])
    store = shm.SharedMemory(store_dir)
    await eventually(lambda: serves(store, items), what="the store serves the table")
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert store.read(items, [1], None, False) is None
    assert isinstance(store.read(items, [1], None, True), shm.Answer)  # allow_stale still may
    store.close()


async def test_a_killed_daemon_is_not_trusted_after_the_heartbeat_bound(start, items, store_dir):
    _, process = start([items])
    store = shm.SharedMemory(store_dir)
    await eventually(lambda: serves(store, items), what="the store serves the table")
    process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(process.wait, 30)
    await eventually(lambda: not serves(store, items), timeout=shm.FRESH_BOUND + 5, what="the store refused")
    assert time.monotonic() - killed <= shm.FRESH_BOUND + 1.0  # (the bound, plus this machine's load)
    # a new daemon takes the same store over (the dead writer's lock is LMDB's robust mutex),
    # and the reader that kept it open reads again, in the new history (a new epoch; in
    # logical capture the database's, from a later revision)
    before = store.read(items, [1], None, True)
    start([items])
    await eventually(lambda: serves(store, items), timeout=30, what="the store serves again")
    after = store.read(items, [1], None, False)
    assert isinstance(before, shm.Answer) and isinstance(after, shm.Answer)
    assert after.epoch != before.epoch or after.revision > before.revision
    store.close()


def _hold_a_read(directory: str, table: str, holding) -> None:  # type: ignore[no-untyped-def]
    """In another process: open a read transaction, say so, and hang (to be killed)."""
    import lmdb

    env = lmdb.open(directory, readonly=True, create=False, lock=True, max_dbs=64)
    meta = env.open_db(shm.META_DB, create=False)
    txn = env.begin()
    txn.get(shm.STATE_KEY, db=meta)
    holding.put(os.getpid())
    time.sleep(600)


def reader_pids(directory: str) -> set[int]:
    import lmdb

    env = lmdb.open(directory, readonly=True, create=False, lock=True, max_dbs=64)
    try:  # (env.readers(): "    pid     thread     txnid" then a line per live slot)
        return {int(line.split()[0]) for line in env.readers().splitlines()[1:] if line.split()[2] != "-"}
    finally:
        env.close()


async def written_and_read(db, target: str, store_dir: str, items: str, name: str) -> None:  # type: ignore[no-untyped-def]
    """A change committed now is applied to the store and read from it."""
    await db.execute(f"UPDATE {items} SET name = $1 WHERE id = 1", name)
    async with AsyncClient(target, shared_memory=store_dir) as cache:
        store = cache._store
        assert store is not None
        await eventually(lambda: serves(store, items), what="the store serves the table")
        reads = store.reads
        assert (await cache.get(items, 1, consistency="strong", timeout=10))["name"] == name
        assert store.reads == reads + 1


async def test_a_reader_killed_mid_read_leaves_nothing_that_blocks_the_writer(start, db, items, store_dir):
    target, _ = start([items])
    await eventually(lambda: os.path.exists(os.path.join(store_dir, "lock.mdb")), what="the store")
    context = multiprocessing.get_context("spawn")
    holding = context.Queue()
    reader = context.Process(target=_hold_a_read, args=(store_dir, items, holding))
    reader.start()
    pid = await asyncio.to_thread(holding.get, True, 60)
    assert pid in reader_pids(store_dir)  # its snapshot pins old pages while it lives
    await written_and_read(db, target, store_dir, items, "while a reader holds an old snapshot")
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(reader.join, 30)
    await eventually(lambda: pid not in reader_pids(store_dir), timeout=10, what="the dead reader's slot cleared")
    await written_and_read(db, target, store_dir, items, "after the reader was killed")


async def test_a_lost_listener_marks_the_store_not_fresh(start, db, items, store_dir):
    # (reconnecting after 2 s: the store says "source down" meanwhile, before any rebuild)
    start([items], CACHE_SIDECAR_LISTENER_RECONNECT_MIN_DELAY="2")
    store = shm.SharedMemory(store_dir)
    await eventually(lambda: serves(store, items), what="the store serves the table")
    pids = await db.fetch(  # (this test's daemon is the only one running)
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name IN ('cache-sidecar-listener', 'cache-sidecar replication')"
    )
    assert pids
    for row in pids:
        await db.execute("SELECT pg_terminate_backend($1)", row["pid"])
    await eventually(lambda: "source is down" in (store.refusal(items) or ""), timeout=5, what="source down")
    await eventually(lambda: serves(store, items), timeout=30, what="the store serves again")
    store.close()


async def test_a_follower_feeds_its_store_from_its_upstream(start_daemon, db, items, tmp_path, store_dir):
    hub = await start_daemon([items])  # (in this process; the follower and its store in another)
    port = free_port()
    command = [*EXE, "serve", "--upstream", hub.target, "--listen", f"127.0.0.1:{port}", "--shared-memory", store_dir]
    follower = spawn(command)
    try:
        target = f"127.0.0.1:{port}"
        await asyncio.to_thread(wait_serving, target, follower)
        keys: list[object] = [*range(1, 55)]
        await same_as_grpc(store_dir, target, items, keys)
        await db.execute(f"UPDATE {items} SET name = 'via the hub' WHERE id IN (1, 2)")
        await db.execute(f"DELETE FROM {items} WHERE id = 3")
        await db.execute(f"INSERT INTO {items} (id) VALUES (53)")
        await same_as_grpc(store_dir, target, items, keys)
        async with AsyncClient(target, shared_memory=store_dir) as cache:
            assert (await cache.get(items, 1, consistency="strong"))["name"] == "via the hub"
            assert cache._store is not None and cache._store.reads == 1
    finally:
        follower.terminate()
        await asyncio.to_thread(follower.wait, 30)


# ---------------------------------------------------------------- whole transactions, across processes


def _sum_reader(directory: str, table: str, stop, ready, results) -> None:  # type: ignore[no-untyped-def]
    """In another process: sum rows 1 and 2, read in one store read, until told to stop;
    report every distinct sum seen, how many reads the store answered and how many
    distinct revisions they were at."""
    import json

    store = shm.SharedMemory(directory)
    sums: set[int] = set()
    revisions: set[int] = set()
    reads = 0
    while not stop.is_set():
        answer = store.read(table, [1, 2], None, False)
        if isinstance(answer, shm.Answer) and None not in answer.rows:
            if not reads:
                ready.put(True)
            reads += 1
            revisions.add(answer.revision)
            sums.add(sum(json.loads(row)["v"] for row in answer.rows if row is not None))
    results.put((sorted(sums), reads, len(revisions)))


async def test_readers_never_see_half_a_transaction(start, db, schema, store_dir):
    table = f"{schema}.accounts"
    await db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int); INSERT INTO {table} VALUES (1, 500), (2, 500)")
    target, _ = start([table])
    store = shm.SharedMemory(store_dir)
    await eventually(lambda: serves(store, table), what="the store serves the table")
    store.close()
    context = multiprocessing.get_context("spawn")
    stop, ready, results = context.Event(), context.Queue(), context.Queue()
    readers = [context.Process(target=_sum_reader, args=(store_dir, table, stop, ready, results)) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for _ in readers:  # every reader reads before the writes begin
            assert await asyncio.to_thread(ready.get, True, 60)
        for step in range(300):
            amount = (step % 7) + 1
            async with db.transaction():
                await db.execute(f"UPDATE {table} SET v = v - $1 WHERE id = 1", amount)
                await db.execute(f"UPDATE {table} SET v = v + $1 WHERE id = 2", amount)
        async with AsyncClient(target) as cache:
            await cache.sync()
    finally:
        stop.set()
        seen = [await asyncio.to_thread(results.get, True, 60) for _ in readers]
        for reader in readers:
            await asyncio.to_thread(reader.join, 30)
    _, _, rows = snapshot(store_dir, table)
    assert len(rows) == 2
    for sums, reads, revisions in seen:
        assert reads > 0 and revisions > 10  # (the readers read while the writes went on)
        assert sums == [1000]

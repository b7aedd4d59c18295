"""Fleet mode with real processes and a real PostgreSQL: a hub (a sidecar on the
database) and followers (``serve --upstream``) started as daemons, read through
the Python client -- rows, relations, indexes and lazy tables; a commit seen on
every follower; one follower's revision honoured by another; STRONG on a
follower; a follower of a follower; the follower<->hub link cut (resumed, no
Reset) and the hub restarted (rebuilt, Reset: a new epoch, or in logical capture a
later history); a follower switched between two NOTIFY hubs (the other hub's
revisions proven, never assumed past); Invalidate
forwarded with the caller's own token and the hub's statuses passed on."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cache_sidecar_client import AsyncClient, ChangeBatch, Reset
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.api.v1 import cache_pb2_grpc as pb_grpc
from tests.e2e.test_process import EXE, clean_env, free_port
from tests.support.proxy import Proxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")  # (the hubs' capture mode)

FOLLOWER_ENV = {
    "CACHE_SIDECAR_UPSTREAM_PROGRESS_INTERVAL": "0.2",
    "CACHE_SIDECAR_UPSTREAM_STALL_TIMEOUT": "1.5",
    "CACHE_SIDECAR_LISTENER_RECONNECT_MIN_DELAY": "0.05",
    "CACHE_SIDECAR_LISTENER_RECONNECT_MAX_DELAY": "0.5",
}


class Daemons:
    """Sidecar processes of one test, stopped at its end; each logs to its own file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> tuple[str, Path]:
        port = free_port()
        log = self.directory / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [*EXE, "serve", "--listen", f"127.0.0.1:{port}", *args],
                env=clean_env(**(env or {})),
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        self.processes.append(process)
        return f"127.0.0.1:{port}", log

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


async def serving(target: str, timeout: float = 60) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def check() -> bool:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(check, timeout, 0.05, what=f"{target} SERVING")


async def list_tables(target: str) -> pb.ListTablesResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        answer: pb.ListTablesResponse = await pb_grpc.CacheStub(channel).ListTables(pb.ListTablesRequest(), timeout=5)
        return answer


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Daemons]:
    running = Daemons(tmp_path)
    yield running
    await asyncio.to_thread(running.stop_all)


@pytest.fixture
async def hub_config(postgres: Any, schema: str, tmp_path: Path, capture: str) -> dict[str, Any]:
    conn = await asyncpg.connect(postgres.dsn)
    await conn.execute(
        f"""
        CREATE TABLE {schema}.item (id int PRIMARY KEY, name text NOT NULL, price int NOT NULL);
        INSERT INTO {schema}.item SELECT g, 'item ' || g, g * 10 FROM generate_series(1, 50) g;
        CREATE TABLE {schema}.note (id uuid PRIMARY KEY, body text);
        INSERT INTO {schema}.note VALUES ('00000000-0000-0000-0000-000000000001', 'one');
        CREATE TABLE {schema}.owner (id int PRIMARY KEY, name text);
        INSERT INTO {schema}.owner VALUES (1, 'Ada'), (2, 'Grace');
        CREATE TABLE {schema}.pet (id int PRIMARY KEY, owner_id int, name text);
        INSERT INTO {schema}.pet VALUES (10, 1, 'Rex'), (11, 2, 'Tom');
        """
    )
    await conn.close()
    path = tmp_path / "hub.toml"
    path.write_text(
        f"""
[database]
dsn = "{postgres.dsn}"
capture = "{capture}"

[server]
install_triggers = true

[listener]
channel = "cs_{secrets.token_hex(4)}"
ping_interval = 1.0
ping_timeout = 1.0
reconnect_min_delay = 0.05
reconnect_max_delay = 0.5

[[tables]]
name = "{schema}.item"

[[tables.indexes]]
name = "by_price"
columns = ["price"]
range = true

[[tables]]
name = "{schema}.note"
mode = "lazy"
max_rows = 100

[[tables]]
name = "{schema}.pets"
query = "SELECT p.id, p.name, p.owner_id, o.name AS owner FROM {schema}.pet p JOIN {schema}.owner o ON o.id = owner_id"
key = ["id"]
sources = {{ "{schema}.pet" = {{ id = "id" }}, "{schema}.owner" = {{ id = "owner_id" }} }}
""",
        encoding="utf-8",
    )
    return {"path": str(path), "schema": schema, "dsn": postgres.dsn}


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def watch_into(client: AsyncClient, table: str, dsn: str) -> tuple[list[Any], asyncio.Task[None]]:
    """A watcher of ``table``, known to be subscribed (it has seen a change made for it)."""
    seen: list[Any] = []

    async def read() -> None:
        async for item in client.watch([table]):
            seen.append(item)

    reader = asyncio.create_task(read())

    async def subscribed() -> bool:
        await execute(dsn, f"UPDATE {table} SET price = price WHERE id = 50")
        return any(isinstance(i, ChangeBatch) for i in seen)

    await eventually(subscribed, 15, 0.2, what="the watcher subscribed")
    return seen, reader


async def test_a_hub_and_followers_serve_one_fleet(daemons, hub_config):
    schema, dsn = hub_config["schema"], hub_config["dsn"]
    item, note, pets = f"{schema}.item", f"{schema}.note", f"{schema}.pets"
    hub, _ = daemons.start("hub", ["--config", hub_config["path"]])
    await serving(hub)
    followers = [daemons.start(f"follower{n}", ["--upstream", hub], FOLLOWER_ENV)[0] for n in range(2)]
    leaf, _ = daemons.start("leaf", ["--upstream", followers[0]], FOLLOWER_ENV)  # a follower of a follower
    for target in [*followers, leaf]:
        await serving(target)
    hub_epoch = (await list_tables(hub)).revision.epoch
    for target in [*followers, leaf]:
        listing = await list_tables(target)
        assert listing.revision.epoch == hub_epoch  # the hub's revisions, on every follower
        assert {t.name for t in listing.tables} == {item, note, pets}
        assert listing.upstream.following

    clients = [AsyncClient(target) for target in [*followers, leaf]]
    try:
        for cache in clients:
            assert await cache.get(item, 7) == {"id": 7, "name": "item 7", "price": 70}
            assert await cache.get(pets, 11) == {"id": 11, "name": "Tom", "owner_id": 2, "owner": "Grace"}
            assert await cache.get(note, "00000000-0000-0000-0000-000000000001") == {
                "id": "00000000-0000-0000-0000-000000000001",
                "body": "one",
            }
            assert [r["id"] for r in (await cache.query(item, "by_price", lower=95, upper=120)).rows] == [10, 11, 12]

        # A commit is seen on every follower; a revision from one is honoured by the others.
        await execute(dsn, f"UPDATE {schema}.item SET name = 'bought', price = 1 WHERE id = 7")
        await execute(dsn, f"UPDATE {schema}.owner SET name = 'Grace H.' WHERE id = 2")
        await execute(dsn, f"UPDATE {schema}.note SET body = 'uno'")
        written = await clients[0].sync()
        assert written.epoch == hub_epoch
        for cache in clients[1:]:
            row = await cache.get(item, 7, min_revision=written)
            assert row == {"id": 7, "name": "bought", "price": 1}
            assert (await cache.get(pets, 11, min_revision=written))["owner"] == "Grace H."
            assert (await cache.get(note, "00000000-0000-0000-0000-000000000001"))["body"] == "uno"
            assert [r["id"] for r in (await cache.query(item, "by_price", upper=10)).rows] == [7, 1]

        # STRONG on a follower (and on a follower of one) sees a write committed just before.
        for n in range(3):
            await execute(dsn, f"UPDATE {schema}.item SET name = 'strong {n}' WHERE id = 3")
            for cache in clients:
                assert (await cache.get(item, 3, consistency="strong"))["name"] == f"strong {n}"
    finally:
        for cache in clients:
            await cache.close()


async def test_a_cut_link_is_resumed_without_reset(daemons, hub_config):
    schema, dsn = hub_config["schema"], hub_config["dsn"]
    item = f"{schema}.item"
    hub, _ = daemons.start("hub", ["--config", hub_config["path"]])
    await serving(hub)
    proxy = Proxy(host="127.0.0.1", port=int(hub.rsplit(":", 1)[1]))
    await proxy.start()
    follower, log = daemons.start("follower", ["--upstream", f"127.0.0.1:{proxy.port}"], FOLLOWER_ENV)
    try:
        await serving(follower)
        async with AsyncClient(follower, retries=0) as cache:
            epoch = (await cache.sync()).epoch
            seen, reader = await watch_into(cache, item, dsn)
            proxy.block()  # the link is down: the follower notices, reads fail (no stale answer)
            await eventually(lambda: _not_following(follower), timeout=15, what="the follower noticed")
            with pytest.raises(Exception, match=r"UNAVAILABLE|navailable"):
                await cache.get(item, 1)
            assert (await cache.get(item, 1, allow_stale=True))["id"] == 1
            await execute(dsn, f"UPDATE {schema}.item SET name = 'while cut' WHERE id = 4")
            proxy.unblock()
            await serving(follower, 20)
            written = await AsyncClient(hub).sync()
            assert written.epoch == epoch  # no new epoch anywhere
            assert (await cache.get(item, 4, min_revision=written))["name"] == "while cut"
            await eventually(
                lambda: any(isinstance(i, ChangeBatch) and i.revision.number >= written.number for i in seen),
                what="the follower's watcher got the change",
            )
            reader.cancel()
            assert not any(isinstance(i, Reset) for i in seen)
        text = log.read_text()
        assert "resumed: nothing missed, no rebuild" in text and "rebuilding" not in text
    finally:
        await proxy.close()


async def _not_following(target: str) -> bool:
    try:
        return not (await list_tables(target)).upstream.following
    except grpc.RpcError:
        return False


async def test_a_restarted_hub_means_a_rebuild_and_a_reset(daemons, hub_config, capture):
    """NOTIFY capture: the restarted hub is in a new epoch. Logical capture: in the same one
    (the database's history), but its history starts after the follower's position."""
    schema, dsn = hub_config["schema"], hub_config["dsn"]
    item = f"{schema}.item"
    port = free_port()
    hub_args = ["--config", hub_config["path"], "--listen", f"127.0.0.1:{port}"]
    daemons.start("hub", hub_args)
    hub = f"127.0.0.1:{port}"
    await serving(hub)
    follower, log = daemons.start("follower", ["--upstream", hub], FOLLOWER_ENV)
    await serving(follower)
    async with AsyncClient(follower) as cache:
        before = (await cache.sync()).epoch
        seen, reader = await watch_into(cache, item, dsn)
        first = daemons.processes[0]
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 15) == 0
        await execute(dsn, f"UPDATE {schema}.item SET name = 'while the hub was away' WHERE id = 5")
        daemons.start("hub-again", hub_args)
        await serving(hub)
        await serving(follower, 30)
        after = (await list_tables(hub)).revision.epoch
        assert (after != before) == (capture == "notify")
        await eventually(lambda: _epoch_of(follower, after), timeout=20, what="the follower in the hub's new epoch")
        assert (await cache.get(item, 5, consistency="strong"))["name"] == "while the hub was away"
        await eventually(lambda: any(isinstance(i, Reset) for i in seen), what="its watchers were reset")
        reader.cancel()
    assert "rebuilding from" in log.read_text()


async def _epoch_of(target: str, epoch: str) -> bool:
    return (await list_tables(target)).revision.epoch == epoch


@pytest.mark.captures("notify")  # (logical hubs share one epoch: tests/integration/logical/test_fleet_failover.py)
async def test_a_follower_back_on_its_first_hub_proves_the_other_hubs_revisions(daemons, hub_config):
    """Two hubs on one database, a follower switched A -> B -> A (a Service routing it
    elsewhere and back). A revision of B's is a live hub's, maybe ahead of A's: a
    min_revision read naming it is answered after a barrier on A, never at once from
    memory as if B's epoch were past."""
    schema, dsn = hub_config["schema"], hub_config["dsn"]
    item = f"{schema}.item"
    first, _ = daemons.start("hub-a", ["--config", hub_config["path"]])
    await serving(first)
    second, _ = daemons.start("hub-b", ["--config", hub_config["path"]])
    await serving(second)
    epoch_a, epoch_b = (await list_tables(first)).revision.epoch, (await list_tables(second)).revision.epoch
    assert epoch_a != epoch_b
    proxy = Proxy(host="127.0.0.1", port=int(first.rsplit(":", 1)[1]))
    await proxy.start()
    follower, log = daemons.start("follower", ["--upstream", f"127.0.0.1:{proxy.port}"], FOLLOWER_ENV)
    try:
        await serving(follower)
        assert (await list_tables(follower)).revision.epoch == epoch_a
        proxy.retarget("127.0.0.1", int(second.rsplit(":", 1)[1]))
        await eventually(lambda: _epoch_of(follower, epoch_b), timeout=30, what="the follower on hub B")
        proxy.delay = 1.0  # back on A over a slow link: the follower's memory is a second behind A's
        proxy.retarget("127.0.0.1", int(first.rsplit(":", 1)[1]))
        await eventually(lambda: _epoch_of(follower, epoch_a), timeout=30, what="the follower back on hub A")
        await serving(follower, 30)
        async with AsyncClient(follower) as cache, AsyncClient(second) as hub_b:
            for n in range(5):
                await execute(dsn, f"UPDATE {item} SET name = 'round {n}' WHERE id = 9")
                written = await hub_b.sync()  # B has the write: its revision is read-your-writes
                assert written.epoch == epoch_b
                assert (await cache.get(item, 9, min_revision=written))["name"] == f"round {n}"
    finally:
        await proxy.close()
    assert log.read_text().count("rebuilding from") >= 2


ADMIN_TOKEN = "admin-" + "a" * 32
READ_TOKEN = "read-" + "r" * 32


async def _invalidate_all(target: str, table: str, token: str | None) -> grpc.StatusCode:
    """Invalidate(all_rows) of ``table`` on ``target`` with this bearer token (or none): its status."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await pb_grpc.CacheStub(channel).Invalidate(
                pb.InvalidateRequest(table=table, all_rows=True), timeout=15, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _hub_revision(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await pb_grpc.CacheStub(channel).Sync(
            pb.SyncRequest(), timeout=15, metadata=(("authorization", f"Bearer {READ_TOKEN}"),)
        )
        return int(answer.revision.number)


async def test_a_follower_forwards_invalidate_with_the_callers_token_and_passes_statuses_on(
    daemons, hub_config, tmp_path
):
    """A hub with admin and read-only tokens, behind a proxy; followers with an admin and a
    read-only upstream token. A follower forwards Invalidate with the caller's own token, never
    its own (an unauthenticated local caller cannot invalidate the whole hub), and the hub's
    status comes back unchanged (PERMISSION_DENIED, not INTERNAL) -- also when a follower is
    told to forward with its own token."""
    item = f"{hub_config['schema']}.item"
    (tmp_path / "hub-tokens").write_text(f"admin {ADMIN_TOKEN}\n{READ_TOKEN}\n")
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "read").write_text(READ_TOKEN + "\n")
    hub, _ = daemons.start("hub", ["--config", hub_config["path"], "--auth-token-file", str(tmp_path / "hub-tokens")])
    await serving(hub)
    proxy = Proxy(host="127.0.0.1", port=int(hub.rsplit(":", 1)[1]))
    await proxy.start()
    link = f"127.0.0.1:{proxy.port}"
    try:
        admin_follower, _ = daemons.start(
            "follower-admin", ["--upstream", link, "--upstream-token-file", str(tmp_path / "admin")], FOLLOWER_ENV
        )
        told, _ = daemons.start(
            "follower-told",
            ["--upstream", link, "--upstream-token-file", str(tmp_path / "read")],
            {**FOLLOWER_ENV, "CACHE_SIDECAR_UPSTREAM_INVALIDATE_WITH_OWN_TOKEN": "true"},
        )
        for target in (admin_follower, told):
            await serving(target)
        before = await _hub_revision(hub)
        # No token of the caller's: the follower's admin token does not go in its place.
        assert await _invalidate_all(admin_follower, item, None) == grpc.StatusCode.UNAUTHENTICATED
        # The caller's read-only token: the hub's answer, unchanged.
        assert await _invalidate_all(admin_follower, item, READ_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        assert await _invalidate_all(admin_follower, item, "not-a-token-of-the-hub-0000") == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # Told to forward with its own (read-only) token: the hub's PERMISSION_DENIED, not INTERNAL.
        assert await _invalidate_all(told, item, None) == grpc.StatusCode.PERMISSION_DENIED
        assert await _hub_revision(hub) == before  # nothing was invalidated on the hub
        # The caller's admin token: done on the hub (a whole-table batch there).
        assert await _invalidate_all(admin_follower, item, ADMIN_TOKEN) == grpc.StatusCode.OK
        assert await _hub_revision(hub) > before
    finally:
        await proxy.close()


def test_a_follower_refuses_a_database_too(tmp_path):
    result = subprocess.run(
        [*EXE, "serve", "--upstream", "127.0.0.1:1", "--dsn", "postgresql://x@localhost/y"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "database.dsn" in result.stderr and "upstream.target" in result.stderr


async def test_a_table_the_upstream_lacks_stops_the_start(daemons, hub_config):
    hub, _ = daemons.start("hub", ["--config", hub_config["path"]])
    await serving(hub)
    result = await asyncio.to_thread(
        subprocess.run,
        [*EXE, "serve", "--upstream", hub, "--table", f"{hub_config['schema']}.nothere", "--listen", "127.0.0.1:0"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{hub_config['schema']}.nothere" in result.stderr


async def test_the_tables_command_shows_the_upstream(daemons, hub_config):
    hub, _ = daemons.start("hub", ["--config", hub_config["path"]])
    await serving(hub)
    follower, _ = daemons.start("follower", ["--upstream", hub], FOLLOWER_ENV)
    await serving(follower)
    result = await asyncio.to_thread(
        subprocess.run, [*EXE, "tables", "--target", follower], env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 0
    assert f"upstream {hub}: following, behind 0 revision(s)" in result.stdout

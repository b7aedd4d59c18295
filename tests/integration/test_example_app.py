"""The example patron service (clients/python/examples/patron_service) against
a real sidecar and PostgreSQL: CRUD over HTTP, reads from the near-cache."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.util
import os
import re
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.waiting import eventually

pytestmark = pytest.mark.captures("notify", "logical")

APP = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "patron_service" / "app.py"


@pytest.fixture
async def service(start_daemon, postgres, db, schema, monkeypatch):
    await db.execute(
        f"CREATE TABLE {schema}.patron (id serial PRIMARY KEY, name text NOT NULL, fav_dish text);"
        f"INSERT INTO {schema}.patron (name, fav_dish) VALUES ('Ada', 'pancakes'), ('Grace', 'curry')"
    )
    async with running_app(start_daemon, schema, monkeypatch, postgres.dsn) as http:
        yield http, schema


@contextlib.asynccontextmanager
async def running_app(start_daemon, schema, monkeypatch, dsn):  # type: ignore[no-untyped-def]
    """The service (``dsn`` None: read-only) on a free port, reading through a new sidecar."""
    monkeypatch.setenv("PATRON_TABLE", f"{schema}.patron")
    spec = importlib.util.spec_from_file_location("patron_service", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sidecar = await start_daemon([f"{schema}.patron"])
    runner = web.AppRunner(module.make_app(dsn, sidecar.target))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await eventually(lambda: _stats_ok(http), what="service up, its near-cache following")
            yield http
    finally:
        await runner.cleanup()


async def _stats_ok(http: aiohttp.ClientSession) -> bool:
    async with http.get("/stats") as response:
        return response.status == 200 and (await response.json())["connected"]  # near-cache stream up


async def get_json(http, path):  # type: ignore[no-untyped-def]
    async with http.get(path) as response:
        return response.status, (await response.json() if response.status == 200 else None)


async def test_crud_over_http_with_reads_from_the_near_cache(service, db):
    http, schema = service
    assert await get_json(http, "/patron/1") == (200, {"id": 1, "name": "Ada", "fav_dish": "pancakes"})
    await get_json(http, "/patron/1")
    async with http.get("/stats") as response:
        assert (await response.json())["hits"] >= 1  # the second read never left the process

    async with http.put("/patron/1", json={"fav_dish": "waffles"}) as response:
        assert response.status == 200 and (await response.json())["fav_dish"] == "waffles"  # read-your-write
    await eventually(lambda: _has(http, "/patron/1", "fav_dish", "waffles"), what="near-cache followed")

    await db.execute(f"UPDATE {schema}.patron SET name = 'Ada L.' WHERE id = 1")  # behind its back
    await eventually(lambda: _has(http, "/patron/1", "name", "Ada L."), what="external change seen")

    async with http.post("/patron", json={"name": "Alan", "fav_dish": "apples"}) as response:
        assert response.status == 201
        new_id = (await response.json())["id"]
    await eventually(lambda: _has(http, f"/patron/{new_id}", "name", "Alan"), what="insert seen")

    async with http.delete("/patron/2") as response:
        assert response.status == 204
    await eventually(lambda: _gone(http, "/patron/2"), what="delete seen")
    async with http.delete("/patron/2") as response:
        assert response.status == 404
    async with http.post("/patron", json={"fav_dish": "x"}) as response:
        assert response.status == 400


async def _has(http, path, field, value) -> bool:  # type: ignore[no-untyped-def]
    status, row = await get_json(http, path)
    return status == 200 and row[field] == value


async def _gone(http, path) -> bool:  # type: ignore[no-untyped-def]
    return (await get_json(http, path))[0] == 404


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_every_setting_it_reads_is_documented():
    source = APP.read_text()
    read = set(re.findall(r"os\.environ(?:\.get\(|\[)\"(\w+)\"", source))
    assert {"DATABASE_URL", "SIDECAR", "PATRON_TABLE", "HOST", "PORT"} <= read  # (the pattern finds them)
    docstring = ast.get_docstring(ast.parse(source)) or ""
    readme = (APP.parent / "README.md").read_text()
    assert not [name for name in sorted(read) if not re.search(rf"^ +{name} ", docstring, re.M)], "app.py docstring"
    assert not [name for name in sorted(read) if f"`{name}`" not in readme], "README.md"


async def test_run_as_a_script_it_serves_on_port(start_daemon, postgres, db, schema):
    """``python app.py``, configured as its docstring says: HTTP on $HOST:$PORT."""
    await db.execute(f"CREATE TABLE {schema}.patron (id serial PRIMARY KEY, name text NOT NULL, fav_dish text)")
    sidecar = await start_daemon([f"{schema}.patron"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        DATABASE_URL=postgres.dsn,
        SIDECAR=sidecar.target,
        PATRON_TABLE=f"{schema}.patron",
        HOST="127.0.0.1",
        PORT=str(port),
    )
    process = await asyncio.create_subprocess_exec(sys.executable, str(APP), env=env, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

            async def answers() -> bool:
                if process.returncode is not None:  # not an AssertionError: eventually would retry it
                    raise RuntimeError(f"app.py exited: {(await process.stderr.read()).decode()}")
                try:
                    return await _stats_ok(http)
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(answers, timeout=30, what=f"the service on port {port}")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)


async def test_without_a_database_url_it_is_read_only(start_daemon, db, schema, monkeypatch):
    """Fleet mode's app pods hold no database credentials: reads work, writes answer 405."""
    await db.execute(
        f"CREATE TABLE {schema}.patron (id serial PRIMARY KEY, name text NOT NULL, fav_dish text);"
        f"INSERT INTO {schema}.patron (name, fav_dish) VALUES ('Ada', 'pancakes')"
    )
    async with running_app(start_daemon, schema, monkeypatch, None) as http:
        assert await get_json(http, "/patron/1") == (200, {"id": 1, "name": "Ada", "fav_dish": "pancakes"})
        for method, path in (("POST", "/patron"), ("PUT", "/patron/1"), ("DELETE", "/patron/1")):
            async with http.request(method, path, json={"name": "Eve"}) as response:
                assert response.status == 405, method
                assert "read-only" in await response.text()
    assert await db.fetchval(f"SELECT count(*) FROM {schema}.patron") == 1

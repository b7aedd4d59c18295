"""The example patron service (clients/python/examples/patron_service) against
a real sidecar and PostgreSQL: CRUD over HTTP, reads from the near-cache."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.waiting import eventually

APP = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples" / "patron_service" / "app.py"


@pytest.fixture
async def service(start_daemon, postgres, db, schema, monkeypatch):
    await db.execute(
        f"CREATE TABLE {schema}.patron (id serial PRIMARY KEY, name text NOT NULL, fav_dish text);"
        f"INSERT INTO {schema}.patron (name, fav_dish) VALUES ('Ada', 'pancakes'), ('Grace', 'curry')"
    )
    monkeypatch.setenv("PATRON_TABLE", f"{schema}.patron")
    spec = importlib.util.spec_from_file_location("patron_service", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sidecar = await start_daemon([f"{schema}.patron"])
    runner = web.AppRunner(module.make_app(postgres.dsn, sidecar.target))
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
        await eventually(lambda: _stats_ok(http), what="service up, its near-cache following")
        yield http, schema
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

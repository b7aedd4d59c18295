"""The patron service of the asyncio case study, reading through the sidecar.

Create, read, update and delete patrons over HTTP. Writes go to PostgreSQL;
reads come from the client's near-cache, kept coherent by the sidecar's
Watch stream, so a hot read costs microseconds and no database work.

    DATABASE_URL=postgresql://...  SIDECAR=127.0.0.1:50051  PORT=8080  python app.py

Settings, from the environment:

    DATABASE_URL   PostgreSQL DSN, for the writes; without it the service is read-only
                   (writes answer 405), as in fleet mode, where the pod holds no
                   database credentials at all
    SIDECAR        the sidecar's address (default 127.0.0.1:50051)
    PATRON_TABLE   the table (default public.patron)
    HOST           the HTTP address to listen on (default 127.0.0.1)
    PORT           the HTTP port (default 8080)

    POST   /patron          {"name": ..., "fav_dish": ...}  -> 201 {"id": ...}
    GET    /patron/{id}     -> 200 row | 404
    PUT    /patron/{id}     {"name"?, "fav_dish"?}          -> 200 row (read back, strongly)
    DELETE /patron/{id}     -> 204 | 404
    GET    /stats           near-cache hits and misses
"""

from __future__ import annotations

import os

import asyncpg
from aiohttp import web
from cache_sidecar_client import AsyncClient

TABLE = os.environ.get("PATRON_TABLE", "public.patron")
FIELDS = ("name", "fav_dish")

routes = web.RouteTableDef()
DB = web.AppKey("db", asyncpg.Pool | None)
CACHE = web.AppKey("cache", AsyncClient)


def database(request: web.Request) -> asyncpg.Pool:
    pool = request.app[DB]
    if pool is None:
        raise web.HTTPMethodNotAllowed(
            request.method, ["GET"], text="this service is read-only: it was started without DATABASE_URL"
        )
    return pool


def patron_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(text="id must be an integer") from None


async def body(request: web.Request, required: bool) -> dict[str, str]:
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body must be JSON") from None
    values = {k: data[k] for k in FIELDS if k in data}
    if required and "name" not in values:
        raise web.HTTPBadRequest(text="name is required")
    if not values:
        raise web.HTTPBadRequest(text=f"give one of {', '.join(FIELDS)}")
    return values


@routes.post("/patron")
async def create(request: web.Request) -> web.Response:
    pool = database(request)
    values = await body(request, required=True)
    new_id = await pool.fetchval(
        f"INSERT INTO {TABLE} (name, fav_dish) VALUES ($1, $2) RETURNING id", values["name"], values.get("fav_dish")
    )
    return web.json_response({"id": new_id}, status=201)


@routes.get("/patron/{id}")
async def read(request: web.Request) -> web.Response:
    row = await request.app[CACHE].get(TABLE, patron_id(request))  # near-cache, else the sidecar
    if row is None:
        raise web.HTTPNotFound(text="no such patron")
    return web.json_response(row)


@routes.put("/patron/{id}")
async def update(request: web.Request) -> web.Response:
    pool = database(request)
    key = patron_id(request)
    values = await body(request, required=False)
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, 2))
    status = await pool.execute(f"UPDATE {TABLE} SET {assignments} WHERE id = $1", key, *values.values())
    if status == "UPDATE 0":
        raise web.HTTPNotFound(text="no such patron")
    # Read our own write: a strong read passes the sidecar's read barrier.
    return web.json_response(await request.app[CACHE].get(TABLE, key, consistency="strong"))


@routes.delete("/patron/{id}")
async def delete(request: web.Request) -> web.Response:
    status = await database(request).execute(f"DELETE FROM {TABLE} WHERE id = $1", patron_id(request))
    if status == "DELETE 0":
        raise web.HTTPNotFound(text="no such patron")
    return web.Response(status=204)


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    near = request.app[CACHE].near_cache
    return web.json_response(
        {"connected": near.connected, "hits": near.stats.hits, "misses": near.stats.misses, "rows": len(near)}
    )


def make_app(dsn: str | None, sidecar: str) -> web.Application:
    """The service; ``dsn`` None: read-only (no database credentials, reads only)."""

    async def resources(app: web.Application):  # type: ignore[no-untyped-def]
        app[DB] = await asyncpg.create_pool(dsn, min_size=1, max_size=4) if dsn else None
        app[CACHE] = AsyncClient(sidecar, near_cache={TABLE: 10_000})
        yield
        await app[CACHE].close()
        pool = app[DB]
        if pool is not None:
            await pool.close()

    app = web.Application()
    app.add_routes(routes)
    app.cleanup_ctx.append(resources)
    return app


if __name__ == "__main__":
    web.run_app(
        make_app(os.environ.get("DATABASE_URL") or None, os.environ.get("SIDECAR", "127.0.0.1:50051")),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8080")),
    )

"""The transport floor: a gRPC server that answers Get and BatchGet with
prebuilt response bytes of the same shape the sidecar sends, doing nothing else.

    python -m tests.benchmarks.floor_server 127.0.0.1:50061 <row-bytes-file>
        [--sync] [--loop asyncio|uvloop] [--option grpc.optimization_target=latency ...] [--busy-us 80]

The address may be ``unix:/path``. ``--sync`` serves with grpcio's thread-pool
server instead of grpc.aio; ``--option`` passes a channel argument to the
server (an integer value is passed as one). ``get_floor.py`` uses these to
measure whether any of them lowers the floor. ``--busy-us`` makes each call of
the grpc.aio server hold the CPU that long first (a handler that works, without
this daemon): what a handler's time costs the process beyond itself.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from sidecar.core import wire
from sidecar.edge.names import SERVICE_NAME


def replies(row: bytes) -> tuple[bytes, bytes]:
    revisions = wire.RevisionField()
    revisions.update("0123456789abcdef", 1)
    entry = wire.entry(row)
    return wire.get_response(entry, revisions), wire.batch_get_response([entry] * 100, revisions)


def handlers(get: Callable[..., Any], batch_get: Callable[..., Any]) -> dict[str, grpc.RpcMethodHandler]:
    return {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "BatchGet": grpc.unary_unary_rpc_method_handler(batch_get),
    }


def parse_options(texts: list[str]) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = []
    for text in texts:
        name, _, value = text.partition("=")
        options.append((name, int(value) if value.lstrip("-").isdigit() else value))
    return options


def busy(seconds: float) -> None:
    if seconds:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass


async def serve_aio(address: str, row: bytes, options: list[tuple[str, Any]], busy_seconds: float = 0.0) -> None:
    get_reply, batch_reply = replies(row)

    async def get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        busy(busy_seconds)
        return get_reply

    async def batch_get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        busy(busy_seconds)
        return batch_reply

    methods = handlers(get, batch_get)
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    server.add_registered_method_handlers(SERVICE_NAME, methods)
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def serve_sync(address: str, row: bytes, options: list[tuple[str, Any]]) -> None:
    get_reply, batch_reply = replies(row)
    methods = handlers(lambda request, context: get_reply, lambda request, context: batch_reply)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    server.add_insecure_port(address)
    server.start()
    print("ready", flush=True)
    threading.Event().wait()  # until terminated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("row_file", type=Path)
    parser.add_argument("--sync", action="store_true", help="grpcio's thread-pool server instead of grpc.aio")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--option", action="append", default=[], help="a server channel argument, name=value")
    parser.add_argument("--busy-us", type=float, default=0.0, help="CPU each grpc.aio call holds first")
    args = parser.parse_args()
    row, options = args.row_file.read_bytes(), parse_options(args.option)
    if args.sync:
        serve_sync(args.address, row, options)
    elif args.loop == "uvloop":
        import uvloop

        uvloop.run(serve_aio(args.address, row, options, args.busy_us / 1e6))
    else:
        asyncio.run(serve_aio(args.address, row, options, args.busy_us / 1e6))


if __name__ == "__main__":
    main()

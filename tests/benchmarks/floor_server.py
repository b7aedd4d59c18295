"""The transport floor: a grpc.aio server that answers Get and BatchGet with
prebuilt response bytes of the same shape the sidecar sends, doing nothing else.

    python -m tests.benchmarks.floor_server 127.0.0.1:50061 <row-bytes-file>
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from sidecar import wire
from sidecar.service import SERVICE_NAME


async def main(address: str, row: bytes) -> None:
    revisions = wire.Revisions()
    revisions.update("0123456789abcdef", 1)
    entry = wire.entry(row)
    get_reply = wire.get_response(entry, revisions)
    batch_reply = wire.batch_get_response([entry] * 100, revisions)

    async def get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return get_reply

    async def batch_get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return batch_reply

    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "BatchGet": grpc.unary_unary_rpc_method_handler(batch_get),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    server.add_insecure_port(address)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]).read_bytes()))

"""The servicer sends nothing for a call whose deadline passed: grpc core has
already ended it, and answering or aborting then fails inside grpc, which
logs an ERROR traceback (``ExecuteBatchError raised in core``) for what is
only a client's timeout. Driven with a fake context, so deterministic."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from sidecar.core.assembly import direct
from sidecar.edge.service import CacheService
from sidecar.errors import Unavailable
from sidecar.testing import MemoryDatabase


class ExpiredCall(Exception):
    """What grpc raises when a batch is sent on a call core has ended."""


class Context:
    def __init__(self, deadline_in: float) -> None:
        self.deadline = time.monotonic() + deadline_in
        self.aborts: list[grpc.StatusCode] = []

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborts.append(code)
        if self.time_remaining() <= 0:
            raise ExpiredCall(details)
        raise grpc.aio.AbortError()


def service() -> CacheService:
    return CacheService(direct(MemoryDatabase(), []))  # (no table: _call does not read one)


async def test_a_call_that_arrives_expired_does_no_work():
    ran = []

    async def work() -> bytes:
        ran.append(True)
        return b""

    with pytest.raises(asyncio.CancelledError):
        await service()._call(Context(-0.01), "Get", work)  # type: ignore[arg-type]
    assert not ran


async def test_an_answer_ready_after_the_deadline_is_not_sent():
    context = Context(5)

    async def work() -> bytes:
        context.deadline = time.monotonic() - 0.001  # the handler overran its deadline
        return b"answer"

    with pytest.raises(asyncio.CancelledError):
        await service()._call(context, "Get", work)  # type: ignore[arg-type]


async def test_an_error_after_the_deadline_is_not_sent():
    context = Context(5)

    async def work() -> bytes:
        context.deadline = time.monotonic() - 0.001
        raise Unavailable("no barrier")

    with pytest.raises(asyncio.CancelledError):
        await service()._call(context, "Sync", work)  # type: ignore[arg-type]
    assert context.aborts == []


async def test_errors_within_the_deadline_are_still_statuses():
    context = Context(5)

    async def work() -> bytes:
        raise Unavailable("no barrier")

    with pytest.raises(grpc.aio.AbortError):
        await service()._call(context, "Sync", work)  # type: ignore[arg-type]
    assert context.aborts == [grpc.StatusCode.UNAVAILABLE]

    async def slow() -> bytes:
        await asyncio.sleep(10)  # (cut by the sidecar's own bound, not the call's deadline)
        return b""

    async def bounded() -> bytes:
        async with asyncio.timeout(0.01):
            return await slow()

    with pytest.raises(grpc.aio.AbortError):
        await service()._call(context, "Sync", bounded)  # type: ignore[arg-type]
    assert context.aborts[-1] == grpc.StatusCode.DEADLINE_EXCEEDED

"""BatchGet's key forms: the one-column fast paths answer as the general path
does, and every bound and refusal of a request holds on each of them."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sidecar.api.v1 import cache_pb2 as pb
from sidecar.core.assembly import Options, direct
from sidecar.core.keys import KeyColumn
from sidecar.core.schema import TableSchema
from sidecar.edge.service import CacheService
from sidecar.testing import MemoryChangeSource, MemoryDatabase, int_key_schema
from tests.support.waiting import eventually

T = "public.items"
PAIRS = "public.pairs"


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)


def pairs_schema() -> TableSchema:
    base = int_key_schema(PAIRS)
    columns = (KeyColumn.create("a", "int8", "bigint"), KeyColumn.create("b", "text", "text"))
    return TableSchema(config=base.config, key_columns=columns)


@pytest.fixture
async def service():
    db = MemoryDatabase(int_key_schema(T), pairs_schema())
    for i in (1, 2, 3):
        db.put(T, (i,), id=i)
    db.put(PAIRS, (1, "x"), a=1, b="x")
    source = MemoryChangeSource(db)
    core = direct(db, list(db.schemas.values()), Options(max_batch_keys=5))
    core.notices.attach(source)
    following = asyncio.create_task(source.follow(core.notices))
    await eventually(lambda: core.engine.ready)
    yield CacheService(core)
    following.cancel()
    await core.close()


def key(*values: object) -> pb.Key:
    parts = []
    for v in values:
        parts.append(pb.KeyPart(int_value=v) if isinstance(v, int) else pb.KeyPart(string_value=str(v)))
    return pb.Key(parts=parts)


async def ids(service: CacheService, request: pb.BatchGetRequest) -> list[int | None]:
    import json

    reply = pb.BatchGetResponse.FromString(await service.BatchGet(request, Context()))  # type: ignore[arg-type]
    return [json.loads(r.row)["id"] if r.found else None for r in reply.rows]


async def refusal(service: CacheService, request: pb.BatchGetRequest) -> tuple[grpc.StatusCode, str]:
    context = Context()
    with pytest.raises(Aborted):
        await service.BatchGet(request, context)  # type: ignore[arg-type]
    assert context.status is not None
    return context.status


@pytest.mark.parametrize(
    "request_",
    [
        pb.BatchGetRequest(table=T, keys=[key(3), key(9), key(1)]),
        pb.BatchGetRequest(table=T, int_keys=[3, 9, 1]),
        pb.BatchGetRequest(table=T, string_keys=["3", "9", "1"]),
        pb.BatchGetRequest(table=T, keys=[key(3), key("9"), key(" 1")]),  # parts coerced as one-by-one would
    ],
    ids=["keys", "int_keys", "string_keys", "keys of mixed kinds"],
)
async def test_every_form_answers_rows_in_the_order_asked(service, request_):
    assert await ids(service, request_) == [3, None, 1]


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (
            pb.BatchGetRequest(table=T, keys=[key(1), pb.Key(parts=[pb.KeyPart()])]),
            "INVALID_ARGUMENT",
            "keys[1]: part 0 has no value",
        ),
        (pb.BatchGetRequest(table=T, keys=[key(1), pb.Key()]), "INVALID_ARGUMENT", "keys[1]: empty"),
        (pb.BatchGetRequest(table=T, keys=[key(1), key(1, 2)]), "INVALID_ARGUMENT", "key has 2 part(s)"),
        (pb.BatchGetRequest(table=T, keys=[key(1), key("x")]), "INVALID_ARGUMENT", "'x' is not an integer"),
        (pb.BatchGetRequest(table=T, int_keys=[1], keys=[key(1)]), "INVALID_ARGUMENT", "not keys and int_keys"),
        (
            pb.BatchGetRequest(table=T, int_keys=[1], string_keys=["1"]),
            "INVALID_ARGUMENT",
            "not int_keys and string_keys",
        ),
        (pb.BatchGetRequest(table=T, int_keys=list(range(6))), "INVALID_ARGUMENT", "6 keys requested; at most 5"),
        (pb.BatchGetRequest(table=T, keys=[key(1)] * 6), "INVALID_ARGUMENT", "6 keys requested; at most 5"),
        (pb.BatchGetRequest(table=T, string_keys=["1", "x"]), "INVALID_ARGUMENT", "'x' is not an integer"),
        (
            pb.BatchGetRequest(table=PAIRS, int_keys=[1]),
            "INVALID_ARGUMENT",
            "key has 1 part(s) but the primary key is (a, b)",
        ),
        (
            pb.BatchGetRequest(table=PAIRS, keys=[key(1)]),
            "INVALID_ARGUMENT",
            "key has 1 part(s) but the primary key is (a, b)",
        ),
        (pb.BatchGetRequest(table="public.nope", int_keys=[1]), "NOT_FOUND", "not cached here"),
    ],
)
async def test_refusals_name_the_problem(service, request_, code, fragment):
    status, details = await refusal(service, request_)
    assert status == getattr(grpc.StatusCode, code)
    assert fragment in details


async def test_composite_keys_take_the_general_path(service):
    reply = pb.BatchGetResponse.FromString(
        await service.BatchGet(pb.BatchGetRequest(table=PAIRS, keys=[key(1, "x"), key(1, "y")]), Context())  # type: ignore[arg-type]
    )
    assert [r.found for r in reply.rows] == [True, False]

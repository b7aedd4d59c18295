"""The Python client's conversions and error mapping (no server needed)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid

import grpc
import pytest
from cache_sidecar_client import InvalidArgument, TableNotFound, Unavailable
from cache_sidecar_client._convert import batch_keys, from_key, read_options, to_key
from cache_sidecar_client.errors import CacheSidecarError, from_rpc_error


@pytest.mark.parametrize(
    ("value", "field", "sent"),
    [
        (5, "int_value", 5),
        (2**70, "string_value", str(2**70)),
        (True, "bool_value", True),
        ("x", "string_value", "x"),
        (1.5, "double_value", 1.5),
        (b"\x00", "bytes_value", b"\x00"),
        (uuid.UUID(int=1), "string_value", "00000000-0000-0000-0000-000000000001"),
        (decimal.Decimal("1.50"), "string_value", "1.50"),
        (dt.date(2024, 2, 29), "string_value", "2024-02-29"),
    ],
)
def test_key_parts(value, field, sent):
    (part,) = to_key(value).parts
    assert part.WhichOneof("kind") == field and getattr(part, field) == sent


def test_composite_keys_and_round_trip():
    key = to_key((3, "sku"))
    assert [p.WhichOneof("kind") for p in key.parts] == ["int_value", "string_value"]
    assert from_key(key) == (3, "sku") and from_key(to_key(7)) == 7
    with pytest.raises(TypeError, match="cannot send object"):
        to_key(object())


def test_batch_keys_use_compact_forms_when_they_can():
    assert batch_keys([1, 2]) == {"int_keys": [1, 2]}
    assert batch_keys(["a", "b"]) == {"string_keys": ["a", "b"]}
    assert "keys" in batch_keys([1, "a"]) and "keys" in batch_keys([True]) and "keys" in batch_keys([(1, 2)])
    assert "keys" in batch_keys([2**64])


def test_read_options():
    assert read_options("eventual", None, False) is None  # nothing to send
    assert read_options("strong", None, False).consistency == 2
    with pytest.raises(ValueError, match="consistency"):
        read_options("linearizable", None, False)  # type: ignore[arg-type]


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, TableNotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.INTERNAL, CacheSidecarError),
    ],
)
def test_errors_map_to_a_small_hierarchy(code, cls):
    error = from_rpc_error(FakeRpcError(code, "why"))
    assert type(error) is cls and isinstance(error, CacheSidecarError)
    assert error.code == code and str(error) == f"{code.name}: why"


def test_resumer_resumes_from_the_stream_start_and_skips_repeats():
    from cache_sidecar_client import ChangeBatch, Revision
    from cache_sidecar_client.watch import Resumer, request

    resumer = Resumer(request(["t"], None, None, None, False, None))
    resumer.established((("cachesidecar-epoch", "e"), ("cachesidecar-revision", "e/41")))
    assert resumer.next_request().start_revision.number == 41  # cut before any message: no gap
    assert resumer.duplicate(ChangeBatch(Revision("e", 41), 1, []))
    assert not resumer.duplicate(ChangeBatch(Revision("e", 42), 1, []))


def test_resumer_starts_over_without_the_stale_revision_after_out_of_range():
    from cache_sidecar_client import Revision
    from cache_sidecar_client.watch import Resumer, request

    resumer = Resumer(request(["t"], None, None, Revision("old", 5), False, None))
    reset = resumer.out_of_range("gone")
    assert reset.revision is None and "resync" in reset.reason
    assert not resumer.next_request().HasField("start_revision")


def test_unavailable_is_retried_within_the_deadline_and_other_errors_are_not():
    from cache_sidecar_client import Client, TableNotFound, Unavailable
    from cache_sidecar_client.api.v1 import cache_pb2 as pb

    class Stub:
        def __init__(self, failures: list[grpc.StatusCode]) -> None:
            self.failures = failures
            self.calls = 0

        def Sync(self, request, timeout):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.failures:
                raise FakeRpcError(self.failures.pop(0), "down")
            return pb.SyncResponse(revision=pb.Revision(epoch="e", number=3))

    client = Client("127.0.0.1:1", retries=2)
    client._stub = Stub([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])  # type: ignore[assignment]
    assert client.sync().number == 3 and client._stub.calls == 3
    client._stub = Stub([grpc.StatusCode.UNAVAILABLE] * 3)  # type: ignore[assignment]
    with pytest.raises(Unavailable):
        client.sync()
    assert client._stub.calls == 3  # one try and two retries
    client._stub = Stub([grpc.StatusCode.NOT_FOUND])  # type: ignore[assignment]
    with pytest.raises(TableNotFound):
        client.sync()
    assert client._stub.calls == 1
    client.close()


def test_the_default_decoder_reads_rows_json_loads_refuses():
    from cache_sidecar_client._convert import default_decoder
    from cache_sidecar_client._json import loads

    huge = b'{"n":' + b"9" * 5000 + b',"m":-' + b"1" * 4400 + b"}"
    row = default_decoder(huge)
    assert row["n"] == 10**5000 - 1 and row["m"] == -(10**4400 - 1) // 9
    deep = default_decoder(b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    depth, inner = 0, deep["a"]
    while inner:
        inner, depth = inner[0], depth + 1
    assert depth == 49_999
    for text in ('{"a":[1,2.5,{"b":null}],"c":"\\u00e9","d":true}', "[]", '"x"', "[NaN]"):
        assert repr(loads(text)) == repr(json.loads(text))
    for bad in (b"[1,]", b'{"a" 1}', b"{", b"[1]x", b""):
        with pytest.raises(ValueError):
            default_decoder(bad)
    # what json.loads reads besides the sidecar's plain UTF-8 rows, read alike
    for other in (b'{"a": 1} ', b' {"a":1}', '{"a":"é"}'.encode("utf-16"), b'\xef\xbb\xbf{"a":1}', bytearray(b"[1]")):
        assert default_decoder(other) == json.loads(other)

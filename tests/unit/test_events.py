"""Payload parsing at the edge: typed events or a PayloadError saying why."""

from __future__ import annotations

import decimal

import pytest

from sidecar.core import events
from sidecar.errors import PayloadError


def test_row_change():
    event = events.parse('{"v":1,"s":"public","t":"patron","x":77,"op":"U","k":[[1],[2]],"o":[[9]]}')
    assert event == events.RowChange("public", "patron", events.Op.UPDATE, 77, ((1,), (2,)), ((9,),))


def test_numbers_keep_their_digits():
    event = events.parse('{"v":1,"s":"s","t":"t","x":1,"op":"I","k":[[1.50, "a"]],"o":[]}')
    assert isinstance(event, events.RowChange)
    assert event.keys == ((decimal.Decimal("1.50"), "a"),)


def test_table_change_and_sync_token():
    assert events.parse('{"v":1,"s":"a","t":"b","x":3,"op":"T","all":"truncate"}') == events.TableChange(
        "a", "b", events.Op.TRUNCATE, 3, "truncate"
    )
    assert events.parse(events.sync_payload("tok-1")) == events.SyncToken("tok-1")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"v":2}', "version"),
        ('{"v":1,"t":"x","x":1,"op":"I","k":[]}', "schema or table"),
        ('{"v":1,"s":"a","t":"b","op":"I","k":[]}', "transaction id"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"Z","k":[]}', "unknown operation"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[1]}', "keys"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[[]]}', "keys"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"T"}', "TRUNCATE"),
        ('{"v":1,"sync":5}', "sync token"),
        # Anyone may NOTIFY our channel: what the triggers never send is refused here.
        ('{"v":1,"s":"a","t":"b","x":-1,"op":"I","k":[[1]]}', "transaction id -1 is out of range"),
        ('{"v":1,"s":"a","t":"b","x":18446744073709551616,"op":"I","k":[[1]]}', "out of range"),
        ('{"v":1,"s":"a","t":"b","x":true,"op":"I","k":[[1]]}', "transaction id"),
        ("[" * 3900 + "]" * 3900, "not JSON"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[[' + "[" * 3000 + "]" * 3000 + "]]}", "not JSON|scalars"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[[{"a":1}]]}', "scalars"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[[[1]]]}', "scalars"),
        ('{"v":1,"s":"' + "s" * 64 + '","t":"b","x":1,"op":"I","k":[[1]]}', "not a PostgreSQL name"),
        ('{"v":1,"s":"\\ud800","t":"b","x":1,"op":"I","k":[[1]]}', "not a PostgreSQL name"),
        ('{"v":1,"s":"a","t":"","x":1,"op":"I","k":[[1]]}', "not a PostgreSQL name"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"T","all":{"deep":1}}', "'all'"),
        ('{"v":1,"s":"a","t":"b","x":1,"op":"I","k":[[1]],"pad":"' + "x" * 8000 + '"}', "longer than"),
    ],
)
def test_bad_payloads(payload, fragment):
    with pytest.raises(PayloadError, match=fragment):
        events.parse(payload)


def test_largest_transaction_id_fits():
    event = events.parse('{"v":1,"s":"a","t":"b","x":18446744073709551615,"op":"D","k":[[1]]}')
    assert isinstance(event, events.RowChange) and event.xid == 2**64 - 1

"""The adapter translates driver errors: the core sees only the daemon's own."""

from __future__ import annotations

import asyncpg
import pytest

from sidecar.errors import QueryFailed, Unavailable
from sidecar.pg.db import translated


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (asyncpg.exceptions.NumericValueOutOfRangeError("value overflows numeric format"), QueryFailed),
        (asyncpg.exceptions.UndefinedColumnError('column "v" does not exist'), QueryFailed),
        (asyncpg.exceptions.UndefinedTableError('relation "t" does not exist'), QueryFailed),
        (asyncpg.exceptions._base.DataError("invalid input for query argument $1"), QueryFailed),
        (asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"), Unavailable),
        (asyncpg.exceptions.SerializationError("could not serialize access"), Unavailable),
        (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"), Unavailable),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), Unavailable),
        (ConnectionRefusedError("refused"), Unavailable),
        (TimeoutError(), Unavailable),
        (asyncpg.InterfaceError("connection is closed"), Unavailable),
    ],
)
def test_driver_errors_become_the_daemons_own(raised, expected):
    with pytest.raises(expected, match="reading t") as info, translated("reading t"):
        raise raised
    assert info.value.__cause__ is raised


def test_a_bug_is_left_as_it_is():
    with pytest.raises(ZeroDivisionError), translated("reading t"):
        raise ZeroDivisionError

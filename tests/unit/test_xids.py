"""Which transactions a snapshot saw (``sidecar.core.xids``), asked with 32-bit ids."""

from __future__ import annotations

import pytest

from sidecar.core.xids import Visibility


def test_before_xmin_seen_running_and_later_not() -> None:
    seen = Visibility.parse("100:110:103,107")
    assert seen.saw(99) and seen.saw(100 - 50)
    assert seen.saw(100) and seen.saw(105) and seen.saw(109)
    assert not seen.saw(103) and not seen.saw(107)
    assert not seen.saw(110) and not seen.saw(200)


def test_32_bit_ids_are_read_in_xmax_epoch() -> None:
    epoch = 3 << 32
    seen = Visibility.parse(f"{epoch + 5}:{epoch + 20}:")
    assert seen.saw(10) and not seen.saw(20) and not seen.saw(25)
    assert seen.saw(0xFFFFFFF0)  # the end of the epoch before: older than xmin
    assert not seen.saw(epoch + 1000 & 0xFFFFFFFF)  # ahead of xmax: not seen
    near = Visibility.parse(f"{epoch - 10}:{epoch + 3}:{epoch - 2}")
    assert near.saw(0xFFFFFFF7) and not near.saw(0xFFFFFFFE) and near.saw(1) and not near.saw(3)


@pytest.mark.parametrize("text", ["", "1:2", "x:2:", "5:4:", "1:5:7", "1:5:2,,9"])
def test_malformed_snapshots_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Visibility.parse(text)

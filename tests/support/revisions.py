"""Revision numbers as each capture mode makes them, for tests that check a stream's order."""

from __future__ import annotations

from collections.abc import Sequence


def one_per_commit(numbers: Sequence[int], after: int, capture: str) -> bool:
    """``numbers`` are revisions of consecutive commits after revision ``after``, in order,
    none twice: in notify mode a revision counts commits (``after + 1``, ``after + 2``...);
    in logical mode it is the commit's LSN (increasing, apart), so only the order shows
    here and the count of batches (the caller's) shows that none is missing."""
    if capture == "notify":
        return list(numbers) == list(range(after + 1, after + 1 + len(numbers)))
    return all(a < b for a, b in zip([after, *numbers], numbers, strict=False))

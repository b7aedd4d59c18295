"""Rows held ahead of the change stream, by key: ``KeyFences``.

A relation's row read from the database may show a source row newer than the
relation's other rows joined to it show: the read saw a commit whose change has
not arrived yet, so those rows are not pending yet. Memory answers for such a key
once a read-barrier round (a *fence*) brought every commit before it -- the
others are pending by then, and a read of them waits for them.

The Watch fan-out attaches the rows held when it publishes a batch; a row of such
a key may be newer than the batch's other rows (until the batches its fence
brought are published too), so the batch marks it ``ahead`` and a follower
applying the batch fences the key on its own (``replica.ReplicaTable``). Per key,
so that reads under constant writes wait for one round at most.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable

from sidecar.core.keys import Key


class KeyFences:
    """The keys whose rows were read ahead: fenced until a barrier round passed, and
    ahead of the batches numbered before the round ended (for the fan-out's marks)."""

    def __init__(self, seq: Callable[[], int]) -> None:
        self._seq = seq  # the newest batch received (every commit before a passed round is in one up to it)
        self._fences: dict[Key, asyncio.Future[None]] = {}  # the newest round under way, per key
        # Per key: its row may be newer than the batches numbered before this (None: its
        # round is under way); the rounds that passed, in order, to drop them once published.
        self._ahead: dict[Key, int | None] = {}
        self._passed: collections.deque[tuple[int, list[Key]]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._fences)

    def __contains__(self, key: Key) -> bool:
        return key in self._fences

    def keys(self) -> list[Key]:
        return list(self._fences)

    def add(self, keys: Iterable[Key], fence: asyncio.Future[None]) -> None:
        """``keys`` were read ahead: fenced until ``fence`` is done (failed or not)."""
        keys = list(keys)
        for key in keys:
            self._fences[key] = fence
            self._ahead[key] = None
        fence.add_done_callback(lambda _: self._fence_passed(fence, keys))

    def _fence_passed(self, fence: asyncio.Future[None], keys: list[Key]) -> None:
        seq = self._seq()
        passed = [key for key in keys if self._fences.get(key) is fence]  # (not read ahead again since)
        for key in passed:
            del self._fences[key]
            self._ahead[key] = seq
        if passed:
            self._passed.append((seq, passed))

    async def wait(self, keys: Iterable[Key]) -> None:
        """Wait for the rounds of ``keys`` under way now (a failed one raises its error)."""
        fences = {id(f): f for key in keys if (f := self._fences.get(key)) is not None}
        for fence in fences.values():
            await asyncio.shield(fence)

    def ahead(self, key: Key, revision: int) -> bool:
        """Whether ``key``'s row may be newer than the other rows as of batch ``revision``
        show (asked in publishing order: the marks of earlier batches are dropped)."""
        passed = self._passed
        while passed and passed[0][0] <= revision:
            seq, keys = passed.popleft()
            for done in keys:
                if self._ahead.get(done, -1) == seq:
                    del self._ahead[done]
        if key not in self._ahead:
            return False
        until = self._ahead[key]
        return until is None or revision < until

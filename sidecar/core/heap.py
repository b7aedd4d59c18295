"""Big containers and CPython's garbage collector.

A full collection walks every tracked container element by element, one memory
read per element: a 1 M-row table's dict, or the 1 M-key list of a snapshot
that initial-state Watch streams read, costs every full collection ~100 ms
with the event loop stopped (measured: Gets delayed 105--130 ms during 10
initial-state streams of a 1 M-row table, each pause a full collection).
Those containers hold no reference cycles -- reference counting frees them,
and their rows are bytes -- so walking them finds nothing.

``built(size)``, told of such a container just made, moves every object alive
into the permanent generation (``gc.freeze``), which collections skip; an
object there that dies is still freed by reference counting. The price: a
reference cycle alive at that moment that becomes garbage later is never
collected. So only big containers count, and at most one freeze happens per
``interval`` seconds: a container built sooner is frozen when the interval
ends (until then it costs collections their time, nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

BIG = 50_000  # elements: a full collection walks fewer in well under 5 ms


class Heap:
    """When to freeze (one per process: the collector is global)."""

    def __init__(self, big: int = BIG, interval: float = 1.0) -> None:
        self.big = big
        self.interval = interval
        self._last = float("-inf")
        self._later: asyncio.TimerHandle | None = None
        self.freezes = 0

    def built(self, size: int) -> bool:
        """A container of ``size`` elements was just built; True if frozen now (else, in
        an event loop, it is frozen once the interval since the last freeze ended)."""
        if size < self.big:
            return False
        wait = self._last + self.interval - time.monotonic()
        if wait <= 0:
            self._freeze()
            return True
        if self._later is None:
            with contextlib.suppress(RuntimeError):  # (no loop: a later big container will do)
                self._later = asyncio.get_running_loop().call_later(wait, self._freeze)
        return False

    def _freeze(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._last = time.monotonic()
        gc.freeze()
        self.freezes += 1


HEAP = Heap()


def built(size: int) -> bool:
    """See ``Heap.built``."""
    return HEAP.built(size)

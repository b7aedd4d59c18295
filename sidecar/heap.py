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
``interval`` seconds (a container built sooner stays collectable: slower
pauses, nothing lost).
"""

from __future__ import annotations

import gc
import time

BIG = 50_000  # elements: a full collection walks fewer in well under 5 ms


class Heap:
    """When to freeze (one per process: the collector is global)."""

    def __init__(self, big: int = BIG, interval: float = 1.0) -> None:
        self.big = big
        self.interval = interval
        self._last = float("-inf")
        self.freezes = 0

    def built(self, size: int) -> bool:
        """A container of ``size`` elements was just built; True if frozen now."""
        if size < self.big:
            return False
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        gc.freeze()
        self.freezes += 1
        return True


HEAP = Heap()


def built(size: int) -> bool:
    """See ``Heap.built``."""
    return HEAP.built(size)

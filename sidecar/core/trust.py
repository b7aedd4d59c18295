"""Whether memory can be trusted: the change source is up (``Trust.up``), and the read
barrier that goes through that source (``Trust.barrier``).

The ingest objects (``notices.NoticeIngest``, ``batches.BatchIngest``) set it as their
source comes and goes; the read side (``engine.Engine``, ``reads.ReadPath``) and the
full tables' fences read it. Each change of ``up`` is pushed, once, to whoever asked
(``on_change``): the engine's readiness.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.core.barrier import Barrier
from sidecar.core.revisions import Revisions


class Trust:
    """The change source's state as the cache sees it: up or lost, and its barrier."""

    def __init__(self, revisions: Revisions, unavailable: str) -> None:
        self._revisions = revisions
        self.unavailable = unavailable  # why a barrier cannot be had while the source is lost, in words
        self.up = False  # the change source is up: memory is current and trusted
        self.barrier: Barrier | None = None  # through the source, once it can send tokens
        self._told: list[Callable[[], None]] = []
        revisions.on_applied(self._applied)

    def use_barrier(self, barrier: Barrier) -> None:
        """Read barriers go through ``barrier`` (its tokens come back ordered with the source's changes)."""
        self.barrier = barrier

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time ``up`` changes."""
        self._told.append(callback)

    def set_up(self, up: bool) -> None:
        self.up = up
        for callback in self._told:
            callback()

    def lost(self, reason: str) -> None:
        """The source is lost: memory is not trusted, and barriers under way fail."""
        if self.barrier is not None:
            self.barrier.fail_all(reason)
        self.set_up(False)

    def trusted_epoch(self) -> str | None:
        """The epoch while memory can be trusted (the source is up), else None."""
        return self._revisions.epoch if self.up else None

    async def fence(self) -> None:
        """Return once every commit before the call has been received (a token round trip)."""
        if self.up and self.barrier is not None:
            await self.barrier.wait(applied=False)

    def _applied(self, applied: int) -> None:
        if self.barrier is not None:
            self.barrier.applied(applied)

    async def close(self) -> None:
        if self.barrier is not None:
            await self.barrier.close()

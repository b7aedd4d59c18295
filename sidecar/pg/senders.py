"""Who sent a whole-table change: any role that can connect may NOTIFY our
channel, and a whole-table event costs a reload of the table (and, meanwhile,
reads of it from the database). So before one is applied, the sender -- the
backend whose PID PostgreSQL delivers with every notification -- is checked:
one whose role cannot write the table is dropped, counted and logged.

What "can write" means is the adapter's (``db.MAY_WRITE_SQL``, asked on the
LISTEN session by ``pg_source.PgChangeSource``): the role, or a role it may
``SET ROLE`` to, may INSERT, UPDATE, DELETE or TRUNCATE the table or one whose
writes reach it (a foreign key's cascade, a partition's parent, a view), or may
call a SECURITY DEFINER function of a role that may. The verdict is kept a
while per (PID, table) (``KEEP``), in a bounded cache, so a flood from one
connection costs one look-up.

When the sender cannot be told -- its backend has exited (a writer may
commit and disconnect before its notification is read), the look-up failed or
took too long -- the event is applied: a real change is never dropped for
want of an answer. Coalescing (``full.FullTable``: one reload in flight, one
more pending) bounds what such events cost.

Order is kept: while a check runs, every later event (row changes and
read-barrier tokens included) waits behind the one being checked, then they
go on in the order they came. Row events are not checked: they cost a keyed
refetch, and checking them would hold every first write of a connection.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sidecar.core.aio import TaskSet
from sidecar.core.events import Event, TableChange
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

MAX_VERDICTS = 10_000  # (PID, table) verdicts kept; the oldest go first
WARN_EVERY = 10.0  # seconds between warnings of one kind


class Verdict(enum.Enum):
    WRITER = "writer"  # may write the table: the event is applied
    STRANGER = "stranger"  # cannot write it: the event is dropped
    UNKNOWN = "unknown"  # gone, or the look-up failed: applied (never drop a real change)


# How long a verdict is kept. A PID is reused only after the kernel wraps around,
# and a stranger's verdict must not outlive its backend by much: a writer given its
# PID later would have a real change dropped. A writer's may: a stranger given its
# PID would only cost reloads (and a look-up holds events for a round trip).
KEEP = {Verdict.WRITER: 60.0, Verdict.STRANGER: 5.0, Verdict.UNKNOWN: 1.0}


@dataclass
class SenderStats:
    checks: int = 0  # look-ups made
    dropped: int = 0  # whole-table events dropped: their sender cannot write the table
    unknown: int = 0  # whole-table events applied though their sender could not be told


# ``check(pid, schema, table)``: True/False, None when it cannot tell; bounded in time by
# itself, raising a ``SidecarError`` when it fails.
Check = Callable[[int, str, str], Awaitable[bool | None]]


class SenderGate:
    """Passes events on in order, dropping whole-table events from senders that cannot
    write their table; ``check(pid, schema, table)`` says whether one can (None: cannot tell)."""

    def __init__(
        self,
        *,
        deliver: Callable[[Event], None],
        check: Check,
        hears: Callable[[str, str], bool],
        on_error: Callable[[BaseException], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver = deliver
        self._check = check
        self._hears = hears  # whether a table's changes matter here (others are not checked)
        self._on_error = on_error  # a failure delivering after a check (a bug: the owner stops)
        self._clock = clock
        self.stats = SenderStats()
        self._verdicts: collections.OrderedDict[tuple[int, str, str], tuple[Verdict, float]] = collections.OrderedDict()
        self._held: collections.deque[tuple[Event, int]] = collections.deque()
        self._checking = False
        self._generation = 0  # rises when what is held is thrown away (the connection was lost)
        self._tasks = TaskSet("sender check")
        self._warned: dict[str, tuple[float, int]] = {}

    def receive(self, event: Event, pid: int) -> None:
        """One event, as it came (synchronously: a failure to apply it is raised here)."""
        self._held.append((event, pid))
        if not self._checking:
            self._drain()

    def clear(self) -> None:
        """The connection was lost: what is held is gone with it (a rebuild follows)."""
        self._generation += 1
        self._held.clear()
        self._checking = False

    @property
    def held(self) -> int:
        """Events waiting behind a look-up now."""
        return len(self._held)

    async def close(self) -> None:
        self.clear()
        await self._tasks.close()

    def _drain(self, answer: Verdict | None = None) -> None:
        """Pass on what is held, up to the next event whose sender must be looked up
        (``answer``: the look-up's verdict on the first one)."""
        held = self._held
        while held:
            event, pid = held[0]
            if isinstance(event, TableChange) and self._hears(event.schema, event.table):
                verdict = answer or self._verdict(pid, event.schema, event.table)
                answer = None
                if verdict is None:
                    self._checking = True
                    self._tasks.spawn(self._look_up(pid, event.schema, event.table, self._generation), "look-up")
                    return
                held.popleft()
                if verdict is Verdict.STRANGER:
                    self.stats.dropped += 1
                    self._warn(
                        "dropped",
                        "dropping a whole-table change of %s.%s sent by backend %s, whose role cannot write it",
                        event.schema,
                        event.table,
                        pid,
                    )
                    continue
                if verdict is Verdict.UNKNOWN:
                    self.stats.unknown += 1
            else:
                held.popleft()
            self._deliver(event)

    def _verdict(self, pid: int, schema: str, table: str) -> Verdict | None:
        key = (pid, schema, table)
        known = self._verdicts.get(key)
        if known is None:
            return None
        if known[1] <= self._clock():
            del self._verdicts[key]
            return None
        return known[0]

    async def _look_up(self, pid: int, schema: str, table: str, generation: int) -> None:
        self.stats.checks += 1
        try:
            answer = await self._check(pid, schema, table)  # (bounded by its own timeout)
        except SidecarError as exc:  # (not kept: the next event of this sender asks again)
            self._warn("unknown", "cannot tell whether backend %s may write %s.%s (%s)", pid, schema, table, exc)
            verdict = Verdict.UNKNOWN
        except Exception as exc:  # a bug: stop rather than guess
            self._on_error(exc)
            return
        else:
            verdict = Verdict.UNKNOWN if answer is None else Verdict.WRITER if answer else Verdict.STRANGER
            key = (pid, schema, table)
            self._verdicts[key] = (verdict, self._clock() + KEEP[verdict])
            self._verdicts.move_to_end(key)
            while len(self._verdicts) > MAX_VERDICTS:
                self._verdicts.popitem(last=False)
        if generation != self._generation:
            return  # (the connection was lost meanwhile: nothing waits for this)
        self._checking = False
        try:
            self._drain(verdict)
        except Exception as exc:  # applying an event failed: as the listener does, stop
            self._on_error(exc)

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """At most one warning of ``kind`` per ``WARN_EVERY`` seconds (a flood is one line)."""
        now = self._clock()
        last, suppressed = self._warned.get(kind, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[kind] = (last, suppressed + 1)
            return
        self._warned[kind] = (now, 0)
        if suppressed:
            message += f" (and {suppressed} more like it since the last warning)"
        log.warning(message, *args)

"""The Watch fan-out: change batches in revision order, a bounded history, and
fan-out to any number of subscribers without ever blocking the listener.

The engine *records* each transaction batch as its notifications arrive and
*publishes* batches once they are applied (their refetches landed), in
revision order; publishing attaches the rows the sidecar now holds and
appends to the history. The history is shared: every subscriber is a cursor
into it (as in etcd's watchable store), so publishing costs the same for one
subscriber or a hundred and never waits for any of them. A subscriber that
falls more than ``max_lag`` batches behind, or off the end of the history,
is ended with a "fell behind" error naming its last delivered revision, so it
can resume from there.

Fan-out costs little per stream: a filtered view of a batch is made once per
distinct ``Filter`` (and encoded once, by whoever sends it first), the number
of streams is bounded (in all and per client connection), a subscriber that
is behind takes every batch it may have in one message (if its client asked
for that form), and idle subscribers wait on one future each, woken only
when they wait, with one shared ticker for progress marks.

Within an epoch, revisions of published batches are consecutive. A rebuild
(reconnect) starts a new epoch, empties the history and sends every
subscriber a reset.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.core.keys import Key
from sidecar.core.revisions import Revision
from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

# Operations, numbered as cachesidecar.v1.Operation.
INSERT, UPDATE, DELETE, TRUNCATE, TABLE_CHANGED, INVALIDATE, SNAPSHOT = 1, 2, 3, 4, 5, 6, 7
TABLE_WIDE = frozenset({TRUNCATE, TABLE_CHANGED})


class OutOfRange(SidecarError):
    """The resume revision is not in the history: resync."""


class FellBehind(SidecarError):
    """The subscriber fell too far behind and was ended: resume from its last revision."""


class Stalled(FellBehind):
    """The subscriber's client took no message for ``send_timeout`` seconds and was ended."""


class ShuttingDown(SidecarError):
    """The sidecar is shutting down: resume from the last revision, here or elsewhere."""


class TooManyStreams(SidecarError):
    """Too many Watch streams are open: close some, or raise the limit."""


@dataclass(slots=True)
class Change:
    table: str
    op: int
    key: Key | None = None  # None: the whole table
    old_key: Key | None = None
    row: bytes | None = None  # row JSON, attached at publish time (full tables)
    has_row: bool = False
    # The operation is whatever the row held at publish time says: UPDATE if
    # there is one, DELETE if not (relation rows, whose source change does not
    # tell whether the join gained, changed or lost the row).
    by_outcome: bool = False
    # The row may be newer than other rows of the batch showing the same source rows (a
    # relation's row read from the database while the change stream had not brought
    # every commit that read saw): a replica fences the key (ChangeEvent.ahead).
    ahead: bool = False


@dataclass(slots=True)
class Batch:
    epoch: str
    revision: int
    xid: int
    changes: list[Change] = field(default_factory=list)
    size: int = 0
    tables: frozenset[str] = frozenset()
    encoded: bytes | None = None  # the message, encoded once (wire.watch_message)
    # The batch as each distinct filter sees it (None: seen as nothing), made once
    # per filter while the batch is among the newest (``FanOut.view_window``); None
    # outside that window, where each catching-up subscriber filters for itself.
    views: dict[Filter, Batch | None] | None = None


@dataclass(slots=True)
class Batches:
    """Several consecutive batches in one message, in revision order (for clients
    that asked for that form: ``WatchRequest.accept_batches``)."""

    batches: list[Batch]


@dataclass(slots=True)
class Reset:
    epoch: str
    revision: int
    reason: str


@dataclass(slots=True)
class Progress:
    epoch: str
    revision: int


@dataclass(slots=True)
class InitialState:
    """A chunk of initial-state rows, all as of ``revision``."""

    epoch: str
    revision: int
    changes: list[Change]
    encoded: bytes | None = None  # the message, encoded as it was made (wire.watch_message)


@dataclass(slots=True)
class InitialStateDone:
    epoch: str
    revision: int


Message = Batch | Batches | Reset | Progress | InitialState | InitialStateDone
_TRIMMED = Batch("", -1, 0)  # stands in for a batch dropped from the history
SNAPSHOT_PAUSE = 0.002  # seconds: initial-state pauses are gathered to at least this long
MAX_VIEWS = 1024  # distinct filters' views kept per batch (beyond: made per subscriber)


def _revision_of(batch: Batch) -> int:
    return batch.revision


@dataclass(frozen=True)
class Filter:
    tables: frozenset[str]  # empty: every table
    keys: frozenset[Key] = frozenset()  # empty: every key
    ops: frozenset[int] = frozenset()  # empty: every operation

    def passes(self, change: Change) -> bool:
        if self.tables and change.table not in self.tables:
            return False
        if change.op in TABLE_WIDE:
            return True
        if self.keys and change.key not in self.keys and change.old_key not in self.keys:
            return False
        return not self.ops or change.op in self.ops

    def apply(self, batch: Batch) -> Batch | None:
        """The batch as this subscriber sees it (``batch`` itself when nothing is filtered).

        Subscribers with equal filters get the same view object (so it is
        encoded once), as long as the batch is among the newest ones.
        """
        if not self.keys and not self.ops and (not self.tables or batch.tables <= self.tables):
            return batch
        views = batch.views
        if views is None:
            return self._filtered(batch)
        try:
            return views[self]
        except KeyError:
            view = self._filtered(batch)
            if len(views) < MAX_VIEWS:
                views[self] = view
            return view

    def _filtered(self, batch: Batch) -> Batch | None:
        kept = [c for c in batch.changes if self.passes(c)]
        if not kept:
            return None
        return Batch(batch.epoch, batch.revision, batch.xid, kept, tables=batch.tables)


class AppliedObserver(Protocol):
    """Told what the fan-out publishes, in order (the shared-memory store mirrors it)."""

    def rebuilt(self) -> None:
        """Every table is being rebuilt from scratch (a new epoch, or a follower's rebuild)."""

    def applied(self, revision: Revision, batches: Sequence[Batch]) -> None:
        """``revision`` is applied; ``batches`` were published just now (whole transactions)."""


class FanOut:
    """History and fan-out of published change batches."""

    def __init__(
        self,
        *,
        rows_of: Callable[[str], dict[Key, bytes] | None],
        row_json: Callable[[bytes], bytes],
        ahead_of: Callable[[str, Key, int], bool] | None = None,
        max_batches: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_lag: int = 1_000,
        max_streams: int = 10_000,
        max_streams_per_connection: int = 1_000,
        send_timeout: float = 30.0,
    ) -> None:
        self._rows_of = rows_of  # a full table's rows (key -> cache entry); None for lazy tables
        self._row_json = row_json
        self._ahead_of = ahead_of  # whether a table's row held now may be newer than a revision's other rows
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_lag = max_lag
        self.max_streams = max_streams
        self.max_streams_per_connection = max_streams_per_connection
        # Seconds one message may wait for the client to take it (the gRPC layer times its
        # sends: a client that stops reading would otherwise hold its stream, and the
        # snapshot it reads, for as long as its connection lives).
        self.send_timeout = send_timeout
        # Plain variables, so that tests can change them (as etcd's watchable store does):
        self.view_window = 64  # the newest batches whose filtered views are shared
        self.max_group = 512  # most batches handed over in one Batches message
        self.progress_tick = 0.05  # seconds between checks for idle subscribers owed a progress mark
        self.wake_slice = 32  # subscribers woken at a time (see _wake_all)
        self.fan_out_share = 0.3  # most of the event loop's time fan-out takes while others wait for it
        self.pace_after = 0.0005  # seconds: a slice that took less is not followed by a pause
        self.epoch = ""
        self.published = 0  # every batch <= published is in the history (or compacted)
        self._history: list[Batch] = []  # published batches; the live part starts at _first
        self._first = 0
        self._trimmed_to = 0  # the newest revision trimmed from the history (or the epoch's start)
        self._bytes = 0
        self._viewed: collections.deque[Batch] = collections.deque()  # batches whose views are kept
        self.started = asyncio.Event()  # set once the first epoch began
        self._pending: collections.deque[Batch] = collections.deque()  # recorded, not yet applied
        self._subscribers: set[Subscription] = set()
        self._per_connection: dict[str, int] = {}
        # Subscribers waiting for their turn to send, oldest first (an ordered set), woken a
        # slice at a time; and those with nothing to send, waiting for the next publish
        # (which moves them to the turns: an idle one is never woken by the pacing itself).
        self._waiting: collections.OrderedDict[Subscription, None] = collections.OrderedDict()
        self._idle: dict[Subscription, None] = {}
        self._observers: list[AppliedObserver] = []  # told of each start and publish (the shared-memory store)
        self._waking: asyncio.Handle | None = None  # the next slice of wake-ups, when scheduled
        self._paced: set[Subscription] = set()  # subscribers owed progress marks when idle
        self._ticker: asyncio.TimerHandle | None = None
        self.dropped = 0  # subscribers ended for falling behind (stalled ones included)
        self.stalled = 0  # subscribers ended because a message waited longer than send_timeout
        self.refused = 0  # subscriptions refused by max_streams / max_streams_per_connection
        self.closing = False
        self.published_batches = 0
        # Initial states are made one message at a time across all streams, so that
        # however many are streaming, a read waits for at most one being made.
        self.snapshot_turn = asyncio.Lock()

    # ------------------------------------------------------------ engine side

    def start(self, epoch: str, revision: int, reason: str | None = None) -> None:
        """A new epoch begins at ``revision`` (a rebuild when ``reason`` is given)."""
        self.epoch = epoch
        self.published = revision
        self._history = []
        self._first = 0
        self._trimmed_to = revision
        self._pending.clear()
        self._viewed.clear()
        self._bytes = 0
        self.started.set()
        for subscriber in self._subscribers:
            # (subscribers that predate the first epoch hold none; a rebuild resets every one,
            # even in the same epoch: a follower keeps its upstream's epoch across a rebuild)
            if subscriber.epoch != epoch or reason is not None:
                subscriber.reset(Reset(epoch, revision, reason or "the cache was rebuilt"))
        for observer in self._observers:
            observer.rebuilt()

    def observe(self, observer: AppliedObserver) -> None:
        """Tell ``observer`` of every epoch's start and every publish, in order."""
        self._observers.append(observer)

    def record(self, revision: int, xid: int, *changes: Change) -> None:
        """Add changes to batch ``revision`` (created on first use, even for none)."""
        self.ensure(revision, xid)
        self._pending[-1].changes.extend(changes)

    def ensure(self, revision: int, xid: int) -> None:
        """Batch ``revision`` exists (its changes may only be known later: ``add``)."""
        if not self._pending or self._pending[-1].revision != revision:
            self._pending.append(Batch(self.epoch, revision, xid))

    def add(self, revision: int, change: Change) -> None:
        """Add a change to a batch recorded earlier and not yet published (else: dropped)."""
        for batch in reversed(self._pending):
            if batch.revision == revision:
                batch.changes.append(change)
                return
            if batch.revision < revision:
                return

    def publish(self, applied: int) -> None:
        """Publish every recorded batch up to ``applied``, with the rows held now, and tell the
        observers (``applied`` is the applied revision, maybe without a batch of its own)."""
        batches = self._publish(applied)
        for observer in self._observers:
            observer.applied(Revision(self.epoch, applied), batches)

    def _publish(self, applied: int) -> list[Batch]:
        published = False
        batches: list[Batch] = []
        while self._pending and self._pending[0].revision <= applied:
            batch = self._pending.popleft()
            batches.append(batch)
            self._attach_rows(batch)
            batch.views = {}
            self._viewed.append(batch)
            self._history.append(batch)
            self._bytes += batch.size
            self.published_batches += 1
            published = True
        if applied > self.published:
            self.published = applied
            published = True
        if not published:
            return batches
        # Trim from the oldest end, but never the newest batch (however large it is).
        history = self._history
        while (live := len(history) - self._first) > 1 and (live > self.max_batches or self._bytes > self.max_bytes):
            self._bytes -= self._history[self._first].size
            self._trimmed_to = self._history[self._first].revision
            self._history[self._first] = _TRIMMED
            self._first += 1
        if self._first > 1024 and self._first * 2 > len(self._history):
            del self._history[: self._first]
            self._first = 0
        while len(self._viewed) > self.view_window:
            self._viewed.popleft().views = None
        self._waiting.update(self._idle)
        self._idle.clear()
        self._wake_all()
        return batches

    def _wake_all(self) -> None:
        """Wake the subscribers that wait (each send is followed by such a wait),
        ``wake_slice`` at a time, in turn, so that fan-out takes at most
        ``fan_out_share`` of the event loop's time: woken all at once, thousands of
        streams would each send a message (a socket write, in grpc) before any
        other call is served again. A subscriber whose turn comes late finds every
        batch published meanwhile and takes them in one message (if its client
        asked for that), so the busier the loop, the fewer messages."""
        if self._waking is None and self._waiting:
            self._waking = asyncio.get_running_loop().call_soon(self._wake_some)

    def _wake_some(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        for _ in range(min(self.wake_slice, len(waiting))):
            waiting.popitem(last=False)[0].wake()
        # Runs after the woken ones' steps (scheduled before it): how long they took.
        self._waking = loop.call_soon(self._pace, loop.time())

    def _pace(self, began: float) -> None:
        self._waking = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        spent = loop.time() - began
        if spent < self.pace_after:  # (a few streams: a pause would only delay them)
            self._waking = loop.call_soon(self._wake_some)
        else:
            self._waking = loop.call_later(spent * (1 - self.fan_out_share) / self.fan_out_share, self._wake_some)

    def _live(self) -> int:
        return len(self._history) - self._first

    def _attach_rows(self, batch: Batch) -> None:
        size = 64
        tables = set()
        if any(change.by_outcome for change in batch.changes):  # (several sources may touch one row)
            seen: set[tuple[str, Key | None]] = set()
            unique = []
            for change in batch.changes:
                if change.by_outcome:
                    if (change.table, change.key) in seen:
                        continue
                    seen.add((change.table, change.key))
                unique.append(change)
            batch.changes = unique
        for change in batch.changes:
            tables.add(change.table)
            size += 32
            if change.key is None:
                continue  # (INVALIDATE of a key: the row refetched since, as for any change)
            rows = self._rows_of(change.table)
            if rows is None:
                continue  # lazy: the sidecar holds no authoritative row
            entry = rows.get(change.key)
            change.has_row = entry is not None
            if change.by_outcome:
                change.op = UPDATE if entry is not None else DELETE
            if entry is not None:
                change.row = self._row_json(entry)
                size += len(change.row)
                if self._ahead_of is not None:
                    change.ahead = self._ahead_of(change.table, change.key, batch.revision)
        batch.size = 2 * size  # and once more for the encoded message every subscriber shares
        batch.tables = frozenset(tables)

    @property
    def oldest(self) -> int:
        """The oldest revision a subscriber may resume *from*."""
        # (not the first live batch's revision - 1: a follower's history may have gaps)
        return self._trimmed_to if self._live() else self.published

    def next_after(self, revision: int) -> Batch | None:
        """The first published batch after ``revision``, if any."""
        if not self._live():
            return None
        index = self._first + revision + 1 - self._history[self._first].revision
        if self._first <= index < len(self._history) and self._history[index].revision == revision + 1:
            return self._history[index]  # revisions are consecutive: the common case
        if self._history[-1].revision <= revision:
            return None
        # A follower of a filtered upstream stream has gaps (revisions that were not its tables').
        index = bisect.bisect_right(self._history, revision, lo=self._first, key=_revision_of)
        return self._history[index] if index < len(self._history) else None

    # ------------------------------------------------------------ subscribers

    def subscribe(
        self,
        selection: Filter,
        *,
        start: tuple[str, int] | None = None,
        snapshot: Callable[[], Awaitable[Iterable[InitialState]]] | None = None,
        progress_interval: float = 0.0,
        connection: str | None = None,
        several: bool = False,
        beyond: bool = False,
    ) -> Subscription:
        """A new subscriber; raises ``OutOfRange`` for a revision that cannot be resumed,
        ``TooManyStreams`` beyond ``max_streams`` in all or ``max_streams_per_connection``
        on ``connection`` (None: a client that cannot be told apart from others).
        ``several``: its client takes several batches in one message (``Batches``).
        ``beyond``: a ``start`` ahead of the published revision is a position to stream
        after (the caller proved that no batch up to it is still to come here: see
        ``Engine.until_resumable``), not an error."""
        if start is not None:
            epoch, revision = start
            if epoch != self.epoch:
                raise OutOfRange(
                    f"revision {epoch}/{revision} is from another epoch (now {self.epoch}, "
                    f"oldest available {self.epoch}/{self.oldest}); resync"
                )
            if revision < self.oldest:
                raise OutOfRange(
                    f"revision {epoch}/{revision} is older than the history "
                    f"(oldest available {self.epoch}/{self.oldest}); resync"
                )
            if revision > self.published and not beyond:
                raise OutOfRange(f"revision {epoch}/{revision} is ahead of the cache ({self.epoch}/{self.published})")
            position = revision
        else:
            position = self.published
        self._admit(connection)
        subscriber = Subscription(self, selection, position, snapshot, progress_interval, connection, several)
        self._subscribers.add(subscriber)
        if connection is not None:
            self._per_connection[connection] = self._per_connection.get(connection, 0) + 1
        if progress_interval:
            self._paced.add(subscriber)
            self._start_ticker()
        return subscriber

    def _admit(self, connection: str | None) -> None:
        if len(self._subscribers) >= self.max_streams:
            self.refused += 1
            raise TooManyStreams(
                f"too many Watch streams: {len(self._subscribers)} are open, the most this sidecar serves "
                f"(watch.max_streams = {self.max_streams}); close some, or raise watch.max_streams"
            )
        if connection is not None:
            open_here = self._per_connection.get(connection, 0)
            if open_here >= self.max_streams_per_connection:
                self.refused += 1
                raise TooManyStreams(
                    f"too many Watch streams on one connection ({connection}): {open_here} are open, the most "
                    f"one connection may hold (watch.max_streams_per_connection = "
                    f"{self.max_streams_per_connection}); share a stream between watchers, or raise "
                    "watch.max_streams_per_connection"
                )

    def shutdown(self) -> None:
        """End every stream now (cleanly, so clients resume elsewhere)."""
        self.closing = True
        for subscriber in self._subscribers:
            subscriber.wake()

    def unsubscribe(self, subscriber: Subscription) -> None:
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        self._paced.discard(subscriber)
        self._waiting.pop(subscriber, None)
        self._idle.pop(subscriber, None)
        connection = subscriber.connection
        if connection is not None:
            left = self._per_connection[connection] - 1
            if left:
                self._per_connection[connection] = left
            else:
                del self._per_connection[connection]

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _start_ticker(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(self.progress_tick, self._tick)

    def _tick(self) -> None:
        """One timer for every subscriber's progress marks (instead of a timeout per wait)."""
        self._ticker = None
        if not self._paced:
            return
        now = asyncio.get_running_loop().time()
        for subscriber in self._paced:
            if subscriber.waiting and now - subscriber.idle_since >= subscriber.progress_interval:
                subscriber.progress_due = True
                subscriber.wake()
        self._start_ticker()


class Subscription:
    """One Watch stream: a cursor into the fan-out's history."""

    def __init__(
        self,
        fanout: FanOut,
        selection: Filter,
        position: int,
        snapshot: Callable[[], Awaitable[Iterable[InitialState]]] | None,
        progress_interval: float,
        connection: str | None = None,
        several: bool = False,
    ) -> None:
        self.fanout = fanout
        self.filter = selection
        self.epoch = fanout.epoch
        self.position = position  # everything up to here is delivered (or filtered out)
        self._snapshot = snapshot
        self.progress_interval = progress_interval
        self.connection = connection
        self.several = several
        self._resets: collections.deque[Reset] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None  # set while waiting for something to send
        self.woken = False  # something happened since it last looked
        self.idle_since = 0.0  # when it last sent something (for progress marks)
        self.progress_due = False

    def close(self) -> None:
        """The stream ended: stop keeping anything for it."""
        self.fanout.unsubscribe(self)

    def reset(self, reset: Reset) -> None:
        self._resets.append(reset)
        self.wake()

    def wake(self) -> None:
        self.woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    @property
    def last_revision(self) -> str:
        return f"{self.epoch}/{self.position}"

    async def _wait(self, turn: bool = False) -> None:
        """Until the fanout wakes it (a publish, a reset, shutdown, or a progress mark due);
        ``turn``: until its turn comes, behind the others that have something to send."""
        fanout = self.fanout
        if turn:
            fanout._waiting[self] = None
            fanout._wake_all()
        elif self.woken:
            return
        else:
            fanout._idle[self] = None  # (until a publish gives it a turn)
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _group(self, first: Batch) -> list[Batch]:
        """``first`` and the batches after it that are published already, as this
        subscriber sees them (the empty ones left out), at most ``max_group``."""
        fanout = self.fanout
        group: list[Batch] = []
        batch: Batch | None = first
        while batch is not None and len(group) < fanout.max_group:
            visible = self.filter.apply(batch)
            self.position = batch.revision
            if visible is not None:
                group.append(visible)
            batch = fanout.next_after(self.position)
        return group

    async def messages(self, ready: Callable[[], Any] | None = None) -> AsyncGenerator[Message, None]:
        """What to send, in order, until the client goes away or falls behind.

        A subscriber falls behind when, while one message was being handed to
        its client, more than ``max_lag`` batches were published (its client
        is not reading), or when the history moved past its position. One that
        is catching up (a resume) reads from the history at its own pace.
        """
        if self._snapshot is not None:
            async for message in self._initial_state(ready):
                yield message
        loop = asyncio.get_running_loop()
        self.idle_since = loop.time()
        fanout = self.fanout
        while True:
            self.woken = False
            if fanout.closing:
                raise ShuttingDown(f"the sidecar is shutting down; resume from revision {self.last_revision}")
            if self._resets:
                reset = self._resets.popleft()
                self.epoch, self.position = reset.epoch, reset.revision
                yield reset
                if self._snapshot is not None:
                    async for message in self._initial_state(ready):
                        yield message
                continue
            if self.epoch == fanout.epoch and self.position < fanout.oldest:
                fanout.dropped += 1
                raise FellBehind(self._behind("the history moved past it"))
            batch = fanout.next_after(self.position) if self.epoch == fanout.epoch else None
            if batch is not None:
                changes: Batch | Batches | None
                if self.several:
                    group = self._group(batch)
                    changes = (group[0] if len(group) == 1 else Batches(group)) if group else None
                else:
                    changes = self.filter.apply(batch)
                    self.position = batch.revision
                if changes is not None:
                    # (batches counted, not revisions: logical capture's are commit LSNs, far apart)
                    before = fanout.published_batches
                    yield changes
                    self.idle_since = loop.time()
                    self.progress_due = False
                    if fanout.published_batches - before > fanout.max_lag and not self._resets:
                        fanout.dropped += 1
                        waited = fanout.published_batches - before
                        raise FellBehind(self._behind(f"{waited} batches published while one waited"))
                    # Every send takes a turn: with thousands of streams, one event-loop
                    # iteration runs at most wake_slice of them, so other calls (and
                    # grpc accepting them) are never stuck behind the whole fan-out.
                    await self._wait(turn=True)
                continue
            if self.epoch == fanout.epoch and fanout.published > self.position:
                self.position = fanout.published  # a revision without a batch (the start of the epoch)
            if self.progress_due:
                self.progress_due = False
                self.idle_since = loop.time()
                yield Progress(self.epoch, self.position)
                continue
            await self._wait()

    async def _initial_state(self, ready: Callable[[], Any] | None) -> AsyncIterator[Message]:
        if ready is not None:
            await ready()
        assert self._snapshot is not None
        # Every row as of the revision published when the snapshot was taken (no
        # await between that and the next line), read chunk by chunk as the client
        # takes them: a shared view, not a copy.
        chunks = iter(await self._snapshot())
        self.epoch, self.position = self.fanout.epoch, self.fanout.published
        owed = 0.0  # seconds of pause not taken yet
        while True:
            async with self.fanout.snapshot_turn:
                started = time.perf_counter()
                chunk = next(chunks, None)
                # Making initial states takes at most about half of the daemon's time
                # (a read needs several turns of the loop, each may follow one message
                # being made): however many stream, reads are not held up by them. The
                # pause is taken once it is worth a timer (uvloop's tick is a millisecond:
                # a pause per message of a fraction of one cost more than the message).
                owed += time.perf_counter() - started
                if owed >= SNAPSHOT_PAUSE:
                    await asyncio.sleep(owed)
                    owed = 0.0
                else:
                    await asyncio.sleep(0)
            if chunk is None:
                break
            before = self.fanout.published_batches
            yield chunk
            # As for batches (see messages): a client that takes one message while more than
            # max_lag batches are published is not reading, and the snapshot it pins keeps
            # the old entry of every row those batches changed.
            if self.fanout.published_batches - before > self.fanout.max_lag:
                self.fanout.dropped += 1
                raise FellBehind(
                    f"watch fell behind during its initial state ({self.fanout.published_batches - before} batches "
                    f"published while one message waited, more than watch.max_lag = {self.fanout.max_lag}); "
                    "an initial state cannot be resumed: start over"
                )
        yield InitialStateDone(self.epoch, self.position)

    def stalled(self) -> Stalled:
        """Its client took no message for ``send_timeout`` seconds: the error that ends it."""
        fanout = self.fanout
        fanout.dropped += 1
        fanout.stalled += 1
        return Stalled(self._behind(f"its client took no message for {fanout.send_timeout:g} s, watch.send_timeout"))

    def _behind(self, why: str) -> str:
        return f"watch fell behind ({why}); last delivered revision {self.last_revision}; resume from it"


def snapshot_chunks(
    epoch: str,
    revision: int,
    tables: Iterable[tuple[str, Iterable[list[tuple[Key, bytes]]]]],
    row_json: Callable[[bytes], bytes],
    encode: Callable[[InitialState], bytes] | None = None,
) -> Iterator[InitialState]:
    """The rows of the given full tables (each given as chunks of (key, entry), as of
    ``revision``) as SNAPSHOT changes, one message a chunk, made (and encoded, given
    ``encode``) as they are asked for."""
    for name, chunks in tables:
        for chunk in chunks:
            message = InitialState(
                epoch, revision, [Change(name, SNAPSHOT, key, None, row_json(entry), True) for key, entry in chunk]
            )
            if encode is not None:
                message.encoded = encode(message)
            yield message


class SnapshotRows(Protocol):
    """A table's rows as of one moment (``store.Snapshot``)."""

    def __len__(self) -> int: ...
    def items(self, start: int = 0, stop: int | None = None) -> list[tuple[Key, bytes]]: ...


class SharedInitialState:
    """The initial-state messages of one table's snapshot at one revision, made as streams
    ask for them and shared by the streams that read them at about the same time (the last
    few made are kept): ten followers starting together cost one."""

    keep = 8

    def __init__(
        self,
        epoch: str,
        revision: int,
        table: str,
        rows: SnapshotRows,
        row_json: Callable[[bytes], bytes],
        encode: Callable[[InitialState], bytes] | None = None,
        size: int = 500,
    ) -> None:
        self.epoch, self.revision, self.table = epoch, revision, table
        self._rows = rows
        self._row_json = row_json
        self._encode = encode
        self.size = size
        self.count = -(-len(rows) // size)  # messages
        self._made: collections.OrderedDict[int, InitialState] = collections.OrderedDict()
        self.made = 0  # messages made (not taken from those kept)

    def message(self, index: int) -> InitialState:
        message = self._made.get(index)
        if message is not None:
            self._made.move_to_end(index)
            return message
        row_json, table = self._row_json, self.table
        chunk = self._rows.items(index * self.size, (index + 1) * self.size)
        message = InitialState(
            self.epoch,
            self.revision,
            [Change(table, SNAPSHOT, key, None, row_json(entry), True) for key, entry in chunk],
        )
        if self._encode is not None:
            message.encoded = self._encode(message)
        self.made += 1
        self._made[index] = message
        if len(self._made) > self.keep:
            self._made.popitem(last=False)
        return message

    def messages(self) -> Iterator[InitialState]:
        for index in range(self.count):
            yield self.message(index)

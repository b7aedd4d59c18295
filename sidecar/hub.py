"""The watch hub: change batches in revision order, a bounded history, and
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.errors import SidecarError
from sidecar.keys import Key

log = logging.getLogger(__name__)

# Operations, numbered as cachesidecar.v1.Operation.
INSERT, UPDATE, DELETE, TRUNCATE, TABLE_CHANGED, INVALIDATE, SNAPSHOT = 1, 2, 3, 4, 5, 6, 7
TABLE_WIDE = frozenset({TRUNCATE, TABLE_CHANGED})


class OutOfRange(SidecarError):
    """The resume revision is not in the history: resync."""


class FellBehind(SidecarError):
    """The subscriber fell too far behind and was ended: resume from its last revision."""


class ShuttingDown(SidecarError):
    """The sidecar is shutting down: resume from the last revision, here or elsewhere."""


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


@dataclass(slots=True)
class Batch:
    epoch: str
    revision: int
    xid: int
    changes: list[Change] = field(default_factory=list)
    size: int = 0
    tables: frozenset[str] = frozenset()
    encoded: bytes | None = None  # the message, encoded once (wire.watch_message)


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
class Snapshot:
    """A chunk of initial-state rows, all as of ``revision``."""

    epoch: str
    revision: int
    changes: list[Change]
    encoded: bytes | None = None  # the message, encoded as it was made (wire.watch_message)


@dataclass(slots=True)
class SnapshotDone:
    epoch: str
    revision: int


Message = Batch | Reset | Progress | Snapshot | SnapshotDone
_TRIMMED = Batch("", -1, 0)  # stands in for a batch dropped from the history


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
        """The batch as this subscriber sees it (``batch`` itself when nothing is filtered)."""
        if not self.keys and not self.ops and (not self.tables or batch.tables <= self.tables):
            return batch
        kept = [c for c in batch.changes if self.passes(c)]
        if not kept:
            return None
        return Batch(batch.epoch, batch.revision, batch.xid, kept, tables=batch.tables)


class Hub:
    """History and fan-out of published change batches."""

    def __init__(
        self,
        *,
        rows_of: Callable[[str], dict[Key, bytes] | None],
        row_json: Callable[[bytes], bytes],
        max_batches: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_lag: int = 1_000,
    ) -> None:
        self._rows_of = rows_of  # a full table's rows (key -> cache entry); None for lazy tables
        self._row_json = row_json
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.max_lag = max_lag
        self.epoch = ""
        self.published = 0  # every batch <= published is in the history (or compacted)
        self._history: list[Batch] = []  # published batches; the live part starts at _first
        self._first = 0
        self._trimmed_to = 0  # the newest revision trimmed from the history (or the epoch's start)
        self._bytes = 0
        self.started = asyncio.Event()  # set once the first epoch began
        self._pending: collections.deque[Batch] = collections.deque()  # recorded, not yet applied
        self._subscribers: set[Subscription] = set()
        self.dropped = 0  # subscribers ended for falling behind
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
        self._bytes = 0
        self.started.set()
        for subscriber in self._subscribers:
            # (subscribers that predate the first epoch hold none; a rebuild resets every one,
            # even in the same epoch: a follower keeps its upstream's epoch across a rebuild)
            if subscriber.epoch != epoch or reason is not None:
                subscriber.reset(Reset(epoch, revision, reason or "the cache was rebuilt"))

    def record(self, revision: int, xid: int, change: Change) -> None:
        """Add a change to batch ``revision`` (created on first use)."""
        self.ensure(revision, xid)
        self._pending[-1].changes.append(change)

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
        """Publish every recorded batch up to ``applied``, with the rows held now."""
        published = False
        while self._pending and self._pending[0].revision <= applied:
            batch = self._pending.popleft()
            self._attach_rows(batch)
            self._history.append(batch)
            self._bytes += batch.size
            self.published_batches += 1
            published = True
        if applied > self.published:
            self.published = applied
            published = True
        if not published:
            return
        # Trim from the oldest end, but never the newest batch (however large it is).
        while self._live() > 1 and (self._live() > self.max_batches or self._bytes > self.max_bytes):
            self._bytes -= self._history[self._first].size
            self._trimmed_to = self._history[self._first].revision
            self._history[self._first] = _TRIMMED
            self._first += 1
        if self._first > 1024 and self._first * 2 > len(self._history):
            del self._history[: self._first]
            self._first = 0
        for subscriber in self._subscribers:
            subscriber.wake.set()

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
        snapshot: Callable[[], Awaitable[Iterable[Snapshot]]] | None = None,
        progress_interval: float = 0.0,
    ) -> Subscription:
        """A new subscriber; raises ``OutOfRange`` for a revision that cannot be resumed."""
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
            if revision > self.published:
                raise OutOfRange(f"revision {epoch}/{revision} is ahead of the cache ({self.epoch}/{self.published})")
            position = revision
        else:
            position = self.published
        subscriber = Subscription(self, selection, position, snapshot, progress_interval)
        self._subscribers.add(subscriber)
        return subscriber

    def shutdown(self) -> None:
        """End every stream now (cleanly, so clients resume elsewhere)."""
        self.closing = True
        for subscriber in self._subscribers:
            subscriber.wake.set()

    def unsubscribe(self, subscriber: Subscription) -> None:
        self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class Subscription:
    """One Watch stream: a cursor into the hub's history."""

    def __init__(
        self,
        hub: Hub,
        selection: Filter,
        position: int,
        snapshot: Callable[[], Awaitable[Iterable[Snapshot]]] | None,
        progress_interval: float,
    ) -> None:
        self.hub = hub
        self.filter = selection
        self.epoch = hub.epoch
        self.position = position  # everything up to here is delivered (or filtered out)
        self._snapshot = snapshot
        self.progress_interval = progress_interval
        self.wake = asyncio.Event()
        self._resets: collections.deque[Reset] = collections.deque()

    def reset(self, reset: Reset) -> None:
        self._resets.append(reset)
        self.wake.set()

    @property
    def last_revision(self) -> str:
        return f"{self.epoch}/{self.position}"

    async def messages(self, ready: Callable[[], Any] | None = None) -> AsyncIterator[Message]:
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
        idle_since = loop.time()
        hub = self.hub
        while True:
            if hub.closing:
                raise ShuttingDown(f"the sidecar is shutting down; resume from revision {self.last_revision}")
            if self._resets:
                reset = self._resets.popleft()
                self.epoch, self.position = reset.epoch, reset.revision
                yield reset
                if self._snapshot is not None:
                    async for message in self._initial_state(ready):
                        yield message
                continue
            if self.epoch == hub.epoch and self.position < hub.oldest:
                hub.dropped += 1
                raise FellBehind(self._behind("the history moved past it"))
            batch = hub.next_after(self.position) if self.epoch == hub.epoch else None
            if batch is not None:
                visible = self.filter.apply(batch)
                self.position = batch.revision
                if visible is not None:
                    before = hub.published
                    yield visible
                    idle_since = loop.time()
                    if hub.published - before > hub.max_lag and not self._resets:
                        hub.dropped += 1
                        raise FellBehind(self._behind(f"{hub.published - before} batches published while one waited"))
                continue
            if self.epoch == hub.epoch and hub.published > self.position:
                self.position = hub.published  # a revision without a batch (the start of the epoch)
            self.wake.clear()
            if hub.closing or self._resets or (self.epoch == hub.epoch and hub.next_after(self.position) is not None):
                continue
            timeout = None
            if self.progress_interval:
                timeout = max(0.0, idle_since + self.progress_interval - loop.time())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                idle_since = loop.time()
                yield Progress(self.epoch, self.position)

    async def _initial_state(self, ready: Callable[[], Any] | None) -> AsyncIterator[Message]:
        if ready is not None:
            await ready()
        assert self._snapshot is not None
        # Every row as of the revision published when the snapshot was taken (no
        # await between that and the next line), read chunk by chunk as the client
        # takes them: a shared view, not a copy.
        chunks = iter(await self._snapshot())
        self.epoch, self.position = self.hub.epoch, self.hub.published
        while True:
            async with self.hub.snapshot_turn:
                started = time.perf_counter()
                chunk = next(chunks, None)
                # Making initial states takes at most about half of the daemon's time
                # (a read needs several turns of the loop, each may follow one message
                # being made): however many stream, reads are not held up by them.
                await asyncio.sleep(time.perf_counter() - started)
            if chunk is None:
                break
            yield chunk
        yield SnapshotDone(self.epoch, self.position)

    def _behind(self, why: str) -> str:
        return f"watch fell behind ({why}); last delivered revision {self.last_revision}; resume from it"


def snapshot_chunks(
    epoch: str,
    revision: int,
    tables: Iterable[tuple[str, Iterable[list[tuple[Key, bytes]]]]],
    row_json: Callable[[bytes], bytes],
    encode: Callable[[Snapshot], bytes] | None = None,
) -> Iterator[Snapshot]:
    """The rows of the given full tables (each given as chunks of (key, entry), as of
    ``revision``) as SNAPSHOT changes, one message a chunk, made (and encoded, given
    ``encode``) as they are asked for."""
    for name, chunks in tables:
        for chunk in chunks:
            message = Snapshot(
                epoch, revision, [Change(name, SNAPSHOT, key, None, row_json(entry), True) for key, entry in chunk]
            )
            if encode is not None:
                message.encoded = encode(message)
            yield message


class SnapshotRows(Protocol):
    """A table's rows as of one moment (``store.Snapshot``)."""

    def __len__(self) -> int: ...
    def items(self, start: int = 0, stop: int | None = None) -> list[tuple[Key, bytes]]: ...


class SharedSnapshot:
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
        encode: Callable[[Snapshot], bytes] | None = None,
        size: int = 500,
    ) -> None:
        self.epoch, self.revision, self.table = epoch, revision, table
        self._rows = rows
        self._row_json = row_json
        self._encode = encode
        self.size = size
        self.count = -(-len(rows) // size)  # messages
        self._made: collections.OrderedDict[int, Snapshot] = collections.OrderedDict()
        self.made = 0  # messages made (not taken from those kept)

    def message(self, index: int) -> Snapshot:
        message = self._made.get(index)
        if message is not None:
            self._made.move_to_end(index)
            return message
        row_json, table = self._row_json, self.table
        chunk = self._rows.items(index * self.size, (index + 1) * self.size)
        message = Snapshot(
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

    def messages(self) -> Iterator[Snapshot]:
        for index in range(self.count):
            yield self.message(index)

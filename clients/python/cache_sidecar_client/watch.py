"""Watch: the sidecar's change stream as Python objects, resumed automatically.

``Client.watch(...)`` / ``AsyncClient.watch(...)`` yield, in order:

* ``ChangeBatch`` -- the changes of one committed transaction, at a revision;
* ``InitialStateDone`` -- after the initial rows (with ``initial_state=True``);
* ``Progress`` -- nothing matched for a while; the stream is at this revision;
* ``Reset`` -- discard everything derived from this stream: the sidecar
  rebuilt its cache, or the stream could not be resumed. With
  ``initial_state=True`` the initial rows follow again.

When the connection drops (or the sidecar ends a subscriber that fell
behind), the iterator reconnects with backoff and resumes from the last
revision it delivered: no gap, no duplicate. If that revision is gone from
the sidecar's history, it yields a ``Reset`` and starts over.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cache_sidecar_client._convert import Decoder, Revision, from_key, to_key
from cache_sidecar_client.api.v1 import cache_pb2 as pb

OPERATIONS = {
    "insert": pb.INSERT,
    "update": pb.UPDATE,
    "delete": pb.DELETE,
    "truncate": pb.TRUNCATE,
    "table_changed": pb.TABLE_CHANGED,
    "invalidate": pb.INVALIDATE,
}
_NAMES = {value: name for name, value in OPERATIONS.items()} | {pb.SNAPSHOT: "snapshot"}

# Statuses after which the stream resumes from its last revision. Not among
# them: FAILED_PRECONDITION (a row too large to send: it would be sent again).
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # fell behind: resume from the last revision
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,  # e.g. a connection reset mid-stream
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def resumable(code: grpc.StatusCode | None, established: bool) -> bool:
    """Whether a stream that ended with ``code`` is resumed.

    RESOURCE_EXHAUSTED from an established stream is the sidecar ending a
    subscriber that fell behind; before that (no headers yet) it is grpc
    refusing the request itself as too large, which would be refused again.
    """
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return established
    return code in RESUMABLE


@dataclass(frozen=True)
class Change:
    """One row's change (``key`` is None for table-wide operations)."""

    table: str
    operation: str  # insert, update, delete, truncate, table_changed, invalidate, snapshot
    key: Any
    old_key: Any
    row: Any  # the decoded row the sidecar holds now, or None
    has_row: bool  # full tables: False means the key has no row now; lazy tables: always False
    # The decoder could not read the row (``row`` is None, ``has_row`` True): the stream goes
    # on; ``error`` says why. Drop what you hold of the key and read it when you need it.
    undecodable: bool = False
    error: str = ""
    # The row may be newer than the batch's other rows that show the same source rows (a
    # relation's row the sidecar read ahead of its change stream): a cache that serves reads
    # from the stream should drop the key and read it from the sidecar, which answers it once
    # those rows are brought up to it.
    ahead: bool = False


@dataclass(frozen=True)
class ChangeBatch:
    revision: Revision
    xid: int
    changes: list[Change] = field(default_factory=list)


@dataclass(frozen=True)
class InitialStateDone:
    revision: Revision


@dataclass(frozen=True)
class Progress:
    revision: Revision


@dataclass(frozen=True)
class Reset:
    revision: Revision | None
    reason: str


Event = ChangeBatch | InitialStateDone | Progress | Reset


def request(
    tables: Sequence[str],
    keys: Iterable[Any] | None,
    operations: Iterable[str] | None,
    start_revision: Revision | None,
    initial_state: bool,
    progress_interval: float | None,
) -> pb.WatchRequest:
    ops = []
    for name in operations or ():
        if name not in OPERATIONS:
            raise ValueError(f"unknown operation {name!r} (one of {', '.join(OPERATIONS)})")
        ops.append(OPERATIONS[name])
    return pb.WatchRequest(
        tables=list(tables),
        keys=[to_key(k) for k in keys or ()],
        operations=ops,
        start_revision=start_revision.to_pb() if start_revision else None,
        initial_state=initial_state,
        progress_interval_ms=int((progress_interval or 0) * 1000),
        accept_batches=True,  # events() reads several batches in one message
    )


def _change(e: pb.ChangeEvent, decode: Decoder) -> Change:
    key = from_key(e.key) if e.HasField("key") else None
    old_key = from_key(e.old_key) if e.HasField("old_key") else None
    operation = _NAMES.get(e.operation, "unspecified")
    if not e.has_row:
        return Change(e.table, operation, key, old_key, None, False)
    try:
        row = decode(e.row)
    except Exception as exc:  # (one row the decoder cannot read must not end the stream)
        return Change(e.table, operation, key, old_key, None, True, True, f"{type(exc).__name__}: {exc}"[:500])
    return Change(e.table, operation, key, old_key, row, True, ahead=e.ahead)


def _change_batch(batch: pb.ChangeBatch, decode: Decoder) -> ChangeBatch:
    return ChangeBatch(Revision.from_pb(batch.revision), batch.xid, [_change(e, decode) for e in batch.events])


def events(response: pb.WatchResponse, decode: Decoder) -> list[Event]:
    """The events of one stream message: several ``ChangeBatch`` for a ``batches``
    message (in order, as if each had come alone), else one."""
    if response.WhichOneof("kind") == "batches":
        return [_change_batch(batch, decode) for batch in response.batches.batches]
    return [event(response, decode)]


def event(response: pb.WatchResponse, decode: Decoder) -> Event:
    """The event of a stream message that is not ``batches`` (see ``events``)."""
    kind = response.WhichOneof("kind")
    if kind == "changes":
        return _change_batch(response.changes, decode)
    if kind == "reset":
        return Reset(Revision.from_pb(response.reset.revision), response.reset.reason)
    if kind == "progress":
        return Progress(Revision.from_pb(response.progress.revision))
    return InitialStateDone(Revision.from_pb(response.initial_state_done.revision))


class Resumer:
    """What to ask for next: the original request, or a resume from the last revision."""

    def __init__(self, original: pb.WatchRequest, max_delay: float = 5.0) -> None:
        self.original = original
        self.last: Revision | None = None
        self.failures = 0
        self.max_delay = max_delay
        self.in_initial_state = original.initial_state  # a cut here cannot be resumed
        self.delivered_initial_rows = False

    def next_request(self) -> pb.WatchRequest:
        if self.last is None:
            self.in_initial_state = self.original.initial_state
            self.delivered_initial_rows = False
            return self.original
        resumed = pb.WatchRequest()
        resumed.CopyFrom(self.original)
        resumed.initial_state = False
        resumed.start_revision.CopyFrom(self.last.to_pb())
        return resumed

    def established(self, metadata: Any) -> None:
        """The stream's headers: where it starts, should it be cut before any message."""
        if self.last is not None or self.in_initial_state:
            return
        for key, value in metadata or ():
            if key == "cachesidecar-revision" and "/" in value:
                epoch, _, number = value.rpartition("/")
                self.last = Revision(epoch, int(number))

    def duplicate(self, item: Event) -> bool:
        """A batch at or before what was delivered (a resume may repeat the last one)."""
        last = self.last
        return (
            isinstance(item, ChangeBatch)
            and last is not None
            and not self.in_initial_state
            and item.revision.epoch == last.epoch
            and item.revision.number <= last.number
        )

    def seen(self, item: Event) -> None:
        self.failures = 0
        if isinstance(item, Reset):
            self.in_initial_state = self.original.initial_state  # the server sends it again
            self.delivered_initial_rows = False
        if isinstance(item, InitialStateDone):
            self.in_initial_state = False
        if self.in_initial_state:
            self.delivered_initial_rows = self.delivered_initial_rows or isinstance(item, ChangeBatch)
            return  # resuming mid-snapshot would skip rows
        if item.revision is not None:
            self.last = item.revision

    def interrupted(self) -> Reset | None:
        """The stream broke: a Reset to deliver first if what was delivered cannot be continued."""
        if self.in_initial_state and self.delivered_initial_rows:
            self.last = None
            return Reset(None, "resync: the initial state was interrupted")
        return None

    def delay(self) -> float:
        self.failures += 1
        ceiling = min(self.max_delay, 0.05 * float(1 << min(self.failures, 20)))
        return ceiling / 2 + random.random() * ceiling / 2

    def out_of_range(self, details: str) -> Reset:
        """The resume point is gone: start over from now (or the initial state), and say so."""
        self.last = None
        self.original.ClearField("start_revision")
        return Reset(None, f"resync: {details}")

"""The change-source seam: where changes and rows come from, as the core needs them.

* ``Database``: keyed and bulk fetches of rows (``db.PgDatabase`` over an asyncpg
  pool; ``testing.MemoryDatabase`` in memory). It raises only the daemon's own
  errors: ``errors.Unavailable`` for a failure that may pass,
  ``errors.QueryFailed`` for one the same query would meet again.
* ``ChangeSource``: a stream of change events with its connections and losses
  (after a loss, changes may have been missed: the core rebuilds), a way to send
  a read-barrier token that comes back ordered with the changes, and the
  ``Database`` its rows come from. ``pg_source.PgChangeSource`` is PostgreSQL's
  (LISTEN + the pool); ``testing.MemoryChangeSource`` the in-memory one;
  ``follower.UpstreamSource`` a follower's upstream sidecar (Watch + BatchGet + Sync).
* ``ChangeSink``: what a source tells the core (``notices.NoticeIngest`` is one).
* ``NumberedSink``: what a source that numbers its batches itself tells the core.
  PostgreSQL's notifications carry no revision, so the engine numbers them; an
  upstream sidecar's batches come numbered, rows attached, and the follower
  keeps those numbers (its revisions are the upstream's, meaningful on every
  follower of it). Such a source hands the core whole applied states
  (``epoch_began``) and batches (``batch``) instead of events to refetch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.config import TableConfig
from sidecar.core.events import Event
from sidecar.core.indexes import IndexQuery
from sidecar.core.keys import Key
from sidecar.core.schema import TableSchema

Rows = dict[Key, bytes]  # key -> cache entry (see wire.py)


class Database(Protocol):
    """What the caches need from PostgreSQL."""

    async def describe(self, table: TableConfig) -> TableSchema: ...

    def load(self, schema: TableSchema, seen: Callable[[str], None] | None = None) -> AsyncIterator[Rows]:
        """Every row of the table, in chunks, from one snapshot; ``seen`` (when given, and
        the database can tell) is told that snapshot as ``pg_current_snapshot()`` gives it,
        before the first chunk."""
        ...

    async def estimate(self, schema: TableSchema) -> int | None:
        """Roughly how many rows ``load`` would yield (for progress reports), or None."""
        ...

    async def fetch(self, schema: TableSchema, keys: Sequence[Key]) -> Rows:
        """The rows that exist among ``keys`` (missing keys are absent)."""
        ...

    async def fetch_matching(self, schema: TableSchema, columns: Sequence[str], values: Sequence[Key]) -> Rows:
        """The rows whose ``columns`` take one of ``values`` (tuples in ``columns`` order)."""
        ...

    async def query(self, schema: TableSchema, query: IndexQuery) -> Rows:
        """The rows an index query matches, in its order, up to one past its limit."""
        ...


class ChangeSink(Protocol):
    """What a change source tells the core."""

    def source_connected(self) -> None:
        """Changes flow from now on; those before may have been missed: rebuild."""
        ...

    def source_lost(self, reason: str) -> None:
        """Changes may be missed from now on: stop trusting memory."""
        ...

    def handle(self, event: Event) -> None:
        """One change event (or a read-barrier token), in the source's order."""
        ...


class TokenSender(Protocol):
    """Where read-barrier tokens go (every change source)."""

    async def send_token(self, token: str) -> None:
        """Send a read-barrier token: it comes back to the sink after every change that
        was committed before it was sent."""
        ...


class ChangeSource(Protocol):
    """Where changes and rows come from."""

    @property
    def database(self) -> Database:
        """The rows behind the changes."""
        ...

    async def follow(self, sink: ChangeSink) -> None:
        """Tell ``sink`` every change, connection and loss until cancelled, reconnecting as needed."""
        ...

    async def send_token(self, token: str) -> None:
        """Send a read-barrier token: it comes back to the sink as ``events.SyncToken``,
        after every change that was committed before it was sent."""
        ...


@dataclass(frozen=True, slots=True)
class SourceChange:
    """One change of a numbered batch, keys already coerced to the table's columns."""

    table: str
    op: int  # as hub.INSERT ... hub.INVALIDATE
    key: Key | None = None  # None: the whole table
    old_key: Key | None = None
    row: bytes | None = None  # full tables: the row now (a cache entry); None: no row
    apply: bool = True  # False: only told to watchers (memory already holds something newer)
    ahead: bool = False  # the row may be newer than the batch's other rows: fenced (ChangeEvent.ahead)


@dataclass(slots=True)
class SourceBatch:
    """A batch the source numbered: its changes, and whole tables it sent again."""

    revision: int
    xid: int = 0
    changes: list[SourceChange] = field(default_factory=list)
    # Full tables whose every row came with this batch (a whole-table change upstream).
    reloaded: dict[str, Rows] = field(default_factory=dict)
    # Tables the upstream stopped serving from memory, and why.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FollowState:
    """How a follower follows its upstream (ListTables and metrics show it)."""

    target: str
    stream_up: bool  # a Watch stream to the upstream is established
    following: bool  # ... and caught up: reads are served from memory
    epoch: str  # the upstream's epoch ("" before the first)
    upstream_revision: int  # the newest upstream revision known of
    behind_revisions: int
    behind_seconds: float
    resumes: int
    rebuilds: int


@dataclass(frozen=True, slots=True)
class StandbyLag:
    """How far behind its primary the standby a hub decodes on is (ListTables shows it)."""

    behind_bytes: int  # the primary's WAL (as last seen) the standby has not replayed
    behind_seconds: float  # 0 while caught up; else seconds since it replayed a commit
    receiving: bool  # its WAL receiver streams from the primary


class NumberedSink(Protocol):
    """What a source that numbers its own batches tells the core."""

    def source_lost(self, reason: str) -> None:
        """Batches may be missed from now on: stop trusting memory."""
        ...

    def token_received(self, token: str) -> None:
        """A read barrier's token is back: every batch before it has been delivered."""

    def epoch_began(self, epoch: str, revision: int, rows: Mapping[str, Rows], reason: str | None) -> None:
        """Memory is rebuilt: the full tables hold ``rows`` (as of ``revision`` of ``epoch``),
        lazy ones nothing; ``reason`` says why (None: the first start)."""
        ...

    def batch(self, batch: SourceBatch) -> None:
        """One batch, in the source's order (its revision above every earlier one)."""
        ...

    def progress(self, revision: int) -> None:
        """Nothing for us happened up to ``revision``."""
        ...

    def reconciled(self, reloaded: Mapping[str, Rows], failed: Mapping[str, str]) -> None:
        """Full tables found otherwise at the source than memory holds them (a follower resumed
        on another hub): ``reloaded`` ones hold these rows now, ``failed`` ones are not served
        from memory. No revision: the source tells of them with its next batch."""
        ...

    def resumed(self) -> None:
        """Following again, without a rebuild (nothing was missed), and caught up."""
        ...


class NumberedSource(Protocol):
    """A change source that numbers its own batches (a follower's upstream)."""

    @property
    def database(self) -> Database: ...

    async def follow(self, sink: NumberedSink) -> None:
        """Tell ``sink`` every batch, rebuild and loss until cancelled, reconnecting as needed."""
        ...

    async def send_token(self, token: str) -> None:
        """A read-barrier token: it comes back to the sink once every batch the source had
        when it was sent has arrived."""
        ...

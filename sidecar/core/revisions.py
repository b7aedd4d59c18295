"""Revision bookkeeping: the batch sequence, the applied revision and its epoch,
and the readers waiting for a revision.

Every received transaction batch (and every batch of the sidecar's own
making) gets the next sequence number. A batch is *applied* once every table
reflects it: each table pushes its low-water mark (the oldest batch it has not
applied yet, or None) when that changes, and the applied revision is one below
the lowest mark -- never past a batch still being received in this loop
iteration. The epoch changes whenever continuity breaks (a rebuild).

An epoch is ``<identity>.<run>``: a random identity per process and the runs of
that process counted from 1 -- or, given by a source that numbers batches by their
position in the database's log (logical decoding: commit LSNs), the identity of the
database's history and its timeline (``history_epoch``): every sidecar decoding the
same database then numbers the same commit alike, in the same epoch. Only an earlier
run of the identity now followed is "past" (rebuilt since, or an earlier timeline:
older than anything now served); any other epoch -- another hub's, another
process's, a later run not seen yet -- is "unknown" and must be proven by a read
barrier, never assumed older. Clients treat the epoch as opaque.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sidecar.core.aio import Waiters


@dataclass(frozen=True, slots=True)
class Revision:
    epoch: str
    number: int

    def __str__(self) -> str:
        return f"{self.epoch}/{self.number}"


MAX_RUN_DIGITS = 18  # a run number beyond this is no sidecar's (and not worth parsing)


def new_identity() -> str:
    """A process's identity, the first part of each of its epochs."""
    return secrets.token_hex(8)


def new_epoch(identity: str | None = None, run: int = 1) -> str:
    return f"{identity or new_identity()}.{run}"


HISTORY = "wal-"  # the identity of a history epoch begins so (a process's is hex digits)
MAX_SYSTEM_ID_DIGITS = 20  # pg_control's system identifier is a uint64
MAX_TIMELINE = 2**32 - 1  # a TimeLineID is a uint32
MAX_DATABASE_NAME_BYTES = 255  # NAMEDATALEN is 64; a server built wider is still bounded


def history_epoch(system_id: str, database: str, timeline: int) -> str:
    """The epoch of a database's history as its log numbers it: ``<identity>.<timeline>``,
    the identity a digest of the cluster's system identifier and the database's name (the
    same on every sidecar that decodes it, on a primary or its standbys), the run its
    timeline (a promotion or a restore begins a later one: the earlier is "past").

    Raises ``ValueError`` for values no PostgreSQL gives (they come from the server)."""
    if not (system_id.isascii() and system_id.isdigit() and len(system_id) <= MAX_SYSTEM_ID_DIGITS):
        raise ValueError(f"system identifier {system_id[:40]!r} is not a number of at most 20 digits")
    if not 1 <= timeline <= MAX_TIMELINE:
        raise ValueError(f"timeline {timeline} is not a PostgreSQL timeline (1 to {MAX_TIMELINE})")
    named = database.encode("utf-8", "surrogateescape")
    if not named or len(named) > MAX_DATABASE_NAME_BYTES:
        raise ValueError(f"database name of {len(named)} bytes (expected 1 to {MAX_DATABASE_NAME_BYTES})")
    digest = hashlib.sha256(b"cache-sidecar history\0" + system_id.encode() + b"\0" + named).hexdigest()
    return new_epoch(f"{HISTORY}{digest[:16]}", timeline)


def shared_history(epoch: str) -> bool:
    """Whether ``epoch`` is a database history's (``history_epoch``): sidecars that read
    that log independently number it alike, each as far as it has read -- a number of it
    may come from one that is ahead, or be one such a sidecar gave a batch of its own."""
    return epoch.startswith(HISTORY)


def _run_of(epoch: str) -> tuple[str, int] | None:
    """``(identity, run)`` of an epoch of the ``<identity>.<run>`` form, else None."""
    identity, dot, run = epoch.rpartition(".")
    if not dot or not identity or not (run.isascii() and run.isdigit()) or len(run) > MAX_RUN_DIGITS:
        return None
    return identity, int(run)


def earlier_run(epoch: str, than: str) -> bool:
    """Whether ``epoch`` is an earlier run of the process whose epoch ``than`` is. Only such
    an epoch is known to be past: that process rebuilt from scratch after it, so ``than``
    is newer than every revision of it. Another process's epoch (another hub's, one the
    Service routes elsewhere) may be ahead of ``than``, whatever was seen of it before."""
    mine, theirs = _run_of(than), _run_of(epoch)
    return mine is not None and theirs is not None and theirs[0] == mine[0] and theirs[1] < mine[1]


class Revisions:
    """The sequence and the applied revision; told by tables how far they are."""

    def __init__(self, stall_after: float = 30.0) -> None:
        self._told: list[Callable[[int], None]] = []  # each time ``applied`` may have moved, in order
        self._identity = new_identity()
        self._run = 1
        self.epoch = new_epoch(self._identity, self._run)
        self.seq = 0  # batches received (and sidecar-made batches)
        self.applied = 0  # every batch <= applied is reflected in every table
        self.epoch_start = 0  # the rebuild that began this epoch
        self.stall_after = stall_after
        self._open_xid: int | None = None
        self.batch_open = False  # events of this loop iteration may still join batch ``seq``
        self._lows: dict[str, int] = {}  # table -> its oldest unapplied batch (absent: none)
        self._waiters = Waiters()
        self._moved: asyncio.Future[None] | None = None  # woken at each advance (readers of one table)
        self._releases = 0  # release_all calls: a reader of one table stops waiting at one
        self._waiting_since: float | None = None  # batches wait since: the last advance, or the first arrival

    @property
    def revision(self) -> Revision:
        return Revision(self.epoch, self.applied)

    @property
    def waiting(self) -> int:
        """Readers waiting for a revision."""
        return len(self._waiters)

    # ------------------------------------------------------------ numbering

    def batch_for(self, xid: int) -> int:
        """The batch an event of transaction ``xid`` belongs to: consecutive events of one
        transaction share one, until the loop iteration that received them ends."""
        if self.batch_open and self._open_xid == xid:
            return self.seq
        self.seq += 1
        self._open_xid = xid
        if not self.batch_open:
            self.batch_open = True
            asyncio.get_running_loop().call_soon(self._close_batch)
        return self.seq

    def _close_batch(self) -> None:
        self.batch_open = False
        self.advance()

    # A source that sees whole transactions with their commit positions (logical
    # decoding) numbers each by that position: the same on every sidecar reading the
    # same log. (A batch of the sidecar's own between two commits takes the next number;
    # in the rare case that it reached the next commit's position, that commit takes the
    # number after it.)

    def open_commit(self, position: int, xid: int) -> int:
        """The batch of the transaction that committed at ``position``: its events join it
        (``batch_for``) until ``close_commit``."""
        self.seq = position if position > self.seq else self.seq + 1
        self._open_xid = xid
        self.batch_open = True
        return self.seq

    def close_commit(self) -> None:
        self.batch_open = False
        self._open_xid = None
        self.advance()

    def own_batch(self) -> int:
        """A batch of the sidecar's own making (not a transaction's)."""
        self.seq += 1
        self._open_xid = None  # later notifications start their own batch
        return self.seq

    def begin_epoch(self, rebuild: bool, at: int | None = None, epoch: str | None = None) -> int:
        """A rebuild at a new batch -- numbered ``at`` when given and above the last (a
        position in the source's log) -- ; return it. The epoch is ``epoch`` when the source
        gives one (its log's history: a rebuild in the same one keeps it, and its numbers
        never go back), else a new run of this process's when ``rebuild`` (continuity broke)."""
        if epoch is not None:
            if epoch != self.epoch:
                # Another history (the first connection, a new timeline): its numbers are
                # its log's, whatever this process numbered before (they may be lower).
                self.epoch = epoch
                if at is not None:
                    self.seq = at - 1
                    self.applied = min(self.applied, self.seq)
                self._waiters.release_all()  # (they waited for numbers of another epoch)
                self._releases += 1
                self._wake_table_readers()
        elif rebuild:
            self._run += 1
            self.epoch = new_epoch(self._identity, self._run)
        self.seq = at if at is not None and at > self.seq else self.seq + 1
        self.epoch_start = self.seq
        self.batch_open = False
        self._open_xid = None
        return self.seq

    # A source that numbers its own batches (a follower's upstream sidecar) gives the
    # epoch and the numbers: they are then the upstream's, meaningful on every follower.

    def adopt(self, epoch: str, revision: int) -> None:
        """Continue in the source's ``epoch`` from its ``revision`` (a rebuild: memory now
        reflects the source at ``revision``). Numbers never go back within one epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.seq = self.applied = revision
            self._waiters.release_all()  # (they waited for numbers of another epoch)
            self._releases += 1
            self._wake_table_readers()
        else:
            self.seq = self.applied = max(self.applied, revision)
            self._waiters.release(self.applied)
        self.epoch_start = self.seq
        self.batch_open = False
        self._open_xid = None
        self._waiting_since = None

    def number(self, revision: int) -> int:
        """The source's batch ``revision`` arrived (source-numbered: no batch of our own)."""
        self.seq = max(self.seq, revision)
        return self.seq

    def knows(self, epoch: str) -> Literal["current", "past", "unknown"]:
        """``epoch`` is the current one, an earlier run of the process whose epoch is current
        (past: rebuilt since), or anything else (unknown: it may be ahead; prove it). An
        epoch once followed is not past for that: a follower that went from hub A to B and
        back to A is behind B's epoch as often as not."""
        if epoch == self.epoch:
            return "current"
        return "past" if earlier_run(epoch, self.epoch) else "unknown"

    # ------------------------------------------------------------ progress

    def low_water(self, table: str, low: int | None) -> None:
        """``table`` has not applied batch ``low`` yet (None: it has applied all it received)."""
        before = self._lows.get(table)
        if low is None:
            if before is not None:
                del self._lows[table]
                self.advance()
        elif low != before:
            self._lows[table] = low
            if before is not None and low > before:
                self.advance()

    def advance(self) -> None:
        """Move ``applied`` as far as every table allows."""
        oldest = self.seq if self.batch_open else self.seq + 1
        if self._lows:
            oldest = min(oldest, min(self._lows.values()))
        applied = oldest - 1
        moved = applied > self.applied
        if moved:
            self.applied = applied
            if self._waiters:
                self._waiters.release(applied)
        if self.seq <= self.applied:
            self._waiting_since = None
        elif moved or self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._wake_table_readers()
        for tell in self._told:
            tell(self.applied)

    def on_applied(self, callback: Callable[[int], None]) -> None:
        """Tell ``callback`` the applied batch each time it may have moved (after the ones told before)."""
        self._told.append(callback)

    def _wake_table_readers(self) -> None:
        moved, self._moved = self._moved, None
        if moved is not None and not moved.done():
            moved.set_result(None)

    def applied_for(self, table: str) -> int:
        """Every batch up to this one is reflected in ``table`` (``applied`` is the same
        for every table at once: one table's reload holds it back for all)."""
        oldest = self.seq if self.batch_open else self.seq + 1
        low = self._lows.get(table)
        return (oldest if low is None else min(oldest, low)) - 1

    async def wait_for_table(self, table: str, number: int) -> None:
        """Return once ``table`` reflects every batch up to ``number`` (or nothing is worth
        waiting for any more: ``release_all``), however far behind other tables are."""
        releases = self._releases
        while self.applied_for(table) < number and self._releases == releases:
            if self._moved is None:
                self._moved = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._moved)  # (shared: one reader's cancellation is its own)

    async def wait(self, number: int) -> None:
        """Return once ``applied`` reached ``number`` in this epoch."""
        if self.applied < number:
            await self._waiters.wait(number)

    def release_all(self) -> None:
        """Nothing is worth waiting for (memory stopped being trusted): wake every reader."""
        self._waiters.release_all()
        self._releases += 1
        self._wake_table_readers()

    def stalled_seconds(self, counting: bool) -> float:
        """How long received batches have waited without ``applied`` advancing (0: none wait)."""
        if self._waiting_since is None or not counting:
            return 0.0
        return time.monotonic() - self._waiting_since

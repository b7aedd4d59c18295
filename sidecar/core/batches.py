"""Numbered batches that carry rows into the tables: ``BatchIngest``.

Such a source numbers its batches itself and sends the rows with them (today a
follower's upstream, ``follower.UpstreamSource``; next, logical decoding), so nothing is
fetched: a batch is applied the moment it arrives -- full tables' rows stored
(``replica.ReplicaTable``), lazy tables' keys dropped, every change recorded in the Watch
fan-out under the source's revision -- and ``Revisions`` advances to it.

It is the source's ``source.NumberedSink``: an epoch began (every table from scratch),
a batch, progress (no change of ours up to a revision), lost, resumed, and a read
barrier's token coming back (``token_received``: the source's own Sync, never a
notification).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sidecar.core.aio import backoff_delay
from sidecar.core.barrier import Barrier
from sidecar.core.cache import TableCache
from sidecar.core.fanout import TABLE_WIDE, Change, FanOut
from sidecar.core.keys import Key
from sidecar.core.lazy import LazyTable
from sidecar.core.reads import ReadPath
from sidecar.core.replica import ReplicaTable
from sidecar.core.revisions import Revision, Revisions
from sidecar.core.source import NumberedSource, Rows, SourceBatch
from sidecar.core.trust import Trust
from sidecar.errors import Unavailable

log = logging.getLogger(__name__)

# Seconds between barrier rounds that try to trust memory again after one failed (the stream up).
FENCE_RETRY_MIN = 0.1
FENCE_RETRY_MAX = 5.0


class Forwarder(Protocol):
    """Where the source's own writes go (a follower's upstream: ``upstream.Upstream``)."""

    async def invalidate(
        self, table: str, raw_keys: Sequence[Sequence[Any]] | None, refresh: bool, credentials: tuple[str, ...] = ()
    ) -> Revision: ...


class BatchIngest:
    """Numbered batches with their rows, applied to the tables as they arrive."""

    def __init__(
        self,
        replicas: Mapping[str, ReplicaTable],
        lazies: Mapping[str, LazyTable],
        revisions: Revisions,
        fanout: FanOut,
        trust: Trust,
        reads: ReadPath,
        forwarder: Forwarder,
    ) -> None:
        self._replicas = replicas  # full tables: rows as the batches carry them
        self._lazies = lazies  # lazy tables: keys the batches name dropped
        self._revisions = revisions
        self._fanout = fanout
        self._trust = trust
        self._reads = reads
        self._forwarder = forwarder
        self._fences = 0  # switches back to trusting memory begun (see _trust_after_fence)
        self._fence_tasks: set[asyncio.Task[None]] = set()

    def attach(self, source: NumberedSource, barrier_timeout: float = 30.0) -> None:
        """Read barriers go through ``source`` (a Sync there; its token comes back here)."""
        self._trust.use_barrier(Barrier(source.send_token, timeout=barrier_timeout))

    # ------------------------------------------------------------ the source's side (source.NumberedSink)

    def epoch_began(self, epoch: str, revision: int, rows: Mapping[str, Rows], reason: str | None) -> None:
        """Memory is rebuilt from the source's state at ``revision`` of its ``epoch``."""
        if reason is not None:
            log.info(
                "rebuilt every table at the upstream's revision %s/%d (%s)",
                epoch,
                revision,
                reason,
                extra={"event": "rebuild", "epoch": epoch, "reason": reason},
            )
        self._revisions.adopt(epoch, revision)
        self._fanout.start(epoch, revision, reason)
        self._rebuild(rows)
        self._revisions.advance()
        self._trust_after_fence()

    def batch(self, batch: SourceBatch) -> None:
        """One batch the source numbered, applied at once."""
        self._revisions.number(batch.revision)
        self._apply(batch)
        self._revisions.advance()

    def progress(self, revision: int) -> None:
        """Nothing of ours happened at the source up to ``revision``."""
        self._revisions.number(revision)
        self._revisions.advance()

    def reconciled(self, reloaded: Mapping[str, Rows], failed: Mapping[str, str]) -> None:
        """Tables read again, or no longer served, as the source found them on resuming (not
        trusted meanwhile: reads pass through); the next batch tells watchers."""
        for name, rows in reloaded.items():
            if (replica := self._replicas.get(name)) is not None:
                replica.replace(rows)
        for name, problem in failed.items():
            if (replica := self._replicas.get(name)) is not None:
                replica.fail(problem)

    def resumed(self) -> None:
        """The source follows again without having missed anything: trust memory again."""
        self._trust_after_fence()

    def source_lost(self, reason: str) -> None:
        """Batches may be missed from now on: stop trusting memory (reads go to the source)."""
        self._fences += 1  # (a fence under way no longer says anything)
        self._trust.lost(f"listener down ({reason})")
        self._revisions.release_all()

    def token_received(self, token: str) -> None:
        """A read barrier's token is back: the source has sent every batch before it."""
        barrier = self._trust.barrier
        if barrier is not None and barrier.token_received(token, self._revisions.seq):
            self._revisions.advance()

    # ------------------------------------------------------------ applying

    def _rebuild(self, rows: Mapping[str, Rows]) -> None:
        """Every table from scratch: full ones hold ``rows`` (one missing there is not served
        by the upstream), lazy ones nothing."""
        for name, replica in self._replicas.items():
            held = rows.get(name)
            if held is None:
                replica.fail("the upstream does not serve it from memory")
            else:
                replica.replace(held)
        for lazy in self._lazies.values():
            lazy.rebuild(0)

    def _apply(self, batch: SourceBatch) -> None:
        """One batch: tables sent again replaced, rows stored, lazy keys dropped, all recorded."""
        seq = batch.revision
        self._fanout.ensure(seq, batch.xid)  # (a batch of no change of ours is still a revision)
        for name, rows in batch.reloaded.items():
            if (replica := self._replicas.get(name)) is not None:
                replica.replace(rows)
        for name, problem in batch.failed.items():
            if (replica := self._replicas.get(name)) is not None:
                replica.fail(problem)
            elif (lazy := self._lazies.get(name)) is not None:
                lazy.fail(problem)
        # Rows are the upstream's as of publishing: every change of a key in the batch
        # carries the same one, so the order of the changes does not matter for them.
        carried: dict[str, dict[Key, bytes | None]] = {}
        moved: dict[str, list[Key]] = {}
        ahead: dict[str, list[Key]] = {}  # rows newer than the batch's other rows: fenced once stored
        for change in batch.changes:
            lazy = self._lazies.get(change.table)
            if lazy is None and change.table not in self._replicas:
                continue
            self._fanout.record(seq, batch.xid, Change(change.table, change.op, change.key, change.old_key))
            if not change.apply:
                continue
            if lazy is not None:  # drop what the change names
                if change.key is None or change.op in TABLE_WIDE:
                    lazy.changed_all(seq)
                else:
                    lazy.changed([change.key] if change.old_key is None else [change.key, change.old_key], seq)
                continue
            if change.key is None:
                continue  # (a whole-table change comes with the table, in ``reloaded``)
            carried.setdefault(change.table, {})[change.key] = change.row
            if change.ahead:
                ahead.setdefault(change.table, []).append(change.key)
            if change.old_key is not None:  # the row moved away from it (unless another change says)
                moved.setdefault(change.table, []).append(change.old_key)
        for name, held in carried.items():
            for key in moved.pop(name, ()):
                held.setdefault(key, None)
            self._replicas[name].put(held)
        for name, keys in moved.items():
            self._replicas[name].put(dict.fromkeys(keys))
        for name, keys in ahead.items():
            self._replicas[name].fence_ahead(keys)

    # ------------------------------------------------------------ trusting memory again

    def _trust_after_fence(self) -> None:
        """Trust memory again once it is at least as new as every answer the source gave
        meanwhile. A read passed through to the upstream while this follower was away may
        have seen rows newer than the revision memory is at now; so reads wait (not pass
        through) while the reads in flight end and one barrier round -- an upstream Sync
        sent after them, applied here -- brings memory past all they saw."""
        if self._trust.barrier is None:
            self._trust.set_up(True)
            return
        self._fences += 1
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._reads.gate is not None and not self._reads.gate.done():
            self._reads.gate.set_result(None)  # (an earlier fence's readers go on to this one's)
        self._reads.gate = gate
        task = asyncio.create_task(self._fence_then_trust(self._fences, gate), name="fence")
        self._fence_tasks.add(task)
        task.add_done_callback(self._fence_tasks.discard)

    async def _fence_then_trust(self, fence: int, gate: asyncio.Future[None]) -> None:
        """One barrier round, then trust memory -- unless the stream was lost meanwhile (a
        later fence, or none, decides). A round that fails while the stream stays up (it
        timed out behind a slow upstream) is tried again: nothing else would ever trust
        memory again, and the follower would refuse ``Sync`` until its stream broke."""
        barrier = self._trust.barrier
        assert barrier is not None
        attempt = 0
        try:
            while fence == self._fences:
                try:
                    await self._reads.until_none_sourced()
                    await barrier.wait()
                except Unavailable as exc:
                    if fence != self._fences:
                        break  # (lost again meanwhile: reads go on passing through)
                    delay = backoff_delay(attempt, FENCE_RETRY_MIN, FENCE_RETRY_MAX)
                    attempt += 1
                    log.info("memory not trusted yet (%s); another barrier round in %.2fs", exc, delay)
                    await asyncio.sleep(delay)
                else:
                    if fence == self._fences:
                        self._trust.set_up(True)
                    break
        finally:
            if not gate.done():
                gate.set_result(None)
            if self._reads.gate is gate:
                self._reads.gate = None

    # ------------------------------------------------------------ the sidecar's own changes

    async def invalidate(
        self,
        table: TableCache,
        raw_keys: Sequence[Sequence[Any]] | None,
        keys: list[Key] | None,
        refresh: bool,
        credentials: tuple[str, ...],
    ) -> Revision | None:
        """A follower's numbers are its upstream's: the upstream invalidates (every follower
        then hears of it, with the caller's ``credentials``: the upstream decides whether that
        caller may); the revision to wait for before answering."""
        return await self._forwarder.invalidate(table.schema.qualified, raw_keys, refresh, credentials)

    async def close(self) -> None:
        for task in list(self._fence_tasks):
            task.cancel()
        await asyncio.gather(*self._fence_tasks, return_exceptions=True)
        for lazy in self._lazies.values():
            await lazy.close()
        for replica in self._replicas.values():
            await replica.close()

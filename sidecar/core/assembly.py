"""The cache's parts, built and wired in one place, top to bottom: for a sidecar on
PostgreSQL (``direct``: change notices, tables that refetch) and for a follower
(``following``: numbered batches that carry rows). Each part is handed what it needs
when built; ``Revisions`` tells, in this order, the fan-out (publish), the barrier
(``Trust``) and the engine (readiness) each time the applied revision may have moved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.core.batches import BatchIngest, Forwarder
from sidecar.core.cache import RefetchingTable, TableCache
from sidecar.core.engine import Engine
from sidecar.core.fanout import FanOut
from sidecar.core.full import FullTable
from sidecar.core.keys import Key
from sidecar.core.lazy import LazyTable
from sidecar.core.notices import NoticeIngest
from sidecar.core.reads import ReadPath
from sidecar.core.replica import ReplicaTable
from sidecar.core.revisions import Revisions
from sidecar.core.router import ChangeRouter
from sidecar.core.schema import TableSchema
from sidecar.core.source import Database, FollowState, Rows, StandbyLag
from sidecar.core.store import Retention
from sidecar.core.trust import Trust
from sidecar.core.wire import row_json


@dataclass(frozen=True)
class Options:
    """The settings the cache's parts are built with (``from_config``: the ``Config``'s)."""

    max_batch_keys: int = 1000
    refetch_batch_size: int = 500
    refetch_concurrency: int = 2
    history_batches: int = 10_000
    history_bytes: int = 64 * 1024 * 1024
    watch_max_lag: int = 1_000
    watch_max_streams: int = 10_000
    watch_max_streams_per_connection: int = 1_000
    watch_send_timeout: float = 30.0
    snapshot_max_bytes: int = 256 * 1024 * 1024
    stall_after: float = 30.0
    source_name: str = "listener"  # what PostgreSQL's changes come by, in messages

    @classmethod
    def from_config(cls, config: Config) -> Options:
        return cls(
            max_batch_keys=config.max_batch_keys,
            refetch_batch_size=config.refetch_batch_size,
            refetch_concurrency=config.refetch_concurrency,
            history_batches=config.watch_history_batches,
            history_bytes=config.watch_history_bytes,
            watch_max_lag=config.watch_max_lag,
            watch_max_streams=config.watch_max_streams,
            watch_max_streams_per_connection=config.watch_max_streams_per_connection,
            watch_send_timeout=config.watch_send_timeout,
            snapshot_max_bytes=config.watch_snapshot_max_bytes,
            stall_after=config.stall_seconds,
            source_name="replication stream" if config.capture == "logical" else "listener",
        )


class HeldRows:
    """A full table's rows by its name, while memory holds it as the truth: what the
    fan-out attaches to a published batch (None: a lazy table, or one not served)."""

    def __init__(self, tables: Mapping[str, TableCache]) -> None:
        self._tables = tables

    def __call__(self, name: str) -> Rows | None:
        table = self._tables.get(name)
        return table.authoritative_rows() if table is not None else None


@dataclass(frozen=True)
class Core:
    """The wired parts: the engine (reads, Watch) and what the edge and metrics are handed."""

    engine: Engine
    tables: Mapping[str, TableCache]
    full: Mapping[str, FullTable]  # the full tables among them (none on a follower)
    revisions: Revisions
    fanout: FanOut
    trust: Trust
    reads: ReadPath
    retention: Retention
    options: Options
    # Full table -> the definition its rows were read with (ListTables' ``definition``): a
    # sidecar on PostgreSQL fills it from its catalog checks, a follower from its upstream.
    definitions: dict[str, str] = field(default_factory=dict, kw_only=True)

    def upstream_state(self) -> FollowState | None:
        """A follower's state of following its upstream (None: not a follower)."""
        return None

    def standby_state(self) -> StandbyLag | None:
        """How far behind its primary the standby this hub decodes on is (None: not on a
        standby, or not sampled yet)."""
        return None

    async def close(self) -> None:
        await self.reads.close()
        await self.trust.close()


@dataclass(frozen=True)
class Direct(Core):
    """A sidecar on PostgreSQL: its change notices come in by ``notices``."""

    notices: NoticeIngest
    standby_lag: Callable[[], StandbyLag | None] | None = None

    def standby_state(self) -> StandbyLag | None:
        return self.standby_lag() if self.standby_lag is not None else None

    async def close(self) -> None:
        await super().close()
        await self.notices.close()


@dataclass(frozen=True)
class Following(Core):
    """A follower: its upstream's numbered batches come in by ``batches``."""

    batches: BatchIngest
    follow_state: Callable[[], FollowState]

    def upstream_state(self) -> FollowState | None:
        return self.follow_state()

    async def close(self) -> None:
        await self.batches.close()
        await super().close()


class AheadRows:
    """Whether a table's row held now may be newer than its other rows as of a revision
    show (a relation's row read from the database, or marked so by the upstream): what
    the fan-out marks ``ahead`` in a published batch."""

    def __init__(self, tables: Mapping[str, FullTable | ReplicaTable]) -> None:
        self._tables = tables

    def __call__(self, name: str, key: Key, revision: int) -> bool:
        table = self._tables.get(name)
        return table is not None and table.ahead(key, revision)


def _fanout(
    tables: Mapping[str, TableCache], options: Options, ahead: Mapping[str, FullTable | ReplicaTable]
) -> FanOut:
    return FanOut(
        rows_of=HeldRows(tables),
        row_json=row_json,
        ahead_of=AheadRows(ahead),
        max_batches=options.history_batches,
        max_bytes=options.history_bytes,
        max_lag=options.watch_max_lag,
        max_streams=options.watch_max_streams,
        max_streams_per_connection=options.watch_max_streams_per_connection,
        send_timeout=options.watch_send_timeout,
    )


def direct(
    db: Database,
    schemas: Sequence[TableSchema],
    options: Options | None = None,
    standby_lag: Callable[[], StandbyLag | None] | None = None,
) -> Direct:
    """The parts of a sidecar that follows PostgreSQL's change notices (``standby_lag``:
    how far behind its primary the standby it decodes on is, if it is one)."""
    options = options or Options()
    revisions = Revisions(options.stall_after)
    tables: dict[str, RefetchingTable] = {}  # (filled below: the fan-out reads them only when publishing)
    full: dict[str, FullTable] = {}
    fanout = _fanout(tables, options, full)
    revisions.on_applied(fanout.publish)
    trust = Trust(
        revisions, unavailable=f"the {options.source_name} is down; the cache cannot be brought up to date now"
    )
    router = ChangeRouter(revisions, fanout)
    retention = Retention(options.snapshot_max_bytes)  # what initial states keep alive, across tables
    for schema in schemas:
        table: RefetchingTable
        if schema.config.mode == "full":
            table = full[schema.qualified] = FullTable(
                schema,
                db,
                numbering=revisions,
                on_matched=router.matched,
                batch_size=options.refetch_batch_size,
                concurrency=options.refetch_concurrency,
                fence=trust.fence,
            )
            table.store.retention = retention
        else:
            table = LazyTable(schema, db, max_rows=schema.config.max_rows, ttl_seconds=schema.config.ttl_seconds)
        tables[schema.qualified] = table
        router.register(table)
    notices = NoticeIngest(tables, full, router, revisions, fanout, trust, options.source_name)
    reads = ReadPath(db, trust.trusted_epoch, options.max_batch_keys)
    engine = Engine(tables, full, revisions, fanout, trust, reads, notices)
    return Direct(engine, tables, full, revisions, fanout, trust, reads, retention, options, notices, standby_lag)


def following(
    db: Database,
    fills: Database,
    schemas: Sequence[TableSchema],
    forwarder: Forwarder,
    follow_state: Callable[[], FollowState],
    target: str,
    options: Options | None = None,
    definitions: dict[str, str] | None = None,
) -> Following:
    """The parts of a follower: full tables as its upstream's batches say, lazy ones filled
    from ``fills`` (the upstream's memory), reads memory cannot answer passed to ``db``
    (the upstream behind its barrier); its own Invalidates go to ``forwarder``."""
    options = options or Options()
    revisions = Revisions(options.stall_after)
    tables: dict[str, TableCache] = {}
    replicas: dict[str, ReplicaTable] = {}
    fanout = _fanout(tables, options, replicas)
    revisions.on_applied(fanout.publish)
    trust = Trust(revisions, unavailable=f"upstream {target} unreachable: the cache cannot be brought up to date now")
    retention = Retention(options.snapshot_max_bytes)
    lazies: dict[str, LazyTable] = {}
    for schema in schemas:
        if schema.config.mode == "full":
            tables[schema.qualified] = replica = replicas[schema.qualified] = ReplicaTable(
                schema, fence=trust.fence, seq=lambda: revisions.seq
            )
            replica.store.retention = retention
        else:
            tables[schema.qualified] = lazies[schema.qualified] = LazyTable(
                schema, fills, max_rows=schema.config.max_rows
            )
    reads = ReadPath(db, trust.trusted_epoch, options.max_batch_keys, source_name=f"upstream {target}")
    batches = BatchIngest(replicas, lazies, revisions, fanout, trust, reads, forwarder)
    engine = Engine(tables, {}, revisions, fanout, trust, reads, batches)
    return Following(
        engine,
        tables,
        {},
        revisions,
        fanout,
        trust,
        reads,
        retention,
        options,
        batches,
        follow_state,
        definitions={} if definitions is None else definitions,
    )

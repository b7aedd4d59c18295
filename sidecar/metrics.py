"""Prometheus metrics over HTTP (``metrics.listen``; off unless configured).

Most values are read from the engine's own counters when Prometheus scrapes,
so the read path pays nothing for them; the reading happens on the event
loop (the HTTP server's thread hands it over), never concurrently with a
change. Two histograms are observed as calls happen: gRPC handling time per
method and read-barrier time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.config.addresses import parse_listen_address
from sidecar.core.assembly import Core, Direct
from sidecar.core.source import FollowState
from sidecar.edge.auth import ServerSecurity
from sidecar.pg.listener import Listener
from sidecar.pg.logical import SlotState
from sidecar.pg.notify_queue import NotifyQueue
from sidecar.pg.senders import SenderGate, SenderStats
from sidecar.pg.slot_watch import WAL_STATUSES, SlotWatch
from sidecar.pg.standby_watch import StandbySample, StandbyWatch

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class ReplicationStream(Protocol):
    """What the metrics read of logical capture's stream (``logical.LogicalSource``)."""

    @property
    def up(self) -> bool: ...
    @property
    def connects(self) -> int: ...
    @property
    def losses(self) -> int: ...
    @property
    def transactions(self) -> int: ...
    @property
    def slot(self) -> SlotState: ...


class Metrics:
    """The registry, the histograms, and the HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "cache_sidecar_request_seconds",
            "Time to answer a gRPC call, by method (Watch: time to subscribe).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.barrier_seconds = Histogram(
            "cache_sidecar_barrier_seconds",
            "Time a read barrier (Sync, STRONG reads) took.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue: NotifyQueue | None = None  # set by the daemon: its queue samples
        self.slot: SlotWatch | None = None  # set by the daemon in logical mode: its slot samples
        self.standby: StandbyWatch | None = None  # set by a hub on a standby: how far behind the primary
        self._server: Any = None

    def observe_call(self, method: str, seconds: float) -> None:
        self.request_seconds.labels(method).observe(seconds)

    def watch(
        self,
        core: Core,
        listener: Listener | None,
        loop: asyncio.AbstractEventLoop,
        senders: SenderGate | None = None,
        *,
        security: ServerSecurity | None = None,
        logical: ReplicationStream | None = None,
    ) -> None:
        """Report the state of ``core``, ``listener`` and ``senders`` (read on ``loop``; a
        follower has no listener; no sender gate when senders are not checked), of the
        replication stream ``logical`` (logical capture: no listener then), and of the
        credential files of ``security``."""
        core.engine.on_barrier(self.barrier_seconds.observe)
        self.registry.register(_StateCollector(core, listener, loop, self, senders, logical))
        if security is not None:
            self.registry.register(CredentialCollector(security))

    def serve(self, listen: str) -> str:
        """Start the HTTP endpoint; return the address it is bound to."""
        address = parse_listen_address(listen)
        if address.unix_path is not None or address.port is None:
            raise ValueError("metrics.listen must be host:port")
        host = (address.host or "0.0.0.0").strip("[]")
        self._server, _thread = start_http_server(address.port, addr=host, registry=self.registry)
        bound = f"{address.host}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics", bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _StateCollector(Collector):
    def __init__(
        self,
        core: Core,
        listener: Listener | None,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics,
        senders: SenderGate | None = None,
        logical: ReplicationStream | None = None,
    ) -> None:
        self.core = core
        self.listener = listener
        self.senders = senders
        self.logical = logical
        self.loop = loop
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        if self.loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop)
        try:
            yield from future.result(timeout=5)
        except Exception as exc:
            log.warning("metrics: could not read the engine's state: %s", exc)

    async def _snapshot(self) -> list[Any]:
        core, engine, listener = self.core, self.core.engine, self.listener
        notices = core.notices if isinstance(core, Direct) else None
        reads = CounterMetricFamily(
            "cache_sidecar_reads",
            "Keys read, by table and result (hit, not_found, miss; database: "
            "read through while memory could not be trusted).",
            labels=["table", "result"],
        )
        queries = CounterMetricFamily(
            "cache_sidecar_queries",
            "Queries the caches made, by table and kind (fill, refetch, reload; degraded: keyed refetches "
            "that failed as they would again and became reloads).",
            labels=["table", "kind"],
        )
        coalesced = CounterMetricFamily(
            "cache_sidecar_reloads_coalesced",
            "Whole-table changes that caused no reload of their own: a reload already due covered them.",
            labels=["table"],
        )
        rows = GaugeMetricFamily(
            "cache_sidecar_rows", "Rows held (lazy tables: with cached 'not found').", labels=["table"]
        )
        size = GaugeMetricFamily("cache_sidecar_bytes", "Approximate bytes of cached rows.", labels=["table"])
        loaded = GaugeMetricFamily("cache_sidecar_table_loaded", "1 once the table is loaded.", labels=["table"])
        not_served = GaugeMetricFamily(
            "cache_sidecar_table_not_served",
            "1 while the table is not served from memory (dropped, altered key, foreign triggers, a load "
            "that fails the same way each time; the reason is logged); reads of it go to the database.",
            labels=["table"],
        )
        loading = GaugeMetricFamily(
            "cache_sidecar_table_loading",
            "1 while a (re)load of the full table is due or runs (reads go to the database meanwhile).",
            labels=["table"],
        )
        load_rows = GaugeMetricFamily(
            "cache_sidecar_load_rows", "Rows read by the running (re)load, or by the last one.", labels=["table"]
        )
        load_expected = GaugeMetricFamily(
            "cache_sidecar_load_expected_rows",
            "PostgreSQL's estimate of the rows of the running or last load (0: none).",
            labels=["table"],
        )
        load_eta = GaugeMetricFamily(
            "cache_sidecar_load_eta_seconds",
            "Seconds the running load still needs at its rate so far (0: not running, or cannot tell).",
            labels=["table"],
        )
        for name, table in core.tables.items():
            if (progress := table.load_progress) is not None:
                state = progress.state()
                loading.add_metric([name], 1 if state.running else 0)
                load_rows.add_metric([name], state.rows)
                load_expected.add_metric([name], state.expected or 0)
                load_eta.add_metric([name], state.eta or 0.0)
            for result, count in table.reads.items():
                reads.add_metric([name, result], count)
            reads.add_metric([name, "database"], core.reads.stats.database_reads.get(name, 0))
            for kind, count in table.queries().items():
                queries.add_metric([name, kind], count)
            if (full := core.full.get(name)) is not None:
                coalesced.add_metric([name], full.coalesced)
            rows.add_metric([name], table.row_count)
            size.add_metric([name], table.byte_count())
            loaded.add_metric([name], 1 if table.loaded else 0)
            not_served.add_metric([name], 0 if table.problem is None else 1)
        families: list[Any] = [reads, queries, coalesced, rows, size, loaded, not_served]
        families += [loading, load_rows, load_expected, load_eta]
        if listener is not None:
            families += self._listener(listener)
        if self.logical is not None:
            families += _replication(self.logical, self.metrics.slot)
            standby = self.metrics.standby
            if standby is not None and standby.sample is not None:
                families += _standby(standby.sample)
        if self.senders is not None:
            families += _senders(self.senders.stats)
        if (following := core.upstream_state()) is not None:
            families += _upstream(following)
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_revision_stalled_seconds",
                "Seconds the revision has not advanced while received changes wait (0: none wait); "
                "health is NOT_SERVING above cache.stall_seconds.",
                engine.stalled_seconds,
            )
        )
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_ready", "1 while serving from memory (health SERVING).", 1 if engine.ready else 0
            )
        )
        families.append(
            GaugeMetricFamily("cache_sidecar_revision", "The applied revision number.", core.revisions.applied)
        )
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_revision_received",
                "Revision numbers received (applied lags it by refetches).",
                core.revisions.seq,
            )
        )
        families.append(
            GaugeMetricFamily("cache_sidecar_watch_subscribers", "Open Watch streams.", core.fanout.subscribers)
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_watch_dropped", "Watch streams ended for falling behind.", core.fanout.dropped
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_watch_stalled",
                "Watch streams ended because their client took no message for watch.send_timeout "
                "(counted in cache_sidecar_watch_dropped too).",
                core.fanout.stalled,
            )
        )
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_watch_snapshot_bytes",
                "Bytes of old rows that initial-state snapshots keep alive (at most watch.snapshot_max_bytes).",
                core.retention.held,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_watch_snapshots_given_up",
                "Initial-state snapshots given up for keeping more than watch.snapshot_max_bytes alive "
                "(their streams ended; clients start over).",
                core.retention.given_up,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_watch_refused",
                "Watch streams refused by watch.max_streams or watch.max_streams_per_connection.",
                core.fanout.refused,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_events_ignored",
                "Notifications for tables this sidecar does not cache.",
                notices.stats.ignored if notices is not None else 0,
            )
        )
        queue = self.metrics.queue
        if queue is not None and queue.usage is not None:
            families.append(
                GaugeMetricFamily(
                    "cache_sidecar_pg_notification_queue_usage",
                    "pg_notification_queue_usage(): the fraction of PostgreSQL's NOTIFY queue in use "
                    "(alert at 0.5; at 1.0 every write to a cached table fails).",
                    queue.usage,
                )
            )
        return families

    def _listener(self, listener: Listener) -> list[Any]:
        stats = listener.stats
        notices = self.core.notices if isinstance(self.core, Direct) else None
        families: list[Any] = []
        families.append(
            CounterMetricFamily("cache_sidecar_notifications", "Notifications received.", stats.notifications)
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_notifications_rejected",
                "Notifications whose payload could not be parsed.",
                stats.rejected,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_notifications_forged",
                "Read-barrier tokens on our channel sent by another backend than the sidecar's (ignored).",
                stats.forged,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_notifications_degraded",
                "Notifications whose keys did not fit their columns (the table was reloaded instead).",
                notices.stats.bad_keys if notices is not None else 0,
            )
        )
        families.append(
            CounterMetricFamily(
                "cache_sidecar_listener_reconnects",
                "Times the LISTEN connection was re-established.",
                max(0, stats.connects - 1),
            )
        )
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_listener_connected", "1 while LISTEN is active.", 1 if listener.connected else 0
            )
        )
        return families


def _replication(stream: ReplicationStream, watch: SlotWatch | None) -> list[Any]:
    """Logical capture's: the replication stream, and the WAL its slot holds back."""
    slot = stream.slot
    families: list[Any] = [
        GaugeMetricFamily(
            "cache_sidecar_replication_connected",
            "1 while the replication stream is up (its slot created; tables load, then changes stream).",
            1 if stream.up else 0,
        ),
        CounterMetricFamily(
            "cache_sidecar_replication_reconnects",
            "Times the replication stream was re-established (each from a new slot, with a rebuild).",
            max(0, stream.connects - 1),
        ),
        CounterMetricFamily(
            "cache_sidecar_replication_losses",
            "Times the replication stream was lost while up (memory stops being trusted until the rebuild).",
            stream.losses,
        ),
        CounterMetricFamily(
            "cache_sidecar_replication_transactions",
            "Committed transactions received that changed a cached table or carried a read barrier's token.",
            stream.transactions,
        ),
    ]
    if stream.up and slot.streaming:
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_replication_lag_bytes",
                "Bytes of WAL between what the server has sent (as it last said) and the position the "
                "sidecar has confirmed.",
                max(0, slot.server_end - slot.confirmed),
            )
        )
        families.append(
            GaugeMetricFamily(
                "cache_sidecar_replication_last_message_seconds",
                "Seconds since the server last sent anything on the stream (a change or a keepalive; "
                "the sidecar asks for one after listener.ping_interval of silence).",
                max(0.0, time.monotonic() - slot.heard),
            )
        )
    sample = watch.sample if watch is not None else None
    if sample is not None:
        if sample.retained is not None:
            families.append(
                GaugeMetricFamily(
                    "cache_sidecar_slot_retained_bytes",
                    "Bytes of WAL the sidecar's replication slot makes the server keep (its current WAL "
                    "position minus the slot's restart_lsn, sampled every 15 s); alert when it stays high.",
                    max(0, sample.retained),
                )
            )
        if sample.safe_wal_size is not None:
            families.append(
                GaugeMetricFamily(
                    "cache_sidecar_slot_safe_wal_bytes",
                    "Bytes of WAL that may still be written before the slot is in danger of losing WAL it "
                    "needs (pg_replication_slots.safe_wal_size; only with max_slot_wal_keep_size).",
                    sample.safe_wal_size,
                )
            )
        if sample.wal_status is not None:
            status = GaugeMetricFamily(
                "cache_sidecar_slot_wal_status",
                "1 for the slot's wal_status (reserved, extended: safe; unreserved: WAL it needs goes at the "
                "next checkpoint unless it catches up; lost: gone, the stream breaks and tables rebuild).",
                labels=["status"],
            )
            for name in WAL_STATUSES:
                status.add_metric([name], 1 if sample.wal_status == name else 0)
            families.append(status)
    return families


def _standby(sample: StandbySample) -> list[Any]:
    """A hub on a standby (database.primary_dsn): how far the standby is behind the primary."""
    return [
        GaugeMetricFamily(
            "cache_sidecar_standby_replay_lag_bytes",
            "Bytes of the primary's WAL (as the standby's receiver or the hub's last read barrier last saw its "
            "end) the standby has not replayed, sampled every 5 s: the stream is that far behind the primary, "
            "and read barriers wait for it.",
            sample.behind_bytes,
        ),
        GaugeMetricFamily(
            "cache_sidecar_standby_replay_lag_seconds",
            "0 while the standby has replayed all it knows the primary has; else seconds since it replayed a commit.",
            sample.behind_seconds,
        ),
        GaugeMetricFamily(
            "cache_sidecar_standby_receiving",
            "1 while the standby's WAL receiver streams from the primary (0: disconnected, or not visible to "
            "the role: pg_stat_wal_receiver needs pg_read_all_stats).",
            1 if sample.receiving else 0,
        ),
    ]


def _senders(stats: SenderStats) -> list[Any]:
    """Whole-table changes by who sent them (anyone may NOTIFY our channel)."""
    return [
        CounterMetricFamily(
            "cache_sidecar_notifications_dropped",
            "Whole-table changes dropped because the sending backend's role cannot write the table.",
            stats.dropped,
        ),
        CounterMetricFamily(
            "cache_sidecar_notifications_sender_unknown",
            "Whole-table changes applied though their sender could not be told (it had disconnected, "
            "or the look-up failed).",
            stats.unknown,
        ),
        CounterMetricFamily(
            "cache_sidecar_sender_checks", "Look-ups of whether a sending backend may write a table.", stats.checks
        ),
    ]


class CredentialCollector(Collector):
    """The server's certificate and token files as last re-read (read in the scraping
    thread: ``Watched`` is thread-safe)."""

    def __init__(self, security: ServerSecurity) -> None:
        self.security = security

    def collect(self) -> Iterator[Any]:
        failures = CounterMetricFamily(
            "cache_sidecar_credential_reload_failures",
            "Re-reads of a credential file that failed, by file (tokens: missing, unreadable or no valid "
            "token -- every call is then refused; certificate: bad or not valid now -- the last good one "
            "stays); each problem counted once.",
            labels=["file"],
        )
        failing = GaugeMetricFamily(
            "cache_sidecar_credential_file_failing", "1 while the file's last re-read failed.", labels=["file"]
        )
        for name, watched in (("certificate", self.security.certificates), ("tokens", self.security.tokens)):
            if watched is not None:
                watched.value  # noqa: B018 (looks at the file now, as a call would)
                failures.add_metric([name], watched.failures)
                failing.add_metric([name], int(watched.failing))
        yield failures
        yield failing
        tokens = self.security.tokens
        if tokens is not None:
            current = tokens.value
            yield GaugeMetricFamily(
                "cache_sidecar_auth_tokens", "Tokens in force (0: every call is refused).", len(current)
            )
            yield GaugeMetricFamily(
                "cache_sidecar_auth_token_lines_skipped",
                "Lines of the token file skipped as invalid when it was last read (each logged).",
                len(current.skipped),
            )


def _upstream(state: FollowState) -> list[Any]:
    """A follower's: how it follows its upstream."""
    info = GaugeMetricFamily(
        "cache_sidecar_upstream_info", "1, labelled with the upstream a follower follows.", labels=["target"]
    )
    info.add_metric([state.target], 1)
    return [
        info,
        GaugeMetricFamily(
            "cache_sidecar_upstream_stream_up", "1 while the Watch stream to the upstream is up.", int(state.stream_up)
        ),
        GaugeMetricFamily(
            "cache_sidecar_upstream_following",
            "1 while following the upstream, caught up (reads from memory).",
            int(state.following),
        ),
        GaugeMetricFamily(
            "cache_sidecar_upstream_behind_revisions",
            "How far the newest upstream revision known of is ahead of the applied one, in revision "
            "numbers (a hub in logical capture numbers by commit LSN: WAL bytes then).",
            state.behind_revisions,
        ),
        GaugeMetricFamily(
            "cache_sidecar_upstream_behind_seconds",
            "Seconds since the follower last had everything it knew of applied (or since it stopped following).",
            state.behind_seconds,
        ),
        CounterMetricFamily("cache_sidecar_upstream_resumes", "Streams resumed without a rebuild.", state.resumes),
        CounterMetricFamily(
            "cache_sidecar_upstream_rebuilds", "Rebuilds from the upstream's initial state.", state.rebuilds
        ),
    ]

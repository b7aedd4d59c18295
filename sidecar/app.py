"""The daemon's lifecycle: wire config, database, engine, listener and gRPC
server together, supervise the background tasks, and shut down cleanly.

Start-up order matters for correctness: the tables start loading only once
the listener's LISTEN is active (``NoticeIngest.source_connected``), so no change
can slip between the snapshot and the notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg

from sidecar.config import Config, dsn
from sidecar.config.dsn import scrub
from sidecar.core import assembly
from sidecar.core.aio import backoff_delay, wait_set
from sidecar.core.assembly import Core, Direct, Following, Options
from sidecar.core.engine import Engine
from sidecar.core.schema import TableSchema
from sidecar.edge import auth, server
from sidecar.errors import ConfigError, QueryFailed, SchemaError, SidecarError, Unavailable
from sidecar.fleet import channels, upstream
from sidecar.fleet.follower import UpstreamSource
from sidecar.metrics import Metrics
from sidecar.pg import db, embedded, preflight, primary, publication, triggers
from sidecar.pg.catalog import CatalogWatch
from sidecar.pg.db import PgDatabase
from sidecar.pg.listener import Listener
from sidecar.pg.logical import LogicalSource
from sidecar.pg.notify_queue import NotifyQueue
from sidecar.pg.pg_source import PgChangeSource
from sidecar.pg.senders import SenderGate
from sidecar.pg.slot_watch import SlotWatch
from sidecar.pg.standby_watch import StandbyWatch
from sidecar.shm.store import SharedStore

log = logging.getLogger(__name__)


def exit_code(exc: SidecarError) -> int:
    """A start that failed: 2 for what only a change of configuration, schema or privileges
    can fix (the README's rule), 1 for what may pass (the database went away meanwhile)."""
    return 1 if isinstance(exc, Unavailable) else 2


def wants_embedded(config: Config, environ: dict[str, str] | None = None) -> bool:
    """No database given anywhere (flag, file, CACHE_SIDECAR_*, PG*): use the embedded one."""
    environ = dict(os.environ) if environ is None else environ
    return config.embedded or not dsn.given(config.dsn, environ)


class Daemon:
    """One running sidecar. ``run()`` returns the process exit code."""

    def __init__(
        self, config: Config, on_ready: Callable[[Daemon], None] | None = None, handle_signals: bool = True
    ) -> None:
        self.config = config
        self.on_ready = on_ready
        self.handle_signals = handle_signals
        self.stop_event = asyncio.Event()
        self.embedded: embedded.EmbeddedPostgres | None = None
        self.db: PgDatabase | None = None
        self.core: Core | None = None  # the cache's parts (tests read them)
        self.engine: Engine | None = None
        self.shared_store: SharedStore | None = None
        self.source: PgChangeSource | LogicalSource | UpstreamSource | None = None
        self.listener: Listener | None = None  # the source's LISTEN connection (metrics, tests)
        self.server: server.Server | None = None
        self.metrics: Metrics | None = None
        self.metrics_address: str | None = None
        self.catalog: CatalogWatch | None = None
        self.primary: primary.Primary | None = None  # database.dsn is a standby: the barriers' primary
        self.standby_watch: StandbyWatch | None = None  # and how far behind the primary that standby is
        self._health_dirty = asyncio.Event()
        self._signals = 0
        # What start-up sets up, each part entered in order and left in reverse.
        self._stack = contextlib.AsyncExitStack()

    async def run(self) -> int:
        # Installed before start-up, which may wait long (connection retries, an embedded
        # server): SIGTERM then must stop the daemon cleanly too, not kill it silently.
        if self.handle_signals:
            self._install_signal_handlers()
        try:
            if not await self._start_unless_stopped():
                await self._close()
                log.info("stopped during start-up", extra={"event": "stopped"})
                return 0
        except SidecarError as exc:
            log.error("%s", scrub(str(exc), self.config.dsn))
            await self._close()
            return exit_code(exc)
        except Exception as exc:  # e.g. the database dropped mid start-up
            log.error("start-up failed: %s", scrub(f"{type(exc).__name__}: {exc}", self.config.dsn))
            await self._close()
            return 1
        try:
            return await self._supervise()
        finally:
            await self._close()

    # ---------------------------------------------------------------- start

    async def _start_unless_stopped(self) -> bool:
        """Start; False when asked to stop first (start-up is then cancelled)."""
        start = asyncio.create_task(self._start(), name="start-up")
        stop = asyncio.create_task(self.stop_event.wait(), name="stop")
        try:
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
            return False
        start.result()
        return True

    async def _start(self) -> None:
        config = self.config
        security = auth.load(config)  # a bad certificate or token file fails now, before any connection
        preflight.check_listen(config)  # and an address that cannot be listened on, before any change
        if config.upstream_target is not None:
            await self._start_follower(config, security)
            return
        if wants_embedded(config):
            config = await self._start_embedded(config)
        if not config.tables:
            raise ConfigError("tables", "no tables configured: add [[tables]] to the config file or --table NAME")
        log.info("connecting to %s", dsn.resolve(config.dsn).origin)
        self.db = await self._connect_with_retry(config)
        self._stack.push_async_callback(_close_pool, self.db)
        schemas = [await self.db.describe(table) for table in config.tables]
        logical = config.capture == "logical"
        captured: publication.Publication | None = None
        async with self.db.pool.acquire(timeout=config.query_timeout) as conn:
            # (a standby: decoding there, or a clear refusal, before anything else is checked)
            on_standby = await preflight.check_standby(conn, config)
            await preflight.check_privileges(conn, schemas)
            if logical:
                await preflight.check_logical(conn, schemas)  # (first: publishing a table with no
                # replica identity would make the application's UPDATEs and DELETEs of it fail)
                if on_standby:
                    captured = await self._standby_publication(config, conn, schemas)
                else:
                    captured = await publication.check_or_install(conn, config, schemas)
        if not logical:
            await self._check_triggers(config, schemas)

        if on_standby:
            self.standby_watch = StandbyWatch(
                lambda: self.primary.position if self.primary is not None else None,
                config.query_timeout,
                on_promoted=self._promoted,
            )
        lag = self.standby_watch.lag if self.standby_watch is not None else None
        self.core = core = assembly.direct(self.db, schemas, Options.from_config(config), standby_lag=lag)
        self.engine = core.engine
        self._stack.push_async_callback(core.close)
        self._open_shared_store(config, core)
        db = self.db
        notices = core.notices
        trigger_sets = triggers.trigger_sets(schemas, config.channel, config.bulk_threshold)
        self.catalog = catalog = CatalogWatch(
            acquire=lambda: db.pool.acquire(timeout=config.query_timeout),
            describe=db.describe,
            schemas=schemas,
            trigger_sets=trigger_sets,
            install=config.install_triggers,
            reload=notices.reload_table,
            fail=notices.fail_table,
            problem=notices.problem,
            interval=config.catalog_check_interval,
            capture_changed=self._health_dirty.set,
            # (logical capture: the publication must hold every table, instead of triggers on it)
            capture=publication.PublicationCapture(
                captured, install_on=(lambda: primary.connection(config)) if on_standby else None
            )
            if captured is not None
            else None,
            definitions=core.definitions,
        )
        await catalog.baseline()

        notices.on_connected(catalog.poke)  # what changed while nobody listened is found now, not at the next check
        if captured is not None:
            barriers = None
            if on_standby:
                self.primary = barriers = primary.Primary(config)
                self._stack.push_async_callback(barriers.close)
            self.source = logical_source = LogicalSource(
                db,
                conninfo=config.dsn,
                publication=captured.name,
                tables={(t.schema.config.schema, t.schema.config.name): t.schema for t in trigger_sets},
                read_on_change={
                    (source.table.config.schema, source.table.config.name)
                    for schema in schemas
                    if schema.config.is_relation
                    for source in schema.sources
                },
                query_timeout=config.query_timeout,
                ping_interval=config.ping_interval,
                ping_timeout=config.ping_timeout,
                reconnect_min_delay=config.reconnect_min_delay,
                reconnect_max_delay=config.reconnect_max_delay,
                connect_timeout=config.connect_timeout,
                redact=lambda text: scrub(text, config.dsn),
                primary=barriers,
            )
            notices.attach(logical_source, barrier_timeout=config.query_timeout, check_catalog=catalog.verify)
            if on_standby:  # (reads the standby answers while the stream is down wait for it to catch up)
                core.engine.database_fresh = logical_source.database_fresh
            self._stack.push_async_callback(logical_source.close)
            served = await self._serve(config, core, security, None, None)
            self._log_serving(config, schemas, served)
            return
        self.source = source = PgChangeSource(
            db,
            connect=_listener_connect(config),
            channel=config.channel,
            query_timeout=config.query_timeout,
            hears=notices.hears,
            check_senders=config.check_senders,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            reconnect_min_delay=config.reconnect_min_delay,
            reconnect_max_delay=config.reconnect_max_delay,
            redact=lambda text: scrub(text, config.dsn),
        )
        self._stack.push_async_callback(source.close)
        self.listener = source.listener
        notices.attach(source, barrier_timeout=config.query_timeout, check_catalog=catalog.verify)
        served = await self._serve(config, core, security, source.listener, source.senders)
        self._log_serving(config, schemas, served)

    def _promoted(self) -> None:
        if isinstance(self.source, LogicalSource):
            self.source.promoted()

    async def _standby_publication(
        self, config: Config, standby: Any, schemas: list[TableSchema]
    ) -> publication.Publication:
        """A hub on a standby: the primary checked, the publication installed (or checked)
        there, and replayed on the standby before any slot is made there."""
        async with primary.connection(config) as conn:
            await preflight.check_primary(conn, standby)
            captured = await publication.check_or_install(conn, config, schemas)
        await publication.replicated(standby, captured, config.connect_timeout + config.query_timeout)
        log.info(
            "database.dsn is a hot standby: decoding there; read barriers go to the primary",
            extra={"event": "hub_on_standby"},
        )
        return captured

    def _log_serving(self, config: Config, schemas: list[TableSchema], served: server.Server) -> None:
        self.config = config
        log.info(
            "serving %s on %s",
            ", ".join(f"{s.qualified} ({s.config.mode})" for s in schemas),
            ", ".join(served.addresses),
            extra={"event": "serving", "tables": [s.qualified for s in schemas], "listen": served.addresses},
        )

    async def _start_follower(self, config: Config, security: Any) -> None:
        """A follower: its change source, rows and tables are another sidecar's; no database."""
        assert config.upstream_target is not None
        link = upstream.Upstream.connect(
            config.upstream_target,
            config.query_timeout,
            channels.UpstreamSecurity.from_config(config),
            config.upstream_invalidate_with_own_token,
        )
        self._stack.push_async_callback(link.close)
        log.info("following %s", link.target)
        listing = await self._list_with_retry(link, config)
        schemas = upstream.follower_schemas(listing, config.tables)
        fills = upstream.UpstreamDatabase(link, strong=False)  # lazy tables' fills: the upstream's memory

        self.source = source = UpstreamSource(
            link,
            {s.qualified: s for s in schemas},
            progress_interval=config.upstream_progress_interval,
            stall_timeout=config.upstream_stall_timeout,
            reconnect_min_delay=config.reconnect_min_delay,
            reconnect_max_delay=config.reconnect_max_delay,
            reread_patience=config.stall_seconds,
        )
        self.core = core = assembly.following(
            source.database,
            fills,
            schemas,
            link,
            source.state,
            link.target,
            Options.from_config(config),
            definitions=source.definitions,
        )
        self.engine = core.engine
        self._stack.push_async_callback(core.close)
        self._open_shared_store(config, core)
        core.batches.attach(source, barrier_timeout=config.query_timeout)
        served = await self._serve(config, core, security, None, None)
        log.info(
            "serving %s on %s, following %s",
            ", ".join(f"{s.qualified} ({s.config.mode})" for s in schemas),
            ", ".join(served.addresses),
            link.target,
            extra={
                "event": "serving",
                "tables": [s.qualified for s in schemas],
                "listen": served.addresses,
                "upstream": link.target,
            },
        )

    async def _serve(
        self, config: Config, core: Core, security: Any, listener: Listener | None, senders: SenderGate | None
    ) -> server.Server:
        """What both start-ups share: the gRPC server, health following readiness, metrics."""
        self.metrics = Metrics() if config.metrics_listen else None
        self.server = served = await server.start(
            core,
            config.listen,
            self.metrics.observe_call if self.metrics is not None else None,
            config.health_listen,
            security,
            max_concurrent_calls=config.max_concurrent_calls,
            max_health_watches=config.max_health_watches,
        )
        self._stack.push_async_callback(self.server.stop, 0)  # (at once: a graceful stop came first, if any)
        core.engine.on_state_change(self._health_dirty.set)
        if self.metrics is not None:
            logical = self.source if isinstance(self.source, LogicalSource) else None
            self.metrics.watch(core, listener, asyncio.get_running_loop(), senders, security=security, logical=logical)
            try:
                self.metrics_address = self.metrics.serve(config.metrics_listen)
            except OSError as exc:
                raise ConfigError("metrics.listen", f"cannot listen on {config.metrics_listen}: {exc}") from None
            self._stack.callback(self.metrics.close)
        return served

    def _follow_changes(self) -> Coroutine[Any, Any, None]:
        """The change source, feeding the side its changes come in by."""
        core, source = self.core, self.source
        if isinstance(core, Direct):
            assert isinstance(source, PgChangeSource | LogicalSource)
            return source.follow(core.notices)
        assert isinstance(core, Following) and isinstance(source, UpstreamSource)
        return source.follow(core.batches)

    def _open_shared_store(self, config: Config, core: Core) -> None:
        """The shared-memory store, when configured: told what the fan-out publishes; closed
        (marked stale for readers) after the server stopped."""
        if config.shared_memory_dir is None:
            return
        self.shared_store = store = SharedStore(config.shared_memory_dir, config.shared_memory_map_size, core)
        self._stack.callback(store.close)
        core.fanout.observe(store)
        core.engine.on_state_change(store.state_changed)

    async def _list_with_retry(self, link: upstream.Upstream, config: Config) -> Any:
        """The upstream's tables, waiting for it to be reachable (it may start after us) and
        to accept us (a wrong CA, certificate or token is logged with its cause and retried,
        so that fixing the Secret is enough)."""
        attempt = 0
        while True:
            try:
                return await link.list_tables()
            except (Unavailable, QueryFailed) as exc:
                delay = backoff_delay(attempt, max(config.reconnect_min_delay, 0.5), config.reconnect_max_delay)
                log.warning("%s; retrying in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)
                await link.renew_if_rotated()

    async def _start_embedded(self, config: Config) -> Config:
        self.embedded = embedded.EmbeddedPostgres(config.embedded_data_dir, logical=config.capture == "logical")
        self._stack.push_async_callback(asyncio.to_thread, self.embedded.stop)
        starting = asyncio.ensure_future(asyncio.to_thread(self.embedded.start))
        try:
            uri = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # A signal: the thread cannot be interrupted, and stopping the server while
            # it is still being started would leave it running. Let it finish first.
            with contextlib.suppress(Exception):
                await starting
            raise
        conn = await asyncpg.connect(uri)
        try:
            await conn.execute(embedded.DEMO_SQL)
        finally:
            await conn.close()
        tables = config.tables
        if not tables:
            tables = (embedded.DEMO_TABLE,)
        return dataclasses.replace(config, dsn=uri, tables=tables, install_triggers=True)

    async def _connect_with_retry(self, config: Config) -> PgDatabase:
        attempt = 0
        while True:
            try:
                return await PgDatabase.connect(config)
            except Unavailable as exc:
                delay = backoff_delay(attempt, max(config.reconnect_min_delay, 0.5), config.reconnect_max_delay)
                log.warning("%s; retrying in %.1fs", exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _check_triggers(self, config: Config, schemas: list[TableSchema]) -> None:
        assert self.db is not None
        sets = triggers.trigger_sets(schemas, config.channel, config.bulk_threshold)
        async with self.db.pool.acquire() as conn:
            if config.install_triggers:
                changed = await triggers.install(conn, sets)
                if changed:
                    log.info("installed triggers on %s; note: %s", ", ".join(changed), triggers.TWO_PHASE_NOTE)
                return
            for trigger_set in sets:
                found = await triggers.inspect(conn, trigger_set)
                state = found.status
                if state == "missing":
                    raise SchemaError(
                        f"table {trigger_set.schema.qualified} has no cache-sidecar triggers, so its "
                        "cache could never learn of changes; run 'cache-sidecar triggers install' "
                        "(or 'triggers sql' for a DBA) or start with --install-triggers"
                    )
                if state == "outdated":
                    # They may notify another channel: this sidecar would never hear a commit.
                    raise SchemaError(
                        f"the cache-sidecar triggers on {trigger_set.schema.qualified} are not the ones this "
                        f"sidecar needs (channel {config.channel}, bulk threshold {config.bulk_threshold}, "
                        f"this version's definition, installed and enabled on the table and on its partitions, "
                        f"children and parents): {found.describe()}; it could miss changes; run 'cache-sidecar "
                        "triggers install' with the same settings (or 'triggers sql' for a DBA) or start with "
                        "--install-triggers"
                    )

    # ---------------------------------------------------------------- run

    async def _supervise(self) -> int:
        assert self.source is not None and self.engine is not None and self.server is not None
        tasks = {
            asyncio.create_task(self._follow_changes(), name="listener"),
            asyncio.create_task(self._follow_health(), name="health"),
        }
        if self.catalog is not None:
            tasks.add(asyncio.create_task(self.catalog.run(), name="catalog check"))
        if self.shared_store is not None:
            tasks.add(asyncio.create_task(self.shared_store.run(), name="shared-memory heartbeat"))
        if self.db is not None:
            queue = NotifyQueue()
            if self.metrics is not None:
                self.metrics.queue = queue
            tasks.add(asyncio.create_task(queue.run(self.db.pool), name="notify queue"))
        if self.db is not None and isinstance(self.source, LogicalSource):
            stream = self.source
            slot = SlotWatch(lambda: stream.slot.name, self.config.query_timeout)
            if self.metrics is not None:
                self.metrics.slot = slot
            tasks.add(asyncio.create_task(slot.run(self.db.pool), name="slot watch"))
            if self.standby_watch is not None:
                if self.metrics is not None:
                    self.metrics.standby = self.standby_watch
                tasks.add(asyncio.create_task(self.standby_watch.run(self.db.pool), name="standby lag"))
        stop = asyncio.create_task(self.stop_event.wait(), name="stop")
        if self.on_ready is not None:
            self.on_ready(self)
        done, _ = await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is stop:
                continue
            exc = task.exception()
            if exc is not None:
                log.critical("background task %s failed; exiting", task.get_name(), exc_info=exc)
            else:
                log.critical("background task %s ended unexpectedly; exiting", task.get_name())
            code = 1
        await self._shutdown(tasks | {stop})
        return code

    async def _follow_health(self) -> None:
        assert self.server is not None and self.engine is not None
        serving: bool | None = None
        while True:
            # (woken by state changes; and each second, for a revision that stands still)
            await wait_set(self._health_dirty, 1.0)
            self._health_dirty.clear()
            ready = self.engine.ready and not self.engine.stalled and not self._capture_problems()
            if ready != serving:
                serving = ready
                await self.server.set_serving(ready)
                if ready:
                    log.info(
                        "ready: every table is loaded and the %s is up (revision %s)",
                        self._source_name(),
                        self.engine.revision,
                        extra={"event": "ready", "revision": str(self.engine.revision)},
                    )
                else:
                    log.warning("not serving from memory: %s", self._why_not_ready(), extra={"event": "not_ready"})

    def _source_name(self) -> str:
        """What changes come by, in words (the ready and not-ready log lines)."""
        if self.config.upstream_target is not None:
            return "upstream stream"
        return "replication stream" if self.config.capture == "logical" else "listener"

    def _capture_problems(self) -> dict[str, str]:
        """Cached tables whose triggers would not report every change (see ``CatalogWatch``)."""
        return self.catalog.capture_problems if self.catalog is not None else {}

    def _why_not_ready(self) -> str:
        assert self.core is not None
        core, engine = self.core, self.core.engine
        capture = self._capture_problems()
        if capture:
            return "; ".join(f"{table}: {problem}" for table, problem in capture.items())
        following = core.upstream_state()
        if not core.trust.up and following is not None:
            return f"not following {following.target} (yet); reads go to the upstream"
        if not core.trust.up:
            return f"{self._source_name()} down; reads go to the database"
        if engine.stalled:
            waiting = [name for name, table in core.tables.items() if table.low_water() is not None]
            revisions = core.revisions
            return (
                f"the revision has not advanced for {engine.stalled_seconds:.0f}s (applied {revisions.applied}, "
                f"received up to {revisions.seq}) while received batches wait (on {', '.join(waiting) or 'nothing'})"
            )
        loading = [name for name, table in core.tables.items() if not table.loaded and table.problem is None]
        return f"loading {', '.join(loading)}"

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self._on_signal, signum)
                self._stack.callback(loop.remove_signal_handler, signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name, extra={"event": "exit_now"})
            sys.stderr.flush()
            os._exit(1)
        log.info(
            "%s: shutting down (grace period %.0fs)",
            signal.Signals(signum).name,
            self.config.grace_period,
            extra={"event": "shutdown", "signal": signal.Signals(signum).name},
        )
        self.stop_event.set()

    async def _shutdown(self, tasks: set[asyncio.Task[Any]]) -> None:
        assert self.server is not None and self.core is not None
        started = time.monotonic()
        await self.server.set_serving(False)
        # Watch streams end now, cleanly (UNAVAILABLE naming the revision to resume
        # from); unary calls in flight get the grace period, new ones are refused.
        self.core.fanout.shutdown()
        await self.server.stop(self.config.grace_period)
        for task in tasks:  # the listener closes its LISTEN connection
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("stopped after %.2fs", time.monotonic() - started, extra={"event": "stopped"})

    async def _close(self) -> None:
        """Leave what start-up entered, in reverse order (however far it got)."""
        await self._stack.aclose()


async def _close_pool(database: PgDatabase) -> None:
    with contextlib.suppress(Exception):  # (a pool on a database that went away)
        await asyncio.wait_for(database.close(), 5)


def _listener_connect(config: Config) -> Callable[[], Awaitable[Any]]:
    """The listener's connect: its failures are ``ConnectionError``s (which it retries)
    that say where it tried."""
    db.connect_target(config, "cache-sidecar-listener")  # a bad service is found now, not in the retry loop

    async def connect() -> Any:
        try:
            return await db.connect(config, "cache-sidecar-listener")
        except SidecarError as exc:
            raise ConnectionError(str(exc)) from None

    return connect


async def call_with_db(config: Config, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``work(conn)`` on one connection (for the ``triggers`` command)."""
    conn = await db.connect(config, "cache-sidecar-cli")
    try:
        return await work(conn)
    finally:
        await conn.close()

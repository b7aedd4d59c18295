"""The settings, each declared once on its ``Config`` field (as grpclib's
configuration does): key (the environment variable derives from it), flag, help text
and checks; and ``describe``, the effective configuration printed back as TOML."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import dsn as dsn_module
from sidecar.config.addresses import parse_listen_address
from sidecar.config.specs import TableConfig
from sidecar.errors import ConfigError

ENV_PREFIX = "CACHE_SIDECAR_"


DEFAULT_LISTEN = ("127.0.0.1:50051",)


@dataclass(frozen=True)
class Setting:
    """One setting as declared in a ``Config`` field's metadata (``declare()``): its TOML
    key, flag, help and checks. The field itself supplies ``attr``, ``kind`` (from its
    type) and ``default``, which ``SETTINGS`` fills in, so nothing is said twice."""

    key: str  # dotted TOML key, e.g. "server.listen"; the environment variable derives from it
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()  # more flags for the same setting (an older or a newer name)
    metavar: str | None = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False
    unset: str | None = None  # what leaving it unset means, shown as its default ("off")
    check: Callable[[Any], None] | None = None  # raises ConfigError; run on the final value
    at_most: str | None = None  # the key of a setting this one must not exceed
    attr: str = ""  # from the field
    kind: str = ""  # str | int | float | bool | list, from the field's type
    default: Any = None  # from the field

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def shown_default(self) -> str | None:
        """The default as ``--help`` and the README show it; ``None``: nothing worth showing."""
        if self.default is None or self.default in ("", ()):
            return self.unset
        return _shown(self.default)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(_shown(v) for v in value)
    return str(value)


_SETTING = "setting"


def declare(
    key: str,
    help: str,
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    unset: str | None = None,
    check: Callable[[Any], None] | None = None,
    at_most: str | None = None,
) -> Mapping[str, Setting]:
    """A ``Config`` field's metadata: ``field(default=..., metadata=declare(...))``."""
    declared = Setting(
        key=key,
        help=help,
        flag=flag,
        aliases=aliases,
        metavar=metavar,
        minimum=minimum,
        choices=choices,
        secret=secret,
        unset=unset,
        check=check,
        at_most=at_most,
    )
    return {_SETTING: declared}


def _dsn_parses(value: str) -> None:
    dsn_module.parse(value)  # a DSN that cannot parse would be retried forever at start


def _primary_dsn_parses(value: str) -> None:
    try:
        dsn_module.parse(value)
    except ConfigError as exc:
        raise ConfigError("database.primary_dsn", exc.problem) from None


def _listen_addresses(value: tuple[str, ...]) -> None:
    for address in value:
        parse_listen_address(address)


def _tcp_addresses(key: str) -> Callable[[Any], None]:
    def check(value: str | tuple[str, ...]) -> None:
        if value == "":  # metrics.listen's "off"
            return
        for address in (value,) if isinstance(value, str) else value:
            if parse_listen_address(address).unix_path is not None:
                raise ConfigError(key, f"{address!r}: must be host:port")

    return check


def _upstream_target(value: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in value:
        raise ConfigError("upstream.target", f"{value!r}: must be host:port (another sidecar's gRPC address)")


CAPTURE_MODES = ("notify", "logical")


def _capture_mode(value: str) -> None:
    if value not in CAPTURE_MODES:
        raise ConfigError(
            "database.capture",
            f"must be notify (triggers and NOTIFY, the default) or logical (logical decoding: needs the "
            f"server's wal_level = logical and a role with REPLICATION), not {value!r}",
        )


def _plain_identifier(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", value):
        raise ConfigError("listener.channel", f"must be a plain identifier, not {value!r}")


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration. Each field but ``tables`` is a setting, declared
    here once: file, environment, flags, ``--help`` and the README's check derive from it."""

    dsn: str | None = field(
        default=None,
        metadata=declare(
            "database.dsn",
            "PostgreSQL DSN: a URL (postgresql://user@host/db) or libpq key=value pairs (host=... dbname=...). "
            "Without it the PG* variables apply (PGHOST, PGDATABASE, PGSERVICE, ...); "
            "'serve' without either starts an embedded PostgreSQL.",
            flag="--dsn",
            secret=True,
            check=_dsn_parses,
        ),
    )
    primary_dsn: str | None = field(
        default=None,
        metadata=declare(
            "database.primary_dsn",
            "The primary's DSN, when database.dsn is a hot standby (PostgreSQL 16 or newer; logical capture "
            "only): the slot, loads and refetches stay on the standby; read barriers emit their token on the "
            "primary (one statement each) and the publication is installed and checked there.",
            flag="--primary-dsn",
            secret=True,
            unset="database.dsn is the primary",
            check=_primary_dsn_parses,
        ),
    )
    embedded: bool = field(
        default=False,
        metadata=declare(
            "database.embedded",
            "Start an embedded PostgreSQL with a demo table, even if PG* variables are set "
            "(needs the 'embedded' extra).",
            flag="--embedded",
        ),
    )
    embedded_data_dir: str | None = field(
        default=None,
        metadata=declare(
            "database.embedded_data_dir",
            "Keep the embedded cluster's data here.",
            flag="--embedded-data-dir",
            metavar="DIR",
            unset="a temporary directory",
        ),
    )
    pool_min_size: int = field(
        default=1,
        metadata=declare(
            "database.pool_min_size", "Query pool: minimum connections.", minimum=0, at_most="database.pool_max_size"
        ),
    )
    pool_max_size: int = field(
        default=8, metadata=declare("database.pool_max_size", "Query pool: maximum connections.", minimum=1)
    )
    connect_timeout: float = field(
        default=10.0,
        metadata=declare("database.connect_timeout", "Seconds to wait for a database connection.", minimum=0.1),
    )
    query_timeout: float = field(
        default=10.0,
        metadata=declare(
            "database.query_timeout",
            "Seconds a query (load chunk, refetch, NOTIFY) or a wait for a pool connection may take.",
            minimum=0.1,
        ),
    )
    capture: str = field(
        default="notify",
        metadata=declare(
            "database.capture",
            "How changes are captured: notify (triggers send NOTIFY; no server setting, no privilege beyond "
            "owning the triggers) or logical (logical decoding of the WAL through a publication and a "
            "replication slot; needs wal_level = logical and a role with REPLICATION, and costs writers "
            "far less).",
            flag="--capture",
            choices=CAPTURE_MODES,
            check=_capture_mode,
        ),
    )
    listen: tuple[str, ...] = field(
        default=DEFAULT_LISTEN,
        metadata=declare(
            "server.listen",
            "gRPC listen address (host:port or unix:///path); "
            "repeatable. Binding all interfaces (0.0.0.0) must be asked for explicitly.",
            flag="--listen",
            metavar="ADDRESS",
            check=_listen_addresses,
        ),
    )
    health_listen: tuple[str, ...] = field(
        default=(),
        metadata=declare(
            "server.health_listen",
            "Also serve only grpc.health.v1 here (host:port; for Kubernetes gRPC probes, which dial the pod IP); "
            "repeatable.",
            flag="--health-listen",
            metavar="ADDRESS",
            unset="off",
            check=_tcp_addresses("server.health_listen"),
        ),
    )
    install_triggers: bool = field(
        default=False,
        metadata=declare(
            "server.install_triggers",
            "Install (or update) at start what change capture needs in the database: the triggers of the "
            "cached tables (capture notify), or their publication (capture logical).",
            flag="--install-triggers",
            aliases=("--install-capture",),
        ),
    )
    max_batch_keys: int = field(
        default=1000,
        metadata=declare(
            "server.max_batch_keys",
            "Most keys per BatchGet/Invalidate/Watch key filter, values and rows per Query; "
            "also bounds the request size.",
            minimum=1,
        ),
    )
    grace_period: float = field(
        default=10.0,
        metadata=declare(
            "server.grace_period",
            "Seconds in-flight calls get to finish on SIGTERM.",
            flag="--grace-period",
            metavar="SECONDS",
            minimum=0,
        ),
    )
    event_loop: str = field(
        default="auto",
        metadata=declare(
            "server.event_loop",
            "Event loop: uvloop (faster), asyncio, or auto (uvloop when installed).",
            choices=("auto", "uvloop", "asyncio"),
        ),
    )
    channel: str = field(
        default="cache_sidecar",
        metadata=declare(
            "listener.channel", "NOTIFY channel the triggers send on.", flag="--channel", check=_plain_identifier
        ),
    )
    ping_interval: float = field(
        default=5.0,
        metadata=declare(
            "listener.ping_interval",
            "Seconds of silence after which the LISTEN connection is pinged.",
            flag="--ping-interval",
            metavar="SECONDS",
            minimum=0.05,
        ),
    )
    ping_timeout: float = field(
        default=5.0,
        metadata=declare(
            "listener.ping_timeout",
            "Seconds a ping may take before the LISTEN connection is declared dead.",
            minimum=0.05,
        ),
    )
    reconnect_min_delay: float = field(
        default=0.1,
        metadata=declare(
            "listener.reconnect_min_delay",
            "First reconnect backoff, seconds (doubles per failure, with jitter).",
            minimum=0,
            at_most="listener.reconnect_max_delay",
        ),
    )
    reconnect_max_delay: float = field(
        default=10.0,
        metadata=declare("listener.reconnect_max_delay", "Reconnect backoff cap, seconds.", minimum=0),
    )
    check_senders: bool = field(
        default=True,
        metadata=declare(
            "listener.check_senders",
            "Drop a whole-table change whose sender's role cannot write the table (anyone may NOTIFY). "
            "Turn off if a role without those rights changes it by a way the check cannot see "
            "(see README, The trust boundary).",
        ),
    )
    bulk_threshold: int = field(
        default=1000,
        metadata=declare(
            "triggers.bulk_threshold",
            "Rows changed by one statement above which the trigger sends one whole-table event instead of keys.",
            flag="--bulk-threshold",
            metavar="ROWS",
            minimum=1,
        ),
    )
    refetch_batch_size: int = field(
        default=500, metadata=declare("cache.refetch_batch_size", "Most keys refetched by one query.", minimum=1)
    )
    refetch_concurrency: int = field(
        default=2,
        metadata=declare("cache.refetch_concurrency", "Refetch queries in flight at once, per table.", minimum=1),
    )
    stall_seconds: float = field(
        default=30.0,
        metadata=declare(
            "cache.stall_seconds",
            "Seconds the revision may stand still while received changes wait (refetches failing) "
            "before health says NOT_SERVING.",
            minimum=0.1,
        ),
    )
    catalog_check_interval: float = field(
        default=10.0,
        metadata=declare(
            "cache.catalog_check_interval",
            "Seconds between checks that each cached table still has the columns, key, triggers, "
            "storage (rewrites) and enum/composite types it was loaded with (ALTER/DROP TABLE, ALTER "
            "TYPE); also checked after every reconnect. EVENTUAL reads may lag a DDL by up to this "
            "long; STRONG reads and Sync never do (each barrier checks the catalog too).",
            minimum=0.1,
        ),
    )
    watch_history_batches: int = field(
        default=10_000,
        metadata=declare(
            "watch.history_batches", "Change batches kept for Watch resumes (oldest dropped first).", minimum=1
        ),
    )
    watch_history_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=declare("watch.history_bytes", "Bytes of change batches kept for Watch resumes.", minimum=1024),
    )
    watch_max_lag: int = field(
        default=1_000,
        metadata=declare(
            "watch.max_lag",
            "Batches a Watch subscriber may fall behind before it is ended (RESOURCE_EXHAUSTED).",
            minimum=1,
        ),
    )
    upstream_target: str | None = field(
        default=None,
        metadata=declare(
            "upstream.target",
            "Follow another sidecar (host:port) instead of PostgreSQL: a follower, with no database "
            "connection at all; its tables are the upstream's (--table narrows them).",
            flag="--upstream",
            metavar="HOST:PORT",
            unset="off",
            check=_upstream_target,
        ),
    )
    upstream_progress_interval: float = field(
        default=1.0,
        metadata=declare(
            "upstream.progress_interval",
            "A follower asks its upstream for a progress mark after this many idle seconds.",
            minimum=0.05,
        ),
    )
    upstream_stall_timeout: float = field(
        default=5.0,
        metadata=declare(
            "upstream.stall_timeout",
            "Seconds without any message (changes or progress marks) after which a follower treats its "
            "upstream stream as lost and resumes it; must exceed upstream.progress_interval.",
            minimum=0.1,
        ),
    )
    watch_max_streams: int = field(
        default=10_000,
        metadata=declare(
            "watch.max_streams",
            "Most Watch streams open at once; more are refused (RESOURCE_EXHAUSTED).",
            minimum=1,
            at_most="server.max_concurrent_calls",
        ),
    )
    watch_max_streams_per_connection: int = field(
        default=1_000,
        metadata=declare(
            "watch.max_streams_per_connection",
            "Most Watch streams one client connection (TCP) may hold open; more are refused "
            "(RESOURCE_EXHAUSTED). Unix-socket clients cannot be told apart: only watch.max_streams bounds them.",
            minimum=1,
        ),
    )
    watch_send_timeout: float = field(
        default=30.0,
        metadata=declare(
            "watch.send_timeout",
            "Seconds one Watch message may wait for its client to take it; a stream whose client takes "
            "nothing for longer is ended (RESOURCE_EXHAUSTED, resumable), releasing what it held.",
            minimum=0.1,
        ),
    )
    watch_snapshot_max_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=declare(
            "watch.snapshot_max_bytes",
            "Bytes of old rows that initial-state snapshots may keep alive in all (rows changed or reloaded "
            "while an initial state is sent); beyond it the oldest snapshots are given up and their streams "
            "end (RESOURCE_EXHAUSTED; clients start over).",
            minimum=0,
        ),
    )
    max_health_watches: int = field(
        default=1_000,
        metadata=declare(
            "server.max_health_watches",
            "Most grpc.health.v1.Health/Watch streams open at once on each server (the main addresses, and "
            "server.health_listen's); more are refused (RESOURCE_EXHAUSTED). Check is never refused by it.",
            minimum=1,
        ),
    )
    max_concurrent_calls: int = field(
        default=20_000,
        metadata=declare(
            "server.max_concurrent_calls",
            "Most calls in flight at once on each server (the main addresses, and server.health_listen's), "
            "streams included; more are refused at once (RESOURCE_EXHAUSTED).",
            minimum=1,
        ),
    )
    metrics_listen: str = field(
        default="",
        metadata=declare(
            "metrics.listen",
            "Serve Prometheus metrics over HTTP on host:port (/metrics).",
            flag="--metrics-listen",
            metavar="HOST:PORT",
            unset="off",
            check=_tcp_addresses("metrics.listen"),
        ),
    )
    log_format: str = field(
        default="text",
        metadata=declare(
            "logging.format",
            "Log format: text, or json (one JSON object per line).",
            flag="--log-format",
            choices=("text", "json"),
        ),
    )
    log_level: str = field(
        default="info",
        metadata=declare(
            "logging.level", "Log level.", flag="--log-level", choices=("debug", "info", "warning", "error")
        ),
    )
    # ------------------------------------------------ the network edge: TLS and tokens (server side)
    tls_cert_file: str | None = field(
        default=None,
        metadata=declare(
            "server.tls_cert_file",
            "Serve TLS on every listen address with this PEM certificate chain (leaf first); "
            "re-read when it changes. Needs server.tls_key_file. The health-only port stays plaintext.",
            flag="--tls-cert-file",
            metavar="PATH",
            unset="off (plaintext)",
        ),
    )
    tls_key_file: str | None = field(
        default=None,
        metadata=declare(
            "server.tls_key_file",
            "The PEM private key of server.tls_cert_file (unencrypted); re-read when it changes.",
            flag="--tls-key-file",
            metavar="PATH",
        ),
    )
    tls_client_ca_file: str | None = field(
        default=None,
        metadata=declare(
            "server.tls_client_ca_file",
            "Require a client certificate signed by a CA in this PEM bundle (mutual TLS); re-read when it "
            "changes. Needs server.tls_cert_file.",
            flag="--tls-client-ca-file",
            metavar="PATH",
            unset="off",
        ),
    )
    auth_token_file: str | None = field(
        default=None,
        metadata=declare(
            "server.auth_token_file",
            "Require 'authorization: Bearer <token>' with a token from this file: one a line, '# ' comments; "
            "'admin <token>' marks one that may call Invalidate (others are read-only). Re-read when it changes, "
            "failing closed: a bad line is skipped, a missing or tokenless file refuses every call.",
            flag="--auth-token-file",
            metavar="PATH",
            unset="off",
        ),
    )
    # ------------------------------------------------ the network edge: TLS and tokens (client side)
    upstream_tls_ca_file: str | None = field(
        default=None,
        metadata=declare(
            "upstream.tls_ca_file",
            "Connect to the upstream sidecar over TLS and trust the CAs in this PEM bundle "
            "(TLS is on when this or upstream.tls_cert_file is set).",
            flag="--upstream-tls-ca-file",
            metavar="PATH",
            unset="plaintext",
        ),
    )
    upstream_tls_cert_file: str | None = field(
        default=None,
        metadata=declare(
            "upstream.tls_cert_file",
            "The client certificate (PEM chain) to present to the upstream; needs upstream.tls_key_file.",
            flag="--upstream-tls-cert-file",
            metavar="PATH",
            unset="none",
        ),
    )
    upstream_tls_key_file: str | None = field(
        default=None,
        metadata=declare(
            "upstream.tls_key_file",
            "The PEM private key of upstream.tls_cert_file (unencrypted).",
            flag="--upstream-tls-key-file",
            metavar="PATH",
        ),
    )
    upstream_token_file: str | None = field(
        default=None,
        metadata=declare(
            "upstream.token_file",
            "Send the token in this file (its one line) to the upstream as 'authorization: Bearer'; "
            "re-read when it changes.",
            flag="--upstream-token-file",
            metavar="PATH",
            unset="none",
        ),
    )
    upstream_invalidate_with_own_token: bool = field(
        default=False,
        metadata=declare(
            "upstream.invalidate_with_own_token",
            "Forward every caller's Invalidate to the upstream with this follower's own upstream.token_file "
            "(its admin scope, for any caller that reaches this follower); by default a follower forwards "
            "Invalidate only with the caller's own 'authorization' token.",
        ),
    )
    shared_memory_dir: str | None = field(
        default=None,
        metadata=declare(
            "shared_memory.dir",
            "Also keep every full table and relation in a shared-memory store (LMDB) in this directory, "
            "read directly by the pod's processes (docs/shared-memory.md); in Kubernetes an emptyDir "
            "with medium: Memory mounted into the app's containers too.",
            flag="--shared-memory",
            metavar="DIR",
            unset="off",
        ),
    )
    shared_memory_map_size: int = field(
        default=4 * 1024**3,
        metadata=declare(
            "shared_memory.map_size",
            "Most bytes the shared-memory store may take (reserved as address space up front, sparse: "
            "only written pages take memory). About twice the tables' row bytes is needed while a table "
            "is rewritten.",
            minimum=1024 * 1024,
        ),
    )
    tables: tuple[TableConfig, ...] = field(default_factory=tuple)

    def table(self, qualified: str) -> TableConfig:
        for table in self.tables:
            if table.qualified == qualified:
                return table
        raise KeyError(qualified)


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        return "list"
    kinds: dict[Any, str] = {bool: "bool", int: "int", float: "float", str: "str"}
    return kinds[hint]


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(Config)
    return tuple(
        dataclasses.replace(f.metadata[_SETTING], attr=f.name, kind=_kind(hints[f.name]), default=f.default)
        for f in dataclasses.fields(Config)
        if _SETTING in f.metadata
    )


SETTINGS: tuple[Setting, ...] = _settings()


SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


def validate(config: Config) -> None:
    for setting in SETTINGS:
        value = getattr(config, setting.attr)
        if setting.check is not None and value is not None:
            setting.check(value)
        if setting.at_most is not None and value > getattr(config, SETTINGS_BY_KEY[setting.at_most].attr):
            raise ConfigError(setting.key, f"must not exceed {setting.at_most}")
    _validate_edge(config)
    if config.upstream_target is not None:
        # A follower's rows come from its upstream: a database of its own would be a second source of truth.
        for given, key in (
            (config.dsn is not None, "database.dsn"),
            (config.primary_dsn is not None, "database.primary_dsn"),
            (config.embedded, "database.embedded"),
            (config.install_triggers, "server.install_triggers"),
            (config.capture != "notify", "database.capture"),
        ):
            if given:
                raise ConfigError(key, "a follower (upstream.target) has no database: give one of the two, not both")
        if config.upstream_stall_timeout <= config.upstream_progress_interval:
            raise ConfigError("upstream.stall_timeout", "must exceed upstream.progress_interval")
    if config.primary_dsn is not None and config.capture != "logical":
        raise ConfigError(
            "database.primary_dsn",
            "a hub on a standby needs database.capture = logical (NOTIFY capture runs triggers and LISTEN, "
            "which a standby cannot): set capture logical, or point database.dsn at the primary without it",
        )
    seen: set[str] = set()
    for table in config.tables:
        if table.qualified in seen:
            raise ConfigError("tables", f"{table.qualified} is configured twice")
        seen.add(table.qualified)


# Settings that name files and only make sense together: (this, needs that).
_EDGE_PAIRS = (
    ("server.tls_cert_file", "server.tls_key_file"),
    ("server.tls_key_file", "server.tls_cert_file"),
    ("server.tls_client_ca_file", "server.tls_cert_file"),
    ("upstream.tls_cert_file", "upstream.tls_key_file"),
    ("upstream.tls_key_file", "upstream.tls_cert_file"),
)


def _validate_edge(config: Config) -> None:
    for key, needed in _EDGE_PAIRS:
        if getattr(config, SETTINGS_BY_KEY[key].attr) and not getattr(config, SETTINGS_BY_KEY[needed].attr):
            raise ConfigError(key, f"needs {needed} too")
    for setting in SETTINGS:
        if setting.key.endswith("_file") and getattr(config, setting.attr) == "":
            raise ConfigError(setting.key, "is empty; leave it unset, or give a file")


def describe(config: Config, environ: Mapping[str, str] | None = None) -> Sequence[str]:
    """The effective configuration as a TOML file that loads back into it (the
    DSN's password redacted), with where the database comes from as a comment."""
    environ = os.environ if environ is None else environ
    lines = [
        "# cache-sidecar: effective configuration (cache-sidecar serve --print-config)",
        f"# database: {dsn_module.describe_origin(config.dsn, config.embedded, environ)}"
        if config.upstream_target is None
        else f"# database: none (a follower of {config.upstream_target})",
    ]
    sections: dict[str, list[Setting]] = {}
    for setting in SETTINGS:
        sections.setdefault(setting.key.split(".")[0], []).append(setting)
    for section, settings in sections.items():
        lines += ["", f"[{section}]"]
        for setting in settings:
            name = setting.key.split(".", 1)[1]
            value = getattr(config, setting.attr)
            if value is None or value == ():  # (an empty list is not a valid value to load)
                lines.append(f"# {name} is not set")
            elif setting.secret and dsn_module.password(value):
                lines += _dsn_without_password(name, value)
            else:
                lines.append(f"{name} = {_toml(dsn_module.redact(value) if setting.secret else value)}")
    for table in config.tables:
        lines += ["", "[[tables]]", f"name = {_toml(table.qualified)}", f"mode = {_toml(table.mode)}"]
        if table.mode == "lazy":
            lines.append(f"max_rows = {_toml(table.max_rows)}")
            if table.ttl_seconds is not None:
                lines.append(f"ttl_seconds = {_toml(table.ttl_seconds)}")
        if table.where is not None:
            lines.append(f"where = {_toml(table.where)}")
        if table.query is not None:
            lines.append(f"query = {_toml(table.query)}")
            lines.append(f"key = {_toml(table.key)}")
            sources = ", ".join(
                f"{_toml(s.qualified)} = {{ {', '.join(f'{_toml(a)} = {_toml(b)}' for a, b in s.mapping)} }}"
                for s in table.sources
            )
            lines.append(f"sources = {{ {sources} }}")
        for index in table.indexes:
            lines += [
                "",
                "[[tables.indexes]]",
                f"name = {_toml(index.name)}",
                f"columns = {_toml(index.columns)}",
                f"unique = {_toml(index.unique)}",
                f"range = {_toml(index.range)}",
            ]
    return lines


def _dsn_without_password(name: str, value: str) -> list[str]:
    """The DSN with its password left out, and a comment saying where it must come from
    (a redacted one would load back as a wrong password, failing authentication)."""
    shown = dsn_module.without_password(value)
    where = "PGPASSWORD, a password file (~/.pgpass, or PGPASSFILE, or passfile= in the DSN)"
    if shown is None:
        return [
            f"# {name}: its password cannot be left out of this DSN cleanly, so it is not written;",
            f"# give the DSN in CACHE_SIDECAR_DATABASE_DSN, or the password in {where}",
        ]
    return [
        f"# the DSN's password is left out: give it in {where},",
        "# or write it back here",
        f"{name} = {_toml(shown)}",
    ]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    # TOML forbids raw control characters (tab aside) in a basic string.
    escaped = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped)
    return f'"{escaped}"'

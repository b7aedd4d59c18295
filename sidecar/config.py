"""Configuration: one frozen, validated object from defaults, a TOML file, the
environment and flags (in rising order of precedence).

Every setting is declared once in ``SETTINGS``: its TOML key, type, default,
environment variable and help text, so the file, the environment, ``--help``
and the README cannot drift apart. Errors name the offending key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidecar import dsn as dsn_module
from sidecar.addresses import parse_listen_address
from sidecar.errors import ConfigError
from sidecar.identifiers import parse_table_name, qualified_name

ENV_PREFIX = "CACHE_SIDECAR_"
DEFAULT_LISTEN = ("127.0.0.1:50051",)
TableMode = Literal["full", "lazy"]
TABLE_MODES: tuple[TableMode, ...] = ("full", "lazy")


@dataclass(frozen=True)
class IndexConfig:
    """A secondary index: equality on ``columns`` (``range``: ordered, one column)."""

    name: str
    columns: tuple[str, ...]
    unique: bool = False
    range: bool = False


@dataclass(frozen=True)
class Source:
    """A table a relation reads, and which of its key columns map to relation columns."""

    schema: str
    name: str
    mapping: tuple[tuple[str, str], ...]  # (source column, relation column)

    @property
    def qualified(self) -> str:
        return qualified_name(self.schema, self.name)


@dataclass(frozen=True)
class TableConfig:
    """One cached table, or a relation (a cached query) when ``query`` is set."""

    schema: str
    name: str
    mode: TableMode = "full"
    max_rows: int = 100_000
    ttl_seconds: float | None = None
    where: str | None = None
    query: str | None = None
    key: tuple[str, ...] = ()  # a relation's key columns (tables: from the catalog)
    sources: tuple[Source, ...] = ()
    indexes: tuple[IndexConfig, ...] = ()

    @property
    def qualified(self) -> str:
        """The table's name as the API spells it: ``schema.table``."""
        return qualified_name(self.schema, self.name)

    @property
    def is_relation(self) -> bool:
        return self.query is not None


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration (see ``SETTINGS`` for each field's meaning)."""

    dsn: str | None = None
    embedded: bool = False
    embedded_data_dir: str | None = None
    pool_min_size: int = 1
    pool_max_size: int = 8
    connect_timeout: float = 10.0
    query_timeout: float = 10.0
    listen: tuple[str, ...] = DEFAULT_LISTEN
    health_listen: tuple[str, ...] = ()
    install_triggers: bool = False
    max_batch_keys: int = 1000
    grace_period: float = 10.0
    event_loop: str = "auto"
    channel: str = "cache_sidecar"
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    reconnect_min_delay: float = 0.1
    reconnect_max_delay: float = 10.0
    bulk_threshold: int = 1000
    refetch_batch_size: int = 500
    refetch_concurrency: int = 2
    stall_seconds: float = 30.0
    catalog_check_interval: float = 10.0
    watch_history_batches: int = 10_000
    watch_history_bytes: int = 64 * 1024 * 1024
    watch_max_lag: int = 1_000
    log_level: str = "info"
    log_format: str = "text"
    metrics_listen: str = ""
    tables: tuple[TableConfig, ...] = field(default_factory=tuple)

    def table(self, qualified: str) -> TableConfig:
        for table in self.tables:
            if table.qualified == qualified:
                return table
        raise KeyError(qualified)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """A scalar setting: where it lives in the file, its flag, and how to parse it."""

    key: str  # dotted TOML key, e.g. "server.listen"
    attr: str  # Config field
    kind: str  # str | int | float | bool | list
    help: str
    flag: str | None = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "database.dsn",
        "dsn",
        "str",
        "PostgreSQL DSN: a URL (postgresql://user@host/db) or libpq key=value pairs (host=... dbname=...). "
        "Without it (and without PGHOST/PGDATABASE/PGSERVICE) an embedded PostgreSQL is started.",
        flag="--dsn",
        secret=True,
    ),
    Setting(
        "database.embedded",
        "embedded",
        "bool",
        "Start an embedded PostgreSQL with a demo table (needs the 'embedded' extra).",
        flag="--embedded",
    ),
    Setting(
        "database.embedded_data_dir",
        "embedded_data_dir",
        "str",
        "Keep the embedded cluster's data here (default: a temporary directory).",
        flag="--embedded-data-dir",
    ),
    Setting("database.pool_min_size", "pool_min_size", "int", "Query pool: minimum connections.", minimum=0),
    Setting("database.pool_max_size", "pool_max_size", "int", "Query pool: maximum connections.", minimum=1),
    Setting(
        "database.connect_timeout",
        "connect_timeout",
        "float",
        "Seconds to wait for a database connection.",
        minimum=0.1,
    ),
    Setting(
        "database.query_timeout",
        "query_timeout",
        "float",
        "Seconds a query (load chunk, refetch, NOTIFY) or a wait for a pool connection may take.",
        minimum=0.1,
    ),
    Setting(
        "server.listen",
        "listen",
        "list",
        "gRPC listen address (host:port or unix:///path); "
        "repeatable. Binding all interfaces (0.0.0.0) must be asked for explicitly.",
        flag="--listen",
    ),
    Setting(
        "server.health_listen",
        "health_listen",
        "list",
        "Also serve only grpc.health.v1 here (host:port; for Kubernetes gRPC probes, which dial the pod IP).",
        flag="--health-listen",
    ),
    Setting(
        "server.install_triggers",
        "install_triggers",
        "bool",
        "Install (or update) the change triggers of the cached tables at start.",
        flag="--install-triggers",
    ),
    Setting(
        "server.max_batch_keys",
        "max_batch_keys",
        "int",
        "Most keys per BatchGet/Invalidate/Watch key filter, values and rows per Query; also bounds the request size.",
        minimum=1,
    ),
    Setting(
        "server.grace_period",
        "grace_period",
        "float",
        "Seconds in-flight calls get to finish on SIGTERM.",
        flag="--grace-period",
        minimum=0,
    ),
    Setting(
        "server.event_loop",
        "event_loop",
        "str",
        "Event loop: uvloop (faster), asyncio, or auto (uvloop when installed).",
        choices=("auto", "uvloop", "asyncio"),
    ),
    Setting("listener.channel", "channel", "str", "NOTIFY channel the triggers send on.", flag="--channel"),
    Setting(
        "listener.ping_interval",
        "ping_interval",
        "float",
        "Seconds of silence after which the LISTEN connection is pinged.",
        flag="--ping-interval",
        minimum=0.05,
    ),
    Setting(
        "listener.ping_timeout",
        "ping_timeout",
        "float",
        "Seconds a ping may take before the LISTEN connection is declared dead.",
        minimum=0.05,
    ),
    Setting(
        "listener.reconnect_min_delay",
        "reconnect_min_delay",
        "float",
        "First reconnect backoff, seconds (doubles per failure, with jitter).",
        minimum=0,
    ),
    Setting(
        "listener.reconnect_max_delay",
        "reconnect_max_delay",
        "float",
        "Reconnect backoff cap, seconds.",
        minimum=0,
    ),
    Setting(
        "triggers.bulk_threshold",
        "bulk_threshold",
        "int",
        "Rows changed by one statement above which the trigger sends one whole-table event instead of keys.",
        flag="--bulk-threshold",
        minimum=1,
    ),
    Setting(
        "cache.refetch_batch_size",
        "refetch_batch_size",
        "int",
        "Most keys refetched by one query.",
        minimum=1,
    ),
    Setting(
        "cache.refetch_concurrency",
        "refetch_concurrency",
        "int",
        "Refetch queries in flight at once, per table.",
        minimum=1,
    ),
    Setting(
        "cache.stall_seconds",
        "stall_seconds",
        "float",
        "Seconds the revision may stand still while received changes wait (refetches failing) "
        "before health says NOT_SERVING.",
        minimum=0.1,
    ),
    Setting(
        "cache.catalog_check_interval",
        "catalog_check_interval",
        "float",
        "Seconds between checks that each cached table still has the columns, key and triggers "
        "it was loaded with (ALTER/DROP TABLE); also checked after every reconnect.",
        minimum=0.1,
    ),
    Setting(
        "watch.history_batches",
        "watch_history_batches",
        "int",
        "Change batches kept for Watch resumes (oldest dropped first).",
        minimum=1,
    ),
    Setting(
        "watch.history_bytes",
        "watch_history_bytes",
        "int",
        "Bytes of change batches kept for Watch resumes.",
        minimum=1024,
    ),
    Setting(
        "watch.max_lag",
        "watch_max_lag",
        "int",
        "Batches a Watch subscriber may fall behind before it is ended (RESOURCE_EXHAUSTED).",
        minimum=1,
    ),
    Setting(
        "metrics.listen",
        "metrics_listen",
        "str",
        "Serve Prometheus metrics over HTTP on host:port (/metrics); empty: off.",
        flag="--metrics-listen",
    ),
    Setting(
        "logging.format",
        "log_format",
        "str",
        "Log format: text, or json (one JSON object per line).",
        flag="--log-format",
        choices=("text", "json"),
    ),
    Setting(
        "logging.level",
        "log_level",
        "str",
        "Log level.",
        flag="--log-level",
        choices=("debug", "info", "warning", "error"),
    ),
)
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
TABLE_KEYS = {"name", "mode", "max_rows", "ttl_seconds", "where", "query", "key", "sources", "indexes"}
INDEX_KEYS = {"name", "columns", "unique", "range"}
TABLES_ENV = ENV_PREFIX + "TABLES"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


# ---------------------------------------------------------------- loading


def load(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Config:
    """Build the configuration: defaults < file < environment < flags.

    ``flags`` maps setting keys (``"server.listen"``) and ``"tables"`` to
    already-typed values; ``None`` values mean "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    tables: list[TableConfig] | None = None

    path = path or env.get(CONFIG_ENV) or None
    if path is not None:
        file_values, tables = _read_file(Path(path))
        values.update(file_values)

    for setting in SETTINGS:
        raw = env.get(setting.env)
        if raw is not None:
            values[setting.attr] = _parse_env(setting, raw)
    if env.get(TABLES_ENV):
        tables = [parse_table_spec(spec, TABLES_ENV) for spec in _split_list(env[TABLES_ENV])]
    known = {s.env for s in SETTINGS} | {TABLES_ENV, CONFIG_ENV}
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known and warn is not None:
            warn(f"ignoring unknown environment variable {name}")

    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "tables":
            tables = [parse_table_spec(spec, "--table") for spec in value]
            continue
        setting = SETTINGS_BY_KEY[key]
        values[setting.attr] = _check(setting, value, setting.flag or key)
        if setting.secret and warn is not None and dsn_module.password(value):
            warn(
                f"the password given with {setting.flag} is visible to every user of this machine (ps); "
                f"give the DSN in {setting.env} or the config file, or the password in PGPASSWORD or ~/.pgpass"
            )

    if tables is not None:
        values["tables"] = tuple(tables)
    config = Config(**values)
    _validate(config)
    return config


def _read_file(path: Path) -> tuple[dict[str, Any], list[TableConfig] | None]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None

    values: dict[str, Any] = {}
    tables: list[TableConfig] | None = None
    for section, content in data.items():
        if section == "tables":
            tables = _read_tables(content)
            continue
        if not isinstance(content, dict):
            raise ConfigError(section, "unknown key (settings live in sections such as [server])")
        for name, value in content.items():
            key = f"{section}.{name}"
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None:
                raise ConfigError(key, f"unknown key{_suggest(key)}")
            values[setting.attr] = _check(setting, value, key)
    return values, tables


def _read_tables(content: Any) -> list[TableConfig]:
    if not isinstance(content, list):
        raise ConfigError("tables", "must be an array of tables ([[tables]])")
    tables = []
    for index, entry in enumerate(content):
        where = f"tables[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "must be a table with at least 'name'")
        for name in entry:
            if name not in TABLE_KEYS:
                raise ConfigError(f"{where}.{name}", f"unknown key (known: {', '.join(sorted(TABLE_KEYS))})")
        if "name" not in entry:
            raise ConfigError(f"{where}.name", "is required")
        tables.append(_table_from_dict(entry, where))
    return tables


def _table_from_dict(entry: Mapping[str, Any], where: str) -> TableConfig:
    name = entry["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name", "must be a string like 'public.patron'")
    schema, table = parse_table_name(name, f"{where}.name")
    mode = entry.get("mode", "full")
    if mode not in TABLE_MODES:
        raise ConfigError(f"{where}.mode", f"must be one of {', '.join(TABLE_MODES)}, not {mode!r}")
    max_rows = entry.get("max_rows", 100_000)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ConfigError(f"{where}.max_rows", f"must be a positive integer, not {max_rows!r}")
    ttl = entry.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
        raise ConfigError(f"{where}.ttl_seconds", f"must be a positive number, not {ttl!r}")
    where_sql = entry.get("where")
    if where_sql is not None and (not isinstance(where_sql, str) or not where_sql.strip()):
        raise ConfigError(f"{where}.where", "must be a non-empty SQL condition")
    if mode == "full" and ("max_rows" in entry or ttl is not None):
        raise ConfigError(where, "max_rows and ttl_seconds apply to mode = 'lazy' only")
    query, key, sources = _relation(entry, where)
    indexes = _indexes(entry.get("indexes", []), f"{where}.indexes")
    if indexes and mode != "full":
        raise ConfigError(f"{where}.indexes", "indexes are served from memory: they need mode = 'full'")
    if query is not None and where_sql is not None:
        raise ConfigError(f"{where}.where", "a relation filters in its query; 'where' is for tables")
    return TableConfig(
        schema=schema,
        name=table,
        mode=mode,
        max_rows=max_rows,
        ttl_seconds=float(ttl) if ttl is not None else None,
        where=where_sql,
        query=query,
        key=key,
        sources=sources,
        indexes=indexes,
    )


def _relation(entry: Mapping[str, Any], where: str) -> tuple[str | None, tuple[str, ...], tuple[Source, ...]]:
    query = entry.get("query")
    if query is None:
        for name in ("key", "sources"):
            if name in entry:
                raise ConfigError(f"{where}.{name}", "applies to relations (tables defined by a query)")
        return None, (), ()
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"{where}.query", "must be a non-empty SELECT")
    key = entry.get("key")
    if not isinstance(key, list) or not key or not all(isinstance(k, str) and k for k in key):
        raise ConfigError(f"{where}.key", 'a relation needs its key columns, e.g. key = ["user_id"]')
    raw_sources = entry.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise ConfigError(
            f"{where}.sources",
            "a relation needs its source tables and how their key columns map to its columns, e.g. "
            'sources = { "public.users" = { user_id = "user_id" } }',
        )
    sources = []
    for source_name, mapping in raw_sources.items():
        spot = f"{where}.sources.{source_name}"
        source_schema, source_table = parse_table_name(source_name, spot)
        if (
            not isinstance(mapping, dict)
            or not mapping
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        ):
            raise ConfigError(spot, 'must map source columns to relation columns, e.g. { user_id = "user_id" }')
        sources.append(Source(source_schema, source_table, tuple(mapping.items())))
    return query.strip().rstrip(";"), tuple(key), tuple(sources)


def _indexes(raw: Any, where: str) -> tuple[IndexConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(where, "must be an array of tables ([[tables.indexes]])")
    indexes = []
    for position, entry in enumerate(raw):
        spot = f"{where}[{position}]"
        if not isinstance(entry, dict):
            raise ConfigError(spot, "must be a table with name and columns")
        for name in entry:
            if name not in INDEX_KEYS:
                raise ConfigError(f"{spot}.{name}", f"unknown key (known: {', '.join(sorted(INDEX_KEYS))})")
        name, columns = entry.get("name"), entry.get("columns")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{spot}.name", "must be a plain identifier")
        if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns):
            raise ConfigError(f"{spot}.columns", "must list one or more column names")
        unique, ordered = entry.get("unique", False), entry.get("range", False)
        if not isinstance(unique, bool) or not isinstance(ordered, bool):
            raise ConfigError(spot, "unique and range must be true or false")
        if ordered and len(columns) != 1:
            raise ConfigError(f"{spot}.columns", "a range index orders by one column")
        indexes.append(IndexConfig(name, tuple(columns), unique, ordered))
    names = [i.name for i in indexes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(where, f"index {duplicate!r} is declared twice")
    return tuple(indexes)


def parse_table_spec(spec: str, where: str) -> TableConfig:
    """``schema.table[:full|lazy]``, as given to ``--table`` or CACHE_SIDECAR_TABLES."""
    name, _, mode = spec.strip().rpartition(":") if _has_mode(spec) else (spec.strip(), "", "")
    entry: dict[str, Any] = {"name": name}
    if mode:
        entry["mode"] = mode
    return _table_from_dict(entry, f"{where} {spec!r}")


def _has_mode(spec: str) -> bool:
    return bool(re.search(r":[A-Za-z]+\s*$", spec)) and not spec.rstrip().endswith('"')


def _parse_env(setting: Setting, raw: str) -> Any:
    where = f"{setting.env} ({setting.key})"
    value: Any
    if setting.kind == "list":
        value = _split_list(raw)
    elif setting.kind == "bool":
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            value = True
        elif lowered in ("0", "false", "no", "off", ""):
            value = False
        else:
            raise ConfigError(where, f"must be true or false, not {raw!r}")
    elif setting.kind in ("int", "float"):
        try:
            value = int(raw) if setting.kind == "int" else float(raw)
        except ValueError:
            raise ConfigError(
                where, f"must be a{'n integer' if setting.kind == 'int' else ' number'}, not {raw!r}"
            ) from None
    else:
        value = raw
    return _check(setting, value, where)


def _check(setting: Setting, value: Any, where: str) -> Any:
    """Type- and range-check one value; return it in the Config field's type."""
    kind = setting.kind
    shown = "a value" if setting.secret else repr(value)
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(where, f"must be a list of strings, not {shown}")
        if not value:
            raise ConfigError(where, "must not be empty")
        return tuple(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(where, f"must be true or false, not {shown}")
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
        if not ok or isinstance(value, bool):
            raise ConfigError(where, f"must be a{'n integer' if kind == 'int' else ' number'}, not {shown}")
        if setting.minimum is not None and value < setting.minimum:
            raise ConfigError(where, f"must be at least {setting.minimum:g}, not {value}")
        return int(value) if kind == "int" else float(value)
    if not isinstance(value, str):
        raise ConfigError(where, f"must be a string, not {shown}")
    if setting.choices is not None and value.lower() not in setting.choices:
        raise ConfigError(where, f"must be one of {', '.join(setting.choices)}, not {value!r}")
    return value.lower() if setting.choices is not None else value


def _validate(config: Config) -> None:
    if config.dsn is not None:
        dsn_module.parse(config.dsn)  # a DSN that cannot parse would be retried forever at start
    for address in config.listen:
        parse_listen_address(address)
    for address in config.health_listen:
        if parse_listen_address(address).unix_path is not None:
            raise ConfigError("server.health_listen", f"{address!r}: must be host:port")
    if config.metrics_listen:
        metrics = parse_listen_address(config.metrics_listen)
        if metrics.unix_path is not None:
            raise ConfigError("metrics.listen", f"{config.metrics_listen!r}: must be host:port")
    if config.pool_min_size > config.pool_max_size:
        raise ConfigError("database.pool_min_size", "must not exceed database.pool_max_size")
    if config.reconnect_min_delay > config.reconnect_max_delay:
        raise ConfigError("listener.reconnect_min_delay", "must not exceed listener.reconnect_max_delay")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]{0,62}", config.channel):
        raise ConfigError("listener.channel", f"must be a plain identifier, not {config.channel!r}")
    seen: set[str] = set()
    for table in config.tables:
        if table.qualified in seen:
            raise ConfigError("tables", f"{table.qualified} is configured twice")
        seen.add(table.qualified)


def _split_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(SETTINGS_BY_KEY), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------- description


def describe(config: Config, environ: Mapping[str, str] | None = None) -> Sequence[str]:
    """The effective configuration as a TOML file that loads back into it (the
    DSN's password redacted), with where the database comes from as a comment."""
    environ = os.environ if environ is None else environ
    lines = [
        "# cache-sidecar: effective configuration (cache-sidecar serve --print-config)",
        f"# database: {dsn_module.describe_origin(config.dsn, config.embedded, environ)}",
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

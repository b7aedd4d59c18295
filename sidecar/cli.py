"""``cache-sidecar``: the command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sidecar import __version__
from sidecar import config as cfg
from sidecar.config import dsn
from sidecar.errors import ConfigError, SidecarError

log = logging.getLogger("sidecar")

# grpcio 1.85's EventEngine client/listener cost ~25% more CPU per call than
# the older I/O manager in our measurements (see README, "Performance"); an
# operator's own GRPC_EXPERIMENTS setting wins.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

EXIT_BROKEN_PIPE = 141

DESCRIPTION = """\
Keep PostgreSQL tables cached in memory, current from LISTEN/NOTIFY, and serve
them over gRPC to every process of an application.

With no database configured, 'serve' starts an embedded PostgreSQL with a demo
table, so a first try needs no setup at all.
"""

PRETTY_HELP = "indent the JSON (whitespace only: values stay byte for byte as served)"

SERVE_EPILOG = """\
configuration (highest precedence first):
  flags  >  CACHE_SIDECAR_* environment  >  TOML file (--config or
  CACHE_SIDECAR_CONFIG)  >  defaults. The database may also come from the
  standard PG* variables (PGHOST, PGUSER, PGPASSWORD, ...).

settings (TOML key / environment variable):
{settings}
  tables / CACHE_SIDECAR_TABLES ("schema.table[:mode],...")
      [[tables]] name, mode ("full" or "lazy"), max_rows, ttl_seconds, where
      relations (a cached query): query, key = [...], [tables.sources]
        "schema.table" = {{ source_key_column = "relation_column" }}
      [[tables.indexes]] name, columns = [...], unique, range (full mode)
      (see README.md, "Relations and indexes", and examples/relations)

examples:
  cache-sidecar serve                          # embedded PostgreSQL + demo table
  cache-sidecar serve --dsn postgresql://app@db/app --table public.patron \\
      --table public.prices:lazy --install-triggers
  cache-sidecar serve --config sidecar.toml --listen unix:///run/cache/grpc.sock
"""


# 'capture' (alias 'triggers') only builds the capture SQL and talks to the database: the
# daemon's other settings would mean nothing there, so it takes no flags for them.
TRIGGERS_FLAGS = (
    "database.dsn",
    "database.capture",
    "listener.channel",
    "triggers.bulk_threshold",
    "logging.level",
    "logging.format",
)
CAPTURE_COMMANDS = ("capture", "triggers")


def _settings_help() -> str:
    lines = []
    for setting in cfg.SETTINGS:
        default = f"  (default: {setting.shown_default})" if setting.shown_default is not None else ""
        lines.append(f"  {setting.key} / {setting.env}{default}")
        lines += textwrap.wrap(setting.help, 78, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _add_setting_flag(group: argparse._ArgumentGroup, setting: cfg.Setting) -> None:
    assert setting.flag is not None
    if setting.kind == "bool":  # a switch: off unless given, nothing to say about a default
        group.add_argument(
            setting.flag,
            *setting.aliases,
            dest=setting.key,
            action="store_true",
            default=None,
            help=setting.help.replace("%", "%%"),
        )
        return
    shown = setting.shown_default
    # argparse %-formats help text.
    text = (setting.help if shown is None else f"{setting.help} (default: {shown})").replace("%", "%%")
    metavar = None if setting.choices else setting.metavar or setting.flag.lstrip("-").upper()
    group.add_argument(
        setting.flag,
        *setting.aliases,
        dest=setting.key,
        action="append" if setting.kind == "list" else "store",
        type={"int": int, "float": float}.get(setting.kind, str),
        choices=setting.choices,
        metavar=metavar,
        help=text,
    )


def _add_config_flags(parser: argparse.ArgumentParser, serve: bool) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="PATH", help="TOML configuration file")
    group.add_argument(
        "--table",
        dest="tables",
        action="append",
        metavar="NAME[:MODE]",
        help="cache this table (schema.table, mode full or lazy); repeatable, replaces the file's tables",
    )
    for setting in cfg.SETTINGS:
        if setting.flag is not None and (serve or setting.key in TRIGGERS_FLAGS):
            _add_setting_flag(group, setting)
    if serve:
        group.add_argument(
            "--print-config",
            action="store_true",
            help="print the effective configuration (secrets redacted) and exit",
        )


def _client_options(parser: argparse.ArgumentParser, reads: bool = False) -> None:
    """The options of the commands that talk to a running sidecar (and, for reads, how)."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="sidecar address (default 127.0.0.1:50051)")
    edge = parser.add_argument_group("TLS and tokens (a sidecar reached over the network; README, 'Running a hub')")
    edge.add_argument("--tls-ca-file", "--tls-ca", metavar="PATH", help="use TLS and trust the CAs in this PEM bundle")
    edge.add_argument(
        "--tls-cert-file", "--tls-cert", metavar="PATH", help="client certificate (PEM) to present; implies TLS"
    )
    edge.add_argument("--tls-key-file", "--tls-key", metavar="PATH", help="the client certificate's private key (PEM)")
    edge.add_argument("--token-file", metavar="PATH", help="send the token in this file as 'authorization: Bearer'")
    if reads:
        parser.add_argument("--strong", action="store_true", help="pass the read barrier first")
        parser.add_argument("--pretty", action="store_true", help=PRETTY_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cache-sidecar", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cache-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon: load the tables, follow changes, serve gRPC.",
        epilog=SERVE_EPILOG.format(settings=_settings_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(serve, serve=True)

    for name in CAPTURE_COMMANDS:
        trig = commands.add_parser(
            name,
            help="print, install or remove what change capture needs in the database"
            + (" (the same as 'capture')" if name == "triggers" else ""),
            description="Manage what change capture needs in the database: with database.capture notify "
            "(the default), the triggers that send a NOTIFY on every committed change of a cached table; "
            "with logical (--capture logical), the publication the replication stream reads. 'sql' prints "
            "the script for review (nothing is changed; in logical mode with the server settings and role "
            "attribute needed, as comments); install is idempotent; uninstall removes exactly what install "
            "created. 'triggers' is the older name of 'capture'.",
        )
        trig.add_argument(
            "action",
            choices=("sql", "install", "uninstall"),
            help="sql: print the install script; install or uninstall: change the database",
        )
        trig.add_argument("--uninstall-sql", action="store_true", help="with 'sql': print the removal script instead")
        _add_config_flags(trig, serve=False)

    get = commands.add_parser(
        "get",
        help="read rows through a running sidecar",
        description="Read one row by key (one value per key column) and print it as the sidecar serves it: "
        "JSON, UTF-8, byte for byte (numerics keep every digit).",
    )
    get.add_argument("table", help="schema.table")
    get.add_argument("key", nargs="+", help="key part(s), in primary-key column order")
    _client_options(get, reads=True)

    query = commands.add_parser(
        "query",
        help="read rows by a secondary index through a running sidecar",
        description="Rows of a table by one of its declared indexes, printed as JSON lines: those whose "
        "index columns equal VALUE (several columns: give them comma-separated), or with --lower/--upper "
        "(range indexes) those in between, in index order.",
        epilog="examples:\n  cache-sidecar query public.patron by_dish curry ramen\n"
        "  cache-sidecar query public.patron by_name --lower B --upper L --limit 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument("table", help="schema.table")
    query.add_argument("index", help="the index's name (see 'cache-sidecar tables')")
    query.add_argument("values", nargs="*", metavar="VALUE", help="index value(s) to match")
    query.add_argument("--lower", help="range: lowest value (included)")
    query.add_argument("--upper", help="range: highest value (included)")
    query.add_argument("--limit", type=int, default=0, help="at most this many rows (default: the server's maximum)")
    query.add_argument("--desc", action="store_true", help="reverse the order")
    _client_options(query, reads=True)

    watch = commands.add_parser(
        "watch",
        help="print a table's changes as they happen, through a running sidecar",
        description="Follow a table's changes: one JSON line per changed row (revision, table, op, key, "
        "and the row exactly as 'get' prints it, null when there is none now or the table is lazy). "
        "Resumes by itself from the last revision after a restart or a broken connection; a history "
        "that no longer reaches back prints a 'reset' line. Ends on Ctrl-C.",
        epilog="examples:\n  cache-sidecar watch public.patron\n"
        "  cache-sidecar watch public.patron --keys 1 2 --initial-state\n"
        "  cache-sidecar watch public.patron --from 6f1c.../42      # as 'cache-sidecar tables' prints it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watch.add_argument("table", help="schema.table")
    watch.add_argument(
        "--keys", nargs="+", default=[], metavar="KEY", help="only these keys (a composite key comma-separated)"
    )
    watch.add_argument("--from", dest="start", metavar="REVISION", help="resume after this revision (EPOCH/NUMBER)")
    watch.add_argument(
        "--initial-state", action="store_true", help="print the current rows first (full tables), then changes"
    )
    _client_options(watch)

    tables = commands.add_parser(
        "tables",
        help="list a running sidecar's tables",
        description="List the tables a running sidecar caches, one a line: name, mode, rows, whether "
        "loaded, key columns; then each table's indexes and, if it is not served from memory, why; "
        "last the sidecar's revision.",
    )
    _client_options(tables)

    check = commands.add_parser(
        "health",
        help="exit 0 if a running sidecar is SERVING",
        description="Ask grpc.health.v1 of a running sidecar; exit 0 when SERVING, 1 otherwise "
        "(for compose health checks and exec probes).",
    )
    _client_options(check)
    check.add_argument("--service", default="", help="health service name ('' overall, 'liveness')")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """Setting keys to the values given as flags (``None``: not given)."""
    flags = {s.key: getattr(args, s.key, None) for s in cfg.SETTINGS if s.flag is not None}
    return {**flags, "tables": args.tables}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extras
    (``event``, ``table``, ``rows``, ... on lifecycle events)."""

    STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in self.STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    logging.getLogger("asyncpg.pool").addFilter(_one_line)


def _one_line(record: logging.LogRecord) -> bool:
    """asyncpg's pool logs a traceback per retry while the database is down:
    keep the message and the error, drop the traceback."""
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: every command, and a reader that stops early (``| head``)."""
    import os

    try:
        try:
            return _main(argv)
        finally:
            # Flush here, not at exit: a closed pipe must raise where it can be caught.
            sys.stdout.flush()
    except BrokenPipeError:
        # Whoever reads our output has what they wanted; the rest goes nowhere. Point
        # stdout at devnull so the interpreter's own flush at exit cannot fail again,
        # and exit as a process killed by SIGPIPE does (128 + 13), as coreutils do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    import os

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)  # before gRPC starts
    # Nothing here forks a process that uses gRPC (the embedded PostgreSQL's
    # helpers do fork), so skip gRPC's fork handlers and their log noise.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    if args.command in ("get", "query", "watch", "tables", "health"):
        return _remote(args)
    try:
        config = cfg.load(args.config, flags=_flags(args), warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    except ConfigError as exc:
        print(f"cache-sidecar: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(config.log_level, config.log_format)
    if args.command == "serve":
        if args.print_config:
            print("\n".join(cfg.describe(config)))
            return 0
        return _serve(config)
    return _triggers(config, args)


def _serve(config: cfg.Config) -> int:
    from sidecar.app import Daemon

    log.info("cache-sidecar %s starting", __version__, extra={"event": "start", "version": __version__})

    def announce(daemon: Daemon) -> None:
        if daemon.embedded is not None and daemon.server is not None:
            _print_demo_banner(daemon)

    runner = _event_loop_runner(config.event_loop)
    try:
        return runner(Daemon(config, on_ready=announce).run())
    except KeyboardInterrupt:  # a signal before handlers were installed
        return 130


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, int]], int]:
    """``asyncio.run`` or ``uvloop.run``, as configured (server.event_loop)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("cache-sidecar: error: config server.event_loop: uvloop is not installed") from None
        else:
            log.info("event loop: uvloop")
            return uvloop.run
    log.info("event loop: asyncio")
    return asyncio.run


def _print_demo_banner(daemon: Any) -> None:
    import shlex

    target = next((a for a in daemon.server.addresses if not a.startswith("unix:")), daemon.server.addresses[0])
    me = sys.argv[0] if sys.argv[0].endswith("cache-sidecar") else f"{sys.executable} -m sidecar"
    psql = f"{shlex.quote(daemon.embedded.psql)} {shlex.quote(daemon.config.dsn)}"
    print(
        f"""
  cache-sidecar is serving the demo table public.patron from an embedded PostgreSQL.

    gRPC      {target}
    database  {daemon.config.dsn}

  Try it from another terminal:
    {me} get public.patron 1 --target {target}
    {psql} -c "UPDATE patron SET fav_dish = 'waffles' WHERE id = 1"
    {me} get public.patron 1 --target {target}     # the cache followed
    {me} query public.patron by_dish waffles --target {target}   # by a secondary index
    {me} watch public.patron --target {target}     # every change as it commits (Ctrl-C ends it)

  Stop with Ctrl-C.
""",
        file=sys.stderr,
        flush=True,
    )


def _triggers(config: cfg.Config, args: argparse.Namespace) -> int:
    from sidecar.app import call_with_db, exit_code
    from sidecar.pg import triggers
    from sidecar.pg.db import describe_table

    if not config.tables:
        print(
            "cache-sidecar: error: config tables: no tables configured (--table NAME or [[tables]])",
            file=sys.stderr,
        )
        return 2
    if config.dsn is None and not _pg_env():
        print(
            "cache-sidecar: error: config database.dsn: no database given (--dsn or PG* variables)",
            file=sys.stderr,
        )
        return 2

    async def work(conn: Any) -> int:
        schemas = [await describe_table(conn, table) for table in config.tables]
        if config.capture == "logical":
            return await _publication(conn, schemas, args)
        sets = triggers.trigger_sets(schemas, config.channel, config.bulk_threshold)
        if args.action == "sql":
            print(triggers.script(await triggers.resolve(conn, sets), uninstall=args.uninstall_sql), end="")
        elif args.action == "install":
            changed = await triggers.install(conn, sets)
            print(f"installed: {', '.join(changed)}" if changed else "already installed: nothing to do")
            print(f"note: {triggers.TWO_PHASE_NOTE}; logical capture (--capture logical) has no such limit")
        else:
            changed = await triggers.uninstall(conn, sets)
            print(f"removed: {', '.join(changed)}" if changed else "not installed: nothing to do")
        return 0

    try:
        return asyncio.run(call_with_db(config, work))
    except SidecarError as exc:
        print(f"cache-sidecar: error: {dsn.scrub(str(exc), config.dsn)}", file=sys.stderr)
        return exit_code(exc)


async def _publication(conn: Any, schemas: list[Any], args: argparse.Namespace) -> int:
    """The ``capture`` command in logical mode: the publication."""
    from sidecar.pg import publication
    from sidecar.pg.preflight import WAL_LEVEL_FIX

    wanted = publication.for_schemas(schemas)
    if args.action == "sql":
        found = await publication.inspect(conn, wanted)
        print(publication.script(wanted, found, uninstall=args.uninstall_sql), end="")
    elif args.action == "install":
        changed = await publication.install(conn, wanted)
        print(f"installed: publication {wanted.name}" if changed else "already installed: nothing to do")
        level = await conn.fetchval("SHOW wal_level")
        if level != "logical":  # (a publication can be made before the server is ready for it)
            print(f"note: the server's wal_level is {level}, and logical capture needs logical: {WAL_LEVEL_FIX}")
    else:
        gone = await publication.uninstall(conn, wanted)
        print(f"removed: publication {wanted.name}" if gone else "not installed: nothing to do")
    return 0


def _pg_env() -> bool:
    import os

    return any(os.environ.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE"))


def _remote(args: argparse.Namespace) -> int:
    from sidecar import remote
    from sidecar.fleet.channels import UpstreamSecurity

    security = UpstreamSecurity(
        args.tls_ca_file, args.tls_cert_file, args.tls_key_file, args.token_file, keys=dict(remote.FLAG_NAMES)
    )
    if args.command == "health":
        return remote.health(args.target, args.service, security)
    if args.command == "tables":
        return remote.tables(args.target, security)
    if args.command == "watch":
        return remote.watch(
            args.target,
            args.table,
            keys=args.keys,
            start=args.start,
            initial_state=args.initial_state,
            security=security,
        )
    if args.command == "query":
        if args.values and (args.lower is not None or args.upper is not None):
            print("cache-sidecar: give VALUEs or --lower/--upper, not both", file=sys.stderr)
            return 2
        return remote.query(
            args.target,
            args.table,
            args.index,
            values=args.values,
            lower=args.lower,
            upper=args.upper,
            limit=args.limit,
            descending=args.desc,
            strong=args.strong,
            pretty=args.pretty,
            security=security,
        )
    return remote.get(args.target, args.table, args.key, strong=args.strong, pretty=args.pretty, security=security)

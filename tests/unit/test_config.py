"""Configuration: precedence, validation messages that name the key, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config as cfg
from sidecar.config.addresses import parse_listen_address
from sidecar.config.dsn import redact as redact_dsn
from sidecar.config.dsn import scrub
from sidecar.config.settings import validate
from sidecar.errors import ConfigError
from sidecar.identifiers import parse_table_name, qualified_name


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return path


FILE = """
[database]
dsn = "postgresql://app:s3cret@db/app"
[server]
listen = ["127.0.0.1:6000", "unix:///tmp/cs.sock"]
install_triggers = true
[listener]
ping_interval = 2.5
[[tables]]
name = "public.patron"
[[tables]]
name = "prices"
mode = "lazy"
max_rows = 50
ttl_seconds = 30
"""


def test_defaults_are_safe():
    config = cfg.load(env={})
    assert config.listen == ("127.0.0.1:50051",)  # loopback unless asked otherwise
    assert config.dsn is None and config.tables == ()
    assert not config.install_triggers


def test_file_is_read(tmp_path):
    config = cfg.load(write(tmp_path, FILE), env={})
    assert config.dsn == "postgresql://app:s3cret@db/app"
    assert config.listen == ("127.0.0.1:6000", "unix:///tmp/cs.sock")
    assert config.ping_interval == 2.5 and config.install_triggers
    assert [t.qualified for t in config.tables] == ["public.patron", "public.prices"]
    lazy = config.tables[1]
    assert (lazy.mode, lazy.max_rows, lazy.ttl_seconds) == ("lazy", 50, 30.0)


def test_precedence_flag_over_env_over_file(tmp_path):
    path = write(tmp_path, FILE)
    env = {
        "CACHE_SIDECAR_LISTENER_PING_INTERVAL": "7",
        "CACHE_SIDECAR_SERVER_LISTEN": "127.0.0.1:1,127.0.0.1:2",
    }
    config = cfg.load(path, env=env)
    assert config.ping_interval == 7.0 and config.listen == ("127.0.0.1:1", "127.0.0.1:2")
    config = cfg.load(path, env=env, flags={"listener.ping_interval": 9.0, "tables": ["x.y:lazy"]})
    assert config.ping_interval == 9.0
    assert [(t.qualified, t.mode) for t in config.tables] == [("x.y", "lazy")]


def test_env_tables_and_config_path(tmp_path):
    path = write(tmp_path, FILE)
    config = cfg.load(env={"CACHE_SIDECAR_CONFIG": str(path), "CACHE_SIDECAR_TABLES": "a.b, c:lazy"})
    assert [(t.qualified, t.mode) for t in config.tables] == [("a.b", "full"), ("public.c", "lazy")]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[server]\nlisten = 5", "server.listen", "list of strings"),
        ("[server]\nlisen = ['a:1']", "server.lisen", "did you mean server.listen"),
        ("[server]\nlisten = ['nonsense']", "server.listen", "host:port"),
        ("[listener]\nping_interval = 0", "listener.ping_interval", "at least"),
        ("[listener]\nchannel = 'bad channel'", "listener.channel", "plain identifier"),
        ("[logging]\nlevel = 'loud'", "logging.level", "one of"),
        ("[[tables]]\nmode = 'full'", "tables[0].name", "required"),
        ("[[tables]]\nname = 'a'\nmode = 'eager'", "tables[0].mode", "full, lazy"),
        ("[[tables]]\nname = 'a'\nmax_rows = 5", "tables[0]", "lazy"),
        ("[[tables]]\nname = 'a'\ncolour = 'red'", "tables[0].colour", "unknown key"),
        ("[[tables]]\nname = 'a'\n[[tables]]\nname = 'public.a'", "tables", "twice"),
        ("[database]\npool_min_size = 9\npool_max_size = 2", "database.pool_min_size", "exceed"),
        ("not toml = = =", "--config", "not valid TOML"),
        ("[[tables]]\nname = 'r'\nquery = 'SELECT 1 AS a'", "tables[0].key", "key columns"),
        ("[[tables]]\nname = 'r'\nquery = 'SELECT 1 AS a'\nkey = ['a']", "tables[0].sources", "source tables"),
        ("[[tables]]\nname = 'r'\nquery = 'SELECT 1'\nkey = ['a']\nsources = { t = 5 }", "tables[0].sources.t", "map"),
        ("[[tables]]\nname = 'a'\nkey = ['a']", "tables[0].key", "applies to relations"),
        (
            "[[tables]]\nname = 'r'\nquery = 'SELECT 1 AS a'\nkey = ['a']\nsources = { t = { a = 'a' } }\nwhere = 'a'",
            "tables[0].where",
            "filters in its query",
        ),
        (
            "[[tables]]\nname = 'a'\nmode = 'lazy'\n[[tables.indexes]]\nname = 'i'\ncolumns = ['c']",
            "tables[0].indexes",
            "mode = 'full'",
        ),
        (
            "[[tables]]\nname = 'a'\n[[tables.indexes]]\nname = 'i'\ncolumns = ['c', 'd']\nrange = true",
            "tables[0].indexes[0].columns",
            "one column",
        ),
        (
            "[[tables]]\nname = 'a'\n[[tables.indexes]]\nname = 'i'\ncolumns = []",
            "tables[0].indexes[0].columns",
            "one or more",
        ),
        (
            "[[tables]]\nname = 'a'\n[[tables.indexes]]\nname = 'bad name'\ncolumns = ['c']",
            "tables[0].indexes[0].name",
            "identifier",
        ),
        (
            "[[tables]]\nname = 'a'\n[[tables.indexes]]\nname = 'i'\ncolumns = ['c']\nsorted = true",
            "tables[0].indexes[0].sorted",
            "unknown key",
        ),
        (
            "[[tables]]\nname = 'a'\n[[tables.indexes]]\nname = 'i'\ncolumns = ['c']"
            "\n[[tables.indexes]]\nname = 'i'\ncolumns = ['d']",
            "tables[0].indexes",
            "twice",
        ),
    ],
)
def test_file_errors_name_the_key(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as info:
        cfg.load(write(tmp_path, text), env={})
    assert info.value.key == key
    assert fragment in str(info.value)


RELATION = """
[[tables]]
name = "app.user_city"
query = \"\"\"
SELECT uc.*, u.name AS user_name, c.name AS city_name
FROM app.users u JOIN app.users_cities uc USING (user_id) JOIN app.cities c USING (city_id);
\"\"\"
key = ["user_id"]
[tables.sources]
"app.users" = { user_id = "user_id" }
"app.users_cities" = { user_id = "user_id" }
"app.cities" = { city_id = "city_id" }

[[tables.indexes]]
name = "by_city"
columns = ["city_name"]

[[tables.indexes]]
name = "by_user_name"
columns = ["user_name"]
unique = true
range = true
"""


def test_relations_and_indexes_are_read(tmp_path):
    (table,) = cfg.load(write(tmp_path, RELATION), env={}).tables
    assert table.is_relation and table.qualified == "app.user_city" and table.key == ("user_id",)
    assert table.query is not None and table.query.endswith("USING (city_id)")  # (its ';' dropped)
    assert [(s.qualified, s.mapping) for s in table.sources] == [
        ("app.users", (("user_id", "user_id"),)),
        ("app.users_cities", (("user_id", "user_id"),)),
        ("app.cities", (("city_id", "city_id"),)),
    ]
    assert table.indexes == (
        cfg.IndexConfig("by_city", ("city_name",)),
        cfg.IndexConfig("by_user_name", ("user_name",), unique=True, range=True),
    )


def test_env_errors_name_the_variable():
    expected = r"CACHE_SIDECAR_SERVER_MAX_BATCH_KEYS \(server.max_batch_keys\): must be an integer"
    with pytest.raises(ConfigError, match=expected):
        cfg.load(env={"CACHE_SIDECAR_SERVER_MAX_BATCH_KEYS": "lots"})
    with pytest.raises(ConfigError, match="CACHE_SIDECAR_SERVER_INSTALL_TRIGGERS"):
        cfg.load(env={"CACHE_SIDECAR_SERVER_INSTALL_TRIGGERS": "perhaps"})


def test_unknown_env_is_warned_not_fatal():
    warnings: list[str] = []
    cfg.load(env={"CACHE_SIDECAR_LISTNE": "x"}, warn=warnings.append)
    assert warnings == ["ignoring unknown environment variable CACHE_SIDECAR_LISTNE"]


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        cfg.load("/nonexistent/sidecar.toml", env={})


def test_secret_never_in_errors_or_description(tmp_path):
    with pytest.raises(ConfigError) as info:
        cfg.load(env={}, flags={"database.dsn": 5})
    assert "5" not in str(info.value)
    config = cfg.load(write(tmp_path, FILE), env={})
    assert "s3cret" not in "\n".join(cfg.describe(config))


@pytest.mark.parametrize(
    ("dsn", "shown", "password"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app", "s3cret"),
        (
            "postgresql://app@db/app?password=s3cret&sslmode=require",
            "postgresql://app@db/app?password=***&sslmode=require",
            "s3cret",
        ),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app", "s3cret"),
        ("host=db password='s3 cret' dbname=app", "host=db password=*** dbname=app", "s3 cret"),
        ("postgresql://postgres:@/postgres?host=/tmp/x", "postgresql://postgres@/postgres?host=/tmp/x", None),
    ],
)
def test_redact_dsn(dsn, shown, password):
    assert redact_dsn(dsn) == shown
    if password:
        # A driver error that echoes the DSN gets the redacted DSN in its place.
        scrubbed = scrub(f"failed for {dsn}: timeout", dsn)
        assert password not in scrubbed and scrubbed == f"failed for {shown}: timeout"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("patron", ("public", "patron")),
        ("Sales.Orders", ("sales", "orders")),
        ('"Sales"."Big Orders"', ("Sales", "Big Orders")),
        ('app."we""ird.name"', ("app", 'we"ird.name')),
    ],
)
def test_table_names_follow_postgres_rules(text, parsed):
    assert parse_table_name(text) == parsed
    assert parse_table_name(qualified_name(*parsed)) == parsed


def test_listen_addresses():
    assert parse_listen_address("unix:///run/x.sock").unix_path == "/run/x.sock"
    assert parse_listen_address("unix:rel.sock").unix_path == "rel.sock"
    assert parse_listen_address("[::1]:50051").port == 50051
    assert parse_listen_address("0.0.0.0:1").all_interfaces
    with pytest.raises(ConfigError, match="0-65535"):
        parse_listen_address("127.0.0.1:70000")


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[database]\ndsn = "host=db user=jos\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        cfg.load(path, env={})
    assert info.value.key == "--config" and str(path) in info.value.problem and "UTF-8" in info.value.problem


def test_print_config_is_toml_that_loads_back(tmp_path):
    import dataclasses
    import tomllib

    relation = RELATION.replace("[[tables]]", '[[tables]]\n# "quoted"\n', 1)
    extra = """
[[tables]]
name = '"Odd"."Na\\me"'
where = "status = 'open'\\n  AND kind <> \\"x\\""
[[tables.indexes]]
name = "by_kind"
columns = ["kind"]
[[tables]]
name = "prices"
mode = "lazy"
max_rows = 50
ttl_seconds = 2.5
[[tables]]
name = "stock"
mode = "lazy"
"""
    path = write(tmp_path, FILE.split("[[tables]]")[0] + "[metrics]\nlisten = '127.0.0.1:9'\n" + relation + extra)
    config = cfg.load(path, env={})
    assert len(config.tables) == 4 and config.health_listen == () and config.embedded_data_dir is None
    text = "\n".join(cfg.describe(config, environ={}))

    tomllib.loads(text)  # valid TOML, no Python reprs
    assert "None" not in text and "('" not in text and "s3cret" not in text
    assert "# database: DSN postgresql://app:***@db/app" in text
    again = write(tmp_path, text)
    # The password is left out, not redacted: '***' loaded back would fail authentication.
    assert cfg.load(again, env={}) == dataclasses.replace(config, dsn="postgresql://app@db/app")
    assert "# the DSN's password is left out: give it in PGPASSWORD" in text


@pytest.mark.parametrize(
    ("given", "written"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app@db:5432/app"),
        ("postgresql://app@db/app?password=s3cret&sslmode=require", "postgresql://app@db/app?sslmode=require"),
        ("postgresql://app@db/app?sslmode=require&password=s3cret", "postgresql://app@db/app?sslmode=require"),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app dbname=app"),
        ("host=db password='s3 cret' dbname=app", "host=db dbname=app"),
        ("host=db user=app", "host=db user=app"),
    ],
)
def test_print_config_writes_the_dsn_without_its_password_and_says_where_it_must_come_from(tmp_path, given, written):
    import tomllib

    text = "\n".join(cfg.describe(cfg.Config(dsn=given), environ={}))
    assert tomllib.loads(text)["database"]["dsn"] == written and "s3" not in text
    assert ("PGPASSWORD" in text and "~/.pgpass" in text) == (written != given)
    assert cfg.load(write(tmp_path, text), env={}).dsn == written


def test_a_misspelt_array_of_tables_is_suggested_its_name(tmp_path):
    with pytest.raises(ConfigError) as info:
        cfg.load(write(tmp_path, '[[table]]\nname = "public.patron"\n'), env={})
    assert info.value.key == "table" and "did you mean [[tables]]?" in info.value.problem
    with pytest.raises(ConfigError) as info:
        cfg.load(write(tmp_path, '[sever]\nlisten = ["127.0.0.1:1"]\n'), env={})
    assert "did you mean server.listen?" in info.value.problem  # (as other typos)


@pytest.mark.parametrize(
    ("environ", "dsn", "origin"),
    [
        ({}, None, "# database: the embedded PostgreSQL"),
        ({"PGHOST": "db", "PGUSER": "app"}, None, "# database: PG* environment (PGHOST, PGUSER)"),
        ({}, "host=db password='x y'", "# database: DSN host=db password=***"),
    ],
)
def test_print_config_says_where_the_database_comes_from(environ, dsn, origin):
    text = "\n".join(cfg.describe(cfg.Config(dsn=dsn), environ=environ))
    assert origin in text


def test_print_config_names_the_service(tmp_path):
    services = tmp_path / "pg_service.conf"
    services.write_text("[shop]\nhost=db\n")
    environ = {"PGSERVICE": "shop", "PGSERVICEFILE": str(services)}
    text = "\n".join(cfg.describe(cfg.Config(), environ=environ))
    assert f"service shop from {services}" in text


@pytest.mark.parametrize("secret", ["postgres", "r", "a@b:c/"])
def test_redaction_touches_the_password_fields_only(secret):
    encoded = secret.replace("@", "%40").replace(":", "%3A").replace("/", "%2F")
    url = f"postgresql://postgres2:{encoded}@127.0.0.1:53204/nodb"
    assert redact_dsn(url) == "postgresql://postgres2:***@127.0.0.1:53204/nodb"
    query = f"postgresql://app@db/postgres?password={encoded}&sslmode=require"
    assert redact_dsn(query) == "postgresql://app@db/postgres?password=***&sslmode=require"
    quoted = "'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    keywords = f"host=/tmp/postgres user=postgres password = {quoted} dbname=r"
    assert redact_dsn(keywords) == "host=/tmp/postgres user=postgres password = *** dbname=r"

    # Messages are never edited where the password's text happens to occur...
    message = "table public.a@b:c/ has no primary key; cache-sidecar needs one (postgresql, postgres2, r)"
    assert scrub(message, url) == message
    assert scrub(message, keywords) == message
    # ...only where the driver echoes the DSN: that is replaced whole.
    echoed = f"cannot connect to {url}: password authentication failed for user postgres2"
    assert scrub(echoed, url) == (
        "cannot connect to postgresql://postgres2:***@127.0.0.1:53204/nodb: "
        "password authentication failed for user postgres2"
    )


def test_a_password_on_the_command_line_is_warned_about():
    warnings: list[str] = []
    cfg.load(env={}, flags={"database.dsn": "host=db password=pw"}, warn=warnings.append)
    assert len(warnings) == 1
    assert all(word in warnings[0] for word in ("CACHE_SIDECAR_DATABASE_DSN", "PGPASSWORD", "~/.pgpass", "config"))
    assert "pw" not in warnings[0].replace("password", "")
    quiet: list[str] = []
    cfg.load(env={}, flags={"database.dsn": "postgresql://app@db/shop"}, warn=quiet.append)
    cfg.load(env={"CACHE_SIDECAR_DATABASE_DSN": "postgresql://app:pw@db/shop"}, warn=quiet.append)
    assert quiet == []


def test_capture_is_notify_unless_logical_is_asked_for(tmp_path):
    assert cfg.load(env={}).capture == "notify"
    assert cfg.load(write(tmp_path, '[database]\ncapture = "logical"\n'), env={}).capture == "logical"
    assert cfg.load(env={"CACHE_SIDECAR_DATABASE_CAPTURE": "Logical"}).capture == "logical"
    assert cfg.load(env={}, flags={"database.capture": "logical"}).capture == "logical"
    for load in (
        lambda: cfg.load(write(tmp_path, '[database]\ncapture = "wal"\n'), env={}),
        lambda: cfg.load(env={"CACHE_SIDECAR_DATABASE_CAPTURE": "wal"}),
    ):
        with pytest.raises(ConfigError, match=r"database\.capture.*notify.*logical.*'wal'"):
            load()
    with pytest.raises(ConfigError, match=r"config database\.capture: must be notify .* or logical"):
        validate(cfg.Config(capture="triggers"))


def test_a_follower_captures_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"config database\.capture: a follower"):
        cfg.load(env={}, flags={"upstream.target": "hub:50051", "database.capture": "logical"})


def test_install_capture_is_install_triggers_by_a_better_name():
    from sidecar.cli import _flags, build_parser

    for flag in ("--install-capture", "--install-triggers"):
        args = build_parser().parse_args(["serve", flag, "--capture", "logical"])
        config = cfg.load(env={}, flags=_flags(args))
        assert config.install_triggers and config.capture == "logical"
    assert not cfg.load(env={}, flags=_flags(build_parser().parse_args(["serve"]))).install_triggers
    for command in ("capture", "triggers"):  # the command and its older name take --capture
        args = build_parser().parse_args([command, "sql", "--capture", "logical"])
        assert cfg.load(env={}, flags=_flags(args)).capture == "logical"

"""DSNs: libpq's key=value and URL forms, services, redaction, asyncpg arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config as cfg
from sidecar.config import dsn
from sidecar.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "params"),
    [
        (
            "host=127.0.0.1 port=5432 user=app dbname=shop",
            {"host": "127.0.0.1", "port": "5432", "user": "app", "dbname": "shop"},
        ),
        # spaces around "=", quoted values with \' and \\, a backslash outside quotes
        (
            "host = '/run/my pg'  password='it\\'s \\\\ x' application_name=a\\ b",
            {"host": "/run/my pg", "password": "it's \\ x", "application_name": "a b"},
        ),
        ("dbname='' user=app", {"user": "app"}),  # empty means not given, as in libpq
        (
            "postgresql://app:a%40b%3Ac%2F@db:5433,[::1]:6/shop?sslmode=require&options=-c%20x%3D1",
            {
                "user": "app",
                "password": "a@b:c/",
                "host": "db,::1",
                "port": "5433,6",
                "dbname": "shop",
                "sslmode": "require",
                "options": "-c x=1",
            },
        ),
        ("postgres://%2Ftmp%2Fpg/shop", {"host": "/tmp/pg", "dbname": "shop"}),
        ("postgresql://postgres:@/postgres?host=/tmp/x", {"user": "postgres", "host": "/tmp/x", "dbname": "postgres"}),
        ("postgresql://db/shop?ssl=true", {"host": "db", "dbname": "shop", "sslmode": "require"}),
    ],
)
def test_both_forms_parse_like_libpq(text, params):
    assert dsn.parse(text) == params


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("postgres//app@db", "a URL starts with postgresql://"),
        ("just-a-word", "neither a URL"),
        ("mysql://app@db/shop", "not mysql://"),
        ("hots=db", "unknown keyword hots (did you mean host?)"),
        ("search_path=x", "options='-c name=value'"),
        ("keepalives=1", "keepalives: a libpq keyword"),
        ("host=db port=54x32", "port '54x32' is not a port number"),
        ("postgresql://db:99999/x", "port '99999'"),
        ("host=db password='never closed", "unterminated quoted value for password"),
        ("host=db sslmode=sometimes", "sslmode must be one of"),
        ("host=db connect_timeout=0", "connect_timeout must be a positive"),
        ("host=a,b port=1,2,3", "3 ports for 2 hosts"),
        ("postgresql://db/x?password=a%zz", "invalid percent-encoding"),
    ],
)
def test_malformed_dsns_name_the_problem(text, fragment):
    with pytest.raises(ConfigError) as info:
        dsn.parse(text)
    assert info.value.key == "database.dsn"
    assert fragment in info.value.problem


@pytest.mark.parametrize(
    "text",
    [
        "host=db password=my secret",  # unquoted space: "secret" would be taken as a keyword
        "host=db password=my secret=x",
        "postgresql://u@db/x?password=my&secret=x",
    ],
)
def test_parse_errors_never_echo_a_password_fragment(text):
    with pytest.raises(ConfigError) as info:
        dsn.parse(text)
    assert "secret" not in str(info.value)


def test_a_malformed_dsn_is_a_config_error_wherever_it_comes_from(tmp_path):
    for source in (
        {"flags": {"database.dsn": "postgres//app@db"}},
        {"env": {"CACHE_SIDECAR_DATABASE_DSN": "postgres//app@db"}},
    ):
        with pytest.raises(ConfigError, match=r"database\.dsn"):
            cfg.load(**{"env": {}, **source})
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "host=db dbnme=x"\n')
    with pytest.raises(ConfigError, match="did you mean dbname"):
        cfg.load(path, env={})


def test_key_value_becomes_asyncpg_arguments():
    target = dsn.resolve(
        "host=db,db2 port=6432 user=app password='p w' dbname=shop sslmode=Verify-Full connect_timeout=3 "
        "options='-c search_path=shop' application_name=shopper target_session_attrs=read-write "
        "sslrootcert=/etc/ca.pem",
        {},
    )
    assert target.arguments == {
        "host": ["db", "db2"],
        "port": 6432,
        "user": "app",
        "password": "p w",
        "database": "shop",
        "ssl": "verify-full",
        "timeout": 3.0,
        "target_session_attrs": "read-write",
        "server_settings": {"options": "-c search_path=shop", "application_name": "shopper"},
        "dsn": "postgresql://?sslrootcert=%2Fetc%2Fca.pem",
    }
    assert target.address == "db:6432, db2:6432"
    assert "p w" not in target.origin and "password=***" in target.origin


def test_address_names_what_is_tried():
    assert dsn.resolve("host=/run/pg port=6000", {}).address == "/run/pg/.s.PGSQL.6000"
    assert dsn.resolve(None, {"PGHOST": "db", "PGPORT": "7"}).address == "db:7"
    assert dsn.resolve("postgresql://[::1]/x", {}).address == "[::1]:5432"
    assert "default server" in dsn.resolve(None, {}).address


# ---------------------------------------------------------------- services


def service_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pg_service.conf"
    path.write_text(text)
    return path


def test_service_fills_in_what_the_dsn_does_not_give(tmp_path):
    path = service_file(
        tmp_path, "# comment\n[other]\nhost=elsewhere\n\n[shop]\nhost = db.internal\nport=6543\ndbname=shop\n"
    )
    env = {"PGSERVICEFILE": str(path)}
    target = dsn.resolve("service=shop dbname=override", env)
    assert target.arguments == {"host": "db.internal", "port": 6543, "database": "override"}
    assert f"service shop from {path}" in target.origin
    # PGSERVICE names it when the DSN does not; the DSN may be absent altogether
    assert dsn.resolve(None, {**env, "PGSERVICE": "shop"}).arguments["database"] == "shop"


def test_service_lookup_order(tmp_path, monkeypatch):
    user = tmp_path / "home"
    system = tmp_path / "etc"
    user.mkdir()
    system.mkdir()
    (system / "pg_service.conf").write_text("[shop]\nhost=system-db\n[only_system]\nhost=sys2\n")
    (user / ".pg_service.conf").write_text("[shop]\nhost=user-db\n")
    monkeypatch.setenv("HOME", str(user))
    env = {"PGSYSCONFDIR": str(system)}
    assert dsn.resolve("service=shop", env).arguments["host"] == "user-db"
    assert dsn.resolve("service=only_system", env).arguments["host"] == "sys2"
    explicit = service_file(tmp_path, "[shop]\nhost=explicit-db\n")
    assert dsn.resolve("service=shop", {**env, "PGSERVICEFILE": str(explicit)}).arguments["host"] == "explicit-db"


def test_service_errors_name_the_service_and_file(tmp_path):
    path = service_file(tmp_path, "[shop]\nhost=db\nhots=x\n")
    env = {"PGSERVICEFILE": str(path)}
    with pytest.raises(ConfigError, match="service 'nope' is not defined in"):
        dsn.resolve("service=nope", env)
    with pytest.raises(ConfigError, match=r"line 3 \(service shop\): unknown keyword hots"):
        dsn.resolve(None, {**env, "PGSERVICE": "shop"})


def test_libpq_only_environment_variables_are_honoured():
    env = {"PGOPTIONS": "-c work_mem=1MB", "PGAPPNAME": "mine", "PGCONNECT_TIMEOUT": "4"}
    arguments = dsn.resolve("host=db", env).arguments
    assert arguments["server_settings"] == {"options": "-c work_mem=1MB", "application_name": "mine"}
    assert arguments["timeout"] == 4.0
    assert dsn.resolve("host=db application_name=dsn", env).arguments["server_settings"]["application_name"] == "dsn"


def test_where_the_database_comes_from():
    assert dsn.describe_origin(None, False, {}).startswith("the embedded PostgreSQL")
    assert dsn.describe_origin("host=db", True, {}).startswith("the embedded PostgreSQL")
    assert dsn.describe_origin(None, False, {"PGHOST": "db", "PGPASSWORD": "x"}) == (
        "PG* environment (PGHOST, PGPASSWORD)"
    )
    assert dsn.describe_origin("host=db password=x", False, {}) == "DSN host=db password=***"
    assert "service 'gone' is not defined" in dsn.describe_origin(
        None, False, {"PGSERVICE": "gone", "PGSERVICEFILE": "/nonexistent"}
    )

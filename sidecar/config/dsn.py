"""PostgreSQL connection strings: libpq's two forms (a ``postgresql://`` URL or
``keyword=value`` pairs), services from pg_service.conf, and the asyncpg
arguments they mean.

asyncpg takes only URLs and ignores PGSERVICE, so the daemon reads both forms
the way libpq does and hands asyncpg keyword arguments; every connection it
opens is built by ``resolve``. Precedence is libpq's: the DSN, then the
service's entries, then the PG* environment and ~/.pgpass (asyncpg reads
those for whatever the arguments leave out). A password is only ever shown as
``***``: ``redact`` replaces the password fields of the parsed DSN, never the
password's text elsewhere (a password ``r`` must not garble other words).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from sidecar.errors import ConfigError

KEY = "database.dsn"
SCHEMES = ("postgresql://", "postgres://")

# libpq keywords this daemon honours (mapped in ``_arguments``).
KEYWORDS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "connect_timeout",
        "options",
        "application_name",
        "client_encoding",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "service",
    }
)
# libpq keywords asyncpg has no equivalent for: silently dropping one could
# change what the user asked for (a replication connection, TCP keepalives).
UNSUPPORTED = frozenset(
    {
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "gssdelegation",
        "requiressl",
        "require_auth",
        "channel_binding",
        "sslcompression",
        "sslcertmode",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "load_balance_hosts",
    }
)
CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "primary", "standby", "prefer-standby", "read-write", "read-only"),
    "sslnegotiation": ("postgres", "direct"),
    "gsslib": ("gssapi", "sspi"),
}
# asyncpg takes the TLS files only from a URL's query, not as arguments.
TLS_FILES = (
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
)
# PG* variables libpq reads that asyncpg does not; the daemon fills them in itself.
ENV_ONLY_LIBPQ = {"PGOPTIONS": "options", "PGAPPNAME": "application_name", "PGCONNECT_TIMEOUT": "connect_timeout"}
# Any of these means "the database is given by the environment" (else: the embedded one).
SELECTORS = ("PGHOST", "PGDATABASE", "PGSERVICE")
PG_VARIABLES = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGSSLMODE",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLROOTCERT",
    "PGSSLCRL",
    "PGTARGETSESSIONATTRS",
)


def _error(problem: str) -> ConfigError:
    return ConfigError(KEY, problem)


# ---------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Field:
    """One keyword's value, and where its text is in the DSN (for redaction)."""

    key: str
    value: str
    start: int
    end: int
    shown: str = "***"  # what the span becomes when redacted


def parse(text: str) -> dict[str, str]:
    """A DSN's keywords (libpq's names) and values; empty values count as not given.

    Raises ``ConfigError`` (key ``database.dsn``) naming the problem, never a password.
    """
    params: dict[str, str] = {}
    for item in _fields(text):
        if item.value:
            params[item.key] = item.value
        else:
            params.pop(item.key, None)
    _check_hosts(params)
    return params


def is_url(text: str) -> bool:
    return text.lstrip().lower().startswith(SCHEMES)


def _fields(text: str) -> list[_Field]:
    if is_url(text):
        return _url_fields(text)
    if re.match(r"\s*[A-Za-z][A-Za-z0-9+.-]*://", text):
        scheme = text.strip().split("://", 1)[0]
        raise _error(f"a URL must start with postgresql:// or postgres://, not {scheme}://")
    return _keyword_fields(text)


def _keyword_fields(text: str) -> list[_Field]:
    """libpq's ``keyword = value`` syntax: whitespace-separated pairs, spaces allowed
    around ``=``, values bare or single-quoted, ``\\`` escaping the next character."""
    fields: list[_Field] = []
    i, n = 0, len(text)
    previous: str | None = None
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        start = i
        while i < n and not text[i].isspace() and text[i] != "=":
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise _error(_missing_equals(text, previous))
        _check_keyword(key, previous)
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value_start = i
        chars: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise _error(f"unterminated quoted value for {key} (a quote inside is written \\')")
                if text[i] == "\\" and i + 1 < n:
                    chars.append(text[i + 1])
                    i += 2
                elif text[i] == "'":
                    i += 1
                    break
                else:
                    chars.append(text[i])
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\":
                    i += 1
                    if i < n:
                        chars.append(text[i])
                        i += 1
                else:
                    chars.append(text[i])
                    i += 1
        value = "".join(chars)
        _check_value(key, value)
        fields.append(_Field(key, value, value_start, i))
        previous = key
    return fields


def _missing_equals(text: str, previous: str | None) -> str:
    if previous is not None:
        # (the stray word is not echoed: it may be the rest of a password)
        return (
            f"missing \"=\" after the value of {previous}: a value containing spaces must be quoted, {previous}='...'"
        )
    lowered = text.strip().lower()
    if lowered.startswith("postgres"):
        return "neither key=value pairs nor a URL: a URL starts with postgresql:// or postgres://"
    return "neither a URL (postgresql://...) nor key=value pairs (host=... dbname=...)"


def _check_keyword(key: str, previous: str | None, url: bool = False) -> None:
    if key in KEYWORDS:
        return
    if not key:
        raise _error('"=" without a keyword before it')
    if previous == "password":  # (the word is not echoed: it may be the rest of a password)
        fix = "write & in a password as %26" if url else "a value containing spaces must be quoted"
        raise _error(f"unknown keyword after the password's value: {fix}")
    if key in UNSUPPORTED:
        raise _error(f"{key}: a libpq keyword the daemon's driver (asyncpg) has no equivalent for; remove it")
    if key == "database":
        raise _error("unknown keyword database (did you mean dbname?)")
    close = difflib.get_close_matches(key, sorted(KEYWORDS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else " (server settings go in options='-c name=value')"
    raise _error(f"unknown keyword {key}{hint}")


def _check_value(key: str, value: str) -> None:
    if not value:
        return
    if key == "port":
        for part in value.split(","):
            if part and not (part.isdigit() and 0 < int(part) < 65536):
                raise _error(f"port {part!r} is not a port number (1-65535)")
    elif key == "connect_timeout":
        try:
            seconds = float(value)
        except ValueError:
            raise _error(f"connect_timeout {value!r} is not a number of seconds") from None
        if not seconds > 0:
            raise _error("connect_timeout must be a positive number of seconds (waiting forever is not offered)")
    elif key in CHOICES and value.lower() not in CHOICES[key]:
        raise _error(f"{key} must be one of {', '.join(CHOICES[key])}, not {value!r}")
    elif key == "client_encoding" and value.lower().replace("-", "") not in ("utf8", "unicode"):
        raise _error(f"client_encoding {value!r}: the driver always speaks UTF8")


def _check_hosts(params: Mapping[str, str]) -> None:
    if "host" in params and "hostaddr" in params:
        raise _error("give host or hostaddr, not both (the driver verifies TLS against what it connects to)")
    hosts = (params.get("host") or params.get("hostaddr") or "").split(",")
    ports = params.get("port", "").split(",")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise _error(f"{len(ports)} ports for {len(hosts)} hosts: give one port, or one per host")


_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(text: str, part: str) -> str:
    if _PERCENT.search(text):
        raise _error(f"invalid percent-encoding in the URL's {part} (write % as %25)")
    return unquote(text)


def _url_fields(text: str) -> list[_Field]:
    """libpq's URI syntax: postgresql://[user[:password]@][host[:port][,...]][/dbname][?keyword=value&...]."""
    offset = len(text) - len(text.lstrip())
    start = offset + text[offset:].index("://") + 3
    fields: list[_Field] = []
    rest = text[start:]
    authority_end = len(rest)
    for stop in "/?":
        if stop in rest:
            authority_end = min(authority_end, rest.index(stop))
    authority = rest[:authority_end]
    # libpq: the user part ends at the first "@" before any "/" (a password's "@" must be %40).
    if "@" in authority:
        userinfo, hostspec = authority.split("@", 1)
        hosts_start = start + len(userinfo) + 1
        user, colon, password = userinfo.partition(":")
        if user:
            fields.append(_Field("user", _decode(user, "user name"), start, start + len(user)))
        if colon:
            at = start + len(user)
            shown = ":***" if password else ""  # (an empty password: drop the colon too)
            fields.append(_Field("password", _decode(password, "password"), at, at + 1 + len(password), shown))
    else:
        hostspec, hosts_start = authority, start
    hosts: list[str] = []
    ports: list[str] = []
    for entry in hostspec.split(",") if hostspec else []:
        match = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::([^:]*))?", entry)
        if match is None:
            raise _error("the URL's host part is not host[:port][,host[:port]...] (an IPv6 address goes in [ ])")
        host, port = match.group(1), match.group(2) or ""
        hosts.append(_decode(host[1:-1] if host.startswith("[") else host, "host"))
        ports.append(port)
    for port in ports:
        _check_value("port", port)
    if any(hosts):
        fields.append(_Field("host", ",".join(hosts), hosts_start, hosts_start + len(hostspec)))
    if any(ports):
        fields.append(_Field("port", ",".join(ports), hosts_start, hosts_start + len(hostspec)))
    tail = rest[authority_end:]
    path, _, query = tail.partition("?")
    if path.startswith("/") and path[1:]:
        fields.append(_Field("dbname", _decode(path[1:], "database name"), 0, 0))
    position = start + authority_end + len(path) + 1
    previous: str | None = None
    for item in query.split("&") if query else []:
        if "=" not in item:
            raise _error(
                "a URL query parameter without '='"
                + (" (after password: write & in a password as %26)" if previous == "password" else "")
            )
        raw_key, raw_value = item.split("=", 1)
        key = _decode(raw_key, "query")
        value = _decode(raw_value, "query")
        if key == "ssl" and value.lower() == "true":  # libpq's JDBC compatibility
            key, value = "sslmode", "require"
        _check_keyword(key, previous, url=True)
        _check_value(key, value)
        value_start = position + len(raw_key) + 1
        fields.append(_Field(key, value, value_start, value_start + len(raw_value)))
        position += len(item) + 1
        previous = key
    return fields


# ---------------------------------------------------------------- redaction


def password(text: str) -> str | None:
    """The DSN's password, if it carries one (``None`` also when it cannot be parsed)."""
    try:
        return parse(text).get("password")
    except ConfigError:
        return None


def redact(text: str) -> str:
    """The DSN with the value of each password field replaced, safe to show."""
    try:
        fields = _fields(text)
    except ConfigError:
        # Where a password would be is unknown in a DSN that does not parse.
        return "(a DSN that cannot be parsed)"
    secrets = sorted((f for f in fields if f.key == "password" and f.end > f.start), key=lambda f: f.start)
    shown: list[str] = []
    last = 0
    for secret in secrets:
        shown.append(text[last : secret.start])
        shown.append(secret.shown)
        last = secret.end
    shown.append(text[last:])
    return "".join(shown)


def without_password(text: str) -> str | None:
    """The DSN with its password left out (``None`` if that cannot be done cleanly): what
    ``--print-config`` writes, so that the file loads back and the password comes from where
    libpq would look next (PGPASSWORD, the passfile)."""
    try:
        fields = _fields(text)
    except ConfigError:
        return None
    spans = []
    for field in fields:
        if field.key != "password":
            continue
        start, end = field.start, field.end
        if field.shown != ":***":  # keyword=value (or a URL's ?password=): the keyword goes too
            start = text.rfind("password", 0, start)
            if start < 0:
                return None
            if text[start - 1 : start] == "&":
                start -= 1
            elif text[start - 1 : start] == "?":
                if text[end : end + 1] == "&":
                    end += 1
                else:
                    start -= 1
            else:
                while end < len(text) and text[end].isspace():
                    end += 1
        spans.append((start, end))
    shown, last = [], 0
    for start, end in sorted(spans):
        shown.append(text[last:start])
        last = end
    shown.append(text[last:])
    result = "".join(shown).rstrip()
    return result if password(result) is None else None


def scrub(message: str, dsn: str | None) -> str:
    """``message`` with the DSN (as a whole) replaced by its redacted form: a driver
    error may echo it. Nothing else is touched."""
    if not dsn:
        return message
    return message.replace(dsn, redact(dsn))


# ---------------------------------------------------------------- services


@dataclass(frozen=True)
class Service:
    name: str
    path: Path
    params: dict[str, str]


def service_files(environ: Mapping[str, str]) -> list[Path]:
    """Where libpq looks for a service, in order: the user's file, then the system's."""
    user = environ.get("PGSERVICEFILE")
    files = [Path(user) if user else Path(os.path.expanduser("~")) / ".pg_service.conf"]
    if environ.get("PGSYSCONFDIR"):
        files.append(Path(environ["PGSYSCONFDIR"]) / "pg_service.conf")
    return files


def lookup_service(name: str, environ: Mapping[str, str]) -> Service:
    """The keywords of service ``name`` (the first file that defines it wins)."""
    files = service_files(environ)
    for path in files:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _error(f"cannot read the service file {path}: {exc.strerror}") from None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise _error(f"the service file {path} is not UTF-8 text") from None
        params = _read_service(text, name, path)
        if params is not None:
            return Service(name, path, params)
    raise _error(f"service {name!r} is not defined in {' or '.join(str(p) for p in files)}")


def _read_service(text: str, name: str, path: Path) -> dict[str, str] | None:
    section: str | None = None
    found: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise _error(f"{path}, line {number}: a section header is [name]")
            if found is not None:
                return found
            section = line[1:-1].strip()
            found = {} if section == name else None
            continue
        key, equals, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            raise _error(f"{path}, line {number}: expected keyword=value")
        if found is None:
            continue
        if key == "service":
            raise _error(f"{path}, line {number}: a service cannot name another service")
        try:
            _check_keyword(key, None)
            _check_value(key, value)
        except ConfigError as exc:
            raise _error(f"{path}, line {number} (service {name}): {exc.problem}") from None
        if value:
            found[key] = value
    if found is not None:
        _check_hosts(found)
    return found


# ---------------------------------------------------------------- asyncpg arguments


@dataclass(frozen=True)
class Target:
    """How to connect: asyncpg ``connect()`` arguments, and words for messages."""

    arguments: dict[str, Any]
    origin: str  # where the settings came from, password redacted
    address: str  # the socket(s) or host:port(s) that will be tried


def resolve(dsn: str | None, environ: Mapping[str, str] | None = None) -> Target:
    """The DSN (or the PG* environment), with its service filled in, as asyncpg arguments."""
    environ = os.environ if environ is None else environ
    params = parse(dsn) if dsn else {}
    origin = f"DSN {redact(dsn)}" if dsn else _environment_origin(environ)
    service_name = params.pop("service", None) or environ.get("PGSERVICE") or None
    if service_name:
        service = lookup_service(service_name, environ)
        for key, value in service.params.items():
            params.setdefault(key, value)
        _check_hosts(params)
        origin += f", service {service_name} from {service.path}"
    for variable, key in ENV_ONLY_LIBPQ.items():
        if environ.get(variable) and key not in params:
            try:
                _check_value(key, environ[variable])
            except ConfigError as exc:
                raise _error(f"{variable}: {exc.problem}") from None
            params[key] = environ[variable]
    return Target(_arguments(params), origin, _address(params, environ))


def _environment_origin(environ: Mapping[str, str]) -> str:
    given = [name for name in PG_VARIABLES if environ.get(name)]
    return f"PG* environment ({', '.join(given)})" if given else "PG* environment (none set: libpq's defaults)"


def _arguments(params: Mapping[str, str]) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    host = params.get("host") or params.get("hostaddr")
    if host:
        hosts = host.split(",")
        arguments["host"] = hosts if len(hosts) > 1 else host
    if params.get("port"):
        ports = [int(p) if p else 5432 for p in params["port"].split(",")]
        arguments["port"] = ports if len(ports) > 1 else ports[0]
    for key, argument in (
        ("user", "user"),
        ("password", "password"),
        ("passfile", "passfile"),
        ("dbname", "database"),
        ("sslmode", "ssl"),
        ("target_session_attrs", "target_session_attrs"),
        ("krbsrvname", "krbsrvname"),
        ("gsslib", "gsslib"),
    ):
        if params.get(key):
            arguments[argument] = params[key].lower() if key in CHOICES else params[key]
    if params.get("connect_timeout"):
        arguments["timeout"] = float(params["connect_timeout"])
    session = {key: params[key] for key in ("options", "application_name") if params.get(key)}
    if session:
        # Startup parameters: the server reads "options" as its command-line switches.
        arguments["server_settings"] = session
    tls = {key: params[key] for key in TLS_FILES if params.get(key)}
    if tls:
        arguments["dsn"] = "postgresql://?" + urlencode(tls, quote_via=quote)
    return arguments


def _address(params: Mapping[str, str], environ: Mapping[str, str]) -> str:
    host = params.get("host") or params.get("hostaddr") or environ.get("PGHOST") or ""
    port_text = params.get("port") or environ.get("PGPORT") or "5432"
    if not host:
        return (
            f"the default server (a Unix socket in /run/postgresql, /var/run/postgresql or /tmp; localhost:{port_text})"
        )
    hosts = host.split(",")
    ports = port_text.split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    shown = []
    for name, port in zip(hosts, ports, strict=False):
        port = port or "5432"
        if name.startswith("/"):
            shown.append(name if ".s.PGSQL." in name else f"{name.rstrip('/')}/.s.PGSQL.{port}")
        else:
            shown.append(f"[{name}]:{port}" if ":" in name else f"{name}:{port}")
    return ", ".join(shown)


def given(dsn: str | None, environ: Mapping[str, str]) -> bool:
    """Whether a database is given at all (else the daemon may start an embedded one)."""
    return dsn is not None or any(environ.get(v) for v in SELECTORS)


def describe_origin(dsn: str | None, embedded: bool, environ: Mapping[str, str]) -> str:
    """Where the database comes from, in words, for ``--print-config``."""
    if embedded:
        return "the embedded PostgreSQL (database.embedded = true)"
    if not given(dsn, environ):
        return "the embedded PostgreSQL (no DSN, and none of " + ", ".join(SELECTORS) + " set)"
    try:
        return resolve(dsn, environ).origin
    except ConfigError as exc:
        return f"{'DSN ' + redact(dsn) if dsn else _environment_origin(environ)}, but {exc.problem}"

"""Loading the configuration from its three sources -- a TOML file, the environment
and flags (in rising order of precedence) -- into one checked ``Config``; every
problem is a ``ConfigError`` naming the offending key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sidecar.config import dsn as dsn_module
from sidecar.config.settings import ENV_PREFIX, SETTINGS, SETTINGS_BY_KEY, Config, Setting, validate
from sidecar.config.specs import TableConfig, parse_table_spec, read_tables
from sidecar.errors import ConfigError

TABLES_ENV = ENV_PREFIX + "TABLES"


CONFIG_ENV = ENV_PREFIX + "CONFIG"


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
    validate(config)
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
            tables = read_tables(content)
            continue
        if not isinstance(content, dict):
            raise ConfigError(section, f"unknown key{_suggest_section(section)}")
        for name, value in content.items():
            key = f"{section}.{name}"
            setting = SETTINGS_BY_KEY.get(key)
            if setting is None:
                raise ConfigError(key, f"unknown key{_suggest(key)}")
            values[setting.attr] = _check(setting, value, key)
    return values, tables


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


def _split_list(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(SETTINGS_BY_KEY), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _suggest_section(section: str) -> str:
    """ " (did you mean [[tables]]?)" for a misspelt section or array of tables."""
    import difflib

    sections = sorted({s.key.split(".")[0] for s in SETTINGS})
    close = difflib.get_close_matches(section, [*sections, "tables"], n=1)
    if not close:
        return " (settings live in sections such as [server]; tables in [[tables]])"
    return f" (did you mean {'[[tables]]' if close[0] == 'tables' else f'[{close[0]}]'}?)"

"""The configuration: ``settings`` declares each setting once (``Config``), ``specs`` the
tables, relations and indexes, ``loading`` reads file, environment and flags into both;
``addresses`` and ``dsn`` parse the values of two kinds of setting."""

from sidecar.config.loading import CONFIG_ENV, TABLES_ENV, load
from sidecar.config.settings import DEFAULT_LISTEN, ENV_PREFIX, SETTINGS, SETTINGS_BY_KEY, Config, Setting, describe
from sidecar.config.specs import TABLE_MODES, IndexConfig, RelationSource, TableConfig, TableMode, parse_table_spec

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_LISTEN",
    "ENV_PREFIX",
    "SETTINGS",
    "SETTINGS_BY_KEY",
    "TABLES_ENV",
    "TABLE_MODES",
    "Config",
    "IndexConfig",
    "RelationSource",
    "Setting",
    "TableConfig",
    "TableMode",
    "describe",
    "load",
    "parse_table_spec",
]

"""TEMP stand-in (the helper's branch replaces it)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.core.schema import TableSchema
from sidecar.identifiers import quote_ident
from sidecar.pg import triggers


@dataclass
class Publication:
    name: str
    tables: list[str]

    @classmethod
    def of(cls, schemas: Sequence[TableSchema]) -> Publication:
        sets = triggers.trigger_sets(schemas, "x", 1)
        names = sorted(f"{quote_ident(t.schema.config.schema)}.{quote_ident(t.schema.config.name)}" for t in sets)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
        return cls(f"cache_sidecar_{digest}", names)


async def check_or_install(conn: Any, config: Any, schemas: Sequence[TableSchema]) -> None:
    pub = Publication.of(schemas)
    if await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", pub.name):
        return
    await conn.execute(
        f"CREATE PUBLICATION {quote_ident(pub.name)} FOR TABLE {', '.join(pub.tables)} "
        "WITH (publish_via_partition_root = false)"
    )

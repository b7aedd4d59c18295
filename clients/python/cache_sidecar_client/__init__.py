"""Client for cache-sidecar: PostgreSQL tables cached in memory, served over gRPC.

from cache_sidecar_client import Client

with Client("127.0.0.1:50051", near_cache=["public.patron"]) as cache:
    patron = cache.get("public.patron", 1)        # dict, or None
    rows = cache.batch_get("public.patron", [1, 2, 3])
    in_oslo = cache.query("public.patron", "by_city", ["Oslo"]).rows  # a declared index
    for change in cache.changes(["public.patron"], operations=["insert"]):
        ...
"""

from cache_sidecar_client._convert import IndexInfo, QueryResult, Revision, TableInfo
from cache_sidecar_client.client import AsyncClient, Client
from cache_sidecar_client.decorators import CacheInfo, cached
from cache_sidecar_client.errors import (
    CacheSidecarError,
    DeadlineExceeded,
    InvalidArgument,
    OutOfRange,
    TableNotFound,
    TooLarge,
    Unavailable,
    UndecodableRow,
)
from cache_sidecar_client.near import NearCache, NearCacheStats
from cache_sidecar_client.watch import Change, ChangeBatch, InitialStateDone, Progress, Reset

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CacheInfo",
    "CacheSidecarError",
    "Change",
    "ChangeBatch",
    "Client",
    "DeadlineExceeded",
    "IndexInfo",
    "InitialStateDone",
    "InvalidArgument",
    "NearCache",
    "NearCacheStats",
    "OutOfRange",
    "Progress",
    "QueryResult",
    "Reset",
    "Revision",
    "TableInfo",
    "TableNotFound",
    "TooLarge",
    "Unavailable",
    "UndecodableRow",
    "cached",
]

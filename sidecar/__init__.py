"""cache-sidecar: PostgreSQL tables cached in memory, kept current from LISTEN/NOTIFY, served over gRPC."""

__version__ = "0.1.0"

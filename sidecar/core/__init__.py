"""The cache itself, plain Python: tables, revisions, the ingest of changes, reads and Watch.

Imports neither grpc nor asyncpg, nor the folders that do (pyproject.toml's import contracts)."""

"""The PostgreSQL adapter: the query pool, the LISTEN connection, triggers, the catalog check."""

-- The demo table of the patron service and the sidecar's role (run once by the postgres
-- image, as the superuser, in the database app).
CREATE TABLE IF NOT EXISTS public.patron (
    id serial PRIMARY KEY,
    name text NOT NULL,
    fav_dish text
);
INSERT INTO public.patron (name, fav_dish) VALUES
    ('Ada', 'pancakes'), ('Grace', 'curry'), ('Linus', 'herring'), ('Barbara', 'ramen'), ('Edsger', 'stroopwafel');

-- The sidecar reads, nothing more: SELECT on the cached table. The triggers are installed
-- by the table's owner (the compose service "triggers"), not by this role.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cache_sidecar') THEN
        CREATE ROLE cache_sidecar LOGIN PASSWORD 'example-sidecar';
    END IF;
END
$$;
GRANT CONNECT ON DATABASE app TO cache_sidecar;
GRANT USAGE ON SCHEMA public TO cache_sidecar;
GRANT SELECT ON public.patron TO cache_sidecar;

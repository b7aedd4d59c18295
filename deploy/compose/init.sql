-- The demo table of the patron service (run once by the postgres image).
CREATE TABLE IF NOT EXISTS public.patron (
    id serial PRIMARY KEY,
    name text NOT NULL,
    fav_dish text
);
INSERT INTO public.patron (name, fav_dish) VALUES
    ('Ada', 'pancakes'), ('Grace', 'curry'), ('Linus', 'herring'), ('Barbara', 'ramen'), ('Edsger', 'stroopwafel');

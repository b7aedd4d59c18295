-- tablecache's basic example: users, cities, and which city each user lives in.
CREATE TABLE users (
    user_id integer PRIMARY KEY,
    name text NOT NULL,
    nickname text
);
CREATE TABLE cities (
    city_id integer PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE users_cities (
    user_id integer PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    city_id integer NOT NULL REFERENCES cities (city_id)
);

INSERT INTO users VALUES (1, 'User 1', 'u1'), (2, 'User 2', 'u2'), (3, 'User 3', NULL);
INSERT INTO cities VALUES (1, 'City 1'), (2, 'City 2');
INSERT INTO users_cities VALUES (1, 1), (2, 2), (3, 1);

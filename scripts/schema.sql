-- The demo schema, created directly on EVERY shard (scripts/demo.sh, scripts/test.sh).
-- Idempotent: safe to run again on a shard that already has it.
--
-- users, orders and events are sharded by user_id (distribution `users`, hash);
-- accounts by account_id (distribution `accounts`, range); countries is a reference
-- table with the same rows on every shard. The shard key is part of every primary key,
-- so each shard can enforce uniqueness for the keys it owns and logical replication can
-- move rows (the key is in the replica identity).

CREATE TABLE IF NOT EXISTS users (
    user_id    bigint PRIMARY KEY,
    name       text,
    email      text,
    created_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
    order_id   bigint,
    user_id    bigint,
    amount     numeric(10, 2),
    status     text,
    created_at timestamptz DEFAULT now(),
    PRIMARY KEY (user_id, order_id)
);

CREATE TABLE IF NOT EXISTS events (
    user_id  bigint,
    event_id bigint,
    kind     text,
    payload  jsonb,
    at       timestamptz DEFAULT now(),
    PRIMARY KEY (user_id, event_id)
);

CREATE TABLE IF NOT EXISTS accounts (
    account_id bigint PRIMARY KEY,
    owner      text,
    balance    numeric
);

CREATE TABLE IF NOT EXISTS countries (
    code text PRIMARY KEY,
    name text
);

INSERT INTO countries (code, name) VALUES
    ('AR', 'Argentina'),
    ('AU', 'Australia'),
    ('BR', 'Brazil'),
    ('CA', 'Canada'),
    ('DE', 'Germany'),
    ('ES', 'Spain'),
    ('FR', 'France'),
    ('GB', 'United Kingdom'),
    ('IN', 'India'),
    ('JP', 'Japan'),
    ('KE', 'Kenya'),
    ('MX', 'Mexico'),
    ('NL', 'Netherlands'),
    ('NO', 'Norway'),
    ('US', 'United States')
ON CONFLICT (code) DO NOTHING;

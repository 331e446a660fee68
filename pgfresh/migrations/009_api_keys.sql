-- API keys of the HTTP API (pgfresh serve): each bound to one tenant or to admin.
-- Only a SHA-256 of the key is stored; the key itself is shown once, by `pgfresh keys create`.
create table if not exists pgfresh.api_keys (
    id bigserial primary key,
    name text not null default '',
    tenant text,                      -- the one tenant this key may read (null: rows without a tenant)
    admin boolean not null default false,  -- any tenant, and the admin endpoints
    key_hash text not null unique,    -- hex sha256 of the key
    prefix text not null,             -- the key's first characters, to recognise it in listings
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    last_used_at timestamptz
);

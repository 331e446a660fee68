-- The built-in `shop` workload: a multi-tenant store. `shop_id` is the tenant of every table.
-- Created fresh (the arena drops schema shop first); rows are seeded by pgfresh.arena.workload.
create schema shop;

create table shop.shops (
    shop_id     integer     primary key,
    name        text        not null unique,
    city        text        not null
);

create table shop.products (
    product_id  integer     primary key,
    shop_id     integer     not null references shop.shops,
    name        text        not null,
    category    text        not null,
    price       numeric(10, 2),                 -- null while a row is half-finished
    stock       integer     not null default 0,
    status      text        not null default 'draft' check (status in ('draft', 'published')),
    description text,
    updated_at  timestamptz not null default now()
);
create index on shop.products (shop_id);
-- Names are unique across shops so a question names exactly one product.
create unique index on shop.products (name);

create table shop.support_notes (
    note_id     integer     primary key,
    shop_id     integer     not null references shop.shops,
    product_id  integer,                        -- no foreign key: a note outlives its product
    body        text        not null,
    created_at  timestamptz not null default now()
);
create index on shop.support_notes (shop_id);

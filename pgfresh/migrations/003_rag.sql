-- requires extension: vector
-- 003: rag. The hybrid index (documents: pgvector + full text), the queue between the change log
-- and the embedder, freshness, and the answer cache with its lineage.

create extension if not exists vector;

-- One row per index generation: which embedder built it. Exactly one generation is 'active' (the
-- one search reads); when the configured embedder changes, a 'building' one is filled in the
-- background while the active one keeps serving, then the two switch in one transaction.
create table pgfresh.rag_indexes (
    id               integer     generated always as identity primary key,
    embedder         text        not null,
    embedder_version text        not null,
    dim              integer     not null,
    state            text        not null check (state in ('building', 'active', 'retired')),
    backfill_tbl     text,                       -- how far the background re-embedding got (tbl, key)
    backfill_key     text,
    created_at       timestamptz not null default now(),
    activated_at     timestamptz,
    retired_at       timestamptz,
    cleaned_at       timestamptz                 -- a retired generation's documents and HNSW index are gone
);
create unique index rag_indexes_one_active on pgfresh.rag_indexes ((true)) where state = 'active';
create unique index rag_indexes_one_building on pgfresh.rag_indexes ((true)) where state = 'building';

-- One document per (generation, source row). The vector column has no fixed dimension so that
-- generations of different embedders can coexist; each generation has its own partial HNSW index
-- on `embedding::vector(dim)`, created by the index worker (pgvector's documented way to index
-- vectors of several dimensions in one column). A null embedding: the generation's embedder could
-- not be loaded for this version of the row; lexical search still finds it.
create table pgfresh.documents (
    index_id         integer     not null references pgfresh.rag_indexes (id),
    tbl              text        not null,
    key              text        not null,
    tenant           text,
    text             text        not null,
    tsv              tsvector    not null,       -- stemmed words + bigrams of unsegmented scripts
    embedding        vector,
    embedder         text        not null,
    embedder_version text        not null,
    lsn              pg_lsn      not null,       -- the change this version of the document comes from
    commit_time      timestamptz,                -- its commit on the source
    indexed_at       timestamptz not null default clock_timestamp(),
    primary key (index_id, tbl, key)
);
create index documents_tsv on pgfresh.documents using gin (tsv);
create index documents_tenant on pgfresh.documents (index_id, tenant);

-- Rendered changes waiting for the embedder. Filled from the change log in one short transaction
-- (with the consumer's advance), emptied in another (with the documents' upsert), so embedding
-- happens outside any transaction and every change reaches the index exactly once.
create table pgfresh.index_queue (
    id          bigserial   primary key,
    tbl         text        not null,
    key         text        not null,
    tenant      text,
    op          text        not null check (op in ('upsert', 'delete', 'truncate')),
    text        text,
    lsn         pg_lsn      not null,
    commit_time timestamptz,
    live        boolean     not null default true, -- false for snapshot reads: no commit-to-searchable figure
    queued_at   timestamptz not null default clock_timestamp()
);
create index index_queue_row on pgfresh.index_queue (tbl, key);

-- Commit -> searchable time of each streamed change, as a histogram: bucket b holds delays in
-- [1.1^b - 1, 1.1^(b+1) - 1) milliseconds (so percentiles are exact within 10%).
create table pgfresh.rag_freshness (
    bucket  integer primary key,
    n       bigint  not null
);

create table pgfresh.rag_counters (
    name    text    primary key,
    value   bigint  not null default 0
);
insert into pgfresh.rag_counters (name) values
    ('cache_hits'), ('cache_misses'), ('cache_stores'), ('cache_invalidations'), ('cache_refused_stale');

-- Answer cache: keyed by tenant, reader and normalised question; also found by question embedding
-- similarity within the same tenant and reader. `answer_cache_sources` is its lineage.
create table pgfresh.answer_cache (
    id          bigserial   primary key,
    tenant      text        not null,            -- '' for a table without tenants
    reader      text        not null,            -- reader identity ('' when none is configured)
    question    text        not null,            -- normalised
    salient     text        not null,            -- numbers and identifiers in the question (similarity guard)
    index_id    integer     not null,
    qvec        vector,
    result      jsonb       not null,
    hits        bigint      not null default 0,
    created_at  timestamptz not null default now()
);
create unique index answer_cache_key on pgfresh.answer_cache (tenant, reader, question);

create table pgfresh.answer_cache_sources (
    entry_id    bigint      not null references pgfresh.answer_cache (id) on delete cascade,
    tbl         text        not null,
    key         text        not null,
    lsn         pg_lsn      not null,
    primary key (entry_id, tbl, key)
);
create index answer_cache_sources_row on pgfresh.answer_cache_sources (tbl, key);

-- Invalidation runs in capture's own transaction, the one that appends the change: once a change
-- to a source row commits in pgfresh, no cache entry built from that row exists any more.
-- The advisory lock (per table, exclusive here, shared when an entry is stored) closes the race
-- with an entry being stored concurrently: the store re-checks pgfresh.rows under the lock.
create function pgfresh.answer_cache_invalidate() returns trigger
language plpgsql as $$
declare
    t text;
    gone bigint;
begin
    for t in select d.tbl from (select distinct c.tbl from new_changes c) d order by hashtext(d.tbl), d.tbl loop
        perform pg_advisory_xact_lock(1885824611, hashtext(t));
    end loop;
    with doomed as (
        delete from pgfresh.answer_cache e
        where e.id in (select s.entry_id from pgfresh.answer_cache_sources s
                       join new_changes c on c.tbl = s.tbl and (c.key = s.key or c.op = 'truncate'))
        returning 1)
    select count(*) into gone from doomed;
    if gone > 0 then
        update pgfresh.rag_counters set value = value + gone where name = 'cache_invalidations';
    end if;
    return null;
end $$;

create trigger answer_cache_invalidate after insert on pgfresh.changes
    referencing new table as new_changes
    for each statement execute function pgfresh.answer_cache_invalidate();

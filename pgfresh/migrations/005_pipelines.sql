-- 005: pipelines and tenant safety.
--
-- A pipeline is one slot + publication + its configured tables (issue 10 calls it a *source*). Its
-- name defaults to the slot's. Every piece of progress is keyed by it: several pipelines can share
-- one database without sharing a position. Existing rows belong to 'pgfresh', the default slot's
-- name; the column defaults keep code that names no pipeline on the default one.
--
-- The configured tables of each pipeline, with their tenant column, are kept in pgfresh.tables
-- (written at the start of `pgfresh sync`); triggers use it so that a fact or document of a tenant
-- table can never be stored without its tenant (a constraint, not a convention).

create table pgfresh.tables (
    pipeline      text        not null,
    tbl           text        not null,           -- schema.table
    tenant_column text,                           -- null: the table has no tenants
    configured    boolean     not null default true, -- false: removed from the config; its changes are dropped
    updated_at    timestamptz not null default now(),
    primary key (pipeline, tbl)
);
-- A table belongs to one pipeline per database: documents and facts are keyed by (tbl, key).
create unique index tables_one_pipeline on pgfresh.tables (tbl);

-- Changes the stream delivered for tables the pipeline no longer captures: counted, never applied.
create table pgfresh.dropped_changes (
    pipeline    text        not null,
    tbl         text        not null,
    changes     bigint      not null default 0,
    last_lsn    pg_lsn,
    updated_at  timestamptz not null default now(),
    primary key (pipeline, tbl)
);

alter table pgfresh.rows add column pipeline text not null default 'pgfresh';
alter table pgfresh.rows drop constraint rows_pkey, add primary key (pipeline, tbl, key);

alter table pgfresh.changes add column pipeline text not null default 'pgfresh';
create index changes_by_pipeline on pgfresh.changes (pipeline, seq);

alter table pgfresh.consumers add column pipeline text not null default 'pgfresh';
alter table pgfresh.consumers drop constraint consumers_pkey, add primary key (pipeline, name);

alter table pgfresh.sink_progress add column pipeline text not null default 'pgfresh';
alter table pgfresh.sink_progress drop constraint sink_progress_pkey, add primary key (pipeline, sink);

alter table pgfresh.snapshot_progress add column pipeline text not null default 'pgfresh';
alter table pgfresh.snapshot_progress drop constraint snapshot_progress_pkey, add primary key (pipeline, tbl);

-- Worker names stay the primary key (a non-default pipeline's are suffixed '@pipeline').
alter table pgfresh.workers add column pipeline text not null default 'pgfresh';

alter table pgfresh.facts add column pipeline text not null default 'pgfresh';

-- Capture: a row or change of a tenant table has a tenant unless the row itself has none (a NULL in
-- the source's tenant column, which the gate quarantines). A delete whose tenant is not in the key
-- takes it from the stored row; this catches one that does not.
create function pgfresh.check_captured_tenant() returns trigger
language plpgsql as $$
declare
    bad record;
begin
    select n.tbl, n.key into bad from new_rows n
    join pgfresh.tables t on t.pipeline = n.pipeline and t.tbl = n.tbl
    where t.tenant_column is not null and n.tenant is null and n.row ->> t.tenant_column is not null
    limit 1;
    if found then
        raise exception 'pgfresh.%: row % of tenant table % has no tenant', tg_table_name, bad.key, bad.tbl
            using errcode = 'check_violation';
    end if;
    return null;
end $$;

create trigger rows_tenant_insert after insert on pgfresh.rows
    referencing new table as new_rows for each statement execute function pgfresh.check_captured_tenant();
create trigger rows_tenant_update after update on pgfresh.rows
    referencing new table as new_rows for each statement execute function pgfresh.check_captured_tenant();
create trigger changes_tenant after insert on pgfresh.changes
    referencing new table as new_rows for each statement execute function pgfresh.check_captured_tenant();

-- Facts and documents: the pipeline is the one of their table, and a tenant table's have a tenant.
create function pgfresh.check_rendered_tenant() returns trigger
language plpgsql as $$
declare
    t pgfresh.tables%rowtype;
begin
    select * into t from pgfresh.tables where tbl = new.tbl;
    if found then
        new.pipeline := t.pipeline;
        if t.tenant_column is not null and new.tenant is null then
            raise exception 'pgfresh.%: % of tenant table % (key %) has no tenant', tg_table_name,
                case when tg_table_name = 'facts' then 'a fact' else 'a document' end, new.tbl, new.key
                using errcode = 'check_violation';
        end if;
    end if;
    return new;
end $$;

create trigger facts_tenant before insert or update of tenant, tbl on pgfresh.facts
    for each row execute function pgfresh.check_rendered_tenant();

-- pgfresh.documents exists where the server has pgvector (migration 003). Where 003 is deferred
-- and applied later, its documents carry no pipeline column (issue 10 revisits the store schema).
do $$
begin
    if to_regclass('pgfresh.documents') is not null then
        alter table pgfresh.documents add column pipeline text not null default 'pgfresh';
        create trigger documents_tenant before insert or update of tenant, tbl on pgfresh.documents
            for each row execute function pgfresh.check_rendered_tenant();
    end if;
end $$;

-- The arena's own bookkeeping on the source: schema `arena`, never in the publication.
-- arena.events records every change a workload makes (by trigger, so custom SQL workloads are
-- recorded too) with its commit time, so time-to-fresh can be computed and the old values of a
-- fact are known. arena.oltp is the table of the concurrent pgbench-style load.
create schema if not exists arena;

create table if not exists arena.events (
    id          bigserial   primary key,
    tbl         text        not null,           -- schema.table
    key         jsonb       not null,           -- the key's values, in key-column order
    op          text        not null,           -- insert | update | delete
    kind        text        not null,           -- what the workload meant: price, publish, noise:wrong_value, ...
    noise       boolean     not null default false,
    clean       jsonb,                          -- for noise: the values the row should have (truth)
    old_row     jsonb,
    new_row     jsonb,
    xid         xid8        not null default pg_current_xact_id(),
    -- clock_timestamp() in the one-statement transaction of the change: its commit follows within
    -- a millisecond; track_commit_timestamp is off on most servers, so this is the portable clock.
    commit_time timestamptz not null default clock_timestamp()
);
create index if not exists events_tbl_key on arena.events (tbl, key);

-- The workload marks what a change means with transaction-local settings:
--   select set_config('arena.kind', 'noise:wrong_value', true), set_config('arena.noise', 'true', true),
--          set_config('arena.clean', '{"price": "12.50"}', true);
-- Trigger arguments: the key columns of the table.
create or replace function arena.record_change() returns trigger language plpgsql as $$
declare
    r   jsonb := case when tg_op = 'DELETE' then to_jsonb(old) else to_jsonb(new) end;
    k   jsonb := '[]'::jsonb;
    col text;
begin
    foreach col in array tg_argv loop
        k := k || jsonb_build_array(r -> col);
    end loop;
    insert into arena.events (tbl, key, op, kind, noise, clean, old_row, new_row)
    values (tg_table_schema || '.' || tg_table_name, k, lower(tg_op),
            coalesce(nullif(current_setting('arena.kind', true), ''), lower(tg_op)),
            coalesce(nullif(current_setting('arena.noise', true), '')::boolean, false),
            nullif(current_setting('arena.clean', true), '')::jsonb,
            case when tg_op <> 'INSERT' then to_jsonb(old) end,
            case when tg_op <> 'DELETE' then to_jsonb(new) end);
    return null;
end
$$;

create table if not exists arena.oltp (
    id      integer primary key,
    balance bigint  not null default 0
);
insert into arena.oltp (id) select g from generate_series(1, 1000) g on conflict do nothing;

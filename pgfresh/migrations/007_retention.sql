-- 007: retention. How far each pipeline's change log has been pruned (a consumer behind that point
-- backfills from its pipeline's row store), each consumer's backfill cursor, and indexes that let the
-- pruner find old rows in small batches without scanning whole tables. Applies after 005 (pipelines).

create table pgfresh.retention (
    pipeline       text        not null,        -- the pipeline whose `pgfresh sync` pruned (005)
    name           text        not null,        -- 'changes', 'gate_log', 'tombstones', 'facts'
    pruned_through bigint      not null default 0,  -- changes: every seq of the pipeline <= this may be gone
    rows_pruned    bigint      not null default 0,
    last_pruned_at timestamptz,
    primary key (pipeline, name)
);

-- A log that was pruned before this migration (per pipeline): whatever precedes its first entry is gone.
insert into pgfresh.retention (pipeline, name, pruned_through)
select p.pipeline, 'changes',
       coalesce((select min(seq) - 1 from pgfresh.changes c where c.pipeline = p.pipeline),
                (select case when is_called then last_value else 0 end from pgfresh.changes_seq_seq))
from (select pipeline from pgfresh.consumers union select pipeline from pgfresh.changes) p;

-- backfill_cursor: null, not backfilling; '{}', started; {tbl, key}, the last row handed out.
-- backfill_deletes: also hand out tombstones as deletes (a consumer that existed before).
alter table pgfresh.consumers
    add column backfill_cursor  text[],
    add column backfill_deletes boolean not null default false,
    add column backfilled_at    timestamptz;

create index gate_log_decided on pgfresh.gate_log using brin (decided_at);
create index rows_tombstones on pgfresh.rows (pipeline, commit_time) where deleted;
create index facts_superseded on pgfresh.facts (superseded_at) where status = 'superseded';
-- The pruner re-points `superseded_by` of kept facts past the facts it deletes.
create index facts_superseded_by on pgfresh.facts (superseded_by) where superseded_by is not null;

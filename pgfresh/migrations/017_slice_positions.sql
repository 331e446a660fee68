-- 017: a slice version's position in each pipeline's stream.
--
-- slice_versions.lsn is one LSN, but a slice can learn facts of several pipelines (sources), and
-- LSNs of two servers (or of two slots that progress independently) cannot be compared: a version
-- trained after source a's change at 0/9000 knows nothing of source b's change at 0/5000 if b had
-- not been synced yet. `positions` maps each pipeline to the newest LSN of that pipeline's facts
-- the version (with its lineage) learnt; the hybrid router compares a row's LSN with the position
-- of the row's own pipeline. A pipeline not named: the version learnt nothing of it. NULL (a
-- version written without it): `lsn` stands for every pipeline, which is exact with one pipeline.
-- `lsn` stays the newest of all, for display.

alter table pgfresh.slice_versions add column positions jsonb;

-- Existing versions. One pipeline: its position is the version's LSN.
update pgfresh.slice_versions set positions = jsonb_build_object(t.pipeline, lsn::text)
from (select min(pipeline) as pipeline from pgfresh.tables having count(distinct pipeline) = 1) t;

-- Several: the newest LSN per pipeline of the facts the version's lineage learnt (base, learn and
-- update rows of fact_training; replayed facts were learnt by an ancestor).
with recursive chain (slice, version, ancestor) as (
    select slice, version, version from pgfresh.slice_versions where positions is null
    union all
    select c.slice, c.version, v.parent from chain c
    join pgfresh.slice_versions v on v.slice = c.slice and v.version = c.ancestor
    where v.parent is not null
), newest as (
    select c.slice, c.version, f.pipeline, max(f.lsn) as lsn from chain c
    join pgfresh.fact_training t on t.slice = c.slice and t.version = c.ancestor and t.role <> 'replay'
    join pgfresh.facts f on f.fact_id = t.fact_id
    group by 1, 2, 3
)
update pgfresh.slice_versions v
set positions = coalesce((select jsonb_object_agg(n.pipeline, n.lsn::text) from newest n
                          where n.slice = v.slice and n.version = v.version), '{}')
where v.positions is null;

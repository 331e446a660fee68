-- 008: slice names no tenant value can take. The shared slice (facts without a tenant) keeps the
-- name '_shared'; a tenant's slice is named after the tenant, with one more '_' in front when the
-- tenant starts with '_' (tenant '_shared' -> '__shared', '_x' -> '__x'). So no tenant maps to
-- '_shared' (before 008 the tenant '_shared' trained into the shared slice), and no tenant maps to
-- any other name that starts with a single '_' (pgfresh's own names, like the retired slice below).
--
-- Existing installations keep every slice, version, round and trained fact:
-- - a slice of a tenant starting with '_' is renamed (its versions, rounds and fact_training rows
--   follow through the foreign keys, now ON UPDATE CASCADE); its files stay where they are (each
--   version records its own path);
-- - '_shared' that learnt only the tenant '_shared''s facts becomes that tenant's slice '__shared';
-- - '_shared' that learnt facts of both (the collision happened) can serve neither without
--   breaking tenant isolation: it is kept, listed and noted as '_shared (mixed before 008)', and
--   both slices start again from the base model at their next round (their facts wait again).

alter table pgfresh.slices add column note text;  -- why a slice serves nobody (set by a migration)

alter table pgfresh.slice_versions drop constraint slice_versions_slice_fkey,
    add constraint slice_versions_slice_fkey foreign key (slice) references pgfresh.slices (name) on update cascade;
alter table pgfresh.train_rounds drop constraint train_rounds_slice_fkey,
    add constraint train_rounds_slice_fkey foreign key (slice) references pgfresh.slices (name) on update cascade;
alter table pgfresh.fact_training drop constraint fact_training_slice_version_fkey,
    add constraint fact_training_slice_version_fkey foreign key (slice, version)
        references pgfresh.slice_versions (slice, version) on update cascade;

do $$
declare
    r record;
    has_tenant boolean;
    has_shared boolean;
begin
    -- longest first: '__x' moves to '___x' before '_x' moves to '__x'
    for r in select name from pgfresh.slices
             where tenant is not null and name = tenant and name like '\_%' and name <> '_shared'
             order by length(name) desc loop
        update pgfresh.slices set name = '_' || r.name where name = r.name;
    end loop;

    select exists (select 1 from pgfresh.fact_training t join pgfresh.facts f using (fact_id)
                   where t.slice = '_shared' and f.tenant = '_shared'),
           exists (select 1 from pgfresh.fact_training t join pgfresh.facts f using (fact_id)
                   where t.slice = '_shared' and f.tenant is null)
      into has_tenant, has_shared;
    if has_tenant and has_shared then
        update pgfresh.slices set name = '_shared (mixed before 008)', tenant = null, updated_at = now(),
               note = 'learnt facts of the shared slice and of the tenant ''_shared'' (a name collision fixed by '
                      'migration 008); kept for the record, serves nobody; both slices retrain from the base model'
         where name = '_shared';
    elsif has_tenant then
        update pgfresh.slices set name = '__shared', tenant = '_shared', updated_at = now() where name = '_shared';
    else
        update pgfresh.slices set tenant = null where name = '_shared';
    end if;
end
$$;

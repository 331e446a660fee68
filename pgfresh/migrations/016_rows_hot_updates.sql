-- 016: capture updates pgfresh.rows in place (HOT). Every streamed change rewrites its row's lsn and
-- commit_time; with commit_time in an index (007's rows_tombstones) no update could be HOT, so each
-- one also inserted into every index of the table. The tombstone index now names only the pipeline
-- (its predicate, `deleted`, changes only when a row is deleted), and pages keep a fifth free so the
-- new version fits beside the old one. Retention still finds tombstones through this index (the
-- tombstones of a pipeline, a small share of its rows) and sorts them by commit_time.
-- bench/capture.py: the row-store upsert went from 31 to 17 us per change (docs/BENCHMARKS.md).

drop index pgfresh.rows_tombstones;
create index rows_tombstones on pgfresh.rows (pipeline) where deleted;
alter table pgfresh.rows set (fillfactor = 80);

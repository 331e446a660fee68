-- 016: the row store takes HOT updates (capture throughput, issue 12).
-- Nearly every streamed change updates a row that exists. An update can stay on its page without a
-- new entry in the primary key (a HOT update) only when no indexed column changes and the page has
-- room. rows_tombstones indexed commit_time, which every change sets, so no update was HOT: each
-- added a primary-key entry and moved the row to a new page (the upsert cost ~2x).
-- Now the tombstone index is on `deleted_at`, which is the commit time of a tombstone and null for
-- a live row (so it only changes when a row is deleted or comes back), and pages keep room.
-- Adding the stored column rewrites pgfresh.rows once.

alter table pgfresh.rows set (fillfactor = 70);
alter table pgfresh.rows add column deleted_at timestamptz generated always as (case when deleted then commit_time end) stored;
drop index pgfresh.rows_tombstones;
create index rows_tombstones on pgfresh.rows (pipeline, deleted_at) where deleted;

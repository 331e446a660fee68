-- 006: operations. `pgfresh resync` after a lost slot, and the reconnects of `pgfresh sync`.

-- A resync re-reads a table under a new slot and then deletes what the new snapshot did not see.
-- resync_xid is a transaction the resync committed before the first new chunk: a row read by a new
-- chunk carries a snapshot in which it is visible; a row with an older snapshot (or none) and no
-- streamed change after resync_lsn (the new slot's start) is gone from the source.
alter table pgfresh.snapshot_progress
    add column resync_xid     xid8,
    add column resync_lsn     pg_lsn,
    add column resync_deleted bigint;   -- rows the resync found gone and deleted downstream

-- How often `pgfresh sync` lost its connections and opened them again (last_error says why).
alter table pgfresh.workers
    add column reconnects bigint not null default 0;

-- requires extension: vector
-- 013: the newest searchable change, read cheaply. `pgfresh status`, /v1/status and the dashboard
-- show the document of the highest LSN in the active generation (which change is searchable now,
-- and how long after its commit it became so); this index makes that one row an index lookup, not
-- a scan of every document on each dashboard refresh.

create index documents_lsn on pgfresh.documents (index_id, lsn);

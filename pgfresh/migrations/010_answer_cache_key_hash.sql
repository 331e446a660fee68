-- requires extension: vector
-- 010: the answer cache is keyed by a hash of (tenant, reader, normalised question).
-- A B-tree entry holds at most about 2.7 kB, so the unique index on the text itself refused to
-- cache (and failed) a long question or tenant. The hash is computed by pgfresh.rag.cache.key_hash.
-- Existing entries are dropped: it is a cache, the next ask refills it.

delete from pgfresh.answer_cache;
drop index pgfresh.answer_cache_key;
alter table pgfresh.answer_cache add column key_hash bytea not null;
create unique index answer_cache_key_hash on pgfresh.answer_cache (key_hash);

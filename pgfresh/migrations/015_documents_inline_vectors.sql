-- requires extension: vector
-- 015: a document's vector stays in its row. A 384-dimension vector is 1.5 kB, and with the text
-- and tsvector a row passed PostgreSQL's 2 kB TOAST threshold, so every vector went to the TOAST
-- table: an exact ranking of a tenant's 10,000 documents made 10,000 TOAST fetches, and every
-- document write a TOAST insert. Rows up to 4 kB now stay whole (larger vectors are still TOASTed).
-- Applies to rows written from now on; `vacuum full pgfresh.documents` rewrites the old ones.

alter table pgfresh.documents set (toast_tuple_target = 4080);

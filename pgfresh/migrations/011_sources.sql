-- 011: sources (issue 10). Several source databases write into one store, and the same table name
-- in two of them is two different tables. pgfresh.tables records the source database of each
-- pipeline's tables ('<system identifier>/<database>'), so that a configuration naming a table of
-- another database under a name some pipeline already holds is refused instead of taking it over
-- (`[[sources]]` names each source's tables apart: `billing:public.invoices`). Null: registered
-- before 011 (treated as before).
alter table pgfresh.tables add column source text;

-- pgfresh: all a non-superuser role needs on the source database (docs/PRIVILEGES.md).
--
-- pgfresh keeps its state in its store, never in the source: on the source it reads the captured
-- tables (short snapshot chunks) and streams their changes through a slot and a publication.
-- Run once as a superuser (or the tables' owner), connected to the source database, naming the
-- role and the tables pgfresh captures (the [[tables]] of pgfresh.toml):
--
--   psql "dbname=shop" -v role=pgfresh_app -v tables='public.products, public.orders' -f grant.sql
--
-- The role must exist (CREATE ROLE pgfresh_app LOGIN PASSWORD '...'). The publication is named
-- pgfresh (source.publication's default); edit the last line if yours differs. It stays owned by
-- you: pgfresh checks that it covers the configured tables and never alters it (a table added to
-- pgfresh.toml later: ALTER PUBLICATION pgfresh ADD TABLE ...).

\set ON_ERROR_STOP on

-- Logical replication: the slot and the change stream.
ALTER ROLE :"role" WITH REPLICATION;
-- Snapshot reads of the captured tables, and nothing else.
GRANT SELECT ON :tables TO :"role";
-- The publication: exactly the captured tables.
CREATE PUBLICATION pgfresh FOR TABLE :tables;

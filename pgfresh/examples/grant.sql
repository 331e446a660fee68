-- pgfresh: what a non-superuser role needs on the source database today (docs/PRIVILEGES.md).
--
-- Run once as a superuser, connected to the source database, naming the role and the tables
-- pgfresh captures (the [[tables]] of pgfresh.toml):
--
--   psql "dbname=shop" -v role=pgfresh_app -v tables='public.products, public.orders' -f grant.sql
--
-- The role must exist (CREATE ROLE pgfresh_app LOGIN PASSWORD '...'). The publication is named
-- pgfresh (source.publication's default); edit the two lines below if yours differs.
-- Today pgfresh keeps its own state in schema pgfresh of the source, hence CREATE on the database;
-- a later version moves that state to a separate store and this script shrinks to REPLICATION + SELECT.

\set ON_ERROR_STOP on

-- Logical replication: the slot and the change stream.
ALTER ROLE :"role" WITH REPLICATION;
-- Snapshot reads of the captured tables.
GRANT SELECT ON :tables TO :"role";
-- Schema pgfresh (pgfresh creates it and its tables on first `pgfresh sync` / `pgfresh init`).
SELECT format('GRANT CREATE ON DATABASE %I TO %I', current_database(), :'role') \gexec
-- pgvector is not a trusted extension: only a superuser may create it (the RAG index needs it).
CREATE EXTENSION IF NOT EXISTS vector;
-- Adding a table to a publication takes ownership of the table, so the superuser creates it
-- and hands it to the role (which may then drop tables from it; adding one needs its owner).
CREATE PUBLICATION pgfresh FOR TABLE :tables;
ALTER PUBLICATION pgfresh OWNER TO :"role";

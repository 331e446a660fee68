-- 002: gate and render. What the quality gate decided about every change (per model path), what
-- it rejected (quarantine) or holds back (settling), and the facts rendered for training.
-- Each consumer writes these in the same transaction as its `advance`, so a crash loses nothing
-- and decides nothing twice.

-- One row per (path, change): the change's outcome on that path. Every change a consumer read has
-- exactly one row, so "accepted + quarantined + superseded + duplicate + pending = every change"
-- can be checked by SQL.
create table pgfresh.gate_log (
    path        text        not null check (path in ('rag', 'train')),
    seq         bigint      not null,           -- pgfresh.changes.seq
    tbl         text        not null,
    key         text        not null,
    outcome     text        not null check (outcome in ('accepted', 'quarantined', 'pending', 'superseded', 'duplicate')),
    check_name  text,                           -- the check that decided (quarantined), or reported (near_duplicate)
    detail      text,
    pii_masked  integer     not null default 0, -- values dropped or masked before rendering
    decided_at  timestamptz not null default now(),
    primary key (path, seq)
);

-- Changes rejected by a check, with the row as it would have been rendered (PII already removed).
create table pgfresh.quarantine (
    id           bigserial   primary key,
    path         text        not null check (path in ('rag', 'train')),
    seq          bigint      not null,
    tbl          text        not null,
    key          text        not null,
    tenant       text,
    op           text        not null,
    lsn          pg_lsn      not null,
    commit_time  timestamptz,
    check_name   text        not null,
    reason       text        not null,
    row          jsonb,
    created_at   timestamptz not null default now(),
    released_at  timestamptz,                   -- `pgfresh quarantine release ID`
    readmitted_at timestamptz,                  -- when the path's worker took the released change
    release_note text                           -- what re-admission did (accepted, stale, duplicate)
);
create index quarantine_by_table on pgfresh.quarantine (tbl, check_name);
create index quarantine_released on pgfresh.quarantine (path) where released_at is not null and readmitted_at is null;

-- Changes waiting for their settle window (due_at) or for a final state (due_at null): at most one
-- per row and path, the latest; the one it replaced is logged 'superseded'.
create table pgfresh.gate_pending (
    path        text        not null,
    tbl         text        not null,
    key         text        not null,
    seq         bigint      not null,
    tenant      text,
    op          text        not null,
    row         jsonb,
    lsn         pg_lsn      not null,
    commit_time timestamptz,
    due_at      timestamptz,
    primary key (path, tbl, key)
);
create index gate_pending_due on pgfresh.gate_pending (path, due_at) where due_at is not null;

-- The last version of each row a path admitted: its rendered text's fingerprint (dedup), a
-- simhash split in 4 bands (near-duplicates across keys), and the row (for "no longer exists"
-- facts after a delete). deleted_seq: the delete or truncate that removed it.
create table pgfresh.gate_seen (
    path        text        not null,
    tbl         text        not null,
    key         text        not null,
    seq         bigint      not null,
    fingerprint text        not null,
    simhash     bigint      not null,
    bands       integer[]   not null,
    row         jsonb,
    deleted_seq bigint,
    primary key (path, tbl, key)
);
create index gate_seen_bands on pgfresh.gate_seen using gin (bands) where deleted_seq is null;

-- Facts for training: question/answer pairs (with paraphrases) and statements, each naming its
-- source row and LSN. A newer version of the row supersedes its older facts of the same template.
create table pgfresh.facts (
    fact_id       text        primary key,       -- hash of tbl, key, template, kind, question, answer
    tbl           text        not null,
    key           text        not null,
    tenant        text,
    kind          text        not null check (kind in ('qa', 'statement', 'gone')),
    template      text        not null,          -- "the same question" across versions of a row
    question      text        not null,          -- canonical phrasing; the document text for 'statement'
    paraphrases   text[]      not null default '{}',
    answer        text        not null,
    lsn           pg_lsn      not null,
    commit_time   timestamptz,
    status        text        not null default 'active' check (status in ('active', 'superseded')),
    superseded_by text,
    superseded_at timestamptz,
    created_at    timestamptz not null default now()
);
create index facts_active_by_row on pgfresh.facts (tbl, key, template) where status = 'active';
create index facts_by_tenant on pgfresh.facts (tenant, status, created_at);

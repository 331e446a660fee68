-- 001: capture. The row store (current state of every captured row), the change log that later
-- stages consume, and the progress rows that make every sink exactly-once.

create table pgfresh.rows (
    tbl         text        not null,           -- schema.table
    key         text        not null,           -- JSON array of the key's values
    tenant      text,
    row         jsonb,                          -- current row; null once deleted
    lsn         pg_lsn      not null,           -- end LSN of the transaction that wrote it (0/0: snapshot)
    commit_time timestamptz,
    deleted     boolean     not null default false,
    xid         xid8,                           -- source transaction of the last streamed change
    snap        pg_snapshot,                    -- snapshot of the chunk that read it, until a newer change
    versions    integer     not null default 1, -- how many changes were applied to it (exactly-once checks)
    primary key (tbl, key)
);

-- Every change the row store applied, in order; consumers (gate, index, ...) read it by seq and
-- record how far they got in pgfresh.consumers in the same transaction as their own writes.
create table pgfresh.changes (
    seq         bigserial   primary key,
    tbl         text        not null,
    key         text        not null,
    tenant      text,
    op          text        not null,           -- insert | update | delete | read (snapshot) | truncate
    row         jsonb,                          -- the full current row (TOAST-unchanged values filled in)
    lsn         pg_lsn      not null,
    commit_time timestamptz,
    captured_at timestamptz not null default clock_timestamp()
);

create table pgfresh.consumers (
    name        text        primary key,
    seq         bigint      not null default 0,
    updated_at  timestamptz not null default now()
);

-- How far each sink got in the replication stream: the slot is confirmed only up to this LSN.
create table pgfresh.sink_progress (
    sink        text        primary key,
    lsn         pg_lsn      not null,
    updated_at  timestamptz not null default now()
);

create table pgfresh.snapshot_progress (
    tbl          text        primary key,
    last_key     jsonb,                          -- text values of the last key read, in key order
    done         boolean     not null default false,
    rows_read    bigint      not null default 0,
    truncate_xid xid8,                           -- a TRUNCATE streamed during the snapshot
    reconcile_until pg_lsn,                      -- WAL insert position at the last chunk: a streamed
                                                 -- change ending after it cannot be in any chunk
    started_at   timestamptz not null default now(),
    finished_at  timestamptz
);

-- Heartbeat and last error of each worker, for `pgfresh status`.
create table pgfresh.workers (
    name          text        primary key,
    pid           integer,
    heartbeat     timestamptz,
    last_error    text,
    last_error_at timestamptz,
    info          jsonb       not null default '{}'
);

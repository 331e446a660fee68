-- 004: train. Model slices (one lineage of versions per tenant), the rounds that produce them, and
-- which facts each published version learnt. A fact counts as trained for a slice only through a
-- row of fact_training whose version is published and in the lineage of the slice's current version;
-- those rows are written in the same transaction that publishes the version.

create table pgfresh.slices (
    name            text        primary key,    -- the tenant, or '_shared' for facts without one
    tenant          text,
    current_version integer,                    -- the published version that serves now
    probe           text[]      not null default '{}',  -- fixed probe set of old facts (forgetting)
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now()
);

create table pgfresh.slice_versions (
    slice        text        not null references pgfresh.slices (name),
    version      integer     not null,
    parent       integer,                       -- null for a base version (start of a lineage)
    kind         text        not null check (kind in ('base', 'lora', 'full')),
    base_id      text        not null,          -- identity of the base model the lineage starts from
    path         text        not null,          -- base model dir, or the version's adapter / weights dir
    sha256       text,                          -- of the adapter / weights file (corruption check)
    lsn          pg_lsn      not null,          -- the newest fact LSN this version knows
    facts        integer     not null default 0,  -- facts learnt in this version
    metrics      jsonb       not null default '{}',
    round_id     bigint,
    created_at   timestamptz not null default now(),
    primary key (slice, version)
);

create table pgfresh.train_rounds (
    id          bigserial   primary key,
    slice       text        not null references pgfresh.slices (name),
    parent      integer     not null,
    status      text        not null check (status in ('running', 'published', 'rejected', 'failed', 'abandoned', 'trial')),
    version     integer,                        -- the version it published
    pid         integer,
    learn       integer     not null default 0,  -- new and changed facts
    updates     integer     not null default 0,  -- superseded facts explicitly updated
    replay      integer     not null default 0,
    metrics     jsonb       not null default '{}',
    reason      text,                           -- why the gate rejected it, or the error
    started_at  timestamptz not null default now(),
    finished_at timestamptz
);
create index train_rounds_by_slice on pgfresh.train_rounds (slice, id);

-- role: 'learn' (a new or changed fact), 'update' (a superseded fact whose old answer was unlearnt),
-- 'replay' (an unchanged fact rehearsed), 'base' (learnt by the base model).
create table pgfresh.fact_training (
    slice    text    not null,
    version  integer not null,
    fact_id  text    not null,
    role     text    not null check (role in ('base', 'learn', 'update', 'replay')),
    primary key (slice, version, fact_id),
    foreign key (slice, version) references pgfresh.slice_versions (slice, version)
);
create index fact_training_by_fact on pgfresh.fact_training (fact_id);

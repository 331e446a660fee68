"""Retention: how long pgfresh keeps what it no longer needs, and the pruner that enforces it.

What grows with every change, and when it may go (`[retention]` in pgfresh.toml, docs/CONFIG.md):

Everything is per pipeline (capture/change.py): `pgfresh sync` prunes its own pipeline's change log,
tombstones and superseded facts, and records its own horizon; `gate_log` (not keyed by pipeline) is
pruned by every pipeline's pruner alike.

- the change log (`pgfresh.changes`): once every consumer the config runs has passed an entry, and
  `change_log_keep_seconds` after it was captured (with no consumer: after that window alone). A
  consumer that comes back behind the pruned point backfills from the row store
  (`capture.change.read_changes`), so a consumer the config no longer runs never holds pruning back;
- `pgfresh.gate_log` (an outcome per change and path): `gate_log_keep_hours` after the decision,
  except 'pending' rows (their change still waits in gate_pending);
- tombstones in the row store (deleted rows): never while their table's snapshot is still being
  read (a chunk read before the delete could otherwise bring the row back); then, while a consumer
  the config does not run is registered (a stage switched off, which gets them as deletes when it
  comes back), `tombstone_keep_hours` after the delete, else `change_log_keep_seconds`; and never
  while the change log still holds a change of that row that a running consumer has not passed (the
  deletes `pgfresh resync` logs; a resync's tombstone is aged from the resync);
- superseded facts: `superseded_facts_keep_hours` after they were superseded, and never while a
  slice version (`pgfresh.fact_training`, any version, so that every rollback target keeps its
  lineage) or a slice's probe set names them. A kept fact whose `superseded_by` named a pruned one
  is pointed at the pruned one's successor, so training still finds the current answer.

`prune` deletes in batches of `prune_batch_rows` (halved while a batch takes more than a quarter
of `source.max_txn_seconds`), each batch its own short transaction, and stops
after `prune_max_seconds`: the capture loop calls it every `prune_interval_seconds` between its
batches, so pruning never holds a long transaction and never stalls capture for long. Each run is
recorded in `pgfresh.retention` (rows pruned, last run), with the change log's pruned horizon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from pgfresh.capture.change import DEFAULT_PIPELINE
from pgfresh.configtypes import Spec, check_section, integer, number

SECTION = "retention"


@dataclass
class Retention:
    change_log_keep_seconds: float = 60.0  # safety window after every consumer passed an entry
    gate_log_keep_hours: float = 1.0
    tombstone_keep_hours: float = 24.0  # while a stage is switched off: it catches up on deletes within this
    superseded_facts_keep_hours: float = 1.0  # facts a slice version learnt are kept regardless
    prune_interval_seconds: float = 30.0  # how often `pgfresh sync` prunes
    prune_batch_rows: int = 5000  # rows deleted per transaction
    prune_max_seconds: float = 1.0  # pruning time per run; the rest waits for the next run


def settings(config) -> Retention:
    """The [retention] section (defaults for what it leaves out); check_config has validated it."""
    raw = getattr(config, "retention", None) or {}
    r = Retention()
    for f in fields(r):
        if f.name in raw:
            setattr(r, f.name, int(raw[f.name]) if f.type in (int, "int") else float(raw[f.name]))
    return r


_SPEC: Spec = {  # the keys of Retention
    "change_log_keep_seconds": number(0, unit="seconds"),
    "gate_log_keep_hours": number(0, unit="hours"),
    "tombstone_keep_hours": number(0, unit="hours"),
    "superseded_facts_keep_hours": number(0, unit="hours"),
    "prune_interval_seconds": number(0, above=True, unit="seconds"),
    "prune_batch_rows": integer(1),
    "prune_max_seconds": number(0, above=True, unit="seconds"),
}


def check_config(config) -> list[str]:
    """Every problem in [retention], each with its key path."""
    problems: list[str] = []
    check_section(getattr(config, "retention", None) or {}, SECTION, _SPEC, problems)
    return problems


# Each target: one batch of at most %(n)s rows, oldest first. `changes` also needs the consumers'
# lowest position (%(upto)s). Every statement returns the rows it deleted (first column: a seq for
# the change log, whose horizon is then moved).
_TARGETS = {
    "changes": """
        delete from pgfresh.changes c using (
            select seq from pgfresh.changes where pipeline = %(pipeline)s and seq <= %(upto)s
               and captured_at < now() - make_interval(secs => %(change_log_keep_seconds)s)
             order by seq limit %(n)s) d
        where c.seq = d.seq returning c.seq""",
    "gate_log": """
        delete from pgfresh.gate_log g using (
            select path, seq from pgfresh.gate_log where outcome <> 'pending'
               and decided_at < now() - make_interval(secs => %(gate_log_keep_hours)s * 3600) limit %(n)s) d
        where g.path = d.path and g.seq = d.seq returning g.seq""",
    "tombstones": """
        delete from pgfresh.rows r using (
            select tbl, key from pgfresh.rows t
             where pipeline = %(pipeline)s and deleted
               and commit_time < now() - make_interval(secs => %(tombstone_keep_seconds)s)
               and tbl not in (select tbl from pgfresh.snapshot_progress where pipeline = %(pipeline)s and not done)
               and not exists (select 1 from pgfresh.changes c where c.pipeline = %(pipeline)s
                                  and c.seq > %(upto)s and c.tbl = t.tbl and c.key = t.key)
             order by commit_time limit %(n)s) d
        where r.pipeline = %(pipeline)s and r.tbl = d.tbl and r.key = d.key and r.deleted returning 0""",
    # Candidates only: `_prune_facts` keeps the chains of replacements whole before deleting them.
    "facts": """
        select fact_id, superseded_by from pgfresh.facts x where pipeline = %(pipeline)s and status = 'superseded'
           and superseded_at < now() - make_interval(secs => %(superseded_facts_keep_hours)s * 3600)
           and not exists (select 1 from pgfresh.fact_training t where t.fact_id = x.fact_id)
           and not exists (select 1 from pgfresh.slices s where x.fact_id = any(s.probe))
         order by superseded_at limit %(n)s for update""",
}


def prune(conn, config, consumers: list[str], pipeline: str = DEFAULT_PIPELINE,
          budget_seconds: float | None = None) -> dict[str, int]:
    """Delete what retention allows of `pipeline`, in short transactions; returns rows deleted per target.

    `consumers`: the change-log consumers the config runs; only their positions hold the log back
    (a consumer left out backfills from the row store when it returns). Stops when nothing is left
    to prune or after `budget_seconds` (default `prune_max_seconds`); what is left waits.
    """
    r = settings(config)
    budget = r.prune_max_seconds if budget_seconds is None else budget_seconds
    started = time.monotonic()
    params = {f.name: getattr(r, f.name) for f in fields(r)} | {"n": r.prune_batch_rows, "pipeline": pipeline}
    with conn.transaction():
        row = conn.execute("select min(seq) from pgfresh.consumers where pipeline = %s and name = any(%s)",
                           (pipeline, list(consumers))).fetchone()
        # Consumers that need tombstones: not run, backfilling with deletes, or (having read the log
        # before) behind the pruned horizon, so they will backfill with deletes on their next read.
        (idle,) = conn.execute(
            "select count(*) from pgfresh.consumers c where pipeline = %s and (not name = any(%s)"
            " or (backfill_cursor is not null and backfill_deletes)"
            " or (backfill_cursor is null and seq > 0 and seq < coalesce((select pruned_through from pgfresh.retention"
            "     where pipeline = c.pipeline and name = 'changes'), 0)))",
            (pipeline, list(consumers))).fetchone()
    params["upto"] = row[0] if row[0] is not None else 2**63 - 1
    # Tombstones serve a consumer that is switched off now (it gets them as deletes when it comes
    # back, or is getting them now, or will); with none, they go as soon as the change log would.
    params["tombstone_keep_seconds"] = r.tombstone_keep_hours * 3600 if idle else r.change_log_keep_seconds
    done = {name: 0 for name in _TARGETS}
    # Each target gets its share of the budget, so a slow one (wide change-log rows) cannot starve
    # the others; a target that finishes early leaves its share to the ones after it.
    for i, name in enumerate(_TARGETS):
        share = (budget - (time.monotonic() - started)) / (len(_TARGETS) - i)
        begun = time.monotonic()
        while True:
            t = time.monotonic()
            n = _batch(conn, name, params)
            done[name] += n
            # Every batch is one transaction: keep it well inside max_txn_seconds (wide rows, busy disk).
            if time.monotonic() - t > config.source.max_txn_seconds / 4 and params["n"] > 100:
                params["n"] //= 2
            if n < params["n"] or time.monotonic() - begun >= share:
                break
    return done


def _prune_facts(conn, params: dict) -> list:
    """Delete a batch of superseded facts; a fact that named one as `superseded_by` (a learnt fact
    whose chain of replacements leads to the current answer) now names its first kept successor."""
    doomed = dict(conn.execute(_TARGETS["facts"], params).fetchall())
    if not doomed:
        return []
    relink = {}
    for fid in doomed:
        nxt, seen = doomed[fid], {fid}
        while nxt in doomed and nxt not in seen:
            seen.add(nxt)
            nxt = doomed[nxt]
        relink[fid] = nxt
    ids = list(doomed)
    conn.execute(
        "update pgfresh.facts f set superseded_by = m.new from unnest(%s::text[], %s::text[]) m(old, new)"
        " where f.superseded_by = m.old and not f.fact_id = any(%s)",
        (ids, [relink[i] for i in ids], ids))
    return conn.execute("delete from pgfresh.facts where fact_id = any(%s) returning 0", (ids,)).fetchall()


def _batch(conn, name: str, params: dict) -> int:
    with conn.transaction():
        deleted = _prune_facts(conn, params) if name == "facts" else conn.execute(_TARGETS[name], params).fetchall()
        if deleted:
            horizon = max(d[0] for d in deleted) if name == "changes" else 0
            conn.execute(
                "insert into pgfresh.retention as r (pipeline, name, pruned_through, rows_pruned, last_pruned_at)"
                " values (%s, %s, %s, %s, now()) on conflict (pipeline, name) do update set"
                " pruned_through = greatest(r.pruned_through, excluded.pruned_through),"
                " rows_pruned = r.rows_pruned + excluded.rows_pruned, last_pruned_at = now()",
                (params["pipeline"], name, horizon, len(deleted)))
    return len(deleted)

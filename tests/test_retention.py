"""retention: pruning keeps storage bounded, and a stage enabled (or re-enabled) later still sees every row."""

from __future__ import annotations

import pytest

from pgfresh import config as cfg
from pgfresh import retention
from pgfresh.capture import sync
from pgfresh.errors import ConfigError
from tests.conftest import write_config

TABLE = ('[[tables]]\nname = "items"\ndocument = "Item {name} costs {price}."\n'
         '[tables.gate.train]\nsettle_seconds = 0\n')  # facts at once, so one `sync --once` shows them
FACTS = ('[[tables.facts]]\nname = "price"\nquestion = "What does {name} cost?"\nanswer = "{price}"\n'
         'gone = "{name} is no longer sold"\n')
# Everything prunable at once, so that the tests need not wait an hour.
PRUNE_NOW = ("[retention]\nchange_log_keep_seconds = 0\ngate_log_keep_hours = 0\ntombstone_keep_hours = 0\n"
             "superseded_facts_keep_hours = 0\nprune_batch_rows = 7\n")


def load(tmp_path, dsn, body: str) -> cfg.Config:
    return cfg.load(write_config(tmp_path, dsn, body))


def live_rows(db) -> dict:
    return {f"[{i}]": (name, str(price)) for i, name, price in db.execute("select id, name, price from items")}


def documents(db) -> dict:
    return dict(db.execute("select d.key, d.text from pgfresh.documents d join pgfresh.rag_indexes i"
                           " on i.id = d.index_id and i.state = 'active'").fetchall())


def active_price_facts(db) -> dict:
    return dict(db.execute("select key, answer from pgfresh.facts where status = 'active' and kind = 'qa'").fetchall())


def count(db, table: str) -> int:
    return db.execute(f"select count(*) from pgfresh.{table}").fetchone()[0]


def test_stage_enabled_after_the_log_was_pruned_backfills_every_live_row(db, dsn, tmp_path):
    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g + 0.5 from generate_series(1, 120) g")
    sync.run(load(tmp_path, dsn, TABLE + PRUNE_NOW), once=True)  # no stage: nobody reads the log
    db.execute("update items set price = price * 2 where id <= 30")
    db.execute("delete from items where id between 31 and 40")
    db.execute("insert into items values (500, 'late', 9.99)")
    sync.run(load(tmp_path, dsn, TABLE + PRUNE_NOW), once=True)
    assert count(db, "changes") == 0  # pruned: a stage that starts now cannot read these from the log

    # [rag] and fact templates added: every live row gets its document and its facts.
    config = load(tmp_path, dsn, TABLE + FACTS + PRUNE_NOW + "\n[rag]\n")
    sync.run(config, once=True)
    rows = live_rows(db)
    assert len(rows) == 111
    docs = documents(db)
    assert set(docs) == set(rows)
    assert all(f"Item {name} costs {price}." == docs[k] for k, (name, price) in rows.items())
    assert active_price_facts(db) == {k: price for k, (name, price) in rows.items()}
    # Back to following the log: a change after the backfill arrives as usual.
    db.execute("update items set price = 1.25 where id = 500")
    sync.run(config, once=True)
    assert documents(db)["[500]"] == "Item late costs 1.25."
    assert active_price_facts(db)["[500]"] == "1.25"


def test_disabled_stage_holds_nothing_back_and_catches_up_with_deletes_when_back(db, dsn, tmp_path):
    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 40) g")
    both = TABLE + FACTS + PRUNE_NOW.replace("tombstone_keep_hours = 0", "tombstone_keep_hours = 1") + "\n[rag]\n"
    sync.run(load(tmp_path, dsn, both), once=True)
    assert len(documents(db)) == 40

    # [rag] switched off: its consumer row stays, but must not keep the log from being pruned.
    # (Tombstones are kept: the index learns of the deletes from them when it comes back.)
    facts_only = load(tmp_path, dsn, TABLE + FACTS + PRUNE_NOW.replace("tombstone_keep_hours = 0", "tombstone_keep_hours = 1"))
    db.execute("update items set price = 100 + id where id <= 10")
    db.execute("delete from items where id > 35")
    sync.run(facts_only, once=True)
    assert count(db, "changes") == 0
    assert count(db, "rows where deleted") == 5  # kept for the index, which is switched off
    assert active_price_facts(db) == {k: p for k, (_, p) in live_rows(db).items()}

    # [rag] back on: the index catches up from the row store, deletes included.
    sync.run(load(tmp_path, dsn, both), once=True)
    rows = live_rows(db)
    docs = documents(db)
    assert set(docs) == set(rows)
    assert all(f"Item {name} costs {price}." == docs[k] for k, (name, price) in rows.items())
    assert count(db, "rows where deleted") == 0  # every consumer runs again: nobody needs them


def test_stage_enabled_later_on_a_pruned_pipeline_backfills_only_that_pipelines_rows(db, dsn, tmp_path):
    """Two pipelines on one database; only `one` prunes its log. Facts enabled on `one` later come
    from `one`'s row store alone; `two`'s log, horizon and consumers are untouched."""
    for tbl in ("t1", "t2"):
        db.execute(f"create table {tbl} (id int primary key, name text, price numeric(10,2))")
        db.execute(f"insert into {tbl} select g, '{tbl} ' || g, g from generate_series(1, 50) g")
    keep = {"one": PRUNE_NOW, "two": "[retention]\nchange_log_keep_seconds = 3600\n"}

    def config(name: str, tbl: str, facts: bool) -> cfg.Config:
        (tmp_path / name).mkdir(exist_ok=True)
        body = (f'slot = "{name}"\npublication = "{name}"\n' + TABLE.replace('"items"', f'"{tbl}"')
                + (FACTS if facts else "") + keep[name])
        return cfg.load(write_config(tmp_path / name, dsn, body))

    for name, tbl in (("one", "t1"), ("two", "t2")):
        sync.run(config(name, tbl, False), once=True)  # no stage: nobody reads either log
        db.execute(f"update {tbl} set price = price * 2 where id <= 10")
        db.execute(f"delete from {tbl} where id > 45")
        sync.run(config(name, tbl, False), once=True)
    assert count(db, "changes where pipeline = 'one'") == 0  # pruned
    assert count(db, "changes where pipeline = 'two'") > 0  # inside its window
    horizons = dict(db.execute("select pipeline, pruned_through from pgfresh.retention where name = 'changes'"))
    assert horizons.get("one", 0) > 0 and horizons.get("two", 0) == 0

    sync.run(config("one", "t1", True), once=True)  # facts enabled on `one` after its log was pruned
    facts = dict(db.execute("select key, answer from pgfresh.facts where status = 'active' and kind = 'qa'"
                            " and tbl = 'public.t1'").fetchall())
    assert facts == {f"[{i}]": str(p) for i, p in db.execute("select id, price from t1")}
    assert count(db, "facts where tbl <> 'public.t1' or pipeline <> 'one'") == 0  # nothing of t2's rows
    assert db.execute("select pipeline, name, backfilled_at is not null, backfill_cursor from pgfresh.consumers"
                      ).fetchall() == [("one", "facts", True, None)]
    # `two`'s log was never pruned: its stage enabled now follows the log, not the row store.
    sync.run(config("two", "t2", True), once=True)
    assert db.execute("select backfilled_at from pgfresh.consumers where pipeline = 'two' and name = 'facts'"
                      ).fetchone() == (None,)
    facts = dict(db.execute("select key, answer from pgfresh.facts where status = 'active' and kind = 'qa'"
                            " and tbl = 'public.t2'").fetchall())
    assert facts == {f"[{i}]": str(p) for i, p in db.execute("select id, price from t2")}


def test_prune_bounds_gate_log_tombstones_and_superseded_facts_but_keeps_trained_facts(db, dsn, tmp_path):
    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 30) g")
    keep = TABLE + FACTS + "[retention]\nchange_log_keep_seconds = 3600\ngate_log_keep_hours = 10\n"
    config = load(tmp_path, dsn, keep)
    sync.run(config, once=True)
    for round_ in range(3):
        db.execute("update items set price = price + 1 where id <= 20")
        sync.run(config, once=True)
    db.execute("delete from items where id > 25")
    sync.run(config, once=True)
    superseded = count(db, "facts where status = 'superseded'")
    # 20 rows x 3 updates + 5 deletes, each superseding a question and a statement fact
    assert superseded == 130 and count(db, "rows where deleted") == 5 and count(db, "gate_log") >= 95
    # A published slice version learnt one of the superseded facts: it must stay (lineage, rollback).
    # (The oldest price fact of row 1: three versions replaced it one after the other.)
    trained = db.execute("select fact_id from pgfresh.facts where status = 'superseded' and key = '[1]'"
                         " and kind = 'qa' order by created_at limit 1").fetchone()[0]
    db.execute("insert into pgfresh.slices (name) values ('_shared')")
    db.execute("insert into pgfresh.slice_versions (slice, version, kind, base_id, path, lsn)"
               " values ('_shared', 1, 'lora', 'b', '/x', '0/0')")
    db.execute("insert into pgfresh.fact_training values ('_shared', 1, %s, 'learn')", (trained,))
    before = {t: count(db, t) for t in ("changes", "gate_log", "rows", "facts")}

    done = retention.prune(db, load(tmp_path, dsn, keep), ["facts"], budget_seconds=60)
    assert done == {"changes": 0, "gate_log": 0, "tombstones": 0, "facts": 0}  # all inside their windows

    done = retention.prune(db, load(tmp_path, dsn, TABLE + FACTS + PRUNE_NOW), ["facts"], budget_seconds=60)
    assert done["tombstones"] == 5 and count(db, "rows where deleted") == 0
    assert done["facts"] == superseded - 1
    assert db.execute("select fact_id from pgfresh.facts where status = 'superseded'").fetchall() == [(trained,)]
    # Its chain of replacements still leads to the current answer (training unlearns the old one with it).
    assert db.execute("select n.status, n.answer from pgfresh.facts f join pgfresh.facts n on n.fact_id = f.superseded_by"
                      " where f.fact_id = %s", (trained,)).fetchone() == ("active", "4.00")
    assert count(db, "gate_log where outcome <> 'pending'") == 0 and done["gate_log"] == before["gate_log"]
    assert done["changes"] == before["changes"] and count(db, "changes") == 0  # the consumer had read all
    assert count(db, "rows") == 25 and active_price_facts(db) == {k: p for k, (_, p) in live_rows(db).items()}
    (horizon,) = db.execute("select pruned_through from pgfresh.retention where name = 'changes'").fetchone()
    assert horizon == db.execute("select seq from pgfresh.consumers where name = 'facts'").fetchone()[0]


def test_change_log_waits_for_every_running_consumer(db, dsn, tmp_path):
    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 20) g")
    config = load(tmp_path, dsn, TABLE + PRUNE_NOW)
    sync.run(config, once=True)
    db.execute("insert into pgfresh.changes (tbl, key, op, row, lsn) values ('public.items', '[1]', 'read', null, '0/0')")
    db.execute("insert into pgfresh.consumers (name, seq) values ('slow', 0)")
    assert retention.prune(db, config, ["slow"])["changes"] == 0  # 'slow' runs and has read nothing
    assert retention.prune(db, config, [])["changes"] == 1  # not run by the config: holds nothing back


def test_resync_tombstones_stay_until_every_running_consumer_has_seen_their_deletes(db, dsn, tmp_path):
    from pgfresh.capture import change, resync

    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items select g, 'item ' || g, g from generate_series(1, 20) g")
    config = load(tmp_path, dsn, TABLE + FACTS + PRUNE_NOW.replace("tombstone_keep_hours = 0", "tombstone_keep_hours = 1"))
    sync.run(config, once=True)
    # A second consumer that has read the whole log before the slot is lost.
    db.execute("insert into pgfresh.consumers (name, seq) select 'slow', last_value from pgfresh.changes_seq_seq")
    db.execute("select pg_drop_replication_slot('pgfresh')")
    db.execute("delete from items where id > 15")
    assert resync.run(config)["deleted"] == 5  # its pruning keeps the tombstones: 'slow' is not run
    assert count(db, "rows where deleted") == 5
    # Both run now (no consumer switched off), but 'slow' has not seen the resync's deletes (the log
    # has moved past it: it gets them from the tombstones when it backfills): they stay.
    done = retention.prune(db, config, ["facts", "slow"], budget_seconds=60)
    assert done["tombstones"] == 0 and count(db, "rows where deleted") == 5
    deletes = []
    while True:
        with db.transaction():
            seen = change.read_changes(db, "slow", limit=7)
            if not seen:
                break
            deletes += [c.key_text for c in seen if c.op == "delete"]
            change.advance(db, "slow", seen[-1].seq)
    assert sorted(deletes) == [f"[{i}]" for i in range(16, 21)]
    assert retention.prune(db, config, ["facts", "slow"], budget_seconds=60)["tombstones"] == 5
    assert count(db, "rows where deleted") == 0


def test_retention_config_reports_every_problem_at_once(tmp_path):
    body = ('[source]\ndsn = "x"\n[[tables]]\nname = "t"\n[retention]\ngate_log_keep_hours = -1\n'
            'prune_batch_rows = 0\nchange_log_keep_seconds = "soon"\nkeep_forever = true\nprune_interval_seconds = 0\n')
    path = tmp_path / "pgfresh.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    problems = err.value.problems
    assert len(problems) == 5, problems
    for key in ("gate_log_keep_hours", "prune_batch_rows", "change_log_keep_seconds", "keep_forever",
                "prune_interval_seconds"):
        assert any(p.startswith(f"retention.{key}:") for p in problems), (key, problems)
    path.write_text('[source]\ndsn = "x"\n[[tables]]\nname = "t"\n[retention]\ngate_log_keep_hours = 0.5\n')
    assert retention.settings(cfg.load(path)).gate_log_keep_hours == 0.5


def test_release_of_a_stale_quarantined_change_is_refused_after_gate_log_pruning(db, dsn, tmp_path):
    from pgfresh.gate import QuarantineError, release

    db.execute("create table items (id int primary key, name text, price numeric(10,2))")
    db.execute("insert into items values (1, 'mug', 5)")
    body = TABLE.replace("[tables.gate.train]", "[tables.gate]\nranges = { price = [0, 100] }\n[tables.gate.train]")
    config = load(tmp_path, dsn, body + PRUNE_NOW + "\n[rag]\n")
    sync.run(config, once=True)
    db.execute("update items set price = 500 where id = 1")  # out of range: quarantined
    sync.run(config, once=True)
    db.execute("update items set price = 7 where id = 1")  # the newer, good version is admitted
    sync.run(config, once=True)
    assert count(db, "gate_log") == 0  # pruned (keep_hours = 0): only gate_seen still knows what came later
    (qid,) = db.execute("select id from pgfresh.quarantine where path = 'rag'").fetchone()
    with pytest.raises(QuarantineError, match="stale"):
        release(db, qid)

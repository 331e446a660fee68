"""The arena's tuned side actually plays: a short shop run with the built-in model in which every
tenant's slice publishes rounds during the live phase, so the tuned strategy answers changed facts
from a published slice (not from the base model), and the publish-gate-off twin answers the same
questions from a lineage of its own.

Before this test, every round of the demo was rejected (rounds of 3-6 facts trained 60 steps and
learnt none of them; forgetting was judged on 2-7 probe facts), so `tuned` answered exactly as
`stale` did. The settle window of the shop's training gate is 30 s; here it is 5 s, so that a run
of a minute sees facts settle and get trained, as the demo's longer run does.
"""

from __future__ import annotations

import re

import psycopg
import pytest

from pgfresh import config as cfg
from pgfresh.arena import runner, workload

pytestmark = pytest.mark.timeout(5400)  # a model build and a minute of live training: 40+ min at load 12 on 2 cores

STRATEGIES = ["stale", "tuned", "tuned-gate-off"]
SHOPS = 2


def _config(dsn: str, directory) -> cfg.Config:
    slot = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    text = workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0, "slot": slot})
    text = text.replace("settle_seconds = 30", "settle_seconds = 5")
    # rounds of at most 12 facts: a round finishes within a batch or two even on a loaded machine
    text = text.replace("max_facts_per_round = 40", "max_facts_per_round = 12")
    # one thread, deterministic algorithms: the build and the rounds repeat on one machine
    text = text.replace("\n[train]\n", "\n[train]\ndeterministic = true\n", 1)
    path = directory / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n' + text)  # the store in the test database
    return cfg.load(path)


@pytest.fixture(scope="module")
def tuned_run(module_dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("arena_tuned")
    r = runner.run_arena(
        _config(module_dsn, directory), minutes=0.3, noise=0.0, seed=5, strategies=STRATEGIES, json_path=directory / "results.json",
        overrides={"batches": 5, "batch_interval_s": 8.0, "rate_per_s": 6.0, "questions_per_batch": 12,
                   "correct_after_s": 3.0, "oltp_seconds": 0.0, "export_seconds": 0.0,
                   "scale": {"shops": SHOPS, "products_per_shop": 8, "notes_per_shop": 2}})
    with psycopg.connect(module_dsn) as c:
        versions = c.execute(
            "select slice, version, kind, created_at from pgfresh.slice_versions order by slice, version").fetchall()
        tenants = [t for (t,) in c.execute("select distinct tenant from pgfresh.facts where kind = 'qa'")]
    return r, versions, tenants


def _slice_version(record: dict) -> tuple[str, int] | None:
    m = re.fullmatch(r"slice (.+) v(\d+)", (record["sources"] or [""])[0])
    return (m.group(1), int(m.group(2))) if m else None


def test_every_slice_publishes_and_tuned_answers_changed_facts_from_published_slices(tuned_run):
    r, versions, tenants = tuned_run
    assert len(tenants) == SHOPS
    published = {s for s, v, kind, _ in versions if kind != "base" and not s.startswith("_")}
    rounds = [x for x in r["training"]["tuned"]["rounds"]]
    print("tuned rounds: " + "; ".join(
        f"{x['slice']} {x['status']} learn {x['learn']} new {x['new_accuracy']} forgetting {x['forgetting']}"
        f" {x['forgetting_ci']} of {x['kept_before']} ({x['reason']})" for x in rounds))
    assert published == {str(t) for t in tenants}, (published, rounds)  # every tenant's slice, during the run
    assert set(r["training"]["tuned"]["slices_published"]) == published

    changed = [x for x in r["records"] if x["strategy"] == "tuned" and x["cls"] == "changed"]
    from_slices = [x for x in changed if (_slice_version(x) or ("", 0))[1] >= 1]
    right = sum(x["outcome"] == "correct" for x in from_slices)
    stale = {x["qid"]: x["outcome"] == "correct" for x in r["records"] if x["strategy"] == "stale" and x["cls"] == "changed"}
    print(f"changed facts: {len(from_slices)} of {len(changed)} answered from a published slice, {right} right;"
          f" stale right on those: {sum(stale[x['qid']] for x in from_slices)}")
    assert len(from_slices) >= 5, [x["sources"] for x in changed]
    assert r["strategies"]["tuned"]["by_class"]["changed"]["n"] == len(changed)

    # Whether the serving version had trained on the asked value: every unchanged fact was trained
    # by the base version (the lineage's root), so each of those answers must say so.
    unchanged = [x for x in r["records"] if x["strategy"] == "tuned" and x["cls"] == "unchanged"]
    assert unchanged and all(x["learnt"] is True for x in unchanged), [(x["question"], x["learnt"]) for x in unchanged]
    learnt = r["strategies"]["tuned"]["learnt"]
    print(f"learnt: {learnt['learnt']} of {learnt['answered_from_slice']} changed answers from a slice had been"
          f" trained on the asked value; right on {learnt['on_learnt']['accuracy']} of those,"
          f" {learnt['on_not_learnt']['accuracy']} of the rest")
    assert learnt["answered_from_slice"] == sum(x["learnt"] is not None for x in changed) >= len(from_slices)
    row = next(v for v in r["verdict"] if v["claim"].startswith("Fine-tuning internalises"))
    assert "had been trained on the asked value" in row["evidence"]


def test_gate_off_column_comes_from_its_own_rounds_on_the_same_questions(tuned_run):
    r, versions, tenants = tuned_run
    on, off = r["strategies"]["tuned"], r["strategies"]["tuned-gate-off"]
    assert (on["publish_gate"], off["publish_gate"]) == (True, False)
    qids = {name: sorted(x["qid"] for x in r["records"] if x["strategy"] == name) for name in ("tuned", "tuned-gate-off")}
    assert qids["tuned"] == qids["tuned-gate-off"] and on["overall"]["n"] == off["overall"]["n"] > 0
    t = r["training"]["tuned-gate-off"]
    assert t["rejected"] == 0 and t["published"] >= 1
    assert set(t["slices_published"]) == {f"_gate-off:{x}" for x in tenants}
    lineage = {s for s, v, kind, _ in versions if s.startswith("_gate-off:") and kind != "base"}
    assert lineage == set(t["slices_published"])  # published versions of its own lineages, in the store
    served = {(_slice_version(x) or (x["answer"],))[0] for x in r["records"] if x["strategy"] == "tuned-gate-off"}
    assert served <= {f"_gate-off:{x}" for x in tenants}  # it never answers from the gated slices
    row = next(v for v in r["verdict"] if v["claim"].startswith("The publish gate"))
    print(row)
    assert row["measured"] and "tuned-gate-off (gate off)" in row["evidence"] and "McNemar" in row["meaning"]


def test_a_timed_run_trains_in_the_background_while_questions_are_asked(dsn, tmp_path):
    """Without `batches` (the demo, `pgfresh arena --minutes`), rounds run in the arena's trainer
    process beside the questions, not between batches: versions are published while the live
    phase runs, tuned answers from them, the training CPU is the strategies' background cost, and
    the round in progress at the end is abandoned (not left `running`)."""
    r = runner.run_arena(
        _config(dsn, tmp_path), minutes=0.75, noise=0.0, seed=5, strategies=["tuned", "tuned-gate-off"],
        overrides={"batch_interval_s": 5.0, "rate_per_s": 6.0, "questions_per_batch": 6, "correct_after_s": 3.0,
                   "oltp_seconds": 0.0, "export_seconds": 0.0, "wal_seconds": 0.0,
                   "scale": {"shops": SHOPS, "products_per_shop": 8, "notes_per_shop": 2}})
    assert not r["errors"]
    live = {name: r["training"][name] for name in ("tuned", "tuned-gate-off")}
    assert sum(t["published"] for t in live.values()) >= 1, live
    assert all(x["status"] != "running" for t in live.values() for x in t["rounds"])
    with psycopg.connect(dsn) as c:
        newest = dict(c.execute("select slice, max(version) from pgfresh.slice_versions group by slice").fetchall())
    from_live = []
    for name, t in live.items():
        cost = r["strategies"][name]["cost"]
        assert cost["background_cpu_s"] > 1.0 and cost["refresh_wall_s"] < 1.0, cost  # trained, and not in refresh
        # the versions its trainer published while the questions ran: each slice's newest ones
        published = {sl: sum(x["slice"] == sl and x["status"] == "published" for x in t["rounds"]) for sl in newest}
        fresh = {(sl, newest[sl] - i) for sl, n in published.items() for i in range(n)}
        from_live += [x for x in r["records"] if x["strategy"] == name and _slice_version(x) in fresh]
    assert from_live  # tuned answered from versions trained beside the questions

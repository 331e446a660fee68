"""The arena: SQL ground truth checked independently, metrics on a short real run with strategies
defined here, the long-transaction export measured on the server, the report in real chromium.

Most strategies below exist only to exercise the metric pipeline; pgfresh ships none of them:
`lookup` reads the row store (pgfresh.rows, kept current by capture between batches), `frozen`
answers from a copy of the row store taken before the live phase, `constant` always says "42".
One run uses pgfresh's own `stale` and `rag-hybrid` with the built-in model it builds.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import psycopg
import pytest
from rich.console import Console

from pgfresh import config as cfg
from pgfresh.arena import dbimpact, metrics, questions, report, runner, workload
from pgfresh.arena.settings import settings as arena_settings
from pgfresh.arena.strategy import Answer, Strategy
from pgfresh.errors import ConfigError
from tests.conftest import run_cli

SMALL = "\n[arena.scale]\nshops = 3\nproducts_per_shop = 12\nnotes_per_shop = 3\n"


def shop_config(directory: Path, dsn: str, extra: str = "") -> cfg.Config:
    path = directory / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n'  # the store in the test database (tests/conftest.py)
                    + workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0}) + SMALL + extra)
    return cfg.load(path)


# -- ground truth ------------------------------------------------------------------------------
def independent_truth(conn, probe) -> tuple[str, str | None]:
    """The truth by another path: whole tables read into Python, the rules written out by hand."""
    products = {r[0]: r for r in conn.execute(
        "select product_id, shop_id, name, category, price::text, stock::text, status from shop.products")}
    last_event = {}
    for key, noise, clean in conn.execute(
            "select key, noise, clean from arena.events where tbl = 'shop.products' order by id"):
        last_event[key[0]] = (noise, clean)
    if probe.truth_kind == "never":
        names = {r[2] for r in products.values()}
        return ("never", None) if probe.invented["name"] not in names else ("exists", None)
    row = products.get(probe.key[0])
    if row is None or row[6] != "published":
        return "gone", None
    noise, clean = last_event.get(probe.key[0], (False, None))
    clean = (clean or {}) if noise else {}
    column = {"price": 4, "stock": 5, "category": 3}[probe.template]
    return "value", clean.get(probe.template, row[column])


def test_truth_matches_an_independent_check(db, dsn, tmp_path):
    config = shop_config(tmp_path, dsn)
    s = replace(arena_settings(config), correct_after_s=4.0, rate_per_s=5.0)  # corrections within 20 steps
    w = workload.load_workload(config, s)
    w.setup(db)
    (seeded_at,) = db.execute("select clock_timestamp()").fetchone()
    w.attach(db)
    gen = questions.QuestionGenerator(config, s, w, seeded_at)
    seen, probes = set(), []
    for _ in range(6):
        for _ in range(40):
            w.step(db, 0.35)
        batch = gen.batch(db, 12)
        for p in batch:  # the workload is paused: the tables are as they were when the truth was read
            kind, value = independent_truth(db, p)
            assert (kind, value) == (p.truth_kind, p.truth), (p.cls, p.question.text)
            if p.truth_kind != "never":
                assert p.question.tenant is not None and p.question.text.count("{") == 0
        seen |= {p.cls for p in batch}
        probes += batch
    assert seen == set(questions.CLASSES)
    assert {p.phrasing for p in probes} == {"canonical", "paraphrase", "held_out"}
    noisy = [p for p in probes if p.cls == "noisy"]
    assert any(p.noisy_values for p in noisy)  # the truth of a noisy row is its clean value, not what it holds


def test_small_batches_still_ask_every_class_its_share():
    """Batches of 8 questions gave the 10% classes (deleted rows, never-existed rows) no slot at
    all: a 10-minute demo asked 2 deleted-row and 2 never-existed questions of 405, so
    hallucination went all but unmeasured. What a batch cannot give a class is owed to it in the
    next ones."""
    owed: dict = {}
    asked = {c: 0 for c in questions.SHARES}
    for _ in range(50):
        q = questions.quota(8, owed)
        assert sum(q.values()) == 8
        for c, k in q.items():
            asked[c] += k
    for c, share in questions.SHARES.items():
        assert abs(asked[c] - 400 * share) <= 1, asked
    assert questions.quota(100, {}) == {c: round(100 * s) for c, s in questions.SHARES.items()}


def test_re_asked_changes_take_turns(db, dsn, tmp_path):
    """Changes no strategy has got right yet are re-asked in turns: the one asked longest ago
    first, so one change does not take every re-ask slot while others wait."""
    config = shop_config(tmp_path, dsn)
    s = replace(arena_settings(config), correct_after_s=4.0)
    w = workload.load_workload(config, s)
    w.setup(db)
    (seeded_at,) = db.execute("select clock_timestamp()").fetchone()
    w.attach(db)
    for _ in range(80):
        w.step(db, 0.0)
    gen = questions.QuestionGenerator(config, s, w, seeded_at)
    watch: list = []
    rewatched = []
    for _ in range(3):  # no change in between: every changed fact asked stays unresolved and watched
        batch = gen.batch(db, 12, watch)
        rewatched.append({p.fact for p in batch if p.cls == "changed" and p.fact in watch})
        watch += [p.fact for p in batch if p.cls == "changed" and p.fact not in watch]
    assert rewatched[1] and rewatched[2]
    assert not rewatched[1] & rewatched[2], rewatched  # batch 3 re-asks the ones batch 2 left waiting


def test_unchanged_panel_survives_changes_to_other_facts_of_its_rows(db, dsn, tmp_path):
    """After enough changes that every row was touched, the unchanged class still has questions
    (a stock update does not change the row's category fact), and each is about a fact whose
    value no event changed."""
    config = shop_config(tmp_path, dsn)
    s = replace(arena_settings(config), correct_after_s=4.0, rate_per_s=5.0)
    w = workload.load_workload(config, s)
    w.setup(db)
    (seeded_at,) = db.execute("select clock_timestamp()").fetchone()
    w.attach(db)
    gen = questions.QuestionGenerator(config, s, w, seeded_at)
    gen.batch(db, 12)  # the panel is chosen at the first batch
    for _ in range(400):
        w.step(db, 0.1)
    (touched,) = db.execute("select count(distinct key) from arena.events where tbl = 'shop.products'").fetchone()
    (rows,) = db.execute("select count(*) from shop.products").fetchone()
    assert touched >= 0.8 * rows  # nearly every row changed in some way
    unchanged = [p for p in gen.batch(db, 30) if p.cls == "unchanged"]
    assert unchanged
    for p in unchanged:
        (changed,) = db.execute(
            "select count(*) from arena.events where tbl = 'shop.products' and key = %s and (op = 'delete'"
            " or old_row->>%s is distinct from new_row->>%s or old_row->>'status' is distinct from new_row->>'status')",
            (json.dumps(p.key), p.template, p.template)).fetchone()
        assert changed == 0, (p.key, p.template)


def test_workload_is_deterministic(db, dsn, tmp_path):
    config = shop_config(tmp_path, dsn)
    digests = []
    for _ in range(2):
        w = workload.load_workload(config, replace(arena_settings(config), correct_after_s=2.0))
        w.setup(db)
        w.attach(db)
        kinds = [w.step(db, 0.3) for _ in range(60)]
        (rows,) = db.execute("select md5(string_agg(p::text, ',' order by product_id)) from"
                             " (select product_id, shop_id, name, category, price, stock, status, description"
                             " from shop.products) p").fetchone()
        digests.append((rows, kinds))
    assert digests[0] == digests[1]
    assert any(k.startswith("noise:") for k in digests[0][1]) and "correction" in digests[0][1]


def test_hot_rows_take_most_updates_and_the_cold_tail_stays_put(db, dsn, tmp_path):
    """`hot_rows`/`hot_changes`: read from the source's change log, the hot products take about
    `hot_changes` of the price and stock updates; with the default (1.0) no such set exists."""
    config = shop_config(tmp_path, dsn)
    shares = {}
    for hot_rows in (0.2, 1.0):
        w = workload.load_workload(config, replace(arena_settings(config), hot_rows=hot_rows, hot_changes=0.9))
        w.setup(db)
        w.attach(db)
        for _ in range(300):
            w.step(db, 0.0)
        counts = dict(db.execute("select (key->>0)::int, count(*) from arena.events where tbl = 'shop.products'"
                                 " and kind in ('price', 'stock') group by 1").fetchall())
        products = db.execute("select count(*) from shop.products").fetchone()[0]
        top = sorted(counts.values(), reverse=True)[: round(products * 0.2)]
        shares[hot_rows] = sum(top) / sum(counts.values())
        if hot_rows < 1:
            on_hot = sum(n for pid, n in counts.items() if pid in w.hot) / sum(counts.values())
            assert 0.8 <= on_hot <= 0.97, on_hot
            cold = [pid for pid in w.published - w.hot]
            assert sum(counts.get(pid, 0) for pid in cold) / len(cold) < 1.0  # most cold rows changed at most once
    assert shares[0.2] >= 0.75 and shares[1.0] < 0.6, shares


def test_custom_workload_from_the_shipped_example(db, dsn, tmp_path):
    examples = Path(workload.__file__).parent.parent / "examples"
    for name in ("arena_custom.toml", "arena_custom.sql", "arena_custom.py"):
        text = (examples / name).read_text()
        if name.endswith(".toml"):
            text = re.sub(r'dsn = ".*"', f'dsn = "{dsn}"', text, count=1)
        (tmp_path / name).write_text(text)
    config = cfg.load(tmp_path / "arena_custom.toml")
    s = arena_settings(config)
    w = workload.load_workload(config, s)
    w.setup(db)
    (seeded_at,) = db.execute("select clock_timestamp()").fetchone()
    w.attach(db)
    kinds = [w.step(db, 0.2) for _ in range(120)]
    assert "qty" in kinds and "retire" in kinds and "noise:wrong_qty" in kinds
    probes = questions.QuestionGenerator(config, s, w, seeded_at).batch(db, 30)
    assert {"changed", "unchanged", "deleted", "never", "held_out"} <= {p.cls for p in probes}
    parts = {r[0]: r for r in db.execute("select part_id, qty::text, state, name from public.parts")}
    last = {k[0]: (noise, clean) for k, noise, clean in db.execute(
        "select key, noise, clean from arena.events order by id")}
    for p in probes:
        if p.truth_kind == "never":
            assert p.invented["name"] not in {r[3] for r in parts.values()}
            continue
        row = parts.get(p.key[0])
        if row is None or row[2] != "active":
            assert p.truth_kind == "gone"
            continue
        noise, clean = last.get(p.key[0], (False, None))
        assert p.truth == str((clean or {}).get("qty", row[1])) if noise else p.truth == row[1]


def test_arena_config_problems_name_their_keys(dsn, tmp_path):
    path = tmp_path / "pgfresh.toml"
    text = workload.shop_config_text({"dsn": dsn}).replace(
        'workload = "shop"', 'workload = "shop"\nnoise = 0.9\nminutes = "x"\nstrategies = ["rag-dense", 3]')
    path.write_text(text.replace('table = "shop.products"', 'table = "shop.nothing"'))
    with pytest.raises(ConfigError) as err:
        cfg.load(path)
    assert [p.split(":")[0] for p in err.value.problems] == [
        "arena.noise", "arena.minutes", "arena.strategies", "arena.questions[0].table"]
    proc = run_cli("arena", "--config", str(path), "--minutes", "1")
    assert proc.returncode == 2 and "arena.noise: expected a number >= 0.0 and <= 0.5, got 0.9" in proc.stderr


# -- matching ----------------------------------------------------------------------------------
class _P:
    def __init__(self, truth, kind="value", old=(), noisy=()):
        self.truth, self.truth_kind, self.old_values, self.noisy_values = truth, kind, list(old), list(noisy)


def test_answers_are_scored_after_normalisation():
    assert metrics.matches("12.5", "12.50") and metrics.matches("$12.50", "12.50")
    assert metrics.matches("The price is $12.50.", "12.50") and metrics.matches("1,200.00 USD", "1200")
    assert not metrics.matches("12.05", "12.50") and not metrics.matches("112.50", "12.50")
    assert metrics.matches(" kitchen. ", "Kitchen") and not metrics.matches("Kitchn", "Kitchen")
    assert metrics.outcome(_P("12.50", old=["11.00"]), "It costs 11") == "stale"
    assert metrics.outcome(_P("12.50", noisy=["125.00"]), "125") == "polluted"
    assert metrics.outcome(_P(None, "gone", old=["12.50"]), "Oak Kettle is no longer available") == "correct"
    assert metrics.outcome(_P(None, "gone", old=["12.50"]), "12.50") == "stale"
    assert metrics.outcome(_P(None, "never"), "42") == "hallucinated"
    assert metrics.outcome(_P(None, "never"), "I don't know.") == "correct"
    assert metrics.percentile([1, 2, 3, 4], 50) == 2 and metrics.percentile([1, float("inf")], 99) is None


def test_chinese_answers_are_scored_after_normalisation():
    assert metrics.matches("１２.５０", "12.50") and metrics.matches("售价１２．５元。", "12.50")
    assert metrics.matches("价格是12.50元", "12.50") and not metrics.matches("价格是112.50元", "12.50")
    assert metrics.matches("库存还有１２件", "12") and metrics.matches("它属于厨房。", "厨房")
    assert not metrics.matches("它属于橱房", "厨房")  # a wrong character is a wrong answer
    assert metrics.outcome(_P(None, "gone", old=["12.50"]), "北欧橡木水壶已下架") == "correct"
    assert metrics.outcome(_P(None, "never"), "我不知道。") == "correct"
    assert metrics.outcome(_P(None, "never"), "没有相关信息") == "correct"
    assert metrics.outcome(_P(None, "never"), "售价３５元") == "hallucinated"
    assert metrics.outcome(_P("12.50", noisy=["125.00"]), "１２５元") == "polluted"


# -- intervals, tests and the verdict's words -----------------------------------------------------
def test_wilson_and_mcnemar_against_hand_checked_values():
    # Wilson 95%: 5/10 -> 0.2366-0.7634; 0/10 -> [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415].
    lo, hi = metrics.wilson(5, 10)
    assert round(lo, 4) == 0.2366 and round(hi, 4) == 0.7634
    assert metrics.wilson(0, 10)[0] == 0.0 and round(metrics.wilson(0, 10)[1], 4) == 0.2775
    assert round(metrics.wilson(10, 10)[0], 4) == 0.7225 and metrics.wilson(0, 0) is None
    # McNemar exact: 0 vs 6 discordant pairs: 2 * 0.5^6; 1 vs 9: 2 * (1 + 10) / 2^10; none: 1.
    assert metrics.mcnemar_exact(0, 6) == 2 / 64 and metrics.mcnemar_exact(9, 1) == 22 / 1024
    assert metrics.mcnemar_exact(0, 0) == 1.0 and metrics.mcnemar_exact(3, 3) == 1.0


def test_bootstrap_is_deterministic_with_a_seed():
    xs = [0.01 * i for i in range(1, 201)]
    a, b = metrics.bootstrap(xs), metrics.bootstrap(xs)
    assert a == b and a[50][0] <= metrics.percentile(xs, 50) <= a[50][1]
    assert metrics.bootstrap(xs, seed=1) != metrics.bootstrap(xs, seed=2)
    # A change never fresh is infinitely late: an upper bound on it is unbounded (None).
    ci = metrics.bootstrap([1.0] * 12 + [float("inf")] * 8)
    assert ci[50][0] == 1.0 and ci[50][1] is None and ci[99] is None


def _records(name: str, right: dict[str, list[bool]], batches: int = 3) -> list[dict]:
    """One strategy's answers: per class, whether each question (same qids for every strategy) was right."""
    out = []
    for cls, answers in right.items():
        for i, ok in enumerate(answers):
            out.append({"strategy": name, "qid": f"{cls}{i}", "cls": cls, "batch": i % batches, "phrasing": "canonical",
                        "truth_kind": "never" if cls == "never" else "value", "change_kind": None,
                        "outcome": "correct" if ok else ("hallucinated" if cls == "never" else "wrong"),
                        "has_prior": False, "noisy_values": False, "event_id": None, "event_t": None, "answered_t": 1.0,
                        "fact_age_s": None, "latency_s": 0.01 + 0.001 * (i % 7), "cpu_s": 0.001, "gpu_s": None,
                        "hits": None})
    return out


def _results(kinds: dict[str, str], answers: dict[str, dict[str, list[bool]]], batches: int = 3) -> dict:
    records = [r for name in kinds for r in _records(name, answers[name], batches)]
    cost = {"prepare_cpu_s": 0.0, "refresh_cpu_s": 0.0}
    strategies = {n: {"kind": k, "gate": True, **metrics.summarise_strategy(
        [r for r in records if r["strategy"] == n], batches, cost, 0)} for n, k in kinds.items()}
    return {"strategies": strategies, "records": records, "questions": {"batches": batches}}


def _pattern(n: int, share: float) -> list[bool]:
    return [(i * share) % 1 + share >= 1 for i in range(n)]  # round(n * share) right, spread evenly


def test_verdict_calls_a_difference_only_when_the_intervals_say_so():
    from pgfresh.arena import verdict

    kinds = {"rag-x": "rag", "tuned-x": "tuned", "router": "hybrid"}
    close = _results(kinds, {"rag-x": {"unchanged": _pattern(60, 0.55), "changed": _pattern(60, 0.5)},
                             "tuned-x": {"unchanged": _pattern(60, 0.5), "changed": _pattern(60, 0.45)},
                             "router": {"unchanged": _pattern(60, 0.5), "changed": _pattern(60, 0.5)}})
    assert "no measurable difference" in verdict.internalised(close)["meaning"]
    assert "no measurable difference" in verdict.rag_enough(close)["meaning"]
    assert "not measurably worse" in verdict.router_parts(close)["meaning"]
    assert "[" in verdict.rag_enough(close)["evidence"]  # every rate quoted with its interval
    apart = _results(kinds, {"rag-x": {"unchanged": _pattern(60, 0.2), "changed": [True] * 60},
                             "tuned-x": {"unchanged": _pattern(60, 0.9), "changed": _pattern(60, 0.1)},
                             "router": {"unchanged": _pattern(60, 0.9), "changed": _pattern(60, 0.3)}})
    meaning = verdict.internalised(apart)["meaning"]
    assert "no measurable difference" not in meaning.split(";")[0] and "rag-x: +68 points, McNemar" in meaning
    router = verdict.router_parts(apart)["meaning"]
    assert "measurably worse than the better part on: changed" in router and "unchanged" not in router
    rows = {r[0]: r for r in report.router_rows(apart)}  # the report's table, class by class
    assert rows["changed"][-1].startswith("worse than rag-x") and rows["unchanged"][-1].startswith("not measurably")
    # Forgetting across the run: different questions, so only non-overlapping intervals count.
    # Question i is in batch i % 3: right in the first third only, or right every other question.
    forgot = _results({"tuned-x": "tuned"}, {"tuned-x": {"unchanged": [i % 3 == 0 for i in range(90)]}})
    assert "measurable loss on the unchanged panel: tuned-x +100 points" in verdict.forgetting(forgot)["meaning"]
    kept = _results({"tuned-x": "tuned"}, {"tuned-x": {"unchanged": [i % 2 == 0 for i in range(90)]}})
    assert "no measurable difference" in verdict.forgetting(kept)["meaning"]


def test_placement_advises_from_the_tuned_time_to_fresh_even_when_it_never_caught_up():
    """In the 2-minute demo the slices made none of 76 changes fresh within the run; the placement
    row said "not measured" although that is a measurement: no fact that changed can be trained in
    fast enough. It now advises from it; with a measured p50, from the p50."""
    from pgfresh.arena import verdict

    def results(tuned_fresh: dict) -> dict:
        rag_fresh = {"watched": 76, "resolved": 30, "p50_s": None, "p50_ci_s": None}
        return {"workload": {"facts": {"shop.products": {"changes_per_fact_per_hour": {"price": 85.0, "category": 0}}}},
                "strategies": {"tuned": {"kind": "tuned", "overall": {"accuracy": 0.3}, "time_to_fresh": tuned_fresh},
                               "rag": {"kind": "rag", "overall": {"accuracy": 0.4}, "time_to_fresh": rag_fresh}}}

    never = verdict.placement(results({"watched": 76, "resolved": 0, "p50_s": None, "p50_ci_s": None}))
    assert never["measured"] and "never within the run (0 of 76" in never["evidence"]
    assert "price: retrieve" in never["meaning"] and "category: train" in never["meaning"], never
    assert "30 of 76" in never["evidence"]  # retrieval's own catch-up is shown, not hidden
    quick = verdict.placement(results({"watched": 76, "resolved": 60, "p50_s": 10.0, "p50_ci_s": [8.0, 12.0]}))
    assert "price: train" in quick["meaning"] and "category: train" in quick["meaning"], quick  # 42 s > 2 x 10 s
    slow = verdict.placement(results({"watched": 76, "resolved": 60, "p50_s": 30.0, "p50_ci_s": [25.0, 35.0]}))
    assert "price: retrieve" in slow["meaning"]
    assert verdict.placement(results({"watched": 0, "resolved": 0, "p50_s": None}))["meaning"] == verdict.NOT_MEASURED


# -- a short arena run with strategies defined here ----------------------------------------------
WORDS = [("price", re.compile(r"price|cost|sell|pay|goes for|价格|多少钱|售价|付多少")),
         ("stock", re.compile(r"stock|units|available|inventory|left|库存|几件|多少件|有货")),
         ("category", re.compile(r"category|kind|section|classified|listed|类别|分类|哪一类|哪个区"))]


def _column(text: str) -> str | None:
    return next((c for c, pattern in WORDS if pattern.search(text.lower())), None)


def _rows(conn, tenant):
    return conn.execute("select key, row from pgfresh.rows where tbl = 'shop.products' and not deleted"
                        " and tenant = %s and row->>'status' = 'published'", (tenant,)).fetchall()


def _answer_from(rows, question) -> Answer:
    t0 = time.perf_counter()
    found = [(k, r) for k, r in rows if r["name"].lower() in question.text.lower()]
    column = _column(question.text)
    if not found or column is None:
        return Answer("That product is no longer available.", time.perf_counter() - t0)
    key, row = found[0]
    return Answer(str(row[column]), time.perf_counter() - t0, retrieved_keys=[("shop.products", key)])


class Lookup(Strategy):
    kind = "rag"

    def prepare(self, ctx):
        self.conn = psycopg.connect(ctx.dsn, autocommit=True)

    def answer(self, question):
        return _answer_from(_rows(self.conn, question.tenant), question)

    def close(self):
        self.conn.close()


class Frozen(Strategy):
    kind = "stale"

    def prepare(self, ctx):
        with psycopg.connect(ctx.dsn) as conn:
            self.rows = {t: _rows(conn, t) for (t,) in conn.execute("select distinct tenant from pgfresh.rows")}

    def answer(self, question):
        return _answer_from(self.rows.get(question.tenant, []), question)


class Constant(Strategy):
    kind = "other"

    def answer(self, question):
        return Answer("42", 0.0)


def _named(strategy, name):
    strategy.name = name
    return strategy


MIN_QUESTIONS = 120  # per strategy, in 6 batches: the batches grow from 12 to what it takes


@pytest.fixture(scope="module")
def arena_run(module_dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("arena")
    config = shop_config(directory, module_dsn)
    out = io.StringIO()
    started = time.monotonic()
    results = runner.run_arena(
        config, minutes=0.3, noise=0.2, seed=11, report=directory / "report.html", json_path=directory / "results.json",
        strategies=[_named(Lookup(), "lookup"), _named(Frozen(), "frozen"), _named(Constant(), "constant")],
        console=Console(file=out, width=120),
        overrides={"batches": 6, "batch_interval_s": 3.0, "rate_per_s": 8.0, "questions_per_batch": 12, "correct_after_s": 3.0,
                   "min_questions": MIN_QUESTIONS, "oltp_seconds": 1.0, "export_seconds": 1.0})
    return {"results": results, "dir": directory, "log": out.getvalue(), "seconds": time.monotonic() - started}


def _rates(summary):
    for key in ("accuracy", "stale_rate", "hallucination_rate", "polluted_rate", "refusal_rate"):
        v = summary[key]
        assert v is None or 0.0 <= v <= 1.0, (key, v)


def test_short_run_measures_every_metric(arena_run):
    r = arena_run["results"]
    assert json.loads((arena_run["dir"] / "results.json").read_text())["format"] == "pgfresh-arena/1"
    assert r["questions"]["batches"] == 6 and r["workload"]["changes"] > 20
    assert set(r["questions"]["by_class"]) >= {"changed", "unchanged", "never", "deleted"}
    assert all(n >= MIN_QUESTIONS for n in r["questions"]["per_strategy"].values()), r["questions"]
    for name, s in r["strategies"].items():
        _rates(s["overall"])
        for c in s["by_class"].values():
            _rates(c)
            lo, hi = c["ci"]["accuracy"]  # every rate carries its 95% interval
            assert lo <= c["accuracy"] <= hi
        assert s["latency"]["p50_ci_s"][0] <= s["latency"]["p50_s"] <= s["latency"]["p50_ci_s"][1]
        assert s["latency"]["p50_s"] is not None and s["latency"]["p50_s"] <= s["latency"]["p99_s"]
        assert s["cost"]["cpu_s_per_1k_questions"] >= 0 and s["cost"]["cpu_s_per_1k_changes"] is not None
        assert s["forgetting"]["start_accuracy"] is not None, name
        assert s["time_to_fresh"]["watched"] > 0
    lookup, frozen, constant = (r["strategies"][n] for n in ("lookup", "frozen", "constant"))
    # The property the arena exists to show: an answer from current data beats a frozen copy on changed facts.
    assert lookup["by_class"]["changed"]["accuracy"] > frozen["by_class"]["changed"]["accuracy"]
    assert lookup["time_to_fresh"]["resolved"] > 0 and lookup["time_to_fresh"]["p50_s"] >= 0
    assert frozen["overall"]["stale_rate"] > 0
    assert constant["overall"]["hallucination_rate"] == 1.0
    assert lookup["retrieval"]["measured"] and 0 < lookup["retrieval"]["hit_at_k"]["1"] <= 1
    assert not frozen["retrieval"]["measured"]
    assert r["ingest"]["changes"] > 0 and r["ingest"]["cpu_s_per_1k_changes"] > 0


def test_short_run_measures_the_database(arena_run):
    imp = arena_run["results"]["dbimpact"]
    assert imp["sampler"]["samples"] and imp["sampler"]["max_xmin_age"] is not None and not imp["sampler"]["error"]
    assert imp["oltp"]["without_pgfresh"]["tps"] > 0 and imp["oltp"]["with_pgfresh"]["tps"] > 0
    assert imp["busiest_table"] == "shop.products"
    for mode in ("naive", "chunked"):
        assert imp["export"][mode]["rows_read"] > 0 and imp["export"][mode]["method"] == "pgstattuple"
    rows = {v["claim"]: v for v in arena_run["results"]["verdict"]}
    assert len(rows) == 10
    assert rows["The router is no worse than the better of its two parts on any class"]["evidence"] == "not measured"
    assert rows["Training cost is prohibitive"]["evidence"] == "not measured"  # no tuned strategy ran
    assert rows["Long training reads bloat PostgreSQL"]["measured"]
    assert "frozen" in rows["Continual updates cause catastrophic forgetting"]["evidence"]


# -- the built-in strategies, with the built-in model ------------------------------------------
def test_builtin_rag_finds_changed_rows_and_rarely_serves_their_old_values(dsn, tmp_path):
    """pgfresh's own strategies with its own tiny model (built here on a 16-product shop): hybrid
    retrieval finds the changed rows and the built-in reader rarely answers their old values.
    Its snapshot is the tuned arena's (tests/test_arena_tuned.py), so the two share one build."""
    path = tmp_path / "pgfresh.toml"  # a slot of its own: the module's other arena database keeps "pgfresh"
    slot = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    text = workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0, "slot": slot})
    # One thread, deterministic algorithms: the model build repeats exactly on one machine.
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n'  # the store in the test database
                    + text.replace("\n[train]\n", "\n[train]\ndeterministic = true\n", 1))
    config = cfg.load(path)
    r = runner.run_arena(
        config, minutes=0.3, noise=0.0, seed=5, strategies=["stale", "rag-hybrid"],
        overrides={"batches": 5, "batch_interval_s": 3.0, "rate_per_s": 6.0, "questions_per_batch": 10,
                   "oltp_seconds": 0.0, "export_seconds": 0.0,
                   "scale": {"shops": 2, "products_per_shop": 8, "notes_per_shop": 2}})
    rag, stale = r["strategies"]["rag-hybrid"], r["strategies"]["stale"]
    changed = rag["by_class"]["changed"]
    print(f"changed: rag-hybrid {changed['accuracy']:.2f} right, {changed['stale_rate']:.2f} stale of {changed['n']};"
          f" stale {stale['by_class']['changed']['accuracy']:.2f} right, {stale['by_class']['changed']['stale_rate']:.2f}"
          f" stale; hit@1 {rag['retrieval']['hit_at_k']['1']:.2f}; latency p50 rag-hybrid"
          f" {rag['latency']['p50_s'] * 1000:.0f} ms {rag['latency']['p50_ci_s']}, stale {stale['latency']['p50_s'] * 1000:.0f} ms;"
          f" questions per strategy {r['questions']['per_strategy']}")
    # At this size the built-in reader copies a changed value exactly for only 5-10% of these
    # questions (measured), so the strict "RAG beats stale" is asserted with `lookup` above; what
    # must hold here is that retrieval finds the row and RAG rarely serves the old value.
    assert changed["n"] >= 5
    # Not measurably worse than the frozen model (both are right on 0-2 of these ~20 questions, so
    # "at least as often" failed on one lucky stale answer: CI run of 2026-12-02, 0/20 vs 1/20).
    stale_changed = stale["by_class"]["changed"]
    assert metrics.wilson(round(changed["accuracy"] * changed["n"]), changed["n"])[1] >= stale_changed["accuracy"]
    # RAG rarely serves an old value. It is not held to the frozen model's own old-value rate: that
    # rate depends on the build and on how often a row changed twice before it was asked, and was
    # measured from 0.0 (CI, stop 15: the frozen model answered none right and none stale) to 0.5,
    # while the built-in reader can echo a snapshot value it memorised (1 of 19 in that run).
    assert changed["stale_rate"] <= 0.25
    assert rag["retrieval"]["hit_at_k"]["1"] >= 0.6


# -- the long-transaction export ---------------------------------------------------------------
def test_long_transaction_export_leaves_dead_tuples(db, dsn):
    db.execute("create table public.items (id int primary key, qty int not null, pad text)")
    db.execute("insert into public.items select g, 0, repeat('x', 100) from generate_series(1, 1000) g")
    updates = iter(range(10**6))

    def between():  # the workload: 100 single-row updates, each its own transaction
        for _ in range(100):
            db.execute("update public.items set qty = qty + 1 where id = %s", (next(updates) % 1000 + 1,))

    result = dbimpact.export_comparison(dsn, "public.items", between, chunks=10)
    naive, chunked = result["naive"], result["chunked"]
    print(f"dead tuples after VACUUM: long transaction {naive['dead_tuples_after_vacuum']} (xmin age"
          f" {naive['reader_xmin_age_at_vacuum']}), short chunks {chunked['dead_tuples_after_vacuum']}"
          f" (xmin age {chunked['reader_xmin_age_at_vacuum']})")  # docs/EVIDENCE.md
    assert naive["rows_read"] == chunked["rows_read"] == 1000
    assert naive["method"] == "pgstattuple"
    # Measured, same test, same load: the long transaction leaves the old row versions behind.
    assert naive["dead_tuples_after_vacuum"] > chunked["dead_tuples_after_vacuum"]
    assert naive["dead_tuples_after_vacuum"] >= 500  # most of the 1000 old versions stay behind the held xmin
    assert naive["reader_xmin_age_at_vacuum"] >= 1000 > chunked["reader_xmin_age_at_vacuum"]


# -- the report in a real browser --------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CAPTURE_ERRORS = """<script>
(function () {
  function note(kind, text) {
    var el = document.documentElement;
    el.setAttribute('data-' + kind, (el.getAttribute('data-' + kind) || '') + '|' + text);
  }
  window.addEventListener('error', function (e) { note('js-errors', e.message); });
  window.addEventListener('unhandledrejection', function (e) { note('js-errors', String(e.reason)); });
  var original = console.error;
  console.error = function () { note('console-errors', Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
})();
</script>"""


class _Plots(HTMLParser):
    """For each plot div (by id), whether a rendered plotly SVG appears inside it."""

    def __init__(self, ids):
        super().__init__()
        self.ids, self.stack, self.rendered, self.classes = set(ids), [], {}, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("br", "img", "meta", "input", "link", "hr"):
            return
        self.stack.append(a.get("id"))
        if a.get("id") in self.ids:
            self.classes[a["id"]] = a.get("class", "")
        if tag == "svg" and "main-svg" in (a.get("class") or ""):
            for i in self.stack:
                if i in self.ids:
                    self.rendered[i] = True

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "input", "link", "hr"):
            return
        if self.stack:
            self.stack.pop()


def _open_in_chromium(html_text: str, directory: Path) -> str:
    page = directory / f"page-{uuid.uuid4().hex[:6]}.html"
    page.write_text(html_text.replace("<head>", "<head>" + CAPTURE_ERRORS, 1), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--window-size=1280,900", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; "
                                             "`make test` installs it when run as root)")
def test_report_renders_in_chromium_without_errors(arena_run, tmp_path):
    text = (arena_run["dir"] / "report.html").read_text()
    assert "cdn" not in re.sub(r"<script>.*?</script>", "", text, flags=re.S).lower()  # nothing fetched
    dom = _open_in_chromium(text, tmp_path)
    root = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-js-errors" not in root and "data-console-errors" not in root, root
    plots = _Plots(report.PLOTS)
    plots.feed(dom)
    assert set(plots.rendered) == set(report.PLOTS), set(report.PLOTS) - set(plots.rendered)
    assert all("js-plotly-plot" in plots.classes[p] for p in report.PLOTS)
    assert "Verdict" in dom and "pgfresh-results" in dom
    # The harness can fail: a page with a script error is caught.
    broken = _open_in_chromium(text.replace("</body>", "<script>undefinedFunction()</script></body>"), tmp_path)
    assert "data-js-errors" in re.search(r"<html[^>]*>", broken).group(0)


# -- shop-zh: the same shop in Chinese ---------------------------------------------------------
def zh_config(directory: Path, dsn: str, extra: str = "") -> cfg.Config:
    path = directory / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n'  # the store in the test database (tests/conftest.py)
                    + workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0, "slot": "pgfresh_zh"}, "shop-zh")
                    + SMALL + extra, encoding="utf-8")
    return cfg.load(path)


def test_shop_zh_workload_is_chinese_and_deterministic(db, dsn, tmp_path):
    config = zh_config(tmp_path, dsn)
    s = replace(arena_settings(config), correct_after_s=2.0, noise=0.5)
    assert s.workload == "shop-zh"
    digests = []
    for _ in range(2):
        w = workload.load_workload(config, s)
        assert isinstance(w, workload.ShopZhWorkload)
        w.setup(db)
        w.attach(db)
        kinds = [w.step(db, 0.5) for _ in range(150)]
        (rows,) = db.execute("select md5(string_agg(p::text, ',' order by product_id)) from"
                             " (select product_id, name, category, price, description from shop.products) p").fetchone()
        digests.append((rows, kinds))
    assert digests[0] == digests[1]
    names = [r[0] for r in db.execute("select name from shop.products")]
    assert all(re.search("[\u4e00-\u9fff]", n) for n in names)
    # Noise that fits Chinese: wrong characters in categories, full-width digits in descriptions.
    wrong = [e[0] for e in db.execute("select new_row->>'category' from arena.events where kind = 'noise:wrong_value'"
                                      " and new_row->>'category' is distinct from old_row->>'category'")]
    assert wrong and not set(wrong) & set(workload.ZH_NOUNS)
    typos = [e[0] for e in db.execute("select new_row->>'description' from arena.events where kind = 'noise:typo'")]
    assert any(re.search("[０-９]", t or "") for t in typos) or any(
        c in (t or "") for t in typos for c in workload.ZH_WRONG_CHARACTERS.values())


def test_builtin_tokenizer_handles_chinese():
    from pgfresh import model

    texts = ["北欧橡木水壶（厨房）售价12.50元；库存12件。北欧风格的橡木水壶，经久耐用，保修２年。",
             "北欧橡木水壶的价格是多少？ 12.50", "复古竹风筝已下架"] * 20
    tok = model.train_tokenizer(texts, 300)
    for text in ["北欧橡木水壶的价格是多少？", "售价１２.５０元", "没见过的字：鑫龘", "Oak Kettle 12.50"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.tokenize("12.50元")[:2] == ["1", "2"]  # digits one per token, as in English


def test_shop_zh_short_run_end_to_end(dsn, tmp_path):
    """`pgfresh arena --workload shop-zh` in small: the capture pipeline, Chinese questions with SQL
    truth, the lookup strategy answering from the row store, every class asked."""
    config = zh_config(tmp_path, dsn)
    r = runner.run_arena(
        config, minutes=0.3, noise=0.2, seed=3, report=tmp_path / "report.html",
        strategies=[_named(Lookup(), "lookup"), _named(Constant(), "constant")],
        overrides={"batches": 4, "batch_interval_s": 3.0, "rate_per_s": 8.0, "questions_per_batch": 15,
                   "correct_after_s": 3.0, "oltp_seconds": 0.0, "export_seconds": 0.0})
    assert r["run"]["workload"] == "shop-zh"
    assert set(r["questions"]["by_class"]) >= {"changed", "unchanged", "never", "held_out"}
    questions_asked = [x["question"] for x in r["records"]]
    assert all(re.search("[\u4e00-\u9fff]", q) for q in questions_asked)
    lookup, constant = r["strategies"]["lookup"], r["strategies"]["constant"]
    assert lookup["overall"]["accuracy"] > 0.5, lookup["overall"]
    assert lookup["by_class"]["never"]["accuracy"] == 1.0  # "no longer available" counts as a refusal
    assert constant["overall"]["hallucination_rate"] == 1.0
    assert (tmp_path / "report.html").exists()

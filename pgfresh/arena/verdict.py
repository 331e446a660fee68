"""The verdict table: each claim of the debate, this run's measured evidence, what it means here.

Every sentence is built from numbers in the results document; where a number was not measured in
this run (no strategy of that kind, no retrieval information, a phase switched off) the row says
"not measured" and draws no conclusion.

A difference is called only when the statistics say so, otherwise the row says "no measurable
difference": two strategies on the same questions by McNemar's exact test (p < 0.05,
`metrics.compare`); rates over different questions (first vs last third of the run) and latency
percentiles only where their 95% intervals (Wilson; bootstrap) do not overlap. Every rate quoted
carries its interval.
"""

from __future__ import annotations

from pgfresh.arena import metrics

NOT_MEASURED = "not measured"
NO_DIFFERENCE = "no measurable difference"
READER_GAP = 0.3  # retrieval hit@1 this far above answer accuracy: the reader, not retrieval, limits RAG


def _pct(v, ci=None) -> str:
    if v is None:
        return NOT_MEASURED
    return f"{100 * v:.0f}%" + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%]" if ci else "")


def _rate(summary: dict, key: str) -> str:
    """A rate of a scores() summary with its 95% interval: '52% [44-60%]'."""
    return _pct(summary.get(key), (summary.get("ci") or {}).get(key))


def _cmp(c: dict, what: str = "points") -> str:
    """A paired comparison in words: the difference, and whether it is measurable."""
    if not c["n"] or c["diff"] is None:
        return NOT_MEASURED
    stat = f"{100 * c['diff']:+.0f} {what}, McNemar exact p = {c['p_value']:.2g}, n = {c['n']}"
    return f"{NO_DIFFERENCE} ({stat})" if c["better"] is None else stat


def _sec(v) -> str:
    if v is None:
        return NOT_MEASURED
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.1f} s"


def _kind(results: dict, kind: str) -> list[tuple[str, dict]]:
    """Strategies of a kind, best overall accuracy first (a publish-gate-off variant is the
    `publish_gate` row's, never another row's representative of its kind)."""
    rows = [(n, s) for n, s in results["strategies"].items() if s["kind"] == kind and s.get("publish_gate") is not False]
    return sorted(rows, key=lambda x: -(x[1]["overall"]["accuracy"] or 0))


def _acc(s: dict, cls: str):
    return s["by_class"].get(cls, {}).get("accuracy")


def _cls(s: dict, cls: str) -> str:
    return _rate(s["by_class"].get(cls, {}), "accuracy")


def _lat(s: dict) -> str:
    lat = s["latency"]
    ci = lat.get("p50_ci_s")
    return _sec(lat["p50_s"]) + (f" [{_sec(ci[0])}-{_sec(ci[1])}]" if ci and None not in ci else "")


def _thirds(records: list[dict], name: str, batches: int) -> tuple[list, list]:
    third = max(1, batches // 3)
    rs = [r for r in records if r["strategy"] == name]
    return [r for r in rs if r["batch"] < third], [r for r in rs if r["batch"] >= batches - third]


def _row(claim: str, evidence: str | None, meaning: str | None) -> dict:
    return {"claim": claim, "evidence": evidence or NOT_MEASURED, "meaning": meaning or NOT_MEASURED,
            "measured": evidence is not None}


def rag_scaling(results: dict) -> dict:
    claim = "RAG recall and latency degrade with corpus size"
    rags = [(n, s) for n, s in _kind(results, "rag") + _kind(results, "hybrid") if s["retrieval"]["measured"]]
    batches = results["questions"]["batches"]
    if not rags or batches < 2:
        return _row(claim, None, None)
    start = sum(t["live_tuples"] for t in results["dbimpact"]["tables_start"].values())
    end = sum(t["live_tuples"] for t in results["dbimpact"]["tables_end"].values())
    parts, worse = [], []
    for name, _ in rags:
        first, last = _thirds(results["records"], name, batches)
        h = [_hit5([r for r in rs if r["hits"]]) for rs in (first, last)]
        lat = [[r["latency_s"] for r in rs if r["outcome"] != "error"] for rs in (first, last)]
        p50 = [metrics.percentile(x, 50) for x in lat]
        lat_ci = [metrics.bootstrap(x, qs=(50,))[50] for x in lat]
        parts.append(f"{name}: hit@5 {_pct(*h[0])} -> {_pct(*h[1])}, p50 latency {_sec(p50[0])} -> {_sec(p50[1])}")
        # Different questions in the two thirds: only non-overlapping 95% intervals count.
        if metrics.separated(h[0][1], h[1][1]) > 0 or metrics.separated(lat_ci[1], lat_ci[0]) > 0:
            worse.append(name)
    evidence = f"source rows {start} -> {end} over the run; first vs last third of batches: " + "; ".join(parts)
    growth = (end - start) / start if start else None
    meaning = (f"with the corpus growing {_pct(growth)} in this run, "
               + (f"{', '.join(worse)} got measurably worse (hit@5 or p50 latency, 95% intervals apart)"
                  if worse else f"{NO_DIFFERENCE}: no retrieval strategy got measurably worse")
               + "; larger corpora need bench/ runs to test the claim beyond this size")
    return _row(claim, evidence, meaning)


def _hit5(rs: list[dict]) -> tuple:
    """hit@5 over records and its Wilson interval."""
    if not rs:
        return None, None
    k = "5" if "5" in rs[0]["hits"] else max(rs[0]["hits"], key=int)
    found = sum(r["hits"][k] for r in rs)
    return found / len(rs), metrics.wilson(found, len(rs))


def internalised(results: dict) -> dict:
    claim = "Fine-tuning internalises knowledge and answers faster"
    tuned, rag = _kind(results, "tuned"), _kind(results, "rag")
    if not tuned:
        return _row(claim, None, None)
    tn, ts = tuned[0]
    evidence = (f"{tn}: unchanged {_cls(ts, 'unchanged')}, held-out phrasing {_cls(ts, 'held_out')},"
                f" p50 latency {_lat(ts)}")
    if (learnt := ts.get("learnt")) is not None:  # did training reach the changed facts it was asked about?
        evidence += (f"; of the changed facts it answered from a slice, {learnt['learnt']} of"
                     f" {learnt['answered_from_slice']} had been trained on the asked value"
                     f" ({_pct(learnt['coverage'], learnt['coverage_ci'])}): right on"
                     f" {_rate(learnt['on_learnt'], 'accuracy')} of those, {_rate(learnt['on_not_learnt'], 'accuracy')}"
                     f" of the rest")
    if not rag:
        return _row(claim, evidence, None)
    rn, rs = rag[0]
    tl, rl = ts["latency"]["p50_s"], rs["latency"]["p50_s"]
    evidence += (f"; {rn}: unchanged {_cls(rs, 'unchanged')}, held-out {_cls(rs, 'held_out')},"
                 f" p50 latency {_lat(rs)}")
    c = metrics.compare(results["records"], tn, rn, "unchanged")
    side = metrics.separated(ts["latency"].get("p50_ci_s"), rs["latency"].get("p50_ci_s"))
    speed = (f"it answers {rl / tl:.1f}x as fast" + ("" if side else f" ({NO_DIFFERENCE} in p50 latency)")
             if tl and rl else "latency not comparable")
    meaning = f"on facts that did not change, {tn} against {rn}: {_cmp(c)}; {speed}"
    return _row(claim, evidence, meaning)


def training_cost(results: dict) -> dict:
    claim = "Training cost is prohibitive"
    tuned, rag = _kind(results, "tuned"), _kind(results, "rag")
    if not tuned:
        return _row(claim, None, None)
    parts = []
    for name, s in tuned + rag:
        c = s["cost"]
        parts.append(f"{name}: build {c['prepare_cpu_s']:.1f} CPU-s, updates {_num(c['cpu_s_per_1k_changes'])}"
                     f" CPU-s per 1,000 changes" + (f", {c['gpu_s']:.1f} GPU-s" if c.get("gpu_s") else ""))
    shared = results["ingest"].get("cpu_s_per_1k_changes")
    evidence = "; ".join(parts) + f"; shared capture + workers {_num(shared)} CPU-s per 1,000 changes"
    t = tuned[0][1]["cost"]["cpu_s_per_1k_changes"]
    r = rag[0][1]["cost"]["cpu_s_per_1k_changes"] if rag else None
    rate = results["workload"].get("rate_per_s")
    meaning = None
    if t is not None and rate:
        per_hour = t / 1000 * rate * 3600
        # RAG's own updates cost ~nothing: its index is kept by the shared pipeline, so that is
        # what training is set against (the pipeline also renders the facts training reads)
        base = (r or 0) + (shared or 0)
        meaning = (f"at this workload's {rate:.1f} changes/s, keeping {tuned[0][0]} current costs {per_hour:.0f} CPU-s"
                   f" per hour ({per_hour / 3600:.2f} cores)"
                   + (f", {t / base:.1f}x what keeps {rag[0][0]} current (its own updates plus the shared"
                      " capture, gate and index)" if rag and base > 0 else ""))
    return _row(claim, evidence, meaning)


def _num(v) -> str:
    return NOT_MEASURED if v is None else f"{v:.2f}"


def pollution(results: dict) -> dict:
    claim = "Live data pollutes training"
    rows = [(n, s) for n, s in results["strategies"].items() if s["by_class"].get("noisy", {}).get("n")]
    if not rows:
        return _row(claim, None, None)
    parts = [f"{n}{_gate(s)}: noisy-row accuracy {_cls(s, 'noisy')}, answered the wrong value"
             f" {_rate(s['overall'], 'polluted_rate')}" for n, s in rows]
    evidence = (f"{results['workload']['noise_changes']} of {results['workload']['changes']} changes were noise; "
                + "; ".join(parts))
    worst = max(rows, key=lambda x: x[1]["overall"]["polluted_rate"] or 0)
    meaning = (f"most polluted: {worst[0]} ({_rate(worst[1]['overall'], 'polluted_rate')} of questions on"
               " rows that carried a wrong value)")
    pairs = _gate_pairs(results)
    if pairs:
        meaning += "; gate off vs on, polluted answers: " + ", ".join(
            f"{k}: {_cmp(metrics.compare(results['records'], off, on, outcome='polluted'))}" for k, on, off in pairs)
    return _row(claim, evidence, meaning)


def _gate(s: dict) -> str:
    return "" if s.get("gate") is None else (" (gate on)" if s["gate"] else " (gate off)")


def _gate_pairs(results: dict) -> list[tuple[str, str, str]]:
    out = []
    for kind in ("rag", "tuned", "hybrid"):
        on = [n for n, s in results["strategies"].items() if s["kind"] == kind and s.get("gate") is True]
        off = [n for n, s in results["strategies"].items() if s["kind"] == kind and s.get("gate") is False]
        if on and off:
            out.append((kind, on[0], off[0]))
    return out


def forgetting(results: dict) -> dict:
    claim = "Continual updates cause catastrophic forgetting"
    rows = [(n, s) for n, s in results["strategies"].items() if s["forgetting"]["forgetting"] is not None]
    if not rows:
        return _row(claim, None, None)
    parts = [f"{n}: unchanged facts {_pct(f['start_accuracy'], f.get('start_ci'))} at start (n = {f['n_start']}) -> "
             f"{_pct(f['end_accuracy'], f.get('end_ci'))} at end (n = {f['n_end']}), FUAR {_fuar(s['fuar'])}"
             for n, s in rows for f in [s["forgetting"]]]
    # Start and end are different batches: a loss counts only where the 95% intervals are apart.
    lost = [(n, s) for n, s in rows if s["forgetting"]["measurable"] and s["forgetting"]["forgetting"] > 0]
    if lost:
        worst = max(lost, key=lambda x: x[1]["forgetting"]["forgetting"])
        meaning = (f"measurable loss on the unchanged panel: " + ", ".join(
            f"{n} {100 * s['forgetting']['forgetting']:+.0f} points" for n, s in lost)
            + f" (largest: {worst[0]})")
    else:
        meaning = f"{NO_DIFFERENCE}: no strategy measurably lost accuracy on the unchanged panel (95% intervals overlap)"
    return _row(claim, "; ".join(parts), meaning)


def _fuar(f: dict) -> str:
    if f["value"] is not None:
        return f"{f['value']:.2f}"
    return "undefined (learnt no updated or new fact)" if f["forgotten"] is not None else NOT_MEASURED


def publish_gate(results: dict) -> dict:
    """The tuned strategy beside its publish-gate-off twin, on the same questions: what the gate
    costs on changed facts (rejected rounds leave them stale) and what it buys on the others."""
    claim = "The publish gate keeps forgetting out of the served slices"
    on = [(n, s) for n, s in results["strategies"].items() if s["kind"] == "tuned" and s.get("publish_gate") is True]
    off = [(n, s) for n, s in results["strategies"].items() if s["kind"] == "tuned" and s.get("publish_gate") is False]
    if not on or not off:
        return _row(claim, None, None)
    (gn, gs), (fn, fs) = on[0], off[0]
    rounds = results.get("training") or {}

    def tally(name):
        t = rounds.get(name) or {}
        return f"{t.get('published', 0)} rounds published, {t.get('rejected', 0)} rejected" if t else "rounds not recorded"

    evidence = "; ".join(
        f"{n}{' (gate off)' if s.get('publish_gate') is False else ''}: overall {_rate(s['overall'], 'accuracy')},"
        f" changed {_cls(s, 'changed')}, unchanged {_cls(s, 'unchanged')}, held-out {_cls(s, 'held_out')}; {tally(n)}"
        for n, s in ((gn, gs), (fn, fs)))
    parts = [f"{cls}: {_cmp(metrics.compare(results['records'], gn, fn, cls))}" for cls in ("changed", "unchanged")]
    meaning = (f"{gn} (gate on) against {fn} (gate off), same questions: overall "
               f"{_cmp(metrics.compare(results['records'], gn, fn))}; " + "; ".join(parts))
    return _row(claim, evidence, meaning)


def rag_enough(results: dict) -> dict:
    claim = "Modern RAG is enough"
    rag = _kind(results, "rag")
    others = [(n, s) for n, s in results["strategies"].items() if s["kind"] in ("tuned", "hybrid")]
    if not rag:
        return _row(claim, None, None)
    rn, rs = rag[0]
    evidence = (f"{rn}: overall {_rate(rs['overall'], 'accuracy')}, changed {_cls(rs, 'changed')}, "
                f"time-to-fresh p50 {_fresh(rs)}")
    if not others:
        return _row(claim, evidence, None)
    on, os_ = max(others, key=lambda x: x[1]["overall"]["accuracy"] or 0)
    evidence += (f"; best other, {on}: overall {_rate(os_['overall'], 'accuracy')}, changed"
                 f" {_cls(os_, 'changed')}, time-to-fresh p50 {_fresh(os_)}")
    meaning = f"{on} against {rn} overall: {_cmp(metrics.compare(results['records'], on, rn))}" + _reader_limit(rn, rs)
    return _row(claim, evidence, meaning)


def _fresh(s: dict) -> str:
    """Time-to-fresh p50 with its bootstrap interval; 'never' when most changes never became fresh."""
    t = s["time_to_fresh"]
    if not t["watched"]:
        return NOT_MEASURED
    if t["p50_s"] is None:
        return f"never within the run ({t['resolved']} of {t['watched']} changes became fresh)"
    ci = t.get("p50_ci_s")
    hi = "never" if ci and ci[1] is None else (_sec(ci[1]) if ci else None)
    return _sec(t["p50_s"]) + (f" [{_sec(ci[0])}-{hi}]" if ci else "")


def _reader_limit(name: str, s: dict) -> str:
    """A caveat when retrieval found the rows but the reader did not answer from them."""
    hit1, acc = (s["retrieval"].get("hit_at_k") or {}).get("1"), s["overall"]["accuracy"]
    if hit1 is None or acc is None or hit1 - acc <= READER_GAP:
        return ""
    return (f"; but retrieval put the right row first for {_pct(hit1)} of questions and {name} answered"
            f" {_pct(acc)}: the reader model, not retrieval, limits RAG here (a real instruct model as"
            " [rag.reader] / train.base_model would test the claim)")


def bloat(results: dict) -> dict:
    claim = "Long training reads bloat PostgreSQL"
    imp = results["dbimpact"]
    export, sampler, oltp = imp.get("export"), imp.get("sampler") or {}, imp.get("oltp") or {}
    parts = []
    if export:
        n, c = export["naive"], export["chunked"]
        parts.append(f"export of {export['table']}: one long transaction left {n['dead_tuples_after_vacuum']} dead"
                     f" tuples after VACUUM (held xmin age {n['reader_xmin_age_at_vacuum']}, table"
                     f" {n['table_growth_bytes']:+d} bytes); short chunks left {c['dead_tuples_after_vacuum']}"
                     f" (xmin age {c['reader_xmin_age_at_vacuum']}, {c['table_growth_bytes']:+d} bytes)")
    if sampler.get("max_xmin_age") is not None:
        parts.append(f"pgfresh backends: oldest xmin age {sampler['max_xmin_age']}, longest transaction"
                     f" {_sec(sampler['max_xact_s'])}")
    without, with_ = (oltp.get("without_pgfresh") or {}).get("tps"), (oltp.get("with_pgfresh") or {}).get("tps")
    if without and with_:
        parts.append(f"OLTP {without:.0f} tps without pgfresh, {with_:.0f} tps with it")
    if not parts:
        return _row(claim, None, None)
    meaning = None
    if export:
        n, c = export["naive"]["dead_tuples_after_vacuum"], export["chunked"]["dead_tuples_after_vacuum"]
        meaning = (f"the long-transaction export kept {n - c} more dead tuples that VACUUM could not remove"
                   if n > c else "the long transaction did not keep more dead tuples in this run")
        if without and with_:
            meaning += f"; OLTP throughput with pgfresh running was {with_ / without:.0%} of without"
    return _row(claim, "; ".join(parts), meaning)


def placement(results: dict) -> dict:
    """Per fact template: how often one fact changes vs how soon the slices caught up with a change
    (time-to-fresh p50; when most changes never became fresh within the run, no fact that changed
    can be trained in fast enough: train only the facts that did not change)."""
    claim = "What to train on and what to retrieve (this workload)"
    tuned, rag = _kind(results, "tuned"), _kind(results, "rag")
    facts = results["workload"].get("facts") or {}
    if not facts:
        return _row(claim, None, None)
    fresh = tuned[0][1]["time_to_fresh"] if tuned else None
    tt = fresh["p50_s"] if fresh and fresh["watched"] else None
    parts, advice = [], []
    for table, f in facts.items():
        for tpl, per_hour in f["changes_per_fact_per_hour"].items():
            between = 3600 / per_hour if per_hour else None
            parts.append(f"{table}.{tpl}: a fact changes every {_sec(between) if between else 'never (in this run)'}")
            slow = between is None or (tt is not None and between > 2 * tt)
            advice.append(f"{tpl}: {'train' if slow else 'retrieve'}")
    evidence = "; ".join(parts + [f"time-to-fresh p50 {n} {_fresh(st)}" for n, st in tuned[:1] + rag[:1]])
    if not fresh or not fresh["watched"]:
        return _row(claim, evidence, None)
    rule = ("train facts that change less often than twice the tuned time-to-fresh, retrieve the rest" if tt is not None
            else f"{tuned[0][0]} did not make most changes fresh within the run: train only facts that did not change,"
                 " retrieve the rest")
    return _row(claim, evidence, rule + ": " + ", ".join(advice))


def router_parts(results: dict) -> dict:
    """The router (`hybrid` kind) per class against its two parts on the same questions."""
    claim = "The router is no worse than the better of its two parts on any class"
    hybrid, tuned, rag = _kind(results, "hybrid"), _kind(results, "tuned"), _kind(results, "rag")
    if not hybrid or not tuned or not rag:
        return _row(claim, None, None)
    table = router_table(results)
    hn = hybrid[0][0]
    evidence = "; ".join(
        f"{c['cls']}: {hn} {_pct(c['router'], c['router_ci'])}, {c['tuned_name']} {_pct(c['tuned'], c['tuned_ci'])},"
        f" {c['rag_name']} {_pct(c['rag'], c['rag_ci'])} (n = {c['n']})" for c in table)
    worse = [c for c in table if c["worse"]]
    meaning = (f"{hn} is measurably worse than the better part on: " + ", ".join(
        f"{c['cls']} ({_cmp(c['against_best'])} against {c['best']})" for c in worse) if worse
        else f"on every class {hn} is not measurably worse than the better of {tuned[0][0]} and {rag[0][0]}"
             " (McNemar exact, p < 0.05)") if table else None
    return _row(claim, evidence, meaning)


def router_table(results: dict) -> list[dict]:
    """Per class: the router's, the tuned and the best RAG strategy's accuracy on the same
    questions, and the paired comparison of the router with the better of the two."""
    hybrid, tuned, rag = _kind(results, "hybrid"), _kind(results, "tuned"), _kind(results, "rag")
    if not hybrid or not tuned or not rag:
        return []
    hn, tn, rn = hybrid[0][0], tuned[0][0], rag[0][0]
    out = []
    classes = sorted({r["cls"] for r in results["records"] if r["strategy"] == hn})
    for cls in classes:
        vs_t = metrics.compare(results["records"], hn, tn, cls)
        vs_r = metrics.compare(results["records"], hn, rn, cls)
        if not vs_t["n"] or not vs_r["n"]:
            continue
        best, against = (tn, vs_t) if (vs_t["b_rate"] or 0) >= (vs_r["b_rate"] or 0) else (rn, vs_r)
        out.append({"cls": cls, "n": vs_t["n"], "router": vs_t["a_rate"], "router_ci": vs_t["a_ci"],
                    "tuned_name": tn, "tuned": vs_t["b_rate"], "tuned_ci": vs_t["b_ci"],
                    "rag_name": rn, "rag": vs_r["b_rate"], "rag_ci": vs_r["b_ci"], "best": best,
                    "against_best": against, "worse": against["better"] == best})
    return out


def verdict(results: dict) -> list[dict]:
    return [rag_scaling(results), internalised(results), training_cost(results), pollution(results),
            forgetting(results), publish_gate(results), rag_enough(results), router_parts(results), bloat(results), placement(results)]

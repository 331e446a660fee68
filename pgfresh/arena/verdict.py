"""The verdict table: each claim of the debate, this run's measured evidence, what it means here.

Every sentence is built from numbers in the results document; where a number was not measured in
this run (no strategy of that kind, no retrieval information, a phase switched off) the row says
"not measured" and draws no conclusion. Thresholds that turn numbers into words are named below.
"""

from __future__ import annotations

NOT_MEASURED = "not measured"
DROP_POINTS = 0.05  # a change of accuracy / hit rate smaller than 5 points reads as "about the same"
SLOWER = 1.2  # a latency ratio above 1.2 reads as "slower"
READER_GAP = 0.3  # retrieval hit@1 this far above answer accuracy: the reader, not retrieval, limits RAG


def _pct(v) -> str:
    return NOT_MEASURED if v is None else f"{100 * v:.0f}%"


def _sec(v) -> str:
    if v is None:
        return NOT_MEASURED
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.1f} s"


def _kind(results: dict, kind: str) -> list[tuple[str, dict]]:
    """Strategies of a kind, best overall accuracy first."""
    rows = [(n, s) for n, s in results["strategies"].items() if s["kind"] == kind]
    return sorted(rows, key=lambda x: -(x[1]["overall"]["accuracy"] or 0))


def _acc(s: dict, cls: str):
    return s["by_class"].get(cls, {}).get("accuracy")


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
        lat = [_median([r["latency_s"] for r in rs]) for rs in (first, last)]
        parts.append(f"{name}: hit@5 {_pct(h[0])} -> {_pct(h[1])}, p50 latency {_sec(lat[0])} -> {_sec(lat[1])}")
        if (h[0] is not None and h[1] is not None and h[0] - h[1] > DROP_POINTS) or \
                (lat[0] and lat[1] and lat[1] / lat[0] > SLOWER):
            worse.append(name)
    evidence = f"source rows {start} -> {end} over the run; first vs last third of batches: " + "; ".join(parts)
    growth = (end - start) / start if start else None
    meaning = (f"with the corpus growing {_pct(growth)} in this run, "
               + (f"{', '.join(worse)} got worse (more than {DROP_POINTS * 100:.0f} points or {SLOWER}x latency)"
                  if worse else "no retrieval strategy got measurably worse")
               + "; larger corpora need bench/ runs to test the claim beyond this size")
    return _row(claim, evidence, meaning)


def _hit5(rs: list[dict]):
    if not rs:
        return None
    k = "5" if "5" in rs[0]["hits"] else max(rs[0]["hits"], key=int)
    return sum(r["hits"][k] for r in rs) / len(rs)


def _median(xs: list[float]):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2] if xs else None


def internalised(results: dict) -> dict:
    claim = "Fine-tuning internalises knowledge and answers faster"
    tuned, rag = _kind(results, "tuned"), _kind(results, "rag")
    if not tuned or not rag:
        return _row(claim, None, None)
    (tn, ts), (rn, rs) = tuned[0], rag[0]
    tl, rl = ts["latency"]["p50_s"], rs["latency"]["p50_s"]
    evidence = (f"{tn}: unchanged {_pct(_acc(ts, 'unchanged'))}, held-out phrasing {_pct(_acc(ts, 'held_out'))},"
                f" p50 latency {_sec(tl)}; {rn}: unchanged {_pct(_acc(rs, 'unchanged'))}, held-out"
                f" {_pct(_acc(rs, 'held_out'))}, p50 latency {_sec(rl)}")
    faster = None if not tl or not rl else rl / tl
    diff = None if _acc(ts, "unchanged") is None or _acc(rs, "unchanged") is None else \
        _acc(ts, "unchanged") - _acc(rs, "unchanged")
    meaning = (f"on facts that did not change, {tn} is {_points(diff)} against {rn}; "
               + (f"it answers {faster:.1f}x as fast" if faster else "latency not comparable"))
    return _row(claim, evidence, meaning)


def _points(diff) -> str:
    if diff is None:
        return NOT_MEASURED
    if abs(diff) < DROP_POINTS:
        return f"about the same ({100 * diff:+.0f} points)"
    return f"{100 * diff:+.0f} points"


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
    parts = [f"{n}{_gate(s)}: noisy-row accuracy {_pct(_acc(s, 'noisy'))}, answered the wrong value"
             f" {_pct(s['overall']['polluted_rate'])}" for n, s in rows]
    evidence = (f"{results['workload']['noise_changes']} of {results['workload']['changes']} changes were noise; "
                + "; ".join(parts))
    worst = max(rows, key=lambda x: x[1]["overall"]["polluted_rate"] or 0)
    meaning = f"most polluted: {worst[0]} ({_pct(worst[1]['overall']['polluted_rate'])} of questions on noisy rows)"
    pairs = _gate_pairs(results)
    if pairs:
        meaning += "; the gate changes pollution by " + ", ".join(
            f"{k}: {_points((off['overall']['polluted_rate'] or 0) - (on['overall']['polluted_rate'] or 0))} less"
            for k, on, off in pairs)
    return _row(claim, evidence, meaning)


def _gate(s: dict) -> str:
    return "" if s.get("gate") is None else (" (gate on)" if s["gate"] else " (gate off)")


def _gate_pairs(results: dict) -> list[tuple[str, dict, dict]]:
    out = []
    for kind in ("rag", "tuned", "hybrid"):
        on = [s for s in results["strategies"].values() if s["kind"] == kind and s.get("gate") is True]
        off = [s for s in results["strategies"].values() if s["kind"] == kind and s.get("gate") is False]
        if on and off:
            out.append((kind, on[0], off[0]))
    return out


def forgetting(results: dict) -> dict:
    claim = "Continual updates cause catastrophic forgetting"
    rows = [(n, s) for n, s in results["strategies"].items() if s["forgetting"]["forgetting"] is not None]
    if not rows:
        return _row(claim, None, None)
    parts = [f"{n}: unchanged facts {_pct(s['forgetting']['start_accuracy'])} at start -> "
             f"{_pct(s['forgetting']['end_accuracy'])} at end, FUAR {_fuar(s['fuar'])}" for n, s in rows]
    worst = max(rows, key=lambda x: x[1]["forgetting"]["forgetting"])
    f = worst[1]["forgetting"]["forgetting"]
    meaning = (f"largest loss: {worst[0]}, {_points(f)} on the unchanged panel" if f >= DROP_POINTS
               else f"no strategy lost more than {DROP_POINTS * 100:.0f} points on the unchanged panel")
    return _row(claim, "; ".join(parts), meaning)


def _fuar(f: dict) -> str:
    if f["value"] is not None:
        return f"{f['value']:.2f}"
    return "undefined (learnt no updated or new fact)" if f["forgotten"] is not None else NOT_MEASURED


def rag_enough(results: dict) -> dict:
    claim = "Modern RAG is enough"
    rag = _kind(results, "rag")
    others = [(n, s) for n, s in results["strategies"].items() if s["kind"] in ("tuned", "hybrid")]
    if not rag:
        return _row(claim, None, None)
    rn, rs = rag[0]
    evidence = (f"{rn}: overall {_pct(rs['overall']['accuracy'])}, changed {_pct(_acc(rs, 'changed'))}, "
                f"time-to-fresh p50 {_sec(rs['time_to_fresh']['p50_s'])}")
    if not others:
        return _row(claim, evidence, None)
    on, os_ = max(others, key=lambda x: x[1]["overall"]["accuracy"] or 0)
    evidence += (f"; best other, {on}: overall {_pct(os_['overall']['accuracy'])}, changed"
                 f" {_pct(_acc(os_, 'changed'))}, time-to-fresh p50 {_sec(os_['time_to_fresh']['p50_s'])}")
    diff = None if os_["overall"]["accuracy"] is None or rs["overall"]["accuracy"] is None else \
        os_["overall"]["accuracy"] - rs["overall"]["accuracy"]
    meaning = f"{on} is {_points(diff)} against {rn} overall" + _reader_limit(rn, rs)
    return _row(claim, evidence, meaning)


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
    """Per fact template: how often one fact changes vs how soon each way of knowing caught up."""
    claim = "What to train on and what to retrieve (this workload)"
    tuned, rag = _kind(results, "tuned"), _kind(results, "rag")
    facts = results["workload"].get("facts") or {}
    if not facts:
        return _row(claim, None, None)
    tt = tuned[0][1]["time_to_fresh"]["p50_s"] if tuned else None
    rt = rag[0][1]["time_to_fresh"]["p50_s"] if rag else None
    parts, advice = [], []
    for table, f in facts.items():
        for tpl, per_hour in f["changes_per_fact_per_hour"].items():
            between = 3600 / per_hour if per_hour else None
            parts.append(f"{table}.{tpl}: a fact changes every {_sec(between) if between else 'never (in this run)'}")
            if tt is not None:
                advice.append(f"{tpl}: {'train' if between is None or between > 2 * tt else 'retrieve'}")
    evidence = "; ".join(parts) + f"; time-to-fresh p50 tuned {_sec(tt)}, rag {_sec(rt)}"
    meaning = ("train facts that change less often than twice the tuned time-to-fresh, retrieve the rest: "
               + ", ".join(advice)) if advice else None
    return _row(claim, evidence, meaning)


def verdict(results: dict) -> list[dict]:
    return [rag_scaling(results), internalised(results), training_cost(results), pollution(results),
            forgetting(results), rag_enough(results), bloat(results), placement(results)]

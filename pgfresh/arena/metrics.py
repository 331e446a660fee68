"""Scoring answers and summarising a run: every number the report shows is computed here.

Matching (`outcome`): answers and truths are normalised (NFKC, so full-width digits and
punctuation are half-width; case, whitespace, surrounding punctuation, currency signs and
words, 元 included; numbers compared as numbers, so "12.5" == "12.50" == "$12.50" == "１２.５元").
An answer is right when it equals the truth after normalisation, when it ends with the truth
("The price is $12.50"), or, for a numeric truth, when the only number it contains is the truth.
For a row that is gone the right answer says so ("no longer available", "does not exist", "已下架",
"不存在"); for a row that never existed any refusal is right ("I don't know", "不知道" too).

Outcomes: correct | stale (an earlier value of the fact) | polluted (a wrong value the noise put
in the row) | refused | hallucinated (a value for a row that never existed) | wrong | error.

Percentiles are nearest-rank over the samples. Time-to-fresh counts a change that was asked
about but never answered right as infinitely late, so a p50 of `None` means more than half of the
changes never became fresh during the run (the counts say how many).

Uncertainty: every rate carries a 95% Wilson score interval (`ci`), every latency and
time-to-fresh percentile a 95% percentile-bootstrap interval (`BOOT_RESAMPLES` resamples, seeded,
so the same records give the same interval). Two strategies are compared on the questions both
answered with McNemar's exact test on the discordant pairs (`compare`); rates over different
questions (first vs last third of a run) differ only where their Wilson intervals do not overlap.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation

from pgfresh.stats import Z95, wilson  # noqa: F401  (metrics.wilson: the arena's name for it)

# Digits next to Chinese characters are numbers too ("售价12.50元"): only ASCII letters, digits
# and a decimal point glue a number into a word.
_NUMBER = re.compile(r"(?<![A-Za-z0-9_.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![A-Za-z0-9_])")
_CURRENCY = re.compile(r"[$€£¥]|\b(?:usd|eur|gbp|rmb|cny|dollars?|euros?)\b|人民币|元")
_EDGE = re.compile(r"^[\s\"'`.,;:!?()\[\]。、「」『』《》“”‘’]+|[\s\"'`.,;:!?()\[\]。、「」『』《》“”‘’]+$")
_GONE = re.compile(r"no longer (?:available|exists?|sold|offered|listed|in (?:the )?catalog(?:ue)?)|not available"
                   r"|(?:does not|doesn't|did not|didn't) exist|no such|not found|discontinued|was (?:deleted|removed)"
                   r"|(?:is|has been) (?:deleted|removed)|unavailable"
                   r"|下架|停售|停产|不再(?:销售|出售|供应|提供|有)|已(?:被)?(?:删除|移除)|不存在|没有这(?:个|款|种)|查无此")
_UNKNOWN = re.compile(r"\b(?:i (?:do not|don't) know|unknown|not sure|no information|cannot (?:find|answer)"
                      r"|can't (?:find|answer)|no (?:record|data)|not in (?:the|my) (?:data|records|context))\b")
# Chinese has no spaces, so no word boundaries around these.
_UNKNOWN_ZH = re.compile(r"不知道|不清楚|不确定|没有(?:相关)?(?:信息|记录|数据|资料)|无法(?:回答|找到|确定)|未知|暂无(?:信息|数据)"
                         r"|找不到")
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
BUCKETS = [(0, 10), (10, 30), (30, 60), (60, 120), (120, 300), (300, math.inf)]
ALPHA = 0.05  # a comparison calls a difference when its two-sided p-value is below this
BOOT_RESAMPLES = 1000
BOOT_SEED = 20251201


def _canon_number(text: str) -> str:
    try:
        d = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return text
    return format(d.normalize(), "f")


def _fold(text: str | None) -> str:
    """NFKC (full-width digits, letters and punctuation become half-width: "１２．５０" -> "12.50"), lower case."""
    return unicodedata.normalize("NFKC", text or "").lower()


def normalise(text: str) -> str:
    """Half-width, lower case, no currency signs, single spaces, no edge punctuation, numbers canonical."""
    t = _CURRENCY.sub(" ", _fold(text))
    t = _NUMBER.sub(lambda m: _canon_number(m.group(0)), t)
    t = " ".join(t.split())
    return _EDGE.sub("", t)


def numbers(text: str) -> list[str]:
    return [_canon_number(m.group(0)) for m in _NUMBER.finditer(_CURRENCY.sub(" ", _fold(text)))]


def says_gone(text: str) -> bool:
    return bool(_GONE.search(_fold(text)))


def says_unknown(text: str) -> bool:
    t = _fold(text)
    return bool(_UNKNOWN.search(t) or _UNKNOWN_ZH.search(t)) or normalise(text) in ("", "none", "n/a", "?")


def matches(answer: str, value: str) -> bool:
    """Exact match after normalisation (see the module docstring for the two relaxations)."""
    a, v = normalise(answer), normalise(value)
    if not v:
        return not a
    if a == v or a.endswith(" " + v):
        return True
    if _CJK.match(v) and a.endswith(v):
        return True  # Chinese has no space before the value ("它属于厨房")
    truth_numbers = numbers(value)
    if len(truth_numbers) == 1 and normalise(value) == truth_numbers[0]:
        return set(numbers(answer)) == {truth_numbers[0]}
    return False


def outcome(probe, text: str) -> str:
    """Score one answer against the probe's truth; see the module docstring for the outcomes."""
    if probe.truth_kind == "never":
        return "correct" if says_gone(text) or says_unknown(text) else "hallucinated"
    if probe.truth_kind == "gone":
        if says_gone(text):
            return "correct"
        if any(matches(text, v) for v in probe.old_values):
            return "stale"
        return "refused" if says_unknown(text) else "wrong"
    if matches(text, probe.truth):
        return "correct"
    if any(matches(text, v) for v in probe.noisy_values):
        return "polluted"
    if any(matches(text, v) for v in probe.old_values):
        return "stale"
    return "refused" if says_unknown(text) or says_gone(text) else "wrong"


def hits(probe, retrieved: list[tuple[str, str]], ks=(1, 3, 5, 10)) -> dict | None:
    """Whether the question's row is in the first k retrieved keys, for each k (None: not applicable)."""
    if probe.truth_kind != "value" or not retrieved:
        return None
    import json

    want = (probe.table, tuple(str(v) for v in probe.key))
    got = []
    for tbl, key in retrieved:
        try:
            values = json.loads(key) if isinstance(key, str) else key
        except ValueError:
            values = [key]
        got.append((tbl, tuple(str(v) for v in values)))
    return {str(k): want in got[:k] for k in ks}


def percentile(samples: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no samples or when the rank falls on an infinite sample."""
    if not samples:
        return None
    s = sorted(samples)
    v = s[max(0, math.ceil(q / 100 * len(s)) - 1)]
    return None if math.isinf(v) else v


def _rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


# -- intervals and tests -----------------------------------------------------------------------
def _boot_value(v: float | None):
    return None if v is None or math.isinf(v) else v


def bootstrap(samples: list[float], qs=(50, 99), resamples: int = BOOT_RESAMPLES,
              seed: int = BOOT_SEED) -> dict[int, list | None]:
    """95% percentile-bootstrap intervals of nearest-rank percentiles, per q: [lo, hi] or None.

    Infinite samples (a change never fresh) stay infinite in resamples; a bound that falls on
    one is None (unbounded). Deterministic for a given seed.
    """
    if not samples:
        return {q: None for q in qs}
    rng = random.Random(seed)
    s = list(samples)
    n = len(s)
    stats = {q: [] for q in qs}
    for _ in range(resamples):
        r = sorted(rng.choices(s, k=n))
        for q in qs:
            stats[q].append(r[max(0, math.ceil(q / 100 * n) - 1)])
    out = {}
    for q in qs:
        v = sorted(stats[q])
        lo, hi = v[int(0.025 * (resamples - 1))], v[math.ceil(0.975 * (resamples - 1))]
        out[q] = [_boot_value(lo), _boot_value(hi)] if not math.isinf(lo) else None
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs b (only A right), c (only B right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def overlap(a: list | None, b: list | None) -> bool:
    """Whether two intervals overlap (a missing interval overlaps everything: no claim)."""
    if a is None or b is None:
        return True
    lo_a, hi_a = a[0], math.inf if a[1] is None else a[1]
    lo_b, hi_b = b[0], math.inf if b[1] is None else b[1]
    return lo_a <= hi_b and lo_b <= hi_a


def separated(a: list | None, b: list | None) -> int:
    """+1 when interval a lies wholly above b, -1 wholly below, 0 when they overlap."""
    if overlap(a, b):
        return 0
    return 1 if a[0] > b[0] else -1


def compare(records: list[dict], a: str, b: str, cls: str | None = None, outcome: str = "correct") -> dict:
    """Rate of `outcome` of strategies a and b on the questions both answered (class `cls`, or all).

    Paired: McNemar's exact test on the questions where only one of them had the outcome.
    `better` is the strategy with the measurably higher rate at ALPHA (for "correct": the more
    accurate one), or None: no measurable difference.
    """
    def right(name):
        return {r["qid"]: r["outcome"] == outcome for r in records
                if r["strategy"] == name and (cls is None or r["cls"] == cls)}

    ra, rb = right(a), right(b)
    both = sorted(set(ra) & set(rb))
    n = len(both)
    ka, kb = sum(ra[q] for q in both), sum(rb[q] for q in both)
    only_a = sum(ra[q] and not rb[q] for q in both)
    only_b = sum(rb[q] and not ra[q] for q in both)
    p = mcnemar_exact(only_a, only_b)
    better = None if n == 0 or p >= ALPHA else (a if only_a > only_b else b)
    return {"a": a, "b": b, "cls": cls, "outcome": outcome, "n": n, "test": "mcnemar-exact",
            "a_rate": _rate(ka, n), "b_rate": _rate(kb, n), "a_ci": wilson(ka, n), "b_ci": wilson(kb, n),
            "diff": None if n == 0 else (ka - kb) / n, "only_a": only_a, "only_b": only_b, "p_value": p,
            "better": better}


def scores(records: list[dict]) -> dict:
    """Accuracy and error rates over a list of records (one strategy's answers)."""
    n = len(records)
    count = Counter(r["outcome"] for r in records)
    with_prior = [r for r in records if r["has_prior"]]
    never = [r for r in records if r["truth_kind"] == "never"]
    noisy = [r for r in records if r["noisy_values"]]
    parts = {"accuracy": (count["correct"], n),
             "stale_rate": (sum(r["outcome"] == "stale" for r in with_prior), len(with_prior)),
             "hallucination_rate": (sum(r["outcome"] == "hallucinated" for r in never), len(never)),
             "polluted_rate": (sum(r["outcome"] == "polluted" for r in noisy), len(noisy)),
             "refusal_rate": (count["refused"], n)}
    return {
        "n": n,
        "accuracy": _rate(count["correct"], n),
        "stale_rate": _rate(sum(r["outcome"] == "stale" for r in with_prior), len(with_prior)),
        "hallucination_rate": _rate(sum(r["outcome"] == "hallucinated" for r in never), len(never)),
        "polluted_rate": _rate(sum(r["outcome"] == "polluted" for r in noisy), len(noisy)),
        "refusal_rate": _rate(count["refused"], n),
        "errors": count["error"],
        "outcomes": dict(count),
        "ci": {k: wilson(*v) for k, v in parts.items()},  # 95% Wilson intervals of the rates above
        "counts": {k: list(v) for k, v in parts.items()},  # [part, whole] of each rate
    }


def time_to_fresh(records: list[dict]) -> dict:
    """From each change's commit to the first right answer about it (changed class only)."""
    first: dict[int, float] = {}
    for r in records:
        if r["cls"] != "changed" or r["event_id"] is None:
            continue
        delay = r["answered_t"] - r["event_t"] if r["outcome"] == "correct" else math.inf
        first[r["event_id"]] = min(first.get(r["event_id"], math.inf), delay)
    samples = list(first.values())
    resolved = sorted(s for s in samples if not math.isinf(s))
    ci = bootstrap(samples)
    return {"watched": len(samples), "resolved": len(resolved), "p50_s": percentile(samples, 50),
            "p99_s": percentile(samples, 99), "p50_ci_s": ci[50], "p99_ci_s": ci[99],
            "resolved_ci": wilson(len(resolved), len(samples)), "samples_s": [round(s, 3) for s in resolved]}


def by_staleness(records: list[dict]) -> list[dict]:
    out = []
    before = [r for r in records if r["truth_kind"] != "never" and r["fact_age_s"] is None]
    sb = scores(before)
    out.append({"bucket": "since seeding", "n": len(before), "accuracy": sb["accuracy"], "ci": sb["ci"]["accuracy"]})
    for lo, hi in BUCKETS:
        rs = [r for r in records if r["fact_age_s"] is not None and lo <= r["fact_age_s"] < hi]
        label = f"{lo}-{hi} s" if not math.isinf(hi) else f">= {lo} s"
        sr = scores(rs)
        out.append({"bucket": label, "n": len(rs), "accuracy": sr["accuracy"], "ci": sr["ci"]["accuracy"]})
    return out


def forgetting(records: list[dict], batches: int) -> dict:
    """Accuracy on the unchanged panel in the first vs the last third of the batches.

    `measurable`: the two Wilson intervals do not overlap (different questions: no pairing).
    """
    unchanged = [r for r in records if r["cls"] == "unchanged"]
    if batches < 2:
        return {"start_accuracy": None, "end_accuracy": None, "forgetting": None, "n_start": 0, "n_end": 0,
                "start_ci": None, "end_ci": None, "measurable": False}
    third = max(1, batches // 3)
    start = [r for r in unchanged if r["batch"] < third]
    end = [r for r in unchanged if r["batch"] >= batches - third]
    sa, sb = scores(start), scores(end)
    a, b = sa["accuracy"], sb["accuracy"]
    return {"start_accuracy": a, "end_accuracy": b, "forgetting": None if a is None or b is None else a - b,
            "n_start": len(start), "n_end": len(end), "start_ci": sa["ci"]["accuracy"], "end_ci": sb["ci"]["accuracy"],
            "measurable": separated(sa["ci"]["accuracy"], sb["ci"]["accuracy"]) != 0}


def fuar(records: list[dict], forgot: dict) -> dict:
    """Forgotten / (Updated + Acquired), after Jang et al. 2022 (CKL), on accuracy rates.

    F = max(0, unchanged accuracy at start - at end); U = accuracy on updated facts; A = accuracy on
    acquired facts (rows that became facts during the run). Lower is better; None when U + A = 0.
    """
    f = max(0.0, forgot["forgetting"]) if forgot["forgetting"] is not None else None
    u = scores([r for r in records if r["cls"] == "changed" and r["change_kind"] == "updated"])["accuracy"]
    a = scores([r for r in records if r["cls"] == "changed" and r["change_kind"] == "acquired"])["accuracy"]
    denominator = (u or 0.0) + (a or 0.0)
    value = None if f is None or denominator == 0 else f / denominator
    return {"value": value, "forgotten": f, "updated": u, "acquired": a}


def retrieval(records: list[dict]) -> dict:
    value_questions = [r for r in records if r["truth_kind"] == "value"]
    with_hits = [r for r in value_questions if r["hits"] is not None]
    if not with_hits:
        return {"measured": False, "retrieval_rate": None, "hit_at_k": {}, "hit_at_k_ci": {}}
    ks = sorted(with_hits[0]["hits"], key=int)
    found = {k: sum(r["hits"][k] for r in with_hits) for k in ks}
    return {"measured": True, "retrieval_rate": _rate(len(with_hits), len(value_questions)),
            "hit_at_k": {k: _rate(found[k], len(with_hits)) for k in ks},
            "hit_at_k_ci": {k: wilson(found[k], len(with_hits)) for k in ks}}


def summarise_strategy(records: list[dict], batches: int, cost: dict, changes: int) -> dict:
    """Every per-strategy metric of the report, from its records and its measured CPU."""
    lat = [r["latency_s"] for r in records if r["outcome"] != "error"]
    forgot = forgetting(records, batches)
    classes = sorted({r["cls"] for r in records})
    answer_cpu = sum(r["cpu_s"] for r in records)
    lat_ci = bootstrap(lat)
    ingest = cost.get("refresh_cpu_s", 0.0) + cost.get("background_cpu_s", 0.0)
    return {
        "overall": scores(records),
        "by_class": {c: scores([r for r in records if r["cls"] == c]) for c in classes},
        "by_phrasing": {p: scores([r for r in records if r["phrasing"] == p])
                        for p in sorted({r["phrasing"] for r in records})},
        "by_change_kind": {k: scores([r for r in records if r["change_kind"] == k])
                           for k in ("updated", "acquired")},
        "by_staleness": by_staleness(records),
        "over_time": [{"batch": b, "t_s": round(min(r["answered_t"] for r in rs), 3), **scores(rs)}
                      for b in range(batches) if (rs := [r for r in records if r["batch"] == b])],
        "time_to_fresh": time_to_fresh(records),
        "latency": {"p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
                    "p50_ci_s": lat_ci[50], "p99_ci_s": lat_ci[99],
                    "mean_s": sum(lat) / len(lat) if lat else None, "samples_s": [round(x, 5) for x in lat]},
        "cost": {**cost, "answer_cpu_s": answer_cpu,
                 "cpu_s_per_1k_questions": None if not records else answer_cpu / len(records) * 1000,
                 "cpu_s_per_1k_changes": None if not changes else ingest / changes * 1000,
                 "gpu_s": sum(r["gpu_s"] for r in records if r["gpu_s"] is not None) or None},
        "forgetting": forgot,
        "fuar": fuar(records, forgot),
        "retrieval": retrieval(records),
        "learnt": learnt(records),
    }


def learnt(records: list[dict]) -> dict | None:
    """Changed facts answered from a slice: how many the serving version had trained on (coverage)
    and the accuracy on those and on the rest (None: no answer came from a slice)."""
    from_slice = [r for r in records if r["cls"] == "changed" and r.get("learnt") is not None]
    if not from_slice:
        return None
    yes = [r for r in from_slice if r["learnt"]]
    no = [r for r in from_slice if not r["learnt"]]
    return {"answered_from_slice": len(from_slice), "learnt": len(yes),
            "coverage": _rate(len(yes), len(from_slice)), "coverage_ci": wilson(len(yes), len(from_slice)),
            "on_learnt": scores(yes), "on_not_learnt": scores(no)}

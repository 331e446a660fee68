"""The hybrid router's confidence against accuracy: is there a threshold worth setting?

    python bench/router.py results.json          # an arena run's results (with rag-hybrid, tuned, hybrid)
    python bench/router.py --run MINUTES [DIR [RATE]]  # run the demo's shop arena with those three first (DIR:
                                                       # kept, so a second run reuses the model build; default
                                                       # /tmp/pgfresh-router; RATE: changes per second, default 5)

Every hybrid answer records the route it took and its `confidence` (pgfresh.serve.router). The same
questions (same batch, same question id) were also answered by `rag-hybrid` (retrieval) and `tuned`
(the slice), so for each hybrid answer the other route's outcome is known. Prints:

1. by route and confidence bucket: questions, the hybrid's accuracy, and the other route's accuracy
   on the same questions (where the router went wrong, the other column is higher);
2. by `min_slice_confidence` threshold: the hybrid's accuracy had every slice decision under it gone
   to retrieval instead (counterfactual: rag-hybrid's outcome on that question), with 95% intervals.

The arena must run with the threshold off (the default), so the slice decisions under any threshold
are in the records. Accuracy is `outcome == "correct"`; `error` outcomes count as wrong.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pgfresh.stats import wilson

BUCKETS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.01)
THRESHOLDS = (None, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
OTHER = {"slice": "rag-hybrid", "rag": "tuned"}


def pairs(results: dict) -> list[dict]:
    """One row per hybrid answer: its route, confidence, and the outcomes of hybrid, rag-hybrid, tuned."""
    by = {}
    for r in results["records"]:
        by.setdefault((r["batch"], r["qid"]), {})[r["strategy"]] = r
    out = []
    for same in by.values():
        h = same.get("hybrid")
        if h is None or not h.get("route") or "rag-hybrid" not in same or "tuned" not in same:
            continue
        out.append({"route": h["route"]["taken"], "confidence": h["route"]["confidence"], "cls": h["cls"],
                    "hybrid": h["outcome"] == "correct", "rag-hybrid": same["rag-hybrid"]["outcome"] == "correct",
                    "tuned": same["tuned"]["outcome"] == "correct"})
    return out


def _rate(hits: list[bool]) -> str:
    if not hits:
        return "-"
    ci = wilson(sum(hits), len(hits))
    return f"{sum(hits) / len(hits):.0%} [{ci[0]:.0%}-{ci[1]:.0%}]"


def tables(rows: list[dict]) -> str:
    lines = [f"{len(rows)} hybrid answers with both parts answered; routes: "
             + ", ".join(f"{k} {sum(r['route'] == k for r in rows)}" for k in ("slice", "rag")), "",
             f"{'route':6} {'confidence':>11} {'n':>5}  {'hybrid':>16}  {'other route':>16}"]
    for route in ("slice", "rag"):
        for lo, hi in zip(BUCKETS, BUCKETS[1:]):
            sel = [r for r in rows if r["route"] == route and r["confidence"] is not None and lo <= r["confidence"] < hi]
            if sel:
                lines.append(f"{route:6} {lo:>4.1f}-{min(hi, 1.0):<4.1f}  {len(sel):>5}  {_rate([r['hybrid'] for r in sel]):>16}"
                             f"  {_rate([r[OTHER[route]] for r in sel]):>16} ({OTHER[route]})")
    lines += ["", f"{'min_slice_confidence':>20} {'switched':>8}  {'hybrid accuracy':>16}"]
    for t in THRESHOLDS:
        got, switched = [], 0
        for r in rows:
            if t is not None and r["route"] == "slice" and r["confidence"] is not None and r["confidence"] < t:
                got.append(r["rag-hybrid"])
                switched += 1
            else:
                got.append(r["hybrid"])
        label = "off" if t is None else ("every slice decision" if t > 1 else f"{t:.1f}")
        lines.append(f"{label:>20} {switched:>8}  {_rate(got):>16}")
    lines.append(f"{'(retrieval alone)':>20} {'':>8}  {_rate([r['rag-hybrid'] for r in rows]):>16}")
    lines.append(f"{'(slice alone)':>20} {'':>8}  {_rate([r['tuned'] for r in rows]):>16}")
    return "\n".join(lines)


def run(minutes: float, workdir: Path, rate: float | None) -> dict:
    """The demo's shop arena (its size, embedded server and model in `workdir`), three strategies;
    `rate`: workload changes per second (the demo's 5 leaves few facts unchanged for long)."""
    from pgfresh import config as cfg
    from pgfresh.arena import runner

    path = runner.demo_database(workdir)
    overrides = {**runner.DEMO_SIZE, **({"rate_per_s": rate} if rate else {})}
    return runner.run_arena(cfg.load(path), minutes=minutes, noise=0.1, seed=7, json_path=workdir / "results.json",
                            strategies=["rag-hybrid", "tuned", "hybrid"], overrides=overrides)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--run"] and len(argv) >= 2:
        workdir = Path(argv[2] if len(argv) > 2 else "/tmp/pgfresh-router")
        results = run(float(argv[1]), workdir, float(argv[3]) if len(argv) > 3 else None)
        print(f"results: {workdir / 'results.json'}; load average {os.getloadavg()[0]:.1f}")
    elif len(argv) == 1:
        results = json.loads(Path(argv[0]).read_text())
    else:
        sys.exit(__doc__.split("\n\n")[1])
    print(tables(pairs(results)))


if __name__ == "__main__":
    main(sys.argv[1:])

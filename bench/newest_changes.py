"""What a tenant's published slice answers about the newest changes: the question users ask.

    .venv/bin/python bench/newest_changes.py --config DIR/pgfresh.toml [--newest 30]

For every tenant's slice of the project: the `--newest` most recent changed facts (active facts
that replaced an earlier value of the same row and question, by capture time) that had been
captured when the round of the slice's current version started (a round cannot know what
arrived after it planned; `--now`: the newest of all, whatever the round could see), asked in their
held-out phrasing of the slice's current published version, closed-book. Prints, per slice and
pooled, how many of them the lineage has learnt and how many it answers right, with 95% Wilson
intervals. Read-only: it can run beside a live arena (bench/arena_tuned.py) to compare code
versions on the state each reached. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgfresh import config as cfg  # noqa: E402
from pgfresh.stats import wilson  # noqa: E402
from pgfresh.train import data, fit, rounds, settings, slices  # noqa: E402


def pct(k: int, n: int) -> str:
    ci = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{ci[0]:.2f}-{ci[1]:.2f}]" if n else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--newest", type=int, default=30)
    ap.add_argument("--now", action="store_true")
    a = ap.parse_args()
    config = cfg.load(a.config)
    s = settings(config)
    fit.set_threads(1)
    total = [0, 0, 0]
    with slices.connect(config, "bench") as conn:
        for tenant in rounds.tenants(conn):
            version = slices.current(conn, rounds.slice_of(tenant))
            if version is None:
                continue
            facts = data.load_facts(conn, tenant, statuses=("active", "superseded"))
            replaced = {f.superseded_by for f in facts if f.status == "superseded" and f.superseded_by}
            planned = conn.execute("select started_at from pgfresh.train_rounds where id = %s",
                                   (version.round_id,)).fetchone() if version.round_id else None
            cutoff = None if a.now or planned is None else planned[0]
            changed = sorted((f for f in facts if f.status == "active" and f.fact_id in replaced
                              and (cutoff is None or f.created_at <= cutoff)),
                             key=lambda f: (f.created_at, f.fact_id), reverse=True)[:a.newest]
            chain = [v.version for v in slices.lineage(conn, version)]
            learnt = {r[0] for r in conn.execute("select fact_id from pgfresh.fact_training where slice = %s and"
                                                 " version = any(%s) and role = 'learn'", (version.slice, chain))}
            loaded = slices.load_version(config, conn, version)
            right = fit.correct(loaded, [(data.held_out(f, s.max_phrasings), f.answer) for f in changed])
            k_learnt = sum(f.fact_id in learnt for f in changed)
            print(f"slice {version.slice} v{version.version} (round planned {cutoff or 'now'}): newest {len(changed)}"
                  f" changed facts (newest at {changed[0].created_at:%H:%M:%S}): learnt {pct(k_learnt, len(changed))}; right {pct(sum(right), len(changed))}")
            total = [total[0] + len(changed), total[1] + k_learnt, total[2] + sum(right)]
    print(f"pooled: learnt {pct(total[1], total[0])}; right {pct(total[2], total[0])}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

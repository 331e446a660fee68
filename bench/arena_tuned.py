"""The tuned strategy's accuracy on changed facts in a short shop arena (issue 13).

    .venv/bin/python bench/arena_tuned.py [--workdir DIR] [--batches 10] [--rate 6] [--seed 5]

Runs `pgfresh`'s arena on the shop workload (2 shops x 8 products, an embedded server in
--workdir, `stale` and `tuned`, the training gate's settle window 5 s) and prints, per strategy,
the accuracy on changed facts with its 95% Wilson interval, how many of those were answered from
a published slice, and the rounds the tuned side ran (learnt facts, published or not).

The workload commits changes faster than one training thread learns them, so facts wait in a
backlog larger than `max_facts_per_round`: which waiting facts a round takes decides whether the
newest changes, the ones the arena asks about, are ever learnt. Run it with another checkout on
PYTHONPATH to compare code versions. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("PGFRESH_SRC", str(Path(__file__).resolve().parents[1])))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psycopg  # noqa: E402

from pgfresh import config as cfg  # noqa: E402
from pgfresh.arena import runner, workload  # noqa: E402
from pgfresh.embedded import EmbeddedServer  # noqa: E402
from pgfresh.stats import wilson  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path(".pgfresh/bench-arena-tuned"))
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    import pgfresh

    print(f"pgfresh from {Path(pgfresh.__file__).parent}; load {os.getloadavg()[0]:.1f}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    server = EmbeddedServer(a.workdir.resolve() / "pg")
    with psycopg.connect(server.start(), autocommit=True) as c:
        c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = 'bench' and not active")
        c.execute("drop database if exists bench with (force)")
        c.execute("create database bench")
    dsn = server.dsn("bench")
    text = workload.shop_config_text({"dsn": dsn, "max_txn_seconds": 5.0, "slot": "bench"})
    text = text.replace("settle_seconds = 30", "settle_seconds = 5")
    path = a.workdir / "pgfresh.toml"
    path.write_text(f'store = {{ dsn = "{dsn}" }}\n' + text)
    started = time.time()
    try:
        r = runner.run_arena(
            cfg.load(path), minutes=0.3, noise=0.0, seed=a.seed, strategies=["stale", "tuned"],
            json_path=a.workdir / "results.json",
            overrides={"batches": a.batches, "batch_interval_s": 8.0, "rate_per_s": a.rate, "questions_per_batch": 12,
                       "correct_after_s": 3.0, "oltp_seconds": 0.0, "export_seconds": 0.0, "wal_seconds": 0.0,
                       "scale": {"shops": 2, "products_per_shop": 8, "notes_per_shop": 2}})
    finally:
        server.stop("fast")
    print(f"arena: {time.time() - started:.0f} s; load {os.getloadavg()[0]:.1f}")
    for name in ("stale", "tuned"):
        changed = [x for x in r["records"] if x["strategy"] == name and x["cls"] == "changed"]
        k = sum(x["outcome"] == "correct" for x in changed)
        ci = wilson(k, len(changed)) or [0, 0]
        sliced = [x for x in changed if re.fullmatch(r"slice .+ v[1-9]\d*", (x["sources"] or [""])[0])]
        ks = sum(x["outcome"] == "correct" for x in sliced)
        print(f"{name}: changed facts {k}/{len(changed)} = {k / max(1, len(changed)):.2f} [{ci[0]:.2f}-{ci[1]:.2f}];"
              f" from a published slice {ks}/{len(sliced)}")
    for x in r["training"]["tuned"]["rounds"]:
        print(f"  round {x['slice']} {x['status']} learn {x['learn']} new {x['new_accuracy']}"
              f" forgetting {x['forgetting']} ({x['reason']})")


if __name__ == "__main__":
    main()
